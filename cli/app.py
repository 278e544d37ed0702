"""The Typer ``app`` every command registers on, and what all commands share: the error
mapping (``@command``), ``log`` (stderr) and ``emit_json`` (stdout).

Exit codes: 0 ok, 1 gate or verification failed, 2 bad input/usage, 3 internal error.
Usage errors (a bad option value, a missing or unknown option) are one line on stderr,
``error: <message>``, exit 2: ``OneLineUsageErrors.main`` handles them, and both the console
script and ``CliRunner().invoke(app, ...)`` go through it.
"""
from __future__ import annotations

import errno
import functools
import sys
import traceback
from typing import Annotated, Any, Callable, Optional

import typer
import typer.core

from repair.errors import GateFailed, RepairError, Terminated
from repair.io import FULL_ERRNOS, one_line  # noqa: F401  (one_line: the commands' too)

from .options import with_options

try:  # newer typer vendors click; its ClickException derives from typer.TyperException
    from typer import TyperException as ClickException
except ImportError:  # older typer runs on click itself
    from click import ClickException

STATE = {"debug": False}

def log(msg: str) -> None:
    """A line on stderr; a user's names in it shown as they are (:func:`repair.io.visible`)."""
    from repair.runtime import stderr_log

    stderr_log(True)(msg)


def say(text: str = "") -> None:
    """A result line on stdout (the text of a command's result; ``--json`` goes through
    :func:`emit_json`), with a user's names shown as they are (:func:`repair.io.visible`)."""
    from repair.io import visible

    _stdout(visible(str(text)) + "\n")


class _Stderr:
    """The command's stderr (:func:`guard_streams`): a write it cannot take -- a reader that closed the pipe
    (``2>&1 | head -n 1``), a full disk (``2>/dev/full``) -- ends its log, never the command. What follows
    goes to /dev/null, and the command runs on to its gate, its outputs and its own exit code (a broken
    stderr once ended a failing gate with exit 0)."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def _lost(self) -> None:
        import os

        self._gone = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())       # what C code and child processes write there too
            os.close(null)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                self._stream.write(text)
                return len(text)
            except (OSError, ValueError):
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """The console script's streams made safe before anything runs: a closed stdout or stderr (``>&-``)
    opened on /dev/null, never sharing the other's place (with stderr closed, Python's ``print`` to it
    wrote to stdout, into ``--json``'s one document); a name stdout's encoding cannot hold
    (``PYTHONIOENCODING=ascii``, a file name that is not UTF-8) written escaped (``\\xe9``), never an
    internal error; stderr kept by :class:`_Stderr`."""
    import io
    import os

    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
                setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False))
            except OSError:
                setattr(sys, name, io.StringIO())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    if not isinstance(sys.stderr, _Stderr):
        sys.stderr = _Stderr(sys.stderr)


def _stdout(text: str) -> None:
    """Every result's write to stdout (:func:`say`, :func:`emit_json`), flushed at once. A reader
    that closed the pipe early (``| head``, ``| grep -q``) does not end the command: the rest of
    its output goes to /dev/null and it runs on to its gate or verification, so a failure still
    exits 1 (the exit code is the command's, never 0 because nobody read the table)."""
    import os

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as e:    # a reader gone (EPIPE), a closed stream; a full disk (ENOSPC)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            # the results were not written where the user sent them (`--json > result.json` on a full
            # disk): the command runs on to its gate and outputs, then exits 2 naming stdout, never 0
            # with an empty file (:func:`_stdout_lost`); any other failure is a closed stream
            STATE.setdefault("stdout_lost", e)


def _stdout_lost(code: int) -> int:
    """The exit code of a command whose results stdout could not take (a full disk): its own where it
    failed (a gate's 1), else 2, with a line naming stdout."""
    e = STATE.pop("stdout_lost", None)
    if e is None:
        return code
    log(one_line(f"error: stdout: {e.strerror or e}; the results could not be written there"))
    return code or 2


def logger(runtime) -> Callable[[str], None]:
    """The log a command hands the library: everything, or (``--quiet``) warnings and notices."""
    from repair.runtime import stderr_log

    return stderr_log(runtime.progress)


def _on_sigterm(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def settle_signals() -> None:
    """Once a command is over (its outputs committed, or none written; its result and exit code
    decided), a SIGTERM or SIGINT during the interpreter's shutdown is ignored: it raised inside torch's exit
    hooks ("Exception ignored ...") or turned a finished run's exit code into 143, so a CI job could
    not tell a complete run from a cut one. Called by the console script only (the process ends)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # (a cancelled CI job sends SIGINT: the same)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout. Controls and invisible characters in strings are written as
    ``\\uXXXX`` escapes (:func:`repair.io.visible`): a parser reads the same strings, a terminal shows them."""
    from repair.io import json_text, visible

    _stdout(visible(json_text(doc, indent=2)))


#: commands built when they are run (name -> factory of the click command): their options depend on
#: what is registered (e.g. ``fix``'s model-repair inputs), which needs the registry and torch; built
#: anew each time, so a model repair registered since (a plugin) brings its inputs
LAZY_COMMANDS: dict[str, Callable[[], Any]] = {}


class EmptyPath(typer.BadParameter):
    """An empty string given for a path (``--cache-dir ''``): one line naming the option, exit 2."""

    def format_message(self) -> str:
        return f"{self.param_hint}: {self.message}"


def _is_path(annotation: Any) -> bool:
    """``annotation`` (``Annotated[...]`` unwrapped) is a path type or an optional one."""
    import pathlib
    import typing

    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation) if typing.get_origin(annotation) is not None else (annotation,)
    return any(isinstance(a, type) and issubclass(a, pathlib.PurePath) for a in args)


def path_parameters(cmd) -> set[str]:
    """The names of ``cmd``'s parameters typed as a path (arguments and options; Typer turns ``''``
    into ``Path('.')`` for them, the current folder, which nobody means by an empty string)."""
    import inspect

    try:
        sig = inspect.signature(cmd.callback, eval_str=True)
    except Exception:           # an annotation that does not evaluate: Typer's own record of the type below
        sig = None
    names = {name for name, p in sig.parameters.items() if _is_path(p.annotation)} if sig is not None else set()
    return names | {p.name for p in cmd.params
                    if _is_path(getattr(getattr(p, "type_descriptor", None), "annotation", None))}


def _refuse_empty_paths(cmd, ctx, opts: dict) -> None:
    """The one rule of an empty path on the command line: every path-typed argument and option of
    every command given ``''`` is a usage error naming it (never the current folder)."""
    names = path_parameters(cmd)
    for p in cmd.params:
        value = opts.get(p.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if p.name in names and any(isinstance(v, str) and v == "" for v in values):
            raise EmptyPath("an empty path names no file or folder; give one ('.' is the current folder)",
                            ctx=ctx, param=p, param_hint=_hint(p))


def _hint(p) -> str:
    """How the command line names ``p``: its longest flag (``--data``), or an argument's metavar (``MODEL``)."""
    if getattr(p, "param_type_name", None) == "option" and p.opts:
        return max(p.opts, key=len)
    return (p.metavar or p.name or "").upper()


def _once_each(cmd):
    """``cmd`` refusing an option given twice (a usage error, exit 2): click keeps the last value, so
    ``--fail-under-wga 90% ... --fail-under-wga 0%`` (a CI template with a local line appended) would
    quietly weaken a gate, and ``--out a ... --out b`` write where one of them did not say. Options
    that take several values (``multiple``), counters and plain on-flags may repeat. And an empty
    path refused (:func:`_refuse_empty_paths`)."""
    if cmd is None or getattr(cmd, "_once_each", False):
        return cmd
    plain = cmd.parse_args

    def parse_args(ctx, args):
        try:
            opts, _, order = cmd.make_parser(ctx).parse_args(args=list(args))
        except ClickException:
            opts, order = {}, []     # click's own parse below says what is wrong
        if any(getattr(p, "is_eager", False) for p in order):
            return plain(ctx, args)          # --help / --version answer whatever else is given
        _refuse_empty_paths(cmd, ctx, opts)
        seen = set()
        for p in order:
            if (getattr(p, "param_type_name", None) != "option" or p.multiple or p.count
                    or (p.is_flag and not p.secondary_opts)):
                continue
            if p.name in seen:
                raise typer.BadParameter("given more than once; give it once", ctx=ctx, param=p)
            seen.add(p.name)
        return plain(ctx, args)

    cmd.parse_args, cmd._once_each = parse_args, True
    return cmd


def _warning_line(shown, message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while a command runs: a warning of the repair library (its class defined
    there: a class folder's files that are no images, a plugin that failed to load) is one ``warning:``
    line on stderr, as the command's other warnings are; any other is given to ``shown`` (as before)."""
    if (getattr(category, "__module__", "") or "").split(".")[0] == "repair":
        log("warning: " + " ".join(str(message).split()))
    else:
        shown(message, category, filename, lineno, file, line)


class OneLineUsageErrors(typer.core.TyperGroup):
    """The app's click group: usage errors as one ``error: ...`` line on stderr instead of click's
    usage box. Everything else behaves as in standalone mode."""

    def get_command(self, ctx, cmd_name):
        cmd = LAZY_COMMANDS[cmd_name]() if cmd_name in LAZY_COMMANDS else super().get_command(ctx, cmd_name)
        return _once_each(cmd)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import warnings

        with warnings.catch_warnings():         # the library's own warnings as the CLI's warning lines
            warnings.showwarning = functools.partial(_warning_line, warnings.showwarning)
            return self._main(args, prog_name, complete_var, standalone_mode, **extra)

    def _main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        run = functools.partial(super().main, args, prog_name, complete_var, standalone_mode=False, **extra)
        _SAID_INTERRUPTED[0] = False
        from repair.io import commit_mark

        mark = commit_mark()
        if not standalone_mode:  # the caller handles click's exceptions itself
            return run()
        try:
            rv = run()
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `repair`: the help, as before
                if not (getattr(typer.core, "HAS_RICH", False) and self.rich_markup_mode is not None):
                    e.show()  # (rich has printed it already)
            else:
                log("error: " + " ".join(e.format_message().split()))
            sys.exit(e.exit_code)
        except typer.Abort:
            log("Aborted!")
            sys.exit(1)
        except Terminated:       # while a lazy command is built (imports), before its own wrapper runs
            log("terminated (SIGTERM); nothing partial was left behind")
            sys.exit(143)
        except KeyboardInterrupt:
            log("interrupted; nothing partial was left behind")
            sys.exit(130)
        # standalone_mode=False returns the exit code of a typer.Exit / ctx.exit (e.g. --help) or
        # the command's return value (None from ours)
        if rv == 130 and not _SAID_INTERRUPTED[0]:
            # typer's own answer to a Ctrl-C before a command's wrapper ran (its options being parsed, a
            # lazy command imported); a command's wrapper ends an interrupt with a line of its own
            log(_interrupt_line("interrupted", mark))      # (after a commit, if one was over: names it)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Repair classifiers that lean on spurious correlations: measure, probe, fix, export.")


def _version(value: bool) -> None:
    if value:
        from repair._version import __version__

        say(f"repair {__version__}")
        raise typer.Exit(_stdout_lost(0))         # (stdout full: 2, before any command's own mapping)


@app.callback()
def main_callback(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (default: one line).")] = False,
                  version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                        help="Print the version and exit.")] = False):
    STATE["debug"] = debug


def _interrupted(e: BaseException) -> bool:
    """``e`` was raised while handling a Ctrl-C (a lazy ``import onnxruntime`` turns it into an
    ImportError): an interruption, not an internal error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


#: whether a command's wrapper has said that it was interrupted (its line names what it wrote)
_SAID_INTERRUPTED = [False]


def _interrupt_line(what: str, mark: Optional[int]) -> str:
    """The line an interrupted command ends with: what it wrote, when it was interrupted after committing
    outputs (they are complete, and a rerun needs ``--force`` to replace them), else that nothing was."""
    from repair.io import committed_since

    done = committed_since(mark) if mark is not None else []
    if not done:
        return f"{what}; nothing partial was left behind"
    shown = ", ".join(str(p) for p in done[:3]) + (f" and {len(done) - 3} more" if len(done) > 3 else "")
    return (f"{what} after writing {shown} (complete: a rerun needs --force to replace "
            f"{'it' if len(done) == 1 else 'them'}); nothing partial was left behind")


def command(fn: Callable) -> Callable:
    """Every command's decorator (under ``@app.command``): expands its option bundles (see
    ``options.with_options``) and maps library errors to one line on stderr and the documented
    exit codes."""
    fn = with_options(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = None
        try:
            from repair.io import commit_mark
            from repair.provenance import source_date

            mark = commit_mark()

            source_date()               # a malformed SOURCE_DATE_EPOCH: exit 2 before any work, not once it ran
            STATE.pop("stdout_lost", None)  # (a run before in this process, ended otherwise: not this one's)
            rv = fn(*args, **kwargs)
            if _stdout_lost(0):
                raise typer.Exit(2)
            return rv
        except typer.Exit as e:
            code = _stdout_lost(e.exit_code)
            if code != e.exit_code:
                raise typer.Exit(code)
            raise
        except RepairError as e:
            if STATE["debug"]:
                traceback.print_exc()
            # exit 3 is ours (README: "internal error: ..."), whether the library raised it knowingly or not
            # (a zoo's summary of its rows' failures is not one: it says which rows failed and why)
            prefix = ("FAILED: " if isinstance(e, GateFailed) else "internal error: " if type(e) is RepairError
                      else "error: ")
            log(one_line(f"{prefix}{e}"))
            raise typer.Exit(_stdout_lost(e.exit_code))
        except KeyboardInterrupt:
            log(_interrupt_line("interrupted", mark))
            _SAID_INTERRUPTED[0] = True
            raise typer.Exit(130)
        except Terminated:
            log(_interrupt_line("terminated (SIGTERM)", mark))
            raise typer.Exit(143)
        except Exception as e:  # an internal error: one line unless --debug
            if _interrupted(e):          # Ctrl-C inside an import or a library that wrapped it
                log(_interrupt_line("interrupted", mark))
                _SAID_INTERRUPTED[0] = True
                raise typer.Exit(130)
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                # the machine's limit, not our bug: what to change (torch's CUDA/CPU out-of-memory too)
                if STATE["debug"]:
                    traceback.print_exc()
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                log(one_line(f"error: out of memory ({type(e).__name__}{': ' + first if first else ''}); a smaller "
                             "--batch-size (a model repair: batch_size in its recipe params), fewer samples, or "
                             "another --device"))
                raise typer.Exit(2)
            if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
                # a path the user gave that no file system takes, wherever it was first looked up
                log(one_line(f"error: {e.filename}: {e.strerror or 'file name too long'}"))
                raise typer.Exit(2)
            if isinstance(e, OSError) and (e.errno in FULL_ERRNOS or e.errno == errno.EROFS):
                # the place written to is full or read-only, wherever a write met it: the user's file system
                if STATE["debug"]:
                    traceback.print_exc()
                where = f"{e.filename}: " if e.filename else ""
                log(one_line(f"error: {where}{e.strerror or e}"))
                raise typer.Exit(2)
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM) and e.filename:
                # a path the user gave that this user may not look up (a folder above it that cannot be
                # entered) or open, wherever it was first touched: the user's file system, never our bug
                if STATE["debug"]:
                    traceback.print_exc()
                log(one_line(f"error: {e.filename}: {e.strerror or 'permission denied'}"))
                raise typer.Exit(2)
            _internal(e)
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # a library's own BaseException (a Rust panic through pyo3): internal too
            _internal(e)
    return wrapper


def _internal(e: BaseException) -> None:
    """An internal error: one line on stderr (the traceback with --debug), exit 3."""
    if STATE["debug"]:
        traceback.print_exc()
    log(_internal_error_line(e))
    raise typer.Exit(3)


def _internal_error_line(e: BaseException) -> str:
    """``internal error: Type: the message's first line that says something (a message may open with a
    newline) (rerun ...)``."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return one_line(f"internal error: {type(e).__name__}: {first} (rerun as repair --debug COMMAND ... for the traceback)")
