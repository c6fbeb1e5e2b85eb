import os
import signal
import subprocess
import sys
import time

import pytest

from configurator import UserError, atomic_output, cli, configure, map_in_processes
from conftest import ROOT, dead_pid


def settings():
    return {"batch_size": 8, "learning_rate": 5e-4, "compile": False, "device": "cpu", "init_from": "scratch",
            "lora_targets": "wq,wk,wv,wo", "max_iters": 100}


def test_overrides_are_typed_literals():
    ns = settings()
    changed = configure(ns, ["--batch_size=32", "--learning_rate=1e-3", "--compile=True", "--device=cuda:1",
                             "--init_from=out/ckpt.pt"])
    assert ns["batch_size"] == 32 and ns["learning_rate"] == 1e-3 and ns["compile"] is True
    assert ns["device"] == "cuda:1" and ns["init_from"] == "out/ckpt.pt"
    assert set(changed) == {"batch_size", "learning_rate", "compile", "device", "init_from"}
    configure(ns, ["--learning_rate=1"])
    assert ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 4\nmax_iters = 7\n")
    ns = settings()
    configure(ns, [str(cfg), "--max_iters=9"])
    assert ns["batch_size"] == 4 and ns["max_iters"] == 9


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=3"], "unknown setting --batch_sise (did you mean --batch_size?)"),
    (["--batch_size=3.5"], "--batch_size expects an int"),
    (["--compile=yes"], "--compile expects True or False"),
    (["--max_iters"], "--max_iters needs a value"),
    (["config/nope.py"], "config file not found: config/nope.py"),
    (["config"], "config file config is a folder, not a file"),
])
def test_mistakes_are_user_errors(argv, message):
    with pytest.raises(UserError) as e:
        configure(settings(), argv)
    assert message in str(e.value)


def test_text_settings_take_any_text():
    ns = settings()
    configure(ns, ["--init_from=1984", "--device=" + "once upon a time " * 3000])
    assert ns["init_from"] == "1984" and ns["device"].startswith("once upon")


def test_a_binary_file_is_not_read_as_a_config_file(tmp_path):
    blob = tmp_path / "ckpt.pt"
    blob.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match=f"not a config file.*--checkpoint={blob}"):
        configure(settings(), [str(blob)])
    with pytest.raises(UserError, match=f"not a config file.*--tokenizer_model={blob}"):  # tokenizer.py's setting
        configure({"tokenizer_model": "", "out": ""}, [str(blob)])


def test_config_file_with_unknown_key(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("learning_rte = 1e-3\n")
    with pytest.raises(UserError, match="unknown key 'learning_rte'.*learning_rate"):
        configure(settings(), [str(cfg)])


def test_script_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "tokenizer.py", "--tokenizer_modle=x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown setting --tokenizer_modle (did you mean --tokenizer_model?)"


def test_unwritable_paths_are_one_line(tmp_path):
    for path in ["", str(tmp_path)]:
        with pytest.raises(UserError, match="give a file name"):
            with atomic_output(path):
                pass
    with atomic_output(str(tmp_path / "new" / "dir" / "f.bin")) as f:  # missing directories are made
        f.write(b"x")
    assert (tmp_path / "new" / "dir" / "f.bin").read_bytes() == b"x"


def test_ctrl_c_is_one_line_even_when_cleanup_fails(capsys):
    @cli
    def interrupted_while_saving():
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("a writer's __exit__ failing on the half-written file")
    with pytest.raises(SystemExit) as e:
        interrupted_while_saving()
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_atomic_output_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as f:
            f.write(b"new, half written")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_output(str(target)) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    target.chmod(0o444)  # read-only: kept, though renaming over it would work (and would as root, in any case)
    with pytest.raises(UserError, match="is read-only"):
        with atomic_output(str(target)) as f:
            f.write(b"newer")
    assert target.read_bytes() == b"new"


def test_atomic_output_removes_what_killed_writers_left(tmp_path):
    target = tmp_path / "ckpt.pt"
    killed, running = tmp_path / f"ckpt.pt.tmp{dead_pid()}", tmp_path / f"ckpt.pt.tmp{os.getppid()}"
    other = tmp_path / f"best.pt.tmp{dead_pid()}"  # not this file's: left for its own writer
    for f in (killed, running, other):
        f.write_bytes(b"half")
    with atomic_output(str(target)) as f:
        f.write(b"whole")
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (target, running, other))


def square_slowly(n):
    if n < 0:
        raise UserError(f"no square for {n}")
    os.write(sys.stdout.fileno(), f"started {os.getpid()}\n".encode())  # one write: lines never interleave
    time.sleep(n)
    return n * n


def test_map_in_processes_yields_every_result_and_stops_at_an_error():
    assert sorted(map_in_processes(square_slowly, [0, 0, 0], workers=2)) == [0, 0, 0]
    assert list(map_in_processes(square_slowly, [0, 0], workers=1)) == [0, 0]
    started = time.time()
    with pytest.raises(UserError, match="no square for -1"):
        list(map_in_processes(square_slowly, [60, -1], workers=2))
    assert time.time() - started < 30  # the other worker's minute was not waited for


def test_ctrl_c_stops_the_workers_at_once():
    script = ("import sys; sys.path[:0] = [{!r}, {!r}]; from configurator import cli, map_in_processes; "
              "from test_configurator import square_slowly; "
              "cli(lambda: list(map_in_processes(square_slowly, [60, 60, 60], workers=2)))()"
              ).format(ROOT, os.path.join(ROOT, "tests"))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    workers = [int(p.stdout.readline().split()[1]) for _ in range(2)]
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the parent and its workers alike
    started = time.time()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "error: interrupted\n" and time.time() - started < 30
    for pid in workers:  # reaped by the parent, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_workers_end_with_a_parent_killed_outright():
    script = ("import sys; sys.path[:0] = [{!r}, {!r}]; from configurator import map_in_processes; "
              "from test_configurator import square_slowly; list(map_in_processes(square_slowly, [60, 60], workers=2))"
              ).format(ROOT, os.path.join(ROOT, "tests"))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(p.stdout.readline().split()[1]) for _ in range(2)]
    p.kill()
    p.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def alive(pid):
    """Running, as opposed to ended (a zombie waiting for init to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_configure_starts_from_the_defaults():
    ns = settings()
    configure(ns, ["--batch_size=3"])
    configure(ns, ["--max_iters=5"])
    assert ns["batch_size"] == 8 and ns["max_iters"] == 5


def test_output_to_a_closed_pipe_stops_quietly():
    program = ("import sys; sys.path.insert(0, sys.argv[1]); from configurator import cli\n"
               "cli(lambda: [print('story ' * 100) for _ in range(100000)])()\n")
    p = subprocess.Popen([sys.executable, "-c", program, ROOT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 1 and err == "", err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_output_to_a_full_disk_is_one_line():
    program = ("import sys; sys.path.insert(0, sys.argv[1]); from configurator import cli\n"
               "cli(lambda: print('story ' * 10000))()\n")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-c", program, ROOT], stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 2 and r.stderr == "error: No space left on device; free some space and run again\n"


@pytest.mark.parametrize("argv, setting", [(["sample.py", "--help"], "--temperature=1.0  # "),
                                           (["export.py", "-h"], "--checkpoint=''  # "),
                                           (["ppo.py", "-h"], "--num_pairs=0  # "),
                                           (["train.py", "--sft=True", "--help"], "--batch_size=")])
def test_help_lists_the_settings_with_their_comments(argv, setting):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "settings, as --key=value" in r.stdout
    assert any(line.startswith("  " + setting) for line in r.stdout.splitlines()), r.stdout
