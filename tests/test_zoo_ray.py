"""`repair zoo --ray` as the driver sees it, with no Ray installed: a stand-in ``ray`` module (what
:class:`repair.zoo.RayExecutor` calls of Ray; its ``init`` installs a SIGTERM handler as Ray's
does) runs the tasks in this process, so the driver's side (signals, staging folders, the address,
joining, what a task carries) is checked in CI. The real Ray is exercised by
``tests/test_zoo.py::test_ray_results_equal_local_and_survive_a_killed_worker`` where installed."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from conftest import make_zoo_parts, run_cli, time_limit


class FakeRay(types.ModuleType):
    """``ray`` for :class:`repair.zoo.RayExecutor`: ``init`` puts in Ray's own SIGTERM handler
    (``sys.exit(signum)``, ray/_private/worker.py) then calls ``on_init(address)``; a task runs when
    ``get`` asks for it; ``on_wait(fake)`` is called on each wait for a result (it may interrupt)."""

    def __init__(self, on_init=None, on_wait=None):
        super().__init__("ray")
        self.on_init, self.on_wait = on_init, on_wait
        self.connected, self.tasks, self.cancelled, self.waits, self.shut = False, {}, [], 0, False

    def is_initialized(self):
        return self.connected

    def init(self, address=None, **kwargs):
        def sigterm_handler(signum, frame):
            sys.exit(signum)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm_handler)
        if self.on_init is not None:
            self.on_init(address)
        self.connected = True

    def remote(self, **options):
        fake = self

        class Task:
            def __init__(self, fn):
                self.fn = fn

            def remote(self, task):
                ref = len(fake.tasks)
                fake.tasks[ref] = (self.fn, task)
                return ref

        return Task

    def wait(self, refs, num_returns=1, timeout=None):
        if refs and all(r in self.cancelled for r in refs):         # the driver waits for what it cancelled
            return list(refs), []
        self.waits += 1
        if self.on_wait is not None:
            self.on_wait(self)
        return list(refs[:1]), list(refs[1:])

    def get(self, ref):
        fn, task = self.tasks[ref]
        return fn(task)

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)

    def shutdown(self):
        self.shut, self.connected = True, False


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-ray"))


def manifest(tmp_path: Path, parts: Path, **defaults) -> Path:
    rows = [{"name": "a", "checkpoint": str(parts / "m0")}, {"name": "b", "checkpoint": str(parts / "m1")}]
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place", "data": str(parts / "val"),
                                                 **defaults}, "models": rows}, sort_keys=False))
    return path


def journal_names(path: Path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines()]


@pytest.fixture
def listening():
    """A TCP port that accepts connections (as a web server or Ray's dashboard port would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize("wrapped", [False, True])
def test_sigterm_under_ray_is_143_and_the_report_says_interrupted(parts, tmp_path, monkeypatch, wrapped):
    """ray.init replaces the command's SIGTERM handler with its own sys.exit: the driver puts the
    command's back, so SIGTERM mid-zoo unwinds as without Ray (exit 143, the report written and
    saying interrupted, the finished model journaled); also when Ray's compiled ``wait`` hands the
    handler's exception back as a SystemError (``wrapped``), as Ray 2.60 does."""
    from repair_cli.app import install_signal_handlers

    def term_on_second_wait(fake):
        if fake.waits != 2:                                 # model a is done, b under way
            return
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)                                  # ended by the handler's exception
        except BaseException as e:
            if not wrapped:
                raise
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from e

    fake = FakeRay(on_wait=term_on_second_wait)
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = manifest(tmp_path, parts)
    before = signal.getsignal(signal.SIGTERM)
    try:
        install_signal_handlers()
        ours = signal.getsignal(signal.SIGTERM)
        with time_limit(300):
            code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", "auto", "--workers", "2")
        assert signal.getsignal(signal.SIGTERM) is ours     # Ray's handler did not stay
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and "SIGTERM" in err, (code, err)
    report = tmp_path / "zoo-zoo"
    doc = json.loads((report / "zoo-report.json").read_text())
    assert doc["interrupted"] and doc["summary"]["pending"] == ["b"]
    assert journal_names(report / "journal.jsonl") == ["a"] and fake.shut


def test_an_interrupted_ray_run_leaves_no_staging_folder(parts, tmp_path, monkeypatch):
    """A Ray task cancelled by force never runs its own cleanup: the driver removes the staging
    folder of every row it did not journal once the executor has closed."""
    from repair.zoo import staging_dir

    out = tmp_path / "out"
    out.mkdir()

    def interrupt_mid_b(fake):
        if fake.waits == 2:                 # b's worker has staged part of its output, then Ctrl-C
            staging = staging_dir(out / "b")
            staging.mkdir()
            (staging / "b").mkdir()
            (staging / "b" / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "ray", FakeRay(on_wait=interrupt_mid_b))
    path = manifest(tmp_path, parts, output_dir=str(out))
    with time_limit(300):
        code, _, err = run_cli("zoo", path, "--ray", "auto", "--workers", "2")
    assert code == 130, err
    assert journal_names(tmp_path / "zoo-zoo" / "journal.jsonl") == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["a"]             # no .b.zoo-staging left


@pytest.mark.parametrize("address", ["", "foo", "ray://", "ray://:10001", "127.0.0.1:99999", "127.0.0.1:0",
                                     "a b:1", "auto ", "local", "ray://head:10001/x", "head:port"])
def test_a_ray_address_that_is_neither_auto_nor_host_port_is_exit_2_before_anything(parts, tmp_path, monkeypatch,
                                                                                     address):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = manifest(tmp_path, parts)
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", address)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --ray must be auto or a cluster address"), err
    assert repr(address) in err and not (tmp_path / "zoo-zoo").exists() and not fake.connected


def test_ray_addresses_taken():
    from repair.zoo import ray_address

    assert ray_address("auto") is None
    assert ray_address("ray://head:10001") == ("head", 10001)
    assert ray_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert ray_address("[::1]:6379") == ("::1", 6379)
    assert ray_address("anyscale://my-cluster.example.com:443/") == ("my-cluster.example.com", 443)


def test_a_port_that_answers_but_is_no_ray_is_exit_2_not_a_hang(parts, tmp_path, monkeypatch, listening):
    import repair.zoo as zoo

    release = threading.Event()
    fake = FakeRay(on_init=lambda address: release.wait(120))      # Ray waiting for a GCS that never speaks
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(zoo, "RAY_JOIN_TIMEOUT_S", 0.5, raising=False)
    path = manifest(tmp_path, parts)
    try:
        with time_limit(60):
            code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", f"127.0.0.1:{listening}")
    finally:
        release.set()
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot join the Ray cluster"), err
    assert "no Ray cluster joined within 0.5s" in err and not (tmp_path / "zoo-zoo").exists()


def test_a_ray_client_address_without_ray_client_says_how_to_install_it(parts, tmp_path, monkeypatch, listening):
    def no_client(address):
        raise ValueError("Ray Client requires pip package `ray[client]`. If you installed the minimal Ray "
                         "(e.g. `pip install ray`), please reinstall by executing `pip install ray[client]`.")

    monkeypatch.setitem(sys.modules, "ray", FakeRay(on_init=no_client))
    path = manifest(tmp_path, parts)
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", f"ray://127.0.0.1:{listening}")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "ray[client]" in last and "repair-toolkit[zoo]" in last, err


def test_a_relative_cache_dir_reaches_every_task_absolute(parts, tmp_path, monkeypatch):
    """A Ray worker runs in a folder of its own: the cache folder each task carries is the one the
    driver meant, taken from the driver's folder."""
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = manifest(tmp_path, parts)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--ray", "auto", "--workers", "1", "--cache-dir", "rel")
    assert code == 0, err
    assert [t["runtime"]["cache_dir"] for _, t in fake.tasks.values()] == [str(tmp_path / "cwd" / "rel")] * 2
    assert (tmp_path / "cwd" / "rel").is_dir()


def test_a_join_given_up_on_leaves_the_process_joined_to_no_cluster():
    """A join slower than the deadline is refused, and when it completes later it is undone: a later
    run must not find itself on the cluster this one refused (a review)."""
    import repair.zoo as zoo
    from repair.errors import BadInput

    fake = FakeRay(on_init=lambda address: time.sleep(0.6))
    with pytest.raises(BadInput, match="no Ray cluster joined within 0.2s"):
        zoo._join_within(fake, "127.0.0.1:1", 0.2)
    deadline = time.time() + 10
    while time.time() < deadline and not fake.shut:
        time.sleep(0.05)
    assert fake.shut and not fake.is_initialized()
    from repair.zoo import ray_address

    assert ray_address("[fe80::1%eth0]:6379") == ("fe80::1%eth0", 6379)
