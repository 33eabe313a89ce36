"""Shared fixtures: real cgroups (v1 freezer and v2) and real processes, always cleaned up.

- `cgroup_version`: parametrized 1/2; skips when that hierarchy is missing or we are not root.
- `make_cgroup(version)`: a fresh cgroup under `pycpt-test-<pid>`; removed (rmdir) afterwards.
- `cgroup`: `make_cgroup(cgroup_version)`.
- `spawn(cgroup, n, kind)`: start n "sleep" or "busy" processes inside a cgroup; thawed,
  SIGKILLed by pid and reaped afterwards, even when the test fails.
- `stuck_task(cgroup)`: a task in uninterruptible, unfreezable sleep inside a cgroup.
- `testhosts`: pretend hosts "src" and "dst" (pycpt.testing.testhosts: network namespaces, one sshd
  each, separate state dirs and cgroup parents) for migration; removed afterwards.

The cgroup and process fixtures write the kernel files directly and never use pycpt, so they
stay independent of the code under test. The container fixtures (`ctenv`, `Hasher`) sit on
top of pycpt's own Container, which their tests are about.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from pathlib import Path

from pycpt.testing import demo_workload
from pycpt.container import Container, remove_all
from pycpt.testing.testhosts import TestHosts
from workload import chain_after, wait_for

# --- cgroup helpers (no pycpt) -----------------------------------------------------------------


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


def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _rmdir_cgroup(path: str) -> None:
    if not os.path.isdir(path):
        return
    for child in os.scandir(path):
        if child.is_dir(follow_symlinks=False):
            _rmdir_cgroup(child.path)
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


# --- cgroup fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _cgroup_parents() -> Iterator[Dict[int, str]]:
    """`pycpt-test-<pid>` under each hierarchy, made on first use, removed at session end."""
    parents: Dict[int, str] = {}
    yield parents
    for path in parents.values():
        _rmdir_cgroup(path)


def _require_cgroup(version: int) -> str:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root")
    mnt = cgroup_mount(version)
    if mnt is None:
        what = "the v1 freezer hierarchy" if version == 1 else "cgroup2"
        pytest.skip(f"{what} is not mounted")
    return mnt


@pytest.fixture
def make_cgroup(_cgroup_parents: Dict[int, str], request: pytest.FixtureRequest
                ) -> Iterator[Callable[[int], str]]:
    """Factory: `make_cgroup(version)` returns a new empty cgroup directory, removed afterwards."""
    made: List[str] = []
    counter = itertools.count()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]

    def make(version: int) -> str:
        mnt = _require_cgroup(version)
        parent = _cgroup_parents.get(version)
        if parent is None:
            parent = os.path.join(mnt, f"pycpt-test-{os.getpid()}")
            os.makedirs(parent, exist_ok=True)
            _cgroup_parents[version] = parent
        path = os.path.join(parent, f"{name}-{next(counter)}")
        os.mkdir(path)
        made.append(path)
        if version == 2 and not os.path.exists(os.path.join(path, "cgroup.freeze")):
            pytest.skip("cgroup v2 has no cgroup.freeze here (Linux < 5.2)")
        return path

    yield make
    for path in reversed(made):
        if os.path.isdir(path):
            raw_set_frozen(path, False)  # tasks of a frozen v1 cgroup cannot die
        _rmdir_cgroup(path)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def cgroup_version(request: pytest.FixtureRequest) -> int:
    """1 and 2, each skipped when that hierarchy is not available."""
    _require_cgroup(request.param)
    return int(request.param)


@pytest.fixture
def cgroup(make_cgroup: Callable[[int], str], cgroup_version: int) -> str:
    """A fresh cgroup of `cgroup_version`, removed afterwards."""
    return make_cgroup(cgroup_version)


# --- process fixtures -----------------------------------------------------------------------------

WORKLOADS = {
    "sleep": ["sleep", "100000"],
    "busy": ["sh", "-c", "while :; do :; done"],
}


def _move_into(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


@pytest.fixture
def spawn(make_cgroup: Callable[[int], str]) -> Iterator[Callable[..., List[subprocess.Popen]]]:
    """Factory: `spawn(cgroup, n, kind="sleep"|"busy"|argv)` starts n processes in `cgroup`.

    At teardown their cgroups are thawed, the processes SIGKILLed by pid and reaped. (It
    depends on make_cgroup so that it is torn down before the cgroups are removed.)
    """
    procs: List[subprocess.Popen] = []
    cgroups: List[str] = []

    def start(cgroup: str, n: int = 1, kind: object = "sleep") -> List[subprocess.Popen]:
        argv = WORKLOADS[kind] if isinstance(kind, str) else list(kind)  # type: ignore[call-overload]
        if cgroup not in cgroups:
            cgroups.append(cgroup)
        # The process joins the cgroup before exec, so nothing it forks can start outside.
        wrapped = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]
        started = []
        for _ in range(n):
            p = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, close_fds=True)
            procs.append(p)
            started.append(p)
        for p in started:
            assert _wait_until(lambda p=p: p.pid in read_cgroup_pids(cgroup) or p.poll() is not None,
                               10), f"pid {p.pid} did not join {cgroup}"
        return started

    yield start
    for path in cgroups:
        if os.path.isdir(path):
            raw_set_frozen(path, False)
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait(timeout=30)


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
        _move_into(cgroup, task.pid)
        self.cgroups.append(cgroup)
        assert _wait_until(lambda: blocked_in(task.pid, _MKDIR_CALLS), 10), "task did not block"
        return task

    def release(self) -> None:
        """Abort the FUSE connection: the blocked tasks get an error and run on."""
        if self.fd is not None:
            os.close(self.fd)  # last /dev/fuse fd closed: the kernel aborts the connection
            self.fd = None

    def _popen(self, code: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
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
        assert _wait_until(lambda: blocked_in(holder.pid, _STAT_CALLS), 10), \
            "holder did not block"

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


@pytest.fixture
def stuck_task(make_cgroup: Callable[[int], str]) -> Iterator[StuckTaskMaker]:
    """Factory: `stuck_task(cgroup)` starts a task in `cgroup` that no freezer can freeze.

    A helper outside the cgroup looks up a file on a FUSE mount that nobody serves and blocks
    holding the directory lock; the task then does mkdir there and waits for that lock in
    uninterruptible sleep, which neither freezer interrupts. `stuck_task.release()` aborts the
    FUSE connection and lets both go on. Skips without /dev/fuse.
    """
    maker = StuckTaskMaker()
    yield maker
    maker.cleanup()


# --- CRIU ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine():
    """A usable CRIU (pycpt.Engine), or a skip saying why; a failure when
    PYCPT_REQUIRE_CRIU=1 (CI), where a missing CRIU is a set-up bug, not a missing feature."""
    import pycpt

    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    try:
        return pycpt.find_engine()
    except pycpt.EngineError as exc:
        if os.environ.get("PYCPT_REQUIRE_CRIU") == "1":
            raise
        pytest.skip(f"no usable CRIU ({exc.message}); run `pycpt engine install`")


# --- containers ------------------------------------------------------------------------------


@pytest.fixture
def ctenv(engine, tmp_path, monkeypatch):
    """A private state directory and cgroup parent; every container is stopped and every
    cgroup removed at the end, even when the test fails."""
    monkeypatch.setenv("PYCPT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYCPT_CGROUP_PARENT", f"pycpt-test-{os.getpid()}-ct")
    yield tmp_path
    remove_all()


class Hasher:
    """The demo workload as a container's init, sampled through its report file."""

    def __init__(self, ctenv: Path, ct: str = "ct1", mib: int = 16) -> None:
        self.report = ctenv / f"{ct}-report"
        self.ct = Container.start(ct, [sys.executable, demo_workload.__file__, str(mib),
                                       str(self.report)])
        wait_for(lambda: Path(f"{self.report}.ready").exists(), 60, "the workload")

    def sample(self, timeout: float = 30):
        if self.report.exists():
            self.report.unlink()
        os.kill(self.ct.init_pid, signal.SIGUSR1)
        wait_for(self.report.exists, timeout, "a report")
        step, chain, mem = self.report.read_text().split()
        return int(step), chain, mem


def continued(before, after) -> bool:
    """True if `after` shows the same memory and a hash chain that went on exactly."""
    steps = after[0] - before[0]
    return steps > 0 and chain_after(before[1], steps) == after[1] and before[2] == after[2]




# --- pretend hosts for migration ---------------------------------------------------------------


def testhosts_missing() -> Optional[str]:
    """Why test hosts cannot be built here, or None."""
    import shutil

    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, sshd)"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"test hosts need {tool} (`make setup` installs openssh-server and iproute2)"
    return None


@pytest.fixture
def testhosts(tmp_path: Path) -> Iterator[TestHosts]:
    """Hosts "src" and "dst" on this kernel, each with its own address, sshd, state dir and
    cgroup parent; everything is removed afterwards, even when the test fails."""
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    with TestHosts(["src", "dst"], tmp_path / "hosts") as hosts:
        yield hosts
