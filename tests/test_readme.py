"""Every command in README.md's code blocks names a script, subcommand, config file, flag, Makefile target or run
option that exists, with a value of the setting's type. (The stages themselves run in each script's tests and,
end to end, in tests/test_demo.py.)"""
import importlib.util
import os
import re
import shlex

import pytest

from configurator import configure
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
POSITIONAL = {"export.py": 1}  # positional arguments a script takes besides config files and subcommands


def code_lines():
    """(line number, command words) of each command in the README's fenced bash blocks; comments dropped,
    backslash continuations joined."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
        first_line = text[:block.start()].count("\n") + 2
        joined = block.group(1).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            words = shlex.split(line, comments=True)
            if words:
                commands.append((first_line + offset, words))
    return commands


COMMANDS = code_lines()


def makefile_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return set(re.findall(r"^([A-Za-z_][\w-]*):(?!=)", f.read(), re.M))


def run_options():
    """run.c's options and -m modes, as its usage text lists them."""
    with open(os.path.join(ROOT, "run.c")) as f:
        source = f.read()
    usage = source[source.index("static void usage"):]
    usage = usage[:usage.index("}")]
    modes = re.search(r"mode: ([\w|]+)", usage).group(1).split("|")
    return set(re.findall(r'"  (-\w) <', usage)), set(modes)


def load_script(relpath):
    name = "readme_" + re.sub(r"\W", "_", relpath)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_modules = {}


def check_python(script, args):
    assert os.path.isfile(os.path.join(ROOT, script)), f"no script {script}"
    if script not in _modules:
        _modules[script] = load_script(script)
    module = _modules[script]
    args = list(args)
    subcommands = getattr(module, "SUBCOMMANDS", None)
    if subcommands:
        assert args and args[0] in subcommands, f"{script} needs one of {subcommands}, got {args[:1]}"
        args = args[1:]
    positional = [a for a in args if not a.startswith("--") and not a.endswith(".py")]
    assert len(positional) <= POSITIONAL.get(os.path.basename(script), 0), f"unexpected arguments {positional}"
    settings = [os.path.join(ROOT, a) if a.endswith(".py") else a for a in args if a not in positional]
    namespace = dict(vars(module))
    configure(namespace, settings)  # raises for a config file that is missing or an unknown or mistyped flag


def check_command(words):
    words = list(words)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
        words.pop(0)
    program, args = words[0], words[1:]
    if program == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        assert targets and set(targets) <= makefile_targets(), f"unknown make target in {targets}"
    elif program in ("python", "python3"):
        check_python(args[0], args[1:])
    elif program == "torchrun":
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        assert all(a.startswith("--") for a in args[:script])
        check_python(args[script], args[script + 1:])
    elif program in ("./run", "run"):
        options, modes = run_options()
        assert args and not args[0].startswith("-"), "run's first argument is the model .bin"
        pairs = args[1:]
        assert len(pairs) % 2 == 0, f"every run option takes a value: {pairs}"
        for flag, value in zip(pairs[::2], pairs[1::2]):
            assert flag in options, f"run has no option {flag} (it has {sorted(options)})"
            if flag == "-m":
                assert value in modes, f"run has no mode {value}"
    elif program.startswith("bench/") and program.endswith(".sh"):
        assert os.access(os.path.join(ROOT, program), os.X_OK), f"{program} is not an executable script"
        assert all(a.isdigit() for a in args)
    else:
        pytest.fail(f"the README runs {program!r}, which this test does not know how to check")


@pytest.mark.parametrize("line, words", COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_readme_command_exists(line, words):
    check_command(words)


def test_readme_starts_with_the_two_commands():
    assert COMMANDS[:2] == [(COMMANDS[0][0], ["make", "demo"]), (COMMANDS[0][0] + 1, ["make", "test"])]


def test_readme_covers_every_stage():
    scripts = {w[1] for _, w in COMMANDS if w[0] == "python"} | {w[-1] for _, w in COMMANDS if w[0] == "torchrun"}
    for script in ("tinystories.py", "train.py", "ppo.py", "export.py", "tokenizer.py", "sample.py"):
        assert script in scripts, f"the README never runs {script}"
    used = " ".join(" ".join(w) for _, w in COMMANDS)
    for needed in ("download", "builtin", "train_vocab", "pretokenize", "--sft=True", "--lora_rank=", "--ppo=True",
                   "--reward_model=True", "label", "--reward=length", "--reward=words", "--reward=model:",
                   "--version=2", "-m instruct", "config/stories260K.py", "config/stories15M.py",
                   "config/stories42M.py", "config/stories110M.py", "--init_from=resume"):
        assert needed in used, f"the README never shows {needed}"
    for target in ("run", "runfast", "runomp"):
        assert ["make", target] in [w for _, w in COMMANDS], f"the README never builds make {target}"


def test_checker_refuses_what_does_not_exist():
    for bad in (["python", "train.py", "--max_itres=10"], ["python", "tinystories.py", "downlaod"],
                ["python", "train.py", "config/stories7B.py"], ["python", "train.py", "--max_iters=many"],
                ["./run", "model.bin", "-q", "1"], ["./run", "model.bin", "-m", "poem"], ["make", "rnu"],
                ["python", "nothing.py"]):
        with pytest.raises((AssertionError, Exception)):
            check_command(bad)
