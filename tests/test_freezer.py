"""pycpt.freezer on real cgroups (v1 and v2) with real processes; needs root."""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable, List

import pytest

from pycpt.errors import FreezerError, FreezeTimeoutError
from pycpt.freezer import Freezer, FreezerState
from tests.helpers.cgroups import (
    cpu_ticks,
    cpu_time_ns,
    kernel_says_frozen,
    kernel_says_thawed,
    raw_set_frozen,
    read_cgroup_pids,
)


def assert_not_running(pids: List[int], pause: float = 0.2) -> None:
    """No task uses CPU time during `pause` (schedstat ns and stat ticks both unchanged)."""
    before = {pid: (cpu_time_ns(pid), cpu_ticks(pid)) for pid in pids}
    time.sleep(pause)
    after = {pid: (cpu_time_ns(pid), cpu_ticks(pid)) for pid in pids}
    moved = [pid for pid in pids if before[pid] != after[pid]]
    assert not moved, f"{len(moved)} of {len(pids)} frozen tasks still ran: {moved[:5]}"


def assert_all_running(pids: List[int], within: float = 20.0) -> None:
    """Every task gains CPU time again (a liveness check, generous deadline)."""
    start = {pid: cpu_time_ns(pid) for pid in pids}
    waiting = set(pids)
    deadline = time.monotonic() + within
    while waiting and time.monotonic() < deadline:
        time.sleep(0.02)
        waiting = {pid for pid in waiting if cpu_time_ns(pid) == start[pid]}
    assert not waiting, f"{len(waiting)} of {len(pids)} tasks did not run again"


@pytest.mark.parametrize("kind", ["sleep", "busy"])
@pytest.mark.parametrize("n", [1, 10, 100])
def test_freeze_thaw(cgroup: str, cgroup_version: int, spawn: Callable, n: int, kind: str) -> None:
    procs = spawn(cgroup, n, kind)
    pids = [p.pid for p in procs]
    f = Freezer(cgroup)
    assert f.version == cgroup_version
    assert sorted(f.pids()) == sorted(pids)
    assert f.state is FreezerState.THAWED

    seconds = f.freeze(timeout=30)
    assert seconds > 0
    assert kernel_says_frozen(cgroup)
    assert f.state is FreezerState.FROZEN
    assert_not_running(pids)

    seconds = f.thaw(timeout=30)
    assert seconds > 0
    assert kernel_says_thawed(cgroup)
    assert f.state is FreezerState.THAWED
    if kind == "busy":
        assert_all_running(pids)
    assert all(p.poll() is None for p in procs)


def test_freeze_twice_and_thaw_twice(cgroup: str, spawn: Callable) -> None:
    spawn(cgroup, 3, "busy")
    f = Freezer(cgroup)
    f.freeze()
    f.freeze()  # already frozen: returns at once
    assert kernel_says_frozen(cgroup)
    f.thaw()
    f.thaw()
    assert kernel_says_thawed(cgroup)


def test_empty_cgroup(cgroup: str) -> None:
    f = Freezer(cgroup)
    assert f.pids() == [] and f.tasks() == []
    f.freeze()
    assert f.state is FreezerState.FROZEN
    f.thaw()
    assert f.state is FreezerState.THAWED


def test_pids_and_tasks(cgroup: str, spawn: Callable) -> None:
    # Each python process has a second thread: pids() lists it once, tasks() twice.
    code = (
        "import threading, time; threading.Thread(target=time.sleep, args=(1e5,)).start(); "
        "time.sleep(1e5)"
    )
    procs = spawn(cgroup, 2, [sys.executable, "-c", code])
    f = Freezer(cgroup)
    assert sorted(f.pids()) == sorted(p.pid for p in procs)
    deadline = time.monotonic() + 10
    while len(f.tasks()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    tasks = f.tasks()
    assert len(tasks) == 4
    assert set(f.pids()) <= set(tasks)


def test_kill_busy(cgroup: str, spawn: Callable) -> None:
    procs = spawn(cgroup, 10, "busy")
    f = Freezer(cgroup)
    f.kill(timeout=30)
    assert read_cgroup_pids(cgroup) == []
    assert [p.wait(timeout=10) for p in procs] == [-9] * 10
    assert kernel_says_thawed(cgroup)


def test_kill_frozen_cgroup_keeps_freeze_setting(cgroup: str, spawn: Callable) -> None:
    procs = spawn(cgroup, 10, "busy")
    f = Freezer(cgroup)
    f.freeze()
    f.kill(timeout=30)
    assert read_cgroup_pids(cgroup) == []
    assert [p.wait(timeout=10) for p in procs] == [-9] * 10
    assert f.state is FreezerState.FROZEN  # the setting is kept, as cgroup.kill does on v2
    f.thaw()


def test_kill_reaches_nested_cgroups(cgroup: str, spawn: Callable) -> None:
    """A container's cgroup has children: kill() empties the whole tree (v1 walks it, v2's
    cgroup.kill covers it)."""
    child = os.path.join(cgroup, "child")
    os.mkdir(child)
    procs: list = []
    try:
        procs = spawn(cgroup, 2, "busy") + spawn(child, 3, "sleep")
        Freezer(cgroup).kill(timeout=30)
        assert read_cgroup_pids(cgroup) == [] and read_cgroup_pids(child) == []
        assert [p.wait(timeout=10) for p in procs] == [-9] * 5
    finally:
        for p in procs:  # on failure: end them here, the child cgroup must be empty to go
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        os.rmdir(child)


def test_a_freeze_asked_before_us_survives_close(cgroup: str, spawn: Callable) -> None:
    """The staged workflow: suspend (freeze) in one step, then a `with Freezer(...)` in the
    next must not thaw what it did not freeze."""
    procs = spawn(cgroup, 3, "busy")
    Freezer(cgroup).freeze()
    with Freezer(cgroup) as f:
        assert f.state is FreezerState.FROZEN
    assert Freezer(cgroup).state is FreezerState.FROZEN
    assert_not_running([p.pid for p in procs])
    Freezer(cgroup).thaw()
    assert_all_running([p.pid for p in procs])


def test_kill_forking_tree(cgroup: str, spawn: Callable) -> None:
    # The shell keeps forking busy children while it is being killed.
    tree = "while :; do (while :; do :; done) & sleep 0.005; done"
    (shell,) = spawn(cgroup, 1, ["sh", "-c", tree])
    deadline = time.monotonic() + 10
    while len(read_cgroup_pids(cgroup)) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(read_cgroup_pids(cgroup)) >= 20
    Freezer(cgroup).kill(timeout=30)
    assert read_cgroup_pids(cgroup) == []
    assert shell.wait(timeout=10) == -9


def test_kill_empty_cgroup(cgroup: str) -> None:
    Freezer(cgroup).kill()
    assert read_cgroup_pids(cgroup) == []


def test_context_manager_thaws_on_exception(cgroup: str, spawn: Callable) -> None:
    pids = [p.pid for p in spawn(cgroup, 5, "busy")]

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with Freezer(cgroup) as f:
            assert kernel_says_frozen(cgroup)
            assert_not_running(pids, 0.1)
            raise Boom()
    assert kernel_says_thawed(cgroup)
    assert f.state is FreezerState.THAWED
    assert_all_running(pids)


def test_close_is_idempotent_and_only_thaws_what_it_froze(cgroup: str, spawn: Callable) -> None:
    spawn(cgroup, 2, "sleep")
    raw_set_frozen(cgroup, True)  # frozen by someone else
    other = Freezer(cgroup)
    other.close()
    other.close()
    assert not kernel_says_thawed(cgroup)
    raw_set_frozen(cgroup, False)

    f = Freezer(cgroup)
    f.freeze()
    f.close()
    assert kernel_says_thawed(cgroup)
    raw_set_frozen(cgroup, True)
    f.close()  # already closed: leaves the cgroup alone
    assert not kernel_says_thawed(cgroup)


def test_usable_again_after_close(cgroup: str, spawn: Callable) -> None:
    spawn(cgroup, 2, "busy")
    f = Freezer(cgroup)
    with f:
        assert kernel_says_frozen(cgroup)
    assert kernel_says_thawed(cgroup)
    f.freeze()  # reopens the cgroup's files
    assert kernel_says_frozen(cgroup)
    f.close()
    assert kernel_says_thawed(cgroup)


def test_freeze_timeout_rolls_back(cgroup: str, spawn: Callable, stuck_task) -> None:
    busy = spawn(cgroup, 5, "busy")
    stuck = stuck_task(cgroup)
    f = Freezer(cgroup)
    t0 = time.monotonic()
    with pytest.raises(FreezeTimeoutError) as info:
        f.freeze(timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    err = info.value
    assert err.path == cgroup and err.timeout == 0.3 and err.operation == "freeze"
    assert err.state is FreezerState.THAWED
    assert isinstance(err, FreezerError)
    assert kernel_says_thawed(cgroup)
    assert f.state is FreezerState.THAWED
    assert_all_running([p.pid for p in busy])
    assert stuck.poll() is None  # still waiting for the lock (v2's thaw may wake it briefly)
    stuck_task.release()
    assert stuck.wait(timeout=10) == 1  # it went on: mkdir failed with ENOTCONN
    assert all(p.poll() is None for p in busy)
    f.freeze()  # nothing stuck any more
    f.thaw()


def test_state_freezing_while_a_task_is_stuck(cgroup: str, spawn: Callable, stuck_task) -> None:
    spawn(cgroup, 2, "sleep")
    stuck_task(cgroup)
    raw_set_frozen(cgroup, True)
    time.sleep(0.1)
    assert Freezer(cgroup).state is FreezerState.FREEZING
    raw_set_frozen(cgroup, False)


def test_freeze_timeout_keeps_an_earlier_freeze(cgroup: str, stuck_task) -> None:
    stuck_task(cgroup)
    raw_set_frozen(cgroup, True)  # someone else is freezing it already
    with pytest.raises(FreezeTimeoutError) as info:
        Freezer(cgroup).freeze(timeout=0.05)
    assert info.value.state is FreezerState.FREEZING
    raw_set_frozen(cgroup, False)


# --- bad input ------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path) -> None:
    with pytest.raises(FreezerError) as info:
        Freezer(tmp_path / "nope")
    assert "no such cgroup" in str(info.value) and info.value.hint


def test_not_a_cgroup(tmp_path) -> None:
    with pytest.raises(FreezerError) as info:
        Freezer(tmp_path)
    assert "not a cgroup" in str(info.value)
    assert info.value.path == str(tmp_path)


def test_root_cgroup_has_no_freezer(cgroup_version: int) -> None:
    from tests.helpers.cgroups import cgroup_mount

    root = cgroup_mount(cgroup_version)
    with pytest.raises(FreezerError, match="no freezer"):
        Freezer(root)


def test_cgroup_removed_under_us(make_cgroup: Callable[[int], str], cgroup_version: int) -> None:
    path = make_cgroup(cgroup_version)
    f = Freezer(path)
    os.rmdir(path)
    with pytest.raises(FreezerError) as info:
        f.freeze()
    assert info.value.__cause__.errno in (errno.ENOENT, errno.ENODEV)  # files held open: ENODEV
    assert info.value.hint
    with pytest.raises(FreezerError):
        f.state  # noqa: B018 (reading the property is what must fail)


@pytest.mark.parametrize("bad", [None, 42, b"/sys/fs/cgroup", ["/sys"]])
def test_bad_path_type(bad: object) -> None:
    with pytest.raises(ValueError):
        Freezer(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_bad_timeout(cgroup: str, timeout: object) -> None:
    with pytest.raises(ValueError):
        Freezer(cgroup).freeze(timeout=timeout)  # type: ignore[arg-type]
    assert kernel_says_thawed(cgroup)


def test_public_api() -> None:
    import pycpt

    assert pycpt.Freezer is Freezer and pycpt.FreezerState is FreezerState
