"""threads.workers_for: large work side by side only where every thread is busy and the working sets fit."""
import torch

import repair.threads as T


def test_large_work_side_by_side_only_when_every_thread_is_busy_and_memory_allows(monkeypatch):
    big = 1e8                                        # 50,000 x 2,048: 400 MB of float32
    monkeypatch.setattr(T, "memory_bytes", lambda: 24 * 2 ** 30)
    with T.limited(2):
        assert T.workers_for(4, big) == 2            # two threads, four tasks: each on one
        assert T.workers_for(1, big) == 1
        assert T.workers_for(4, 1e6) == 2            # small work, as before
        assert T.workers_for(4, big, "cuda") == 1
    with T.limited(1):
        assert T.workers_for(4, big) == 1
    with T.limited(8):
        assert T.workers_for(4, big) == 1            # more threads than tasks: one task on all of them
        assert T.workers_for(4, 1e6) == 4
    monkeypatch.setattr(T, "memory_bytes", lambda: 4 * 2 ** 30)
    with T.limited(2):
        assert T.workers_for(4, big) == 1            # 2 x 3 x 400 MB > half of 4 GiB
    monkeypatch.setattr(T, "memory_bytes", lambda: None)
    with T.limited(2):
        assert T.workers_for(4, big) == 1            # unknown memory: one at a time


def test_memory_bytes_is_a_positive_size_or_none():
    m = T.memory_bytes()
    assert m is None or m > 0
    assert torch.get_num_threads() >= 1


def test_a_cgroup_limit_below_the_machine_is_the_memory(tmp_path, monkeypatch):
    """A job's (nested cgroup's) limit counts, not only the root's; "max" means none."""
    lim, unlimited = tmp_path / "memory.max", tmp_path / "parent.max"
    lim.write_text("1073741824\n")
    unlimited.write_text("max\n")
    monkeypatch.setattr(T, "_cgroup_limit_files", lambda: [str(lim), str(unlimited), str(tmp_path / "absent")])
    assert T.memory_bytes() == 1073741824
    monkeypatch.setattr(T, "_cgroup_limit_files", lambda: [str(unlimited)])
    m = T.memory_bytes()
    assert m is None or m > 1073741824


def test_the_cgroup_files_walk_up_from_this_process():
    v1 = "9:name=systemd:/\n4:memory:/slice/job7\n1:cpu:/\n"
    assert T._cgroup_limit_files(v1) == ["/sys/fs/cgroup/memory/slice/job7/memory.limit_in_bytes",
                                         "/sys/fs/cgroup/memory/slice/memory.limit_in_bytes",
                                         "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    assert T._cgroup_limit_files("0::/user.slice/job\n") == ["/sys/fs/cgroup/user.slice/job/memory.max",
                                                              "/sys/fs/cgroup/user.slice/memory.max",
                                                              "/sys/fs/cgroup/memory.max"]
