"""Concurrency and signals (session 43's concurrency audit): two runs committing the same outputs
(``--force``, two CI jobs) commit one after the other, so one run's whole set ends in place; a refused
rerun still removes an interrupted run's temporaries; a Ctrl-C once a command is over is ignored, as a
SIGTERM is; a Ctrl-C before a command's wrapper runs says so in one line."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from repair import io


def test_a_commit_waits_for_another_commit_of_the_same_outputs(tmp_path):
    final = tmp_path / "X"
    held = io._commit_locks([final])           # another run is committing X
    assert held, "no commit lock could be taken here"
    tx = io.OutputSet()
    with open(tx.stage(final), "w") as f:
        f.write("new")
    t = threading.Thread(target=tx.commit)
    try:
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not final.exists()     # waits: never interleaves its renames with the other's
    finally:
        io._release_commit_locks(held)
        t.join(10)
        tx.close()
    assert final.read_text() == "new"
    assert not os.path.exists(held[0][1])          # lock files do not pile up in the temporary folder


def test_a_refused_rerun_removes_an_interrupted_runs_temporaries(tmp_path):
    from repair.errors import BadInput

    final = tmp_path / "X"
    final.mkdir()
    stale = tmp_path / ".X.abc12345.tmp"       # a run killed mid-write: its temp folder, unlocked, old
    stale.mkdir()
    old = time.time() - 2 * io.UNLOCKED_STALE_SECONDS
    os.utime(stale, (old, old))
    with pytest.raises(BadInput):
        io.check_output(final, force=False, log=lambda m: None)
    assert not stale.exists() and final.exists()


def test_a_ctrl_c_once_a_command_is_over_is_ignored():
    from repair_cli.app import settle_signals

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    try:
        settle_signals()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_a_ctrl_c_before_the_commands_wrapper_is_one_line(monkeypatch, capsys):
    import typer
    from repair_cli.app import app

    group = typer.main.get_group(app)

    def interrupted(*a, **k):           # typer's answer to a KeyboardInterrupt while parsing: exit code 130
        return 130

    monkeypatch.setattr(typer.core.TyperGroup, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        group.main(["eval"], standalone_mode=True)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; nothing partial was left behind"


def test_a_commit_interrupted_while_it_waits_releases_the_locks_it_took(tmp_path, monkeypatch):
    """(the session's third review) a Ctrl-C while waiting for the second lock lost the first: a later commit
    of that output in the same process waited forever."""
    import fcntl

    a, b = tmp_path / "a", tmp_path / "b"
    other = io._commit_locks([b])                  # another run holds b
    real = fcntl.flock

    def interrupted(fd, op):
        if not op & fcntl.LOCK_NB:
            raise KeyboardInterrupt
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", interrupted)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        io._commit_locks([a, b], lines.append)
    monkeypatch.setattr(fcntl, "flock", real)
    assert lines and "waiting for another run" in lines[0]
    again = io._commit_locks([a])                  # a's lock was released: taken at once
    assert again
    io._release_commit_locks(again)
    io._release_commit_locks(other)
