"""Errors with the exit codes the CLI maps them to.

0 ok, 1 gate failed / verification failed, 2 bad input or usage, 3 internal error.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union


class RepairError(Exception):
    exit_code = 3


class BadInput(RepairError):
    """A user-supplied file or argument is unusable. One line: the file and the problem."""
    exit_code = 2

    def __init__(self, problem: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnknownName(BadInput, KeyError):
    """A name no registry holds (a method, a model family): a bad input, and a ``KeyError`` for the
    callers that look a name up and fall back."""

    def __str__(self) -> str:          # KeyError's own would quote the message
        return BadInput.__str__(self)


class GateFailed(RepairError):
    """A CI gate (--fail-under-*) or an export verification did not pass."""
    exit_code = 1


class ZooModelsFailed(RepairError):
    """Models of a zoo that could not be run (after the others ran): the worst of their exit codes,
    2 (a model's input) or 3 (our bug), not the gate's 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = int(exit_code)


class Terminated(BaseException):
    """SIGTERM (what CI timeouts and ``kill`` send), raised in the main thread like Ctrl-C so every
    output transaction unwinds and removes its temporaries; the CLI exits 143."""


# ------------------------------------------------------------------ running the user's code
class _ToStderr:
    """The stream ``sys.stdout`` and ``sys.stderr`` are while the user's code runs inside repair
    (:func:`users_code`): every write goes on, at once, to the stderr of the moment the code started
    (never stdout: ``--json`` is one document), and the last line each thread wrote is kept (to name it
    when the code exits). A handler the code creates (``logging.basicConfig`` at import) keeps writing
    through it, to stderr, for the rest of the run."""

    def __init__(self, target):
        self.target, self._last = target, threading.local()

    @property
    def last(self) -> str:
        """The last non-blank line the calling thread wrote through this stream."""
        return getattr(self._last, "line", "")

    def write(self, text: str) -> int:
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        if lines:
            self._last.line = lines[-1]
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.target, name)


_USERS_LOCK = threading.Lock()
_users_running: Optional[list] = None     # [the stream, the stdout and stderr it replaced, how many run, fd 1 saved]


def flush_c_stdio() -> None:
    """The C library's buffered output flushed (``fflush(NULL)``) to the descriptors it was written for."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:            # noqa: BLE001 - no C library to ask (the streams then flush on their own)
        pass


def flush_all(*streams) -> None:
    """Python's ``streams`` (None or closed ones skipped), then the C library's buffers, flushed: before
    a file descriptor is pointed elsewhere, what was written lands where it was meant to."""
    for stream in streams:
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    flush_c_stdio()


def _fd1_to_fd2() -> Optional[int]:
    """File descriptor 1 pointed at descriptor 2 (what the user's code writes past Python's streams --
    ``os.write(1, ...)``, a C extension's ``printf``, a subprocess it starts -- goes to stderr too);
    returns a copy of the old descriptor 1 for :func:`_fd1_back` (None: nothing done, one of them is
    not open). What Python buffered for stdout is flushed first, so it lands where it was meant to."""
    import os

    flush_all(sys.stdout, sys.__stdout__)      # what Python and C code wrote before: to the stdout it was meant for
    try:
        saved = os.dup(1)
    except OSError:
        return None
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        return None
    return saved


def _fd1_back(saved: Optional[int]) -> None:
    """Descriptor 1 put back (:func:`_fd1_to_fd2`), after what the code left buffered (in
    ``sys.__stdout__``, or a C extension's ``printf`` into a pipe) is flushed to where it printed: stderr."""
    import os

    if saved is None:
        return
    flush_all(sys.__stdout__, sys.stdout)      # what the code wrote through them: to stderr, where it printed
    try:
        os.dup2(saved, 1)
    finally:
        os.close(saved)


class _HardExit(SystemExit):
    """``os._exit`` called by the user's code while it runs inside repair (:func:`users_code`)."""


def _exit_guard(real: Callable, pid: int) -> Callable:
    """``os._exit`` while the user's code runs: in this process, :class:`_HardExit` (refused as its
    ``sys.exit`` is: a hard exit would end this command with the code's status, 0 past a gate that was
    never measured); in a process the code forked, the real exit, as it asks."""
    def _exit(status):
        if os.getpid() != pid:
            real(status)
        raise _HardExit(status)
    return _exit


@contextmanager
def to_stderr() -> Iterator[_ToStderr]:
    """While the block runs, whatever prints -- in any thread -- goes to stderr (yields the stream):
    nothing but the results belongs on stdout, and they are written after every block has ended. That
    holds past Python's streams too: file descriptor 1 points at descriptor 2 meanwhile (a C extension's
    output, ``os.write(1, ...)``, a subprocess started without capturing its output). ``os._exit`` in this
    process raises :class:`_HardExit` meanwhile (:func:`_exit_guard`).

    Safe in threads (``auto`` fits candidates side by side, :mod:`repair.threads`; a service's calls at
    once): the streams are swapped once, by the first of the blocks running at the same time, and put
    back by the last, so two blocks ending in another order never leave stdout pointing at stderr
    (``contextlib.redirect_stdout`` in two threads did). The one home of that swap."""
    global _users_running
    with _USERS_LOCK:
        if _users_running is None:
            out = _ToStderr(sys.stderr)
            saved_fd = _fd1_to_fd2()
            _users_running = [out, sys.stdout, sys.stderr, 0, saved_fd, os._exit]
            sys.stdout = sys.stderr = out
            os._exit = _exit_guard(os._exit, os.getpid())
        _users_running[3] += 1
        out = _users_running[0]
    try:
        yield out
    finally:
        with _USERS_LOCK:
            _users_running[3] -= 1
            if _users_running[3] == 0:
                sys.stdout, sys.stderr, os._exit = _users_running[1], _users_running[2], _users_running[5]
                saved_fd, _users_running = _users_running[4], None
                _fd1_back(saved_fd)


@contextmanager
def users_code(what: str, path: Optional[Union[str, Path]] = None) -> Iterator[None]:
    """Around the user's code (a ``--factory`` module's import and call, a recipe plugin's import, a
    plugin method's call): what it prints goes to stderr as it prints it (:func:`to_stderr`); its
    ``sys.exit`` (a module that parses arguments when imported), or ``os._exit`` in this process, is
    :class:`BadInput` -- ``"{what} exited (SystemExit CODE); it printed: LAST LINE"``, with ``path`` --
    never this command's exit status (a gate must not pass, nor fail, by it), nor a Ray worker's."""
    with to_stderr() as out:
        out._last.line = ""
        try:
            yield
        except SystemExit as e:
            how = "os._exit" if isinstance(e, _HardExit) else "SystemExit"
            raise BadInput(f"{what} exited ({how} {e.code!r})" + (f"; it printed: {out.last[:200]}" if out.last
                                                                   else ""), path) from None


class SharedSetting:
    """A process-wide setting changed while blocks that may overlap in threads run: ``change()`` (returning
    what it replaced) by the first of them, ``restore(that)`` by the last -- never one block's saved state
    put back over another's (a save/restore per block, run from two threads, left the change in place for
    good). The one home of that rule (the csv module's field limit, transformers' logging)."""

    def __init__(self, change: Callable[[], object], restore: Callable[[object], None]):
        self._change, self._restore = change, restore
        self._lock, self._running, self._saved = threading.Lock(), 0, None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._saved = self._change()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    saved, self._saved = self._saved, None
                    self._restore(saved)


_QUIET = threading.Condition(threading.Lock())
_quiet: list = [0, None, None]             # blocks running, the filter they added, the recording thread
_quiet_mine = threading.local()            # this thread's blocks running


@contextmanager
def no_warnings() -> Iterator[None]:
    """Python's warnings ignored while the block runs (a library's noise the caller has handled: PIL's on
    an image refused by name, torch's on a refused pickle, an exporter's). Safe in threads, unlike
    ``warnings.catch_warnings`` (two overlapping blocks put back each other's filters, and an "ignore
    everything" filter stayed in the user's process): one "ignore" filter of its own (told apart from any
    of the user's by its message pattern) is put first by the first of the blocks running at the same
    time and taken out by the last; the user's filters, and those the user's code sets meanwhile, stay.
    It waits while another thread records warnings (:func:`caught_warnings`). The one home of ignoring
    warnings."""
    import warnings

    me = threading.get_ident()
    with _QUIET:
        _QUIET.wait_for(lambda: _quiet[2] in (None, me))
        if _quiet[0] == 0:
            warnings.filterwarnings("ignore", message=_OWN_PATTERN)
            _quiet[1] = warnings.filters[0]
        _quiet[0] += 1
        _quiet_mine.n = getattr(_quiet_mine, "n", 0) + 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet[0] -= 1
            _quiet_mine.n -= 1
            if _quiet[0] == 0:
                try:
                    warnings.filters.remove(_quiet[1])
                except ValueError:
                    pass   # the user's code reset the filters meanwhile
                _quiet[1] = None
            _QUIET.notify_all()


#: the message pattern of :func:`no_warnings`'s own filter: every message, written as no user writes it
_OWN_PATTERN = r"(?s)(?#repair.no_warnings).*"


@contextmanager
def caught_warnings() -> Iterator[list]:
    """The warnings raised while the block runs, caught (a list of ``warnings.WarningMessage``) and not
    shown: the caller says them when it decides to (a load that succeeded: its warnings as they would have
    been). The only block that records: it waits until no other thread ignores warnings
    (:func:`no_warnings`), and they wait for it, so no filter of one is left in place by the other."""
    import warnings

    me = threading.get_ident()
    with _QUIET:
        _QUIET.wait_for(lambda: _quiet[2] is None and _quiet[0] == getattr(_quiet_mine, "n", 0))
        _quiet[2] = me
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        with _QUIET:
            _quiet[2] = None
            _QUIET.notify_all()
