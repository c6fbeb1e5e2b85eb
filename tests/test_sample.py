import os

import pytest
import torch

import export
import sample
from conftest import INFERENCE_INSTRUCTION, INFERENCE_STORY
from model import LoRALinear, apply_lora, load_model, lora_state_dict, read_checkpoint, save_checkpoint
from tokenizer import Tokenizer


def run(capsys, *argv):
    sample.main(list(argv))
    return capsys.readouterr().out


def test_greedy_continues_the_prompt_and_stops_at_eos(inference_models, capsys):
    out = run(capsys, f"--checkpoint={inference_models['trained']}", "--start=Once upon a time",
              "--temperature=0", "--max_new_tokens=200")
    model, _ = load_model(inference_models["trained"], merge=True)
    tok = Tokenizer(inference_models["tokenizer"])
    prompt = tok.encode("Once upon a time")
    new = model.generate([prompt], 200, temperature=0.0, stop_tokens=(tok.bos_id, tok.eos_id))[0]
    assert new[-1] == tok.eos_id and len(new) < 200  # it ended the story itself
    assert out == tok.decode(prompt + new[:-1]) + "\n"
    assert out.endswith(INFERENCE_STORY + "\n")


def test_instruct_prints_the_story_only(inference_models, tmp_path, capsys):
    prompt_file = tmp_path / "instruction.txt"
    prompt_file.write_text("\ufeff" + INFERENCE_INSTRUCTION + "\n", encoding="utf-8")  # a BOM, as Notepad writes
    for start in (INFERENCE_INSTRUCTION, f"FILE:{prompt_file}"):
        out = run(capsys, f"--checkpoint={inference_models['trained']}", f"--start={start}", "--instruct=True",
                  "--temperature=0")
        assert out == INFERENCE_STORY + "\n"


def test_samples_follow_the_seed(inference_models, capsys, monkeypatch):
    args = [f"--checkpoint={inference_models['random']}", "--max_new_tokens=30", "--num_samples=3",
            "--temperature=1.0", "--top_k=50", "--top_p=0.95"]
    first = run(capsys, *args, "--seed=1")
    assert run(capsys, *args, "--seed=1") == first
    assert run(capsys, *args, "--seed=2") != first
    samples = first.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 3 and len(set(samples)) == 3
    assert all(s.startswith("Once upon a time") for s in samples)
    # more samples than one batch: the first batch is what a run of that many gives, later batches draw new ones
    two = run(capsys, *args, "--seed=1", "--num_samples=2").rstrip("\n").split("\n---------------\n")
    monkeypatch.setattr(sample, "SAMPLES_PER_BATCH", 2)
    batched = run(capsys, *args, "--seed=1", "--num_samples=5").rstrip("\n").split("\n---------------\n")
    assert batched[:2] == two and len(set(batched)) == 5


def test_lora_checkpoint_samples_like_its_merged_model(inference_models, tmp_path, capsys):
    model, ckpt = load_model(inference_models["trained"])
    apply_lora(model, rank=2, alpha=4.0)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=1.0)  # big enough to change the greedy text
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}
    adapters = dict(ckpt, model=lora_state_dict(model), lora=lora, base_checkpoint=inference_models["trained"])
    save_checkpoint(adapters, str(tmp_path / "lora.pt"))
    merged, _ = load_model(str(tmp_path / "lora.pt"), merge=True)
    save_checkpoint(dict(ckpt, model=merged.state_dict()), str(tmp_path / "merged.pt"))
    args = ["--start=Once upon a time", "--temperature=0", "--max_new_tokens=40"]
    with_lora = run(capsys, f"--checkpoint={tmp_path / 'lora.pt'}", *args)
    assert with_lora == run(capsys, f"--checkpoint={tmp_path / 'merged.pt'}", *args)
    assert with_lora != run(capsys, f"--checkpoint={inference_models['trained']}", *args)


def test_samples_stop_at_the_context_with_a_note(inference_models, capsys):
    model, _ = load_model(inference_models["random"])
    context = model.args.max_seq_len
    sample.main([f"--checkpoint={inference_models['random']}", "--start=Once", "--temperature=0",
                 f"--max_new_tokens={10 * context}"])
    out, err = capsys.readouterr()
    assert f"context is {context} tokens" in err and f"not {10 * context}" in err and out.strip()
    sample.main([f"--checkpoint={inference_models['random']}", "--start=Once", "--max_new_tokens=5"])
    assert "context" not in capsys.readouterr().err


def test_a_hugging_face_folder_samples_like_its_checkpoint(inference_models, tmp_path, capsys):
    folder = str(tmp_path / "hf")
    export.main([folder, f"--checkpoint={inference_models['trained']}", "--hf=True"])
    capsys.readouterr()
    args = ["--start=Once upon a time", "--temperature=0", "--max_new_tokens=40"]
    assert run(capsys, f"--checkpoint={folder}", *args) == run(capsys, f"--checkpoint={inference_models['trained']}",
                                                                 *args)


def test_bfloat16_autocast_samples(inference_models, capsys):
    out = run(capsys, f"--checkpoint={inference_models['trained']}", "--dtype=bfloat16", "--temperature=0",
              "--max_new_tokens=20")
    assert out.startswith("Once upon a time")


def test_tokenizer_comes_from_the_checkpoint_or_the_flag(inference_models, tmp_path, capsys):
    ckpt = read_checkpoint(inference_models["trained"])
    del ckpt["tokenizer"]  # as in llama2.c's checkpoints
    path = str(tmp_path / "no_tok.pt")
    save_checkpoint(ckpt, path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--checkpoint={path}"])
    assert e.value.code == 2 and "records no tokenizer" in capsys.readouterr().err
    out = run(capsys, f"--checkpoint={path}", f"--tokenizer={inference_models['tokenizer']}", "--temperature=0",
              "--max_new_tokens=10")
    assert out.startswith("Once upon a time")
    # a recorded tokenizer that is not there (moved) is named, with the way out
    ckpt["tokenizer"] = {"path": str(tmp_path / "moved.model"), "vocab_size": 512}
    save_checkpoint(ckpt, path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--checkpoint={path}"])
    assert e.value.code == 2 and "moved.model, which is not there" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    ("--tokenizer=SHARED/llama2-tokenizer.model", "has 32000 tokens but the model"),
    ("--start=FILE:/nonexistent/prompt.txt", "no such file"),
    ("--start=FILE:/dev/null", "not a regular file"),
    ("--seed=18446744073709551616", "--seed=18446744073709551616 is out of range"),
    ("--seed=-1", "out of range"),
    ("--start=   |--instruct=True", "the instruction is empty"),
    ("--start=FILE:LATIN1", "is not UTF-8 text"),
    ("--temperature=-1.0", "out of range"),
    ("--top_p=1.5", "out of range"),
    ("--dtype=float8", "--dtype must be one of"),
    ("--device=cuda:7", "not available"),
    ("--start=" + "Once upon a time " * 40, "leaves no room"),
])
def test_bad_settings_are_clear_errors(inference_models, shared_data, tmp_path, capsys, flag, message):
    if flag == "--device=cuda:7" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 story".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        sample.main([f"--checkpoint={inference_models['trained']}",
                     *[f.replace("SHARED", shared_data).replace("LATIN1", str(latin1)) for f in flag.split("|")]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        sample.main([])
    assert "say which checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([f"--checkpoint={os.devnull}x"])
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([f"--checkpoint={tmp_path}"])
    assert f"is a directory; give the checkpoint in it, e.g. {tmp_path}/ckpt.pt" in capsys.readouterr().err
