"""Cgroup and process helpers for the fixtures and tests. They write the kernel's files
directly and never use pycpt, so they stay independent of the code under test (the FUSE
trap of StuckTaskMaker mounts through ctypes for the same reason)."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

import pytest


def cgroup_mount(version: int) -> Optional[str]:
    """Mount point of the v1 freezer hierarchy (version 1) or of cgroup2 (version 2)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts = line.split()[:4]
            if version == 2 and fstype == "cgroup2":
                return mnt
            if version == 1 and fstype == "cgroup" and "freezer" in opts.split(","):
                return mnt
    return None


def cgroup_version_of(path: str) -> int:
    """1 for a v1 freezer cgroup, 2 for a cgroup v2 directory."""
    return 2 if os.path.exists(os.path.join(path, "cgroup.freeze")) else 1


def read_cgroup_pids(path: str) -> List[int]:
    """Pids listed in cgroup.procs."""
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


def raw_set_frozen(path: str, frozen: bool) -> None:
    """Ask the kernel to freeze/thaw without waiting (v1 freezer.state, v2 cgroup.freeze)."""
    if cgroup_version_of(path) == 2:
        name, value = "cgroup.freeze", "1" if frozen else "0"
    else:
        name, value = "freezer.state", "FROZEN" if frozen else "THAWED"
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def kernel_says_frozen(path: str) -> bool:
    """The kernel's own view: v2 cgroup.events `frozen 1`, v1 freezer.state `FROZEN`."""
    if cgroup_version_of(path) == 2:
        with open(os.path.join(path, "cgroup.events")) as f:
            return re.search(r"^frozen 1$", f.read(), re.M) is not None
    with open(os.path.join(path, "freezer.state")) as f:
        return f.read().strip() == "FROZEN"


def kernel_says_thawed(path: str) -> bool:
    """v2: cgroup.freeze 0 and `frozen 0`; v1: freezer.state THAWED."""
    if cgroup_version_of(path) == 2:
        with open(os.path.join(path, "cgroup.freeze")) as f:
            wanted = f.read().strip()
        with open(os.path.join(path, "cgroup.events")) as f:
            return wanted == "0" and re.search(r"^frozen 0$", f.read(), re.M) is not None
    with open(os.path.join(path, "freezer.state")) as f:
        return f.read().strip() == "THAWED"


def cpu_time_ns(pid: int) -> int:
    """CPU time the task has used, in ns (/proc/PID/schedstat, first field)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def cpu_ticks(pid: int) -> int:
    """utime + stime from /proc/PID/stat, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def task_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat (R, S, D, T, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# x86_64 syscall numbers of the calls the stuck tasks block in
_MKDIR_CALLS = {83, 258}  # mkdir, mkdirat
_STAT_CALLS = {4, 6, 262, 332}  # stat, lstat, newfstatat, statx


def blocked_in(pid: int, calls: set) -> bool:
    """True when `pid` sleeps uninterruptibly inside one of `calls` (a D state seen while
    Python starts, on a page fault or I/O, does not count)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            number = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return task_state(pid) == "D" and number.lstrip("-").isdigit() and int(number) in calls


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def rmdir_cgroup(path: str) -> None:
    if not os.path.isdir(path):
        return
    for child in os.scandir(path):
        if child.is_dir(follow_symlinks=False):
            rmdir_cgroup(child.path)
    # A task SIGKILLed a moment ago may still be leaving the cgroup: EBUSY for a short while.
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def require_cgroup(version: int) -> str:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root")
    mnt = cgroup_mount(version)
    if mnt is None:
        what = "the v1 freezer hierarchy" if version == 1 else "cgroup2"
        pytest.skip(f"{what} is not mounted")
    return mnt


WORKLOADS = {
    "sleep": ["sleep", "100000"],
    "busy": ["sh", "-c", "while :; do :; done"],
}


def move_into(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


class StuckTaskMaker:
    """Starts tasks that no freezer can freeze (see the `stuck_task` fixture)."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []
        self.cgroups: List[str] = []
        self.mnt: Optional[str] = None
        self.mounted = False
        self.fd: Optional[int] = None

    def __call__(self, cgroup: str) -> subprocess.Popen:
        """Start one stuck task inside `cgroup` (mounting the FUSE trap on first use)."""
        if self.fd is None:
            self._mount()
        task = self._popen(f"import os; os.mkdir({self.mnt + '/y'!r})")
        move_into(cgroup, task.pid)
        self.cgroups.append(cgroup)
        assert wait_until(lambda: blocked_in(task.pid, _MKDIR_CALLS), 10), "task did not block"
        return task

    def release(self) -> None:
        """Abort the FUSE connection: the blocked tasks get an error and run on."""
        if self.fd is not None:
            os.close(self.fd)  # last /dev/fuse fd closed: the kernel aborts the connection
            self.fd = None

    def _popen(self, code: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(p)
        return p

    def _mount(self) -> None:
        if not os.path.exists("/dev/fuse"):
            pytest.skip("no /dev/fuse to make a task that cannot be frozen")
        libc = ctypes.CDLL(None, use_errno=True)
        self.mnt = tempfile.mkdtemp(prefix="pycpt-test-fuse-")
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"pycpt-test-stuck", self.mnt.encode(), b"fuse", 0, opts) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"cannot mount fuse: {os.strerror(err)}")
        self.mounted = True
        # Nobody answers FUSE, so this lookup blocks holding the directory lock (shared).
        holder = self._popen(f"import os; os.stat({self.mnt + '/x'!r})")
        assert wait_until(lambda: blocked_in(holder.pid, _STAT_CALLS), 10), "holder did not block"

    def cleanup(self) -> None:
        """Thaw, kill (by pid) and reap every task started, then unmount."""
        for path in self.cgroups:
            if os.path.isdir(path):
                raw_set_frozen(path, False)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        self.release()
        for p in self.procs:
            p.wait(timeout=30)
        if self.mounted:
            ctypes.CDLL(None, use_errno=True).umount2(str(self.mnt).encode(), 2)  # MNT_DETACH
        if self.mnt is not None:
            os.rmdir(self.mnt)
