import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import export
import tinystories
import train
from conftest import ROOT, TINY, dead_pid, pretrain_tiny, train_in_two_processes
from configurator import UserError
from model import Transformer, load_model, read_checkpoint, save_checkpoint
from tokenizer import Tokenizer

CONTRACT = {"model", "model_args", "config", "mode", "iter_num", "best_val_loss", "optimizer", "rng", "data_state",
            "tokenizer", "eos", "lora"}


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest's one_torch_thread)."""


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def sft_seq_len(data_dir):
    """A max_seq_len that holds the longest instruct prompt of the corpus and some story."""
    longest = max(len(e["prompt"]) for e in tinystories.instruct_examples("train", 512, data_dir))
    return (longest // 32 + 2) * 32


@pytest.fixture(scope="module")
def pretrained(story_data, tmp_path_factory):
    return pretrain_tiny(story_data, str(tmp_path_factory.mktemp("pretrain")), max_seq_len=64, max_iters=200,
                         eval_every=100, eval_iters=4)


@pytest.fixture(scope="module")
def sft_model(story_data, pretrained, tmp_path_factory):
    """Full SFT of the pretrained model, with a context long enough for the instruct examples."""
    out = str(tmp_path_factory.mktemp("sft"))
    train.main([f"--data_dir={story_data}", f"--out_dir={out}", "--sft=True",
                f"--init_from={pretrained}/ckpt.pt", f"--max_seq_len={sft_seq_len(story_data)}", "--batch_size=4",
                "--max_iters=40", "--eval_interval=40", "--eval_iters=4", "--log_interval=10",
                "--learning_rate=3e-3", "--warmup_iters=5"])
    return out


def test_pretraining_loss_falls_and_checkpoint_holds_the_contract(pretrained, story_data):
    train_rows, evals = metrics(pretrained)
    assert [r["iter"] for r in evals] == [0, 100, 200]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals  # from ln(512) = 6.2 on
    assert [r["iter"] for r in train_rows] == list(range(0, 200, 20))
    for r in train_rows:
        assert {"iter", "loss", "lr", "tokens_per_s", "ms_per_iter"} <= set(r) and "mfu" not in r
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    ckpt = read_checkpoint(os.path.join(pretrained, "ckpt.pt"))
    assert CONTRACT <= set(ckpt)
    assert ckpt["mode"] == "pretrain" and ckpt["iter_num"] == 200 and ckpt["lora"] is None
    assert ckpt["tokenizer"]["path"] == os.path.abspath(tinystories.tokenizer_path(512, story_data))
    assert ckpt["tokenizer"]["vocab_size"] == 512 and ckpt["eos"] is False
    assert ckpt["config"]["max_iters"] == 200 and ckpt["config"]["dim"] == 32
    assert ckpt["data_state"] == {"next_batch": 200}
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)
    best = read_checkpoint(os.path.join(pretrained, "best.pt"))
    assert best["best_val_loss"] == ckpt["best_val_loss"]
    model, _ = load_model(os.path.join(pretrained, "ckpt.pt"))
    assert model.args.dim == 32 and model.args.vocab_size == 512


@pytest.mark.parametrize("name, params", [("stories260K", 260_032), ("stories15M", 15_191_712),
                                          ("stories42M", 41_689_600), ("stories110M", 109_529_856)])
def test_config_files_build_the_published_shapes(name, params):
    train.configure(vars(train), [os.path.join(ROOT, "config", f"{name}.py")])
    with torch.device("meta"):
        model, _, _ = train.build_model(None, None)
    assert sum(p.numel() for p in model.parameters()) == params  # llama2.c's counts


def test_config_file_trains_with_overrides(story_data, tmp_path):
    out = str(tmp_path / "out")
    train.main([os.path.join(ROOT, "config", "stories260K.py"), f"--data_dir={story_data}", f"--out_dir={out}",
                "--batch_size=2", "--max_iters=2", "--eval_iters=1"])
    ckpt = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["model_args"]["n_kv_heads"] == 4 and ckpt["config"]["dropout"] == 0.05
    assert ckpt["config"]["batch_size"] == 2 and ckpt["iter_num"] == 2


def test_llama2_vocab_source_trains_on_tok0(story_data, shared_data, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tinystories.corpus_dir(story_data), tinystories.corpus_dir(data))
    tinystories.pretokenize(0, os.path.join(shared_data, "llama2-tokenizer.model"), data_dir=data)
    out = str(tmp_path / "out")
    train.main([*TINY, "--vocab_source=llama2", f"--data_dir={data}", f"--out_dir={out}", "--batch_size=2",
                "--max_seq_len=32", "--max_iters=2", "--eval_iters=1"])
    ckpt = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["model_args"]["vocab_size"] == 32000 and ckpt["tokenizer"]["vocab_size"] == 32000
    assert ckpt["config"]["vocab_source"] == "llama2"


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    train.configure(vars(train), ["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10",
                                  "--lr_decay_iters=110", "--max_iters=200"])
    assert train.get_lr(0) == pytest.approx(1 / 11) and train.get_lr(9) == pytest.approx(10 / 11)
    assert train.get_lr(10) == pytest.approx(1.0)
    assert train.get_lr(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert train.get_lr(110) == train.get_lr(190) == pytest.approx(0.1)
    train.configure(vars(train), ["--learning_rate=1.0", "--warmup_iters=0", "--max_iters=200"])
    assert train.get_lr(100) == pytest.approx(0.5) and train.get_lr(200) == 0.0  # decays over max_iters
    train.configure(vars(train), ["--learning_rate=1.0", "--decay_lr=False"])
    assert train.get_lr(0) == train.get_lr(10**6) == 1.0


@pytest.mark.parametrize("mode", ["pretrain", "lora_sft"])
def test_resume_reproduces_the_loss_curve(mode, story_data, sft_model, tmp_path):
    common = [f"--data_dir={story_data}", "--eval_interval=5", "--log_interval=1", "--eval_iters=2",
              "--lr_decay_iters=12", "--warmup_iters=2"]
    if mode == "pretrain":
        common += [*TINY, "--batch_size=4", "--max_seq_len=32", "--dropout=0.1"]
    else:
        common += ["--sft=True", f"--init_from={sft_model}/ckpt.pt", "--lora_rank=4", "--lora_dropout=0.1",
                   "--batch_size=2", "--learning_rate=1e-2"]
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.main(common + [f"--out_dir={whole}", "--max_iters=12"])
    train.main(common + [f"--out_dir={halves}", "--max_iters=6"])
    assert read_checkpoint(os.path.join(halves, "ckpt.pt"))["iter_num"] == 6
    with open(os.path.join(halves, "metrics.jsonl"), "a") as f:  # as a run killed mid-line leaves it
        f.write('{"iter": 7, "lo')
    half_written = os.path.join(halves, f"best.pt.tmp{dead_pid()}")
    open(half_written, "wb").close()
    train.main(["--init_from=resume", f"--out_dir={halves}", "--max_iters=12"])
    assert not os.path.exists(half_written)
    (rows_a, evals_a), (rows_b, evals_b) = metrics(whole), metrics(halves)
    assert [r["iter"] for r in rows_b] == list(range(12))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]  # bit for bit
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
    evals_b = {r["iter"]: r["val_loss"] for r in evals_b}
    assert all(evals_b[r["iter"]] == r["val_loss"] for r in evals_a)
    a, b = (read_checkpoint(os.path.join(d, "ckpt.pt")) for d in (whole, halves))
    assert a["iter_num"] == b["iter_num"] == 12 and a["mode"] == b["mode"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sft_trains_on_story_tokens_only(story_data, sft_model):
    ckpt = read_checkpoint(os.path.join(sft_model, "ckpt.pt"))
    assert ckpt["mode"] == "sft" and ckpt["eos"] is True and ckpt["config"]["sft"] is True
    _, evals = metrics(sft_model)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # the batches train.py draws under --sft=True: prompt labels are -1, story labels are the story
    seq = sft_seq_len(story_data)
    train.configure(vars(train), ["--sft=True", f"--data_dir={story_data}", "--batch_size=4",
                                  f"--max_seq_len={seq}"])
    x, y = next(train.make_batches("train"))
    stories = {tuple(e["prompt"]): e["story"] for e in tinystories.instruct_examples("train", 512, story_data)}
    bos = Tokenizer(tinystories.tokenizer_path(512, story_data)).bos_id
    for row in range(len(x)):
        prompt_len = x[row].tolist().index(bos) + 1  # the prompt ends with BOS; the story has none
        story = stories[tuple(x[row, :prompt_len].tolist())]
        n = min(len(story), x.shape[1] - prompt_len + 1)
        assert (y[row, :prompt_len - 1] == -1).all()
        assert y[row, prompt_len - 1:prompt_len - 1 + n].tolist() == story[:n]
        assert (y[row, prompt_len - 1 + n:] == -1).all()
    # the loss train_step minimises is the cross-entropy of those story tokens alone
    model, _ = load_model(os.path.join(sft_model, "ckpt.pt"))
    logits, loss = model(x, y)
    story_positions = y != -1
    expected = F.cross_entropy(logits[story_positions], y[story_positions])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    everything = torch.cat([x[:, 1:], y[:, -1:]], dim=1)  # what a pretraining loss would count
    assert model(x, everything)[1].item() != pytest.approx(loss.item(), rel=1e-3)


def test_lora_checkpoint_holds_only_adapters_and_base_is_untouched(story_data, sft_model, tmp_path):
    out = str(tmp_path / "lora")
    base_path = os.path.join(sft_model, "ckpt.pt")
    train.main([f"--data_dir={story_data}", f"--out_dir={out}", "--sft=True", f"--init_from={base_path}",
                "--lora_rank=4", "--lora_alpha=8", "--batch_size=2", "--max_iters=10", "--eval_interval=10",
                "--eval_iters=2", "--learning_rate=1e-2", "--warmup_iters=0"])
    path = os.path.join(out, "ckpt.pt")
    ckpt = read_checkpoint(path)
    assert ckpt["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}
    assert ckpt["base_checkpoint"] == os.path.abspath(base_path) and ckpt["mode"] == "sft"
    assert ckpt["model"] and all(".lora_a" in k or ".lora_b" in k for k in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # only adapters were optimised
    assert os.path.getsize(path) < os.path.getsize(base_path) / 4
    model, _ = load_model(path)
    base, _ = load_model(base_path)
    state = model.state_dict()
    for name, weight in base.state_dict().items():
        wrapped = name.replace(".weight", ".base.weight")
        assert torch.equal(state.get(wrapped, state.get(name)), weight), name
    assert all(state[k].abs().sum() > 0 for k in state if k.endswith("lora_b"))  # zero at init: trained
    merged, _ = load_model(path, merge=True)
    x = torch.randint(0, 512, (1, 16))
    assert not torch.allclose(merged(x)[0], base(x)[0])
    # adapters on a base that was trained on since are refused, not silently merged into another model
    changed = read_checkpoint(base_path)
    changed["model"]["norm.weight"] = changed["model"]["norm.weight"] + 0.01
    save_checkpoint(changed, str(tmp_path / "base_trained_on.pt"))
    save_checkpoint(dict(ckpt, base_checkpoint=str(tmp_path / "base_trained_on.pt")), str(tmp_path / "lora.pt"))
    with pytest.raises(UserError, match="has been trained on since"):
        load_model(str(tmp_path / "lora.pt"))


def test_fine_tunes_a_hugging_face_folder_as_it_would_the_checkpoint(story_data, pretrained, tmp_path):
    ckpt_path = os.path.join(pretrained, "ckpt.pt")
    tied, untied = str(tmp_path / "hf"), str(tmp_path / "hf_untied")
    export.main([tied, f"--checkpoint={ckpt_path}", "--hf=True"])
    model, ckpt = load_model(ckpt_path)
    separate = Transformer(dataclasses.replace(model.args, tie_embeddings=False))
    separate.load_state_dict(model.state_dict())  # the same classifier, as a weight of its own
    export.write_hf(untied, separate, Tokenizer(ckpt["tokenizer"]["path"]))
    args = [f"--data_dir={story_data}", "--sft=True", f"--max_seq_len={sft_seq_len(story_data)}", "--batch_size=2",
            "--max_iters=4", "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=0",
            "--learning_rate=1e-2"]
    losses = {}
    for source in (ckpt_path, tied, untied):
        out = str(tmp_path / f"out{len(losses)}")
        train.main(args + [f"--init_from={source}", f"--out_dir={out}"])
        losses[source] = [r["loss"] for r in metrics(out)[0]]
        trained, _ = load_model(os.path.join(out, "ckpt.pt"))
        assert trained.args.tie_embeddings == (source != untied)
    assert losses[tied] == losses[ckpt_path]  # the folder holds the checkpoint's model exactly
    assert losses[untied][0] == pytest.approx(losses[ckpt_path][0], rel=1e-6) and losses[untied] != losses[tied]
    assert not torch.equal(trained.output.weight, trained.tok_embeddings.weight)  # trained apart
    # LoRA adapters on a folder name it as their base and merge onto it
    out = str(tmp_path / "lora")
    lora_args = [a for a in args if not a.startswith(("--max_seq_len", "--sft"))]  # the base's context: no SFT
    train.main(lora_args + [f"--init_from={untied}", f"--out_dir={out}", "--lora_rank=4"])
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["base_checkpoint"] == os.path.abspath(untied)
    merged, _ = load_model(os.path.join(out, "ckpt.pt"), merge=True)
    assert not merged.args.tie_embeddings and torch.equal(merged.output.weight, separate.output.weight)


def test_eval_only_and_always_save_checkpoint(story_data, pretrained, tmp_path, capsys):
    # eval_only prints the val loss and leaves out_dir as it was, a resumed run's metrics too
    before = open(os.path.join(pretrained, "metrics.jsonl")).read()
    for init in (f"--init_from={pretrained}/ckpt.pt", "--init_from=resume"):
        train.main([f"--data_dir={story_data}", f"--out_dir={pretrained}", init, "--eval_only=True",
                    "--eval_iters=2"])
        assert "val loss" in capsys.readouterr().out
    assert open(os.path.join(pretrained, "metrics.jsonl")).read() == before
    out = str(tmp_path / "latest")
    train.main([*TINY, f"--data_dir={story_data}", f"--out_dir={out}", "--batch_size=2", "--max_seq_len=16",
                "--max_iters=3", "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True",
                "--peak_flops=1e12"])
    assert os.listdir(out) and not os.path.exists(os.path.join(out, "best.pt"))
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 3  # saved at the end too
    rows, _ = metrics(out)
    assert all(0 < r["mfu"] < 1 for r in rows)


def test_a_run_that_diverges_stops_and_keeps_its_last_finite_checkpoint(story_data, tmp_path, capsys):
    out = str(tmp_path / "diverge")
    common = [*TINY, f"--data_dir={story_data}", f"--out_dir={out}", "--batch_size=2", "--max_seq_len=16",
              "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=0"]
    train.main([*common, "--max_iters=2"])
    good = read_checkpoint(os.path.join(out, "ckpt.pt"))
    line = one_error_line(capsys, [*common, "--init_from=resume", "--max_iters=40", "--learning_rate=1e6"])
    assert "training diverged" in line and "ckpt.pt keeps the last finite eval" in line
    kept = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert kept["iter_num"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())
    # a new run in the same folder that diverges before its first save says so: the ckpt.pt there is not its own
    line = one_error_line(capsys, [*common, "--max_iters=40", "--learning_rate=1e6", "--eval_interval=20"])
    assert "nothing was saved: start again" in line
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {root!r})
import train
real_save, saves = torch.save, []
def save_then_hang_on_the_second(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        f.write(b"half a checkpoint")
        f.flush()
        open({flag!r}, "w").close()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_hang_on_the_second
train.main({argv!r})
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(story_data, tmp_path):
    out, flag = str(tmp_path / "out"), str(tmp_path / "writing")
    argv = [*TINY, f"--data_dir={story_data}", f"--out_dir={out}", "--batch_size=2", "--max_seq_len=16",
            "--max_iters=6", "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(root=ROOT, flag=flag, argv=argv))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not os.path.exists(flag) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(flag), proc.stderr.read().decode() if proc.poll() is not None else "no second save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [f for f in os.listdir(out) if ".tmp" in f]
    assert leftovers  # killed in the middle of writing ckpt.pt's replacement
    ckpt = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 2
    load_model(os.path.join(out, "ckpt.pt"))
    train.main(["--init_from=resume", f"--out_dir={out}"])
    assert read_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 6
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_ddp_two_processes_stay_in_sync(story_data, tmp_path):
    out = str(tmp_path / "ddp")
    stdout = train_in_two_processes([*TINY, f"--data_dir={story_data}", f"--out_dir={out}", "--batch_size=4",
                                     "--max_seq_len=32", "--gradient_accumulation_steps=2", "--max_iters=8",
                                     "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--dropout=0.1"],
                                    tmp_path)
    assert "(2 x 1 x 4 x 32)" in stdout  # 2 accumulation steps shared by 2 processes
    rows, evals = metrics(out)
    assert [r["iter"] for r in rows] == list(range(8)) and [r["iter"] for r in evals] == [0, 4, 8]
    ckpt = read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 8 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # own dropout stream each


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(story_data, pretrained, tmp_path, capsys, monkeypatch):
    data = [f"--data_dir={story_data}", f"--out_dir={tmp_path / 'out'}"]
    empty = str(tmp_path / "empty")
    assert "pretokenize --vocab_size=512" in one_error_line(capsys, [f"--data_dir={empty}"])
    plain_only = tmp_path / "plain" / "tok512"
    plain_only.mkdir(parents=True)
    (plain_only / "meta.json").write_text(open(os.path.join(story_data, "tok512", "meta.json")).read())
    assert "--instruct=True" in one_error_line(capsys, [f"--data_dir={plain_only.parent}", "--sft=True"])
    assert "nothing to resume" in one_error_line(capsys, [*data, "--init_from=resume"])
    assert "checkpoint not found" in one_error_line(capsys, [*data, "--init_from=nowhere/ckpt.pt"])
    # a checkpoint trained with another vocabulary than the data's
    ckpt = read_checkpoint(os.path.join(pretrained, "ckpt.pt"))
    ckpt["tokenizer"]["sha256"] = "0" * 64
    other = str(tmp_path / "other_vocab.pt")
    save_checkpoint(ckpt, other)
    assert "another vocabulary" in one_error_line(capsys, [*data, f"--init_from={other}"])
    assert "vocab_size=512" in one_error_line(capsys, [*data, f"--init_from={pretrained}/ckpt.pt",
                                                        "--vocab_size=1024"])
    assert "--vocab_size=32000" in one_error_line(capsys, [*data, "--vocab_source=llama2", "--vocab_size=512"])
    assert "tok0: run python tinystories.py pretokenize --vocab_size=0" in one_error_line(
        capsys, [*data, "--vocab_source=llama2"])
    # optimizer and device settings are checked before anything is built
    assert "must not be negative" in one_error_line(capsys, [*data, "--learning_rate=-1"])
    assert "[0, 1)" in one_error_line(capsys, [*data, "--beta2=2"])
    assert "--device must be" in one_error_line(capsys, [*data, "--device=gpu"])
    assert "is a file" in one_error_line(capsys, [f"--data_dir={story_data}", f"--out_dir={other}"])
    # LoRA
    assert "lora_dropout" in one_error_line(capsys, [*data, f"--init_from={pretrained}/ckpt.pt", "--lora_rank=4",
                                                      "--lora_dropout=1.5"])
    assert "lora_rank" in one_error_line(capsys, [*data, f"--init_from={pretrained}/ckpt.pt", "--lora_rank=-1"])
    assert "--lora_rank=8" in one_error_line(capsys, [*data, f"--init_from={pretrained}/ckpt.pt",
                                                       "--lora_alpha=8"])
    assert "--init_from" in one_error_line(capsys, [*data, "--lora_rank=4"])
    # fine-tuning into the folder of its own checkpoint would write over it (and a LoRA run's base)
    for name in ("ckpt.pt", "best.pt"):
        before = open(os.path.join(pretrained, name), "rb").read()
        assert "is the --init_from being read" in one_error_line(
            capsys, [f"--data_dir={story_data}", f"--out_dir={pretrained}", f"--init_from={pretrained}/{name}",
                     "--sft=True", "--lora_rank=4"])
        assert open(os.path.join(pretrained, name), "rb").read() == before
    # a read-only checkpoint in out_dir: refused at the start, not at the first save after the work
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "ckpt.pt").write_bytes(b"kept")
    (locked / "ckpt.pt").chmod(0o444)
    assert "is read-only" in one_error_line(capsys, [f"--data_dir={story_data}", f"--out_dir={locked}"])
    # memory, refused before anything is allocated
    line = one_error_line(capsys, [*data, "--batch_size=1000000", "--max_seq_len=512"])
    assert "GiB" in line and "--batch_size" in line
    # resume keeps the model
    assert "keeps its model" in one_error_line(capsys, ["--init_from=resume", f"--out_dir={pretrained}",
                                                        "--dim=48"])
    # DDP: accumulation steps must split evenly over the processes
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "--gradient_accumulation_steps=2" in one_error_line(capsys, [*data])
