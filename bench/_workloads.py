"""Workloads for the benchmarks: a cgroup with N busy processes, removed afterwards.

Self-contained (no pycpt, no tests/ imports) so that the baseline does not share code with
the thing it is compared with.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import List, Optional

BUSY = ["sh", "-c", "while :; do :; done"]


def cgroup_mount(version: int) -> Optional[str]:
    """Mount point of the v1 freezer hierarchy or of cgroup2, or None."""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts = line.split()[:4]
            if version == 2 and fstype == "cgroup2":
                return mnt
            if version == 1 and fstype == "cgroup" and "freezer" in opts.split(","):
                return mnt
    return None


class BusyCgroup:
    """A cgroup `pycpt-bench-<pid>/<name>` holding n busy processes."""

    def __init__(self, version: int, n: int, name: str) -> None:
        mnt = cgroup_mount(version)
        if mnt is None:
            raise RuntimeError(f"cgroup v{version} freezer not mounted")
        self.version = version
        self.parent = os.path.join(mnt, f"pycpt-bench-{os.getpid()}")
        os.makedirs(self.parent, exist_ok=True)
        self.path = os.path.join(self.parent, name)
        os.mkdir(self.path)
        self.procs: List[subprocess.Popen] = []
        # Join the cgroup before exec, so that the workload never runs outside it.
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path, *BUSY]
        for _ in range(n):
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while len(self.pids()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("workload did not join its cgroup")
            time.sleep(0.01)

    def pids(self) -> List[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def close(self) -> None:
        """Thaw, SIGKILL our pids, reap them, remove the cgroup (and the parent if empty)."""
        raw_thaw(self.path, self.version)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(self.path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            os.rmdir(self.parent)
        except OSError:
            pass  # another benchmark's cgroup is still in it


def raw_thaw(path: str, version: int) -> None:
    """Thaw with a plain write (the kernel thaws at once; no wait needed)."""
    name, value = ("cgroup.freeze", b"0") if version == 2 else ("freezer.state", b"THAWED")
    fd = os.open(os.path.join(path, name), os.O_WRONLY)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


class RawFreezer:
    """The baseline: the kernel operation itself, written directly in Python.

    v1: write FROZEN, then re-read freezer.state in a tight loop (reads drive FREEZING to
    FROZEN). v2: write 1 to cgroup.freeze, then poll cgroup.events for POLLPRI until it says
    "frozen 1". Files stay open between rounds, which only favours the baseline.
    """

    def __init__(self, path: str, version: int) -> None:
        self.version = version
        if version == 1:
            self.ctl = os.open(os.path.join(path, "freezer.state"), os.O_RDWR)
            self.events = -1
        else:
            self.ctl = os.open(os.path.join(path, "cgroup.freeze"), os.O_RDWR)
            self.events = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
            self.poller = select.poll()
            self.poller.register(self.events, select.POLLPRI)

    def freeze(self) -> float:
        """Freeze and wait until frozen; return the seconds taken."""
        t0 = time.perf_counter()
        if self.version == 1:
            os.pwrite(self.ctl, b"FROZEN", 0)
            while os.pread(self.ctl, 32, 0) != b"FROZEN\n":
                pass
        else:
            os.pwrite(self.ctl, b"1", 0)
            while b"frozen 1" not in os.pread(self.events, 256, 0):
                self.poller.poll()
        return time.perf_counter() - t0

    def close(self) -> None:
        os.close(self.ctl)
        if self.events >= 0:
            os.close(self.events)
