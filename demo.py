"""The whole pipeline on the built-in story corpus, stage by stage, through the toolkit's own scripts.

    make demo                        # sets up .venv (+ matplotlib), then: python demo.py config/demo.py
    python demo.py config/demo.py    # the demo's sizes: minutes on 2 CPU cores
    python demo.py                   # toy sizes, every stage in about a minute (what tests/test_demo.py runs)

Stages: the built-in corpus, a 512-token vocabulary, plain and instruct shards (tinystories.py); pretraining,
instruction SFT and PPO (train.py); .bin exports fp32 and int8 and the tokenizer .bin (export.py, tokenizer.py);
run.c built by `make runomp`; then a plain story from run, and one instruction answered by the SFT and the PPO
model side by side. Each training stage prints the train.py command it stands for. It ends with a summary
(summary.json), the stories (samples.txt) and loss and reward curves (curves.png, when matplotlib is there).

out_dir/stages.json records each stage's settings: running again reuses a finished stage whose settings and
inputs are unchanged, and an interrupted training stage resumes from its ckpt.pt.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import torch

import export
import ppo
import tinystories
import tokenizer
import train
from configurator import UserError, atomic_output, cli, configure, read_json
from model import read_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings: toy sizes here; config/demo.py sets the demo's (and says how long each stage takes)
out_dir = "out-demo"
data_dir = "data/demo"
threads = 0  # torch threads for training; 0: torch's default (one per core)
num_shards = 3  # built-in corpus; shard 0 is the validation split
stories_per_shard = 300
vocab_size = 512
# train.py flags of each training stage; the demo adds the data, out_dir and init_from flags itself
pretrain_args = ("--max_iters=40 --batch_size=8 --max_seq_len=256 --learning_rate=2e-3 --warmup_iters=5 "
                 "--eval_interval=20 --eval_iters=2 --log_interval=10")
sft_args = "--max_iters=10 --batch_size=4 --learning_rate=1e-3 --warmup_iters=2 --eval_interval=5 --eval_iters=2 " \
           "--log_interval=5"
ppo_args = "--max_iters=2 --rollouts=8 --batch_size=4 --max_new_tokens=32 --ppo_epochs=1 --eval_interval=2 " \
           "--eval_iters=1 --reward=words+length --target_len=150"
train_args = ""  # added to every training stage, e.g. "--device=cuda --dtype=bfloat16 --compile=True"
# generation with run
prompt = "Once upon a time"
instruction = ""  # empty: the instruction of the first held-out example
temperature = 0.8
run_steps = 0  # -n of run; 0: the model's context
speed_runs = 3  # runs of each .bin for tok/s (the median is reported)
run_threads = 1  # OMP_NUM_THREADS of run: a 260K model is too small for a second thread to pay
seed = 42
# -----------------------------------------------------------------------------

STAGES = ("corpus", "vocab", "pretokenize", "pretrain", "sft", "ppo", "export", "build")
DEMO_FLAGS = ("data_dir", "out_dir", "init_from", "sft", "ppo", "reward_model", "vocab_size", "vocab_source")


def path(*parts):
    return os.path.join(out_dir, *parts)


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the stage record

def read_record():
    """Which stages ran, with what; empty when missing or unreadable, so that every stage runs again."""
    record = read_json(path("stages.json"))
    return record if isinstance(record, dict) else {}


def write_record(record):
    os.makedirs(out_dir, exist_ok=True)
    with atomic_output(path("stages.json"), "w") as f:
        json.dump(record, f, indent=1)


def stage(record, name, settings, inputs, outputs, work):
    """Run work(resume) unless the record holds this stage finished with these settings on the same inputs
    (the stages it reads from, as last made) and its outputs exist. resume is True when the stage started
    with these settings and did not finish."""
    key = digest({"settings": settings, "inputs": [record[i]["made"] for i in inputs]})
    done = record.get(name, {})
    number = f"[{STAGES.index(name) + 1}/{len(STAGES)}]"
    if done.get("key") == key and done.get("made") and all(os.path.exists(p) for p in outputs):
        print(f"\n== {number} {name}: reusing {', '.join(outputs)} (same settings and inputs)", flush=True)
        return
    print(f"\n== {number} {name}", flush=True)
    resume = done.get("key") == key and not done.get("made")
    record[name] = {"key": key, "made": None}
    write_record(record)
    start, cpu = time.perf_counter(), cpu_seconds()
    work(resume)
    record[name] = {"key": key, "made": time.time(), "seconds": round(time.perf_counter() - start, 1),
                    "cpu_seconds": round(cpu_seconds() - cpu, 1)}
    write_record(record)
    print(f"-- {name} took {record[name]['seconds']:.0f} s ({record[name]['cpu_seconds']:.0f} s of CPU)", flush=True)


def cpu_seconds():
    """CPU time of this process and its finished children: the work done, however busy the machine is."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------- stages

def stage_args(text, what):
    """A stage's train.py flags, refusing those the demo sets itself."""
    args = shlex.split(text) + shlex.split(train_args)
    for a in args:
        key = a[2:].partition("=")[0].replace("-", "_")
        if not a.startswith("--") or key in DEMO_FLAGS:
            raise UserError(f"{what}: {a!r} is not a train.py flag the demo passes on (it sets "
                            f"{', '.join('--' + k for k in DEMO_FLAGS)} itself)")
    return args


def train_stage(name, args, resume):
    """Run train.py on args (a fresh run in an emptied folder, or --init_from=resume); prints the command."""
    folder = path(name)
    if resume and os.path.exists(os.path.join(folder, "ckpt.pt")):
        args = [a for a in args if not a.startswith("--init_from=")] + ["--init_from=resume"]
    else:
        shutil.rmtree(folder, ignore_errors=True)  # another run's files, made with other settings
    print("python train.py " + " ".join(shlex.quote(a) for a in args), flush=True)
    train.main(args)


def prepare_data(record):
    corpus_settings = {"num_shards": num_shards, "stories_per_shard": stories_per_shard, "seed": 0}
    stage(record, "corpus", corpus_settings, [], [tinystories.corpus_dir(data_dir)],
          lambda _: tinystories.builtin(num_shards, stories_per_shard, 0, data_dir))
    tok_model = tinystories.tokenizer_path(vocab_size, data_dir)
    stage(record, "vocab", {"vocab_size": vocab_size}, ["corpus"], [tok_model],
          lambda _: tinystories.train_vocab(vocab_size, num_shards, data_dir))
    metas = [os.path.join(tinystories.pretok_dir(vocab_size, instruct, data_dir), "meta.json")
             for instruct in (False, True)]

    def pretokenize(_):
        tinystories.pretokenize(vocab_size, data_dir=data_dir)
        tinystories.pretokenize(vocab_size, instruct=True, data_dir=data_dir)
    stage(record, "pretokenize", {}, ["vocab"], metas, pretokenize)
    return tok_model


def training_runs():
    """(stage, its mode flag, its flags, the stage it starts from) of each training stage."""
    return (("pretrain", [], stage_args(pretrain_args, "pretrain_args"), "pretokenize"),
            ("sft", ["--sft=True"], stage_args(sft_args, "sft_args"), "pretrain"),
            ("ppo", ["--ppo=True"], stage_args(ppo_args, "ppo_args"), "sft"))


def training(record, runs):
    common = [f"--data_dir={data_dir}", f"--vocab_size={vocab_size}"]
    for name, mode, args, before in runs:
        init = [] if name == "pretrain" else [f"--init_from={path(before, 'ckpt.pt')}"]
        full = mode + init + common + [f"--out_dir={path(name)}"] + args
        stage(record, name, full, [before], [path(name, "ckpt.pt"), path(name, "metrics.jsonl")],
              lambda resume, name=name, full=full: train_stage(name, full, resume))


def exports(record, tok_model):
    """Each model's .bin (fp32: version 1; int8: version 2) and the tokenizer's .bin."""
    files = {"pretrain.bin": ("pretrain", 1), "pretrain_q80.bin": ("pretrain", 2), "sft.bin": ("sft", 1),
             "ppo.bin": ("ppo", 1), "ppo_q80.bin": ("ppo", 2)}
    tok_bin = path(f"tok{vocab_size}.bin")

    def work(_):
        for name, (model, version) in files.items():
            export.main([path(name), f"--checkpoint={path(model, 'ckpt.pt')}", f"--version={version}"])
        tokenizer.main([f"--tokenizer_model={tok_model}", f"--out={tok_bin}"])
    stage(record, "export", files, ["pretrain", "sft", "ppo"], [path(f) for f in files] + [tok_bin], work)
    return tok_bin


def build(record):
    """run.c through the Makefile: runomp, or the portable run where OpenMP or -march=native fails."""
    with open(os.path.join(ROOT, "run.c"), "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    binary = os.path.abspath(path("run"))

    def work(_):
        for target in ("runomp", "run"):
            made = subprocess.run(["make", "-s", "-C", ROOT, target, f"RUN_OUT={binary}"])
            if made.returncode == 0:
                with open(path("run.target"), "w") as f:
                    f.write(target)
                return
            print(f"make {target} failed; trying the portable build", file=sys.stderr)
        raise UserError("could not build run.c with make run: is a C compiler (gcc or cc) installed?")
    stage(record, "build", {"run.c": source}, [], [binary, path("run.target")], work)
    with open(path("run.target")) as f:
        return binary, f.read().strip()


# ----------------------------------------------------------------------------- generation with run

def run_c(binary, model_bin, tok_bin, *flags):
    """run's text and its tok/s (from its stderr line "achieved tok/s: X"; None when it printed none)."""
    done = subprocess.run([binary, model_bin, "-z", tok_bin, "-t", str(temperature), "-s", str(seed),
                           "-n", str(run_steps), *flags], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS=str(run_threads)))
    if done.returncode != 0:
        raise UserError(f"{binary} {model_bin} failed: {done.stderr.strip()}")
    speed = re.search(r"achieved tok/s: ([0-9.]+)", done.stderr)
    return done.stdout.strip(), float(speed.group(1)) if speed else None


def held_out_instruction():
    if instruction:
        return instruction, []
    example = tinystories.instruct_examples("val", vocab_size, data_dir)[0]
    return example["instruction"], example["words"]


def generate(binary, tok_bin):
    """The plain story, the instruction answered by the SFT and PPO models, and tok/s in fp32 and int8."""
    story, _ = run_c(binary, path("pretrain.bin"), tok_bin, "-i", prompt)
    print(f"\n== a plain story from run (pretrained model, {path('pretrain.bin')})\n{story}")
    asked, words = held_out_instruction()
    answers = {m: run_c(binary, path(f"{m}.bin"), tok_bin, "-m", "instruct", "-i", asked)[0] for m in ("sft", "ppo")}
    print(f"\n== run -m instruct -i {asked!r}")
    print(ppo.side_by_side(f"SFT model: {answers['sft']}", f"PPO model: {answers['ppo']}",
                           shutil.get_terminal_size((100, 24)).columns))
    used = {m: [w for w in words if ppo.uses_word(a, w)] for m, a in answers.items()}
    if words:
        print(f"required words {words}: SFT used {used['sft']}, PPO used {used['ppo']}")
    speeds = {}
    for label, model_bin in (("fp32", "pretrain.bin"), ("int8", "pretrain_q80.bin")):
        rates = [run_c(binary, path(model_bin), tok_bin, "-i", prompt)[1] for _ in range(speed_runs)]
        rates = [r for r in rates if r]
        speeds[label] = statistics.median(rates) if rates else None
    with atomic_output(path("samples.txt"), "w") as f:
        f.write(f"# plain story (run {path('pretrain.bin')} -i {prompt!r})\n{story}\n\n# instruction\n{asked}\n\n"
                f"# SFT model\n{answers['sft']}\n\n# PPO model\n{answers['ppo']}\n")
    return {"story": story, "instruction": asked, "words": words, "answers": answers, "words_used": used,
            "tok_per_s": speeds}


# ----------------------------------------------------------------------------- curves and summary

def read_metrics(name):
    with open(path(name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "val_loss" not in r], [r for r in rows if "val_loss" in r]


def draw_curves():
    """Loss curves of pretraining and SFT and PPO's reward curve in curves.png; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (make demo installs it), so no curves.png")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name in zip(axes, ("pretrain", "sft")):
        steps, evals = read_metrics(name)
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], label="train")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
        ax.set(title=f"{name}: loss", xlabel="iteration")
        ax.legend()
    steps, evals = read_metrics("ppo")
    axes[2].plot([r["iter"] for r in steps], [r["env/reward_mean"] for r in steps], label="rollouts")
    axes[2].plot([r["iter"] for r in evals], [r["val_score"] for r in evals], "o-", label="held-out prompts")
    axes[2].set(title="PPO: mean reward", xlabel="iteration")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path("curves.png.tmp"), format="png", dpi=100)
    os.replace(path("curves.png.tmp"), path("curves.png"))
    return path("curves.png")


def summarize(record, shown, run_target, tok_model, tok_bin, curves):
    pretrain_eval, sft_eval = read_metrics("pretrain")[1][-1], read_metrics("sft")[1][-1]
    ppo_evals = read_metrics("ppo")[1]
    before, after = ppo_evals[0], ppo_evals[-1]
    ppo_config = read_checkpoint(path("ppo", "ckpt.pt"))["config"]
    held_out = ppo_config["eval_iters"] * ppo_config["batch_size"]
    summary = {
        "pretrain_val_loss": pretrain_eval["val_loss"], "sft_val_loss": sft_eval["val_loss"],
        "ppo_reward": ppo_config["reward"], "ppo_held_out_prompts": held_out,
        "reward_before": before["val_score"], "reward_after": after["val_score"],
        "all_words_before": before.get("val_all_words"), "all_words_after": after.get("val_all_words"),
        "word_share_before": before.get("val_word_share"), "word_share_after": after.get("val_word_share"),
        "run_build": run_target, "run_tok_per_s": shown["tok_per_s"],
        "stage_seconds": {s: record[s].get("seconds") for s in STAGES},
        "stage_cpu_seconds": {s: record[s].get("cpu_seconds") for s in STAGES},
        "artifacts": {"corpus": tinystories.corpus_dir(data_dir), "tokenizer": tok_model,
                      "shards": tinystories.pretok_dir(vocab_size, False, data_dir),
                      "instruct shards": tinystories.pretok_dir(vocab_size, True, data_dir),
                      **{f"{m} checkpoint": path(m, "ckpt.pt") for m in ("pretrain", "sft", "ppo")},
                      "exports": " ".join(path(f) for f in ("pretrain.bin", "pretrain_q80.bin", "sft.bin", "ppo.bin",
                                                            "ppo_q80.bin")),
                      "tokenizer .bin": tok_bin, "run": path("run"), "stories": path("samples.txt"),
                      "curves": curves, "summary": path("summary.json")},
    }
    with atomic_output(path("summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    share = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731 (no words: not an instruct run)
    speed = lambda x: "n/a" if x is None else f"{x:,.0f} tok/s"  # noqa: E731
    print("\n== summary")
    print(f"pretraining   val loss {summary['pretrain_val_loss']:.3f} (iteration {pretrain_eval['iter']})")
    print(f"SFT           val loss {summary['sft_val_loss']:.3f} on the held-out stories' tokens "
          f"(iteration {sft_eval['iter']})")
    print(f"PPO           mean reward ({summary['ppo_reward']}) on {held_out} held-out prompts: "
          f"{summary['reward_before']:.3f} before, {summary['reward_after']:.3f} after {after['iter']} iterations")
    print(f"              stories using all three required words: {share(summary['all_words_before'])} before, "
          f"{share(summary['all_words_after'])} after; required words used: {share(summary['word_share_before'])} "
          f"before, {share(summary['word_share_after'])} after")
    print(f"run ({run_target})  fp32 {speed(shown['tok_per_s']['fp32'])}, int8 {speed(shown['tok_per_s']['int8'])}"
          " (pretrained model, median of runs)")
    print("seconds       " + ", ".join(f"{s} {record[s]['seconds']:.0f}" for s in STAGES)
          + " (when each stage last ran)")
    print("artifacts")
    for what, where in summary["artifacts"].items():
        if where:
            print(f"  {what:<17} {where}")
    return summary


@cli
def main(argv=None):
    configure(globals(), argv)
    if threads:
        torch.set_num_threads(threads)
    runs = training_runs()  # refuses bad flags before any work
    started = time.perf_counter()
    record = read_record()
    tok_model = prepare_data(record)
    training(record, runs)
    tok_bin = exports(record, tok_model)
    binary, run_target = build(record)
    shown = generate(binary, tok_bin)
    summary = summarize(record, shown, run_target, tok_model, tok_bin, draw_curves())
    print(f"the demo took {time.perf_counter() - started:.0f} s")
    return summary


if __name__ == "__main__":
    main()
