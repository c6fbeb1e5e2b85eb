"""demo.py at toy size (its defaults, what `make demo DEMO_SMALL=1` runs): every stage leaves its artifacts, run
prints a story, the summary holds its figures, and running again reuses or resumes stages."""
import contextlib
import io
import json
import math
import os
import struct
import subprocess

import pytest

import demo
from conftest import ROOT
from model import read_checkpoint

EXPORTS = {"pretrain.bin": 1, "pretrain_q80.bin": 2, "sft.bin": 1, "ppo.bin": 1, "ppo_q80.bin": 2}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_demo(dirs, *args):
    """demo.main at toy size in dirs; returns (summary, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = demo.main([f"--out_dir={dirs['out']}", f"--data_dir={dirs['data']}", *args])
    return summary, printed.getvalue()


def mtimes(out):
    return {f: os.path.getmtime(os.path.join(out, f))
            for f in ("pretrain/ckpt.pt", "sft/ckpt.pt", "ppo/ckpt.pt", *EXPORTS, "run")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, one_torch_thread):
    d = tmp_path_factory.mktemp("demo")
    dirs = {"out": str(d / "out-demo"), "data": str(d / "data")}
    summary, printed = run_demo(dirs)
    return dirs, summary, printed


def test_every_stage_leaves_its_artifacts(first_run):
    dirs, summary, printed = first_run
    out, data = dirs["out"], dirs["data"]
    assert len([f for f in os.listdir(os.path.join(data, "TinyStories_all_data")) if f.endswith(".json")]) == 3
    for meta in ("tok512/meta.json", "tok512/instruct/meta.json"):
        with open(os.path.join(data, meta)) as f:
            assert json.load(f)["num_shards"] == 3
    for mode in ("pretrain", "sft", "ppo"):
        ckpt = read_checkpoint(os.path.join(out, mode, "ckpt.pt"))
        assert ckpt["mode"] == mode and ckpt["iter_num"] == ckpt["config"]["max_iters"]
        assert os.path.getsize(os.path.join(out, mode, "metrics.jsonl")) > 0
    for name, version in EXPORTS.items():
        with open(os.path.join(out, name), "rb") as f:
            assert struct.unpack("<Ii", f.read(8)) == (0x616B3432, version), name
    assert os.access(os.path.join(out, "run"), os.X_OK)
    with open(os.path.join(out, "tok512.bin"), "rb") as f:
        assert struct.unpack("<I", f.read(4))[0] > 0
    with open(os.path.join(out, "stages.json")) as f:
        assert all(record["made"] for record in json.load(f).values())
    for path in summary["artifacts"].values():
        assert path is None or all(os.path.exists(p) for p in path.split()), path
    for stage in demo.STAGES:
        assert f"] {stage}\n" in printed


def test_run_prints_a_story_and_answers_the_instruction(first_run):
    dirs, summary, printed = first_run
    with open(os.path.join(dirs["out"], "samples.txt")) as f:
        samples = f.read()
    story = samples.split("# plain story")[1].split("\n", 1)[1].split("\n\n# instruction")[0]
    assert story.startswith(demo.prompt) and len(story) > len(demo.prompt) + 50, story
    assert story in printed
    for model in ("SFT", "PPO"):
        answer = samples.split(f"# {model} model\n")[1].split("\n\n#")[0]
        assert answer.strip() and f"{model} model: " in printed
    assert "run -m instruct -i 'Write a story." in printed


def test_summary_reports_each_stage(first_run):
    dirs, summary, printed = first_run
    with open(os.path.join(dirs["out"], "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["pretrain_val_loss"] < math.log(512) and summary["sft_val_loss"] < math.log(512)
    with open(os.path.join(dirs["out"], "ppo", "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_score" in r]
    assert (summary["reward_before"], summary["reward_after"]) == (evals[0]["val_score"], evals[-1]["val_score"])
    assert 0.0 <= summary["all_words_before"] <= 1.0 and 0.0 <= summary["all_words_after"] <= 1.0
    assert summary["run_tok_per_s"]["fp32"] > 0 and summary["run_tok_per_s"]["int8"] > 0
    for line in ("pretraining   val loss", "SFT           val loss", "stories using all three required words",
                 "fp32", "int8", "artifacts"):
        assert line in printed.split("== summary")[1]


def test_running_again_reuses_every_stage(first_run):
    dirs, _, _ = first_run
    before = mtimes(dirs["out"])
    _, printed = run_demo(dirs)
    for stage in demo.STAGES:
        assert f"] {stage}: reusing" in printed
    assert "python train.py" not in printed
    assert mtimes(dirs["out"]) == before


def test_an_interrupted_stage_resumes_and_a_changed_one_reruns_with_those_after_it(first_run):
    dirs, _, _ = first_run
    record_path = os.path.join(dirs["out"], "stages.json")
    with open(record_path) as f:
        record = json.load(f)
    record["ppo"]["made"] = None  # as a kill during PPO leaves it
    with open(record_path, "w") as f:
        json.dump(record, f)
    before = mtimes(dirs["out"])
    _, printed = run_demo(dirs)
    assert "--init_from=resume" in printed and "already at iteration" in printed
    assert mtimes(dirs["out"])["ppo/ckpt.pt"] == before["ppo/ckpt.pt"]

    ppo_args = demo.ppo_args.replace("--max_iters=2", "--max_iters=3")
    assert ppo_args != demo.ppo_args
    _, printed = run_demo(dirs, f"--ppo_args={ppo_args}")
    after = mtimes(dirs["out"])
    for stage in ("corpus", "vocab", "pretokenize", "pretrain", "sft", "build"):
        assert f"] {stage}: reusing" in printed
    assert "] ppo\n" in printed and "] export\n" in printed
    assert after["sft/ckpt.pt"] == before["sft/ckpt.pt"] and after["ppo.bin"] > before["ppo.bin"]
    assert read_checkpoint(os.path.join(dirs["out"], "ppo", "ckpt.pt"))["iter_num"] == 3


@pytest.mark.parametrize("content", ['{"corpus": {"made"', "[1, 2]", "\xff\xfe"])
def test_an_unreadable_stage_record_means_every_stage_runs_again(tmp_path, monkeypatch, content):
    monkeypatch.setattr(demo, "out_dir", str(tmp_path))
    (tmp_path / "stages.json").write_bytes(content.encode("latin-1"))
    assert demo.read_record() == {}


@pytest.mark.parametrize("args, message", [
    (["--pretrain_args=--max_iters=5 --out_dir=elsewhere"], "'--out_dir=elsewhere' is not a train.py flag"),
    (["--sft_args=max_iters=5"], "'max_iters=5' is not a train.py flag"),
    (["--pretrain_iters=5"], "unknown setting --pretrain_iters"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        demo.main([f"--out_dir={tmp_path}/out", f"--data_dir={tmp_path}/data", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_make_demo_reads_config_demo_and_demo_small_the_toy_sizes():
    def planned(*extra):
        made = subprocess.run(["make", "-n", "-C", ROOT, "demo", *extra], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        return [line for line in made.stdout.splitlines() if "demo.py" in line]
    assert planned()[-1].split()[-2:] == ["demo.py", "config/demo.py"]
    assert planned("DEMO_SMALL=1")[-1].split()[-1] == "demo.py"
    ns = {k: v for k, v in vars(demo).items()}
    ns.pop("_config_defaults", None)
    changed = demo.configure(ns, [os.path.join(ROOT, "config", "demo.py")])
    assert {"num_shards", "stories_per_shard", "pretrain_args", "sft_args", "ppo_args"} <= set(changed)
    assert ns["num_shards"] * ns["stories_per_shard"] > demo.num_shards * demo.stories_per_shard
