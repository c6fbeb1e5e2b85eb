"""Command-line plumbing shared by every script: settings, user errors, and files written whole or not at all.

Settings are a script's module-level globals; `script.py [config/file.py] [--key=value ...]` overrides them.

A config file is Python that assigns some of those globals. An override's value is parsed as a Python
literal (or taken as a string when it is not one) and must have the type of the default. Mistakes are one
line on stderr and exit status 2.
"""
import ast
import contextlib
import ctypes
import difflib
import errno
import functools
import glob
import json
import os
import re
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed


class UserError(ValueError):
    """A mistake in the user's input: reported as one line, never a traceback."""


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def cli(main):
    """Run main(), turning a UserError into one line on stderr and exit status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except BrokenPipeError:  # the reader of our output went away (| head): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting's flush fails no more
            sys.exit(1)
        except OSError as e:
            if e.errno == errno.ENOSPC:  # a full disk: often stdout redirected to a file, which names no file
                fail(f"{e.strerror}{': ' + e.filename if e.filename else ''}; free some space and run again")
            if e.filename is None:
                raise
            # a path the user chose that cannot be read or written: a permission, a directory, a full disk
            fail(f"{e.strerror or e}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else ""))
        except KeyboardInterrupt:
            fail("interrupted", status=130)
        except Exception as e:
            if isinstance(e.__context__, KeyboardInterrupt):  # e.g. torch.save's cleanup failing after Ctrl-C
                fail("interrupted", status=130)
            raise
    return wrapper


@contextlib.contextmanager
def atomic_output(path, mode="wb"):
    """Yield a file open on a temporary name beside path (its directory made if missing); it replaces path only
    if the block completes."""
    if not path or os.path.isdir(path):
        raise UserError(f"cannot write {path!r}: give a file name for the output")
    parent = os.path.dirname(path) or "."
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    refuse_read_only(path)
    os.makedirs(parent, exist_ok=True)
    remove_dead_temporaries(glob.escape(path) + ".tmp*")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def refuse_read_only(path):
    """Refuse to replace a file someone made read-only: atomic_output's rename would go through regardless."""
    if os.path.isfile(path) and not os.stat(path).st_mode & 0o222:
        raise UserError(f"{path} is read-only, so it is not replaced; make it writable (chmod u+w) or write elsewhere")


def refuse_overwriting(out_path, in_path, flag):
    """Refuse an output that is the very file (or folder) being read: writing it would destroy the input."""
    if out_path and in_path and os.path.exists(out_path) and os.path.exists(in_path) \
            and os.path.samefile(out_path, in_path):
        raise UserError(f"{out_path} is the {flag} being read; write the output somewhere else")


def read_json(path):
    """The value in a JSON file, or None when the file is missing or does not parse (a state file to rebuild)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None


def require_file(path, what, hint=""):
    """A UserError unless path is a file; a folder and a missing path each get their own message."""
    hint = f" ({hint})" if hint else ""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}{hint}")


def remove_dead_temporaries(pattern):
    """Delete the files matching pattern that a killed process left half-written: their names hold its id after
    ".tmp" (path.tmpPID, or prefix.tmpPID.ext), and no process of that id is running."""
    for tmp in glob.glob(pattern):
        pid = re.search(r"\.tmp(\d+)(\.|$)", os.path.basename(tmp))
        if pid and not pid_alive(int(pid.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another run cleaning up at the same moment
                os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _start_worker(initializer, initargs):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the whole pool at once
    if sys.platform.startswith("linux"):  # and a parent killed outright takes its workers with it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if initializer:
        initializer(*initargs)


def map_in_processes(function, jobs, workers, initializer=None, initargs=()):
    """Yield function(job) for every job as it finishes, in any order, from a pool of worker processes (none for
    one worker). An error, Ctrl-C, or the caller stopping early ends every worker at once."""
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(function, jobs)
        return
    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(initializer, initargs))
    try:
        for future in as_completed([pool.submit(function, job) for job in jobs]):
            yield future.result()
    except BaseException:  # GeneratorExit too: don't wait for shards nobody will use
        for process in list((pool._processes or {}).values()):  # Python 3.14 calls this terminate_workers
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def settable_keys(namespace):
    """The names a config may set: public, non-constant globals holding plain values."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str, type(None), tuple, list))}


def current_config(namespace):
    """The script's settings as they stand, for a checkpoint or a log."""
    return {k: namespace[k] for k in namespace.get("_config_defaults", settable_keys(namespace))}


def _nearest(key, keys):
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f" (did you mean --{close[0]}?)" if close else ""


def kind_name(default):
    """'an int', 'a float', 'a bool', 'a str': what a setting with this default takes."""
    name = type(default).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _parse_value(key, raw, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # long prose can exhaust the parser
        value = raw  # a bare word such as --device=cpu is a string
    if isinstance(default, str) and not isinstance(value, str):
        return raw  # --start=1984 is text, not a number
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"--{key} expects True or False, got {raw!r}")
        return value
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        raise UserError(f"--{key} expects {kind_name(default)} (default {default!r}), got {raw!r}")
    return value


HELP_FLAGS = ("-h", "--help")


def print_settings(namespace, defaults):
    """The --help text: the script's docstring, then every setting with its default and the comment beside it."""
    comments = {}
    path = namespace.get("__file__", "")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"(\w+) = [^#]*#\s*(.*)$", line)
                if m:
                    comments.setdefault(m.group(1), m.group(2))
    print((namespace.get("__doc__") or "").strip())
    print("\nsettings, as --key=value (or in a config file of Python assignments given before them):")
    for k, v in defaults.items():
        print(f"  --{k}={v!r}" + (f"  # {comments[k]}" if k in comments else ""))


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides in argv to namespace (a script's globals()).

    Every call starts again from the script's defaults, so main(argv) can run twice in one process.
    Returns the dict of keys that were set."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = namespace.setdefault("_config_defaults", dict(settable_keys(namespace)))
    namespace.update({k: list(v) if isinstance(v, list) else v for k, v in defaults.items()})
    keys = defaults
    if any(arg in HELP_FLAGS for arg in argv):
        print_settings(namespace, defaults)
        sys.exit(0)
    changed = {}
    for arg in argv:
        if not arg.startswith("--"):
            require_file(arg, "config file")
            file_ns = {}
            try:
                with open(arg, encoding="utf-8") as f:
                    source = f.read()
            except UnicodeDecodeError:
                flag = next((k for k in ("checkpoint", "tokenizer_model", "preferences") if k in keys), "checkpoint")
                raise UserError(f"{arg} is not a config file (Python setting globals); a checkpoint, model or "
                                f"data file goes after its setting, e.g. --{flag}={arg}") from None
            try:
                exec(compile(source, arg, "exec"), file_ns)
            except Exception as e:
                raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}") from None
            for k, v in file_ns.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in keys:
                    raise UserError(f"config file {arg} sets unknown key {k!r}{_nearest(k, keys)}")
                default = keys[k]
                if default is not None and not isinstance(v, type(default)) and not (
                        isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool)):
                    raise UserError(f"config file {arg}: {k} expects {kind_name(default)}, got {v!r}")
                namespace[k] = changed[k] = v
        else:
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                raise UserError(f"--{key} needs a value: write --{key}=VALUE")
            if key not in keys:
                raise UserError(f"unknown setting --{key}{_nearest(key, keys)}")
            namespace[key] = changed[key] = _parse_value(key, raw, keys[key])
    return changed


def configure_subcommand(namespace, subcommands, argv=None):
    """For `python script.py COMMAND --k=v ...`: check COMMAND, configure the rest, return COMMAND."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.basename(namespace.get("__file__", "script.py"))
    if argv and argv[0] in HELP_FLAGS:
        configure(namespace, argv)  # prints the settings and exits
    if not argv or argv[0].startswith("-"):
        raise UserError(f"say what to do: python {script} {'|'.join(subcommands)} [--key=value ...]")
    command = argv.pop(0)
    if command not in subcommands:
        raise UserError(f"unknown subcommand {command!r}: use one of {', '.join(subcommands)}")
    configure(namespace, argv)
    return command
