"""Shared fixtures: real cgroups (v1 freezer and v2) and real processes, always cleaned up.

- `cgroup_version`: parametrized 1/2; skips when that hierarchy is missing or we are not root.
- `make_cgroup(version)`: a fresh cgroup under `pycpt-test-<pid>`; removed (rmdir) afterwards.
- `cgroup`: `make_cgroup(cgroup_version)`.
- `spawn(cgroup, n, kind)`: start n "sleep" or "busy" processes inside a cgroup; thawed,
  SIGKILLed by pid and reaped afterwards, even when the test fails.
- `stuck_task(cgroup)`: a task in uninterruptible, unfreezable sleep inside a cgroup.
- `testhosts`: pretend hosts "src" and "dst" (pycpt.testing.testhosts: network namespaces, one sshd
  each, separate state dirs and cgroup parents) for migration; removed afterwards.

The cgroup and process fixtures write the kernel files directly and never use pycpt
(tests/helpers/cgroups.py), so they stay independent of the code under test. The container
fixture (`ctenv`, with tests/helpers/containers.py's `Hasher`) sits on top of pycpt's own
Container, which its tests are about. Plain helpers live in tests/helpers/.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from pycpt.container import remove_all
from pycpt.testing.testhosts import TestHosts
from tests.helpers.cgroups import (
    WORKLOADS,
    StuckTaskMaker,
    raw_set_frozen,
    read_cgroup_pids,
    require_cgroup,
    rmdir_cgroup,
    wait_until,
)
from tests.helpers.hosts import testhosts_missing

# --- the host's own state is never touched -------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Without a state directory of its own a test would use /var/lib/pycpt: its containers,
    and its host key (made on first use by anything that signs a dump file). One for the
    session, set before any other fixture runs; tests may set their own."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("PYCPT_STATE_DIR"):
            mp.setenv("PYCPT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """pycpt's command sets umask 077 in its process; a test that runs it in-process must
    not leave that to the next test (directories made by mode would lose their x bits)."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# --- cgroup fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _cgroup_parents() -> Iterator[Dict[int, str]]:
    """`pycpt-test-<pid>` under each hierarchy, made on first use, removed at session end."""
    parents: Dict[int, str] = {}
    yield parents
    for path in parents.values():
        rmdir_cgroup(path)


@pytest.fixture
def make_cgroup(
    _cgroup_parents: Dict[int, str], request: pytest.FixtureRequest
) -> Iterator[Callable[[int], str]]:
    """Factory: `make_cgroup(version)` returns a new empty cgroup directory, removed afterwards."""
    made: List[str] = []
    counter = itertools.count()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]

    def make(version: int) -> str:
        mnt = require_cgroup(version)
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
        rmdir_cgroup(path)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def cgroup_version(request: pytest.FixtureRequest) -> int:
    """1 and 2, each skipped when that hierarchy is not available."""
    require_cgroup(request.param)
    return int(request.param)


@pytest.fixture
def cgroup(make_cgroup: Callable[[int], str], cgroup_version: int) -> str:
    """A fresh cgroup of `cgroup_version`, removed afterwards."""
    return make_cgroup(cgroup_version)


# --- process fixtures -----------------------------------------------------------------------------


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
            assert wait_until(
                lambda p=p: p.pid in read_cgroup_pids(cgroup) or p.poll() is not None, 10
            ), f"pid {p.pid} did not join {cgroup}"
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
    """A private state directory (root's, mode 0700, as pycpt requires) and cgroup parent;
    every container is stopped and every cgroup removed at the end, even when the test
    fails."""
    (tmp_path / "state").mkdir(mode=0o700)
    monkeypatch.setenv("PYCPT_STATE_DIR", str(tmp_path / "state"))
    # pycpt's temporary directories too, so that a test sees its own only
    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("PYCPT_CGROUP_PARENT", f"pycpt-test-{os.getpid()}-ct")
    yield tmp_path
    remove_all()


# --- pretend hosts for migration ---------------------------------------------------------------


@pytest.fixture
def testhosts(tmp_path: Path) -> Iterator[TestHosts]:
    """Hosts "src" and "dst" on this kernel, each with its own address, sshd, state dir and
    cgroup parent; everything is removed afterwards, even when the test fails."""
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    with TestHosts(["src", "dst"], tmp_path / "hosts") as hosts:
        yield hosts


@pytest.fixture
def lazy_pipe_size() -> Iterator[None]:
    """fs.pipe-max-size of at least 4 MiB for the test (CRIU's lazy-pages source needs pipes
    that big: post-copy); the old value is put back afterwards, unless someone else changed
    it meanwhile."""
    path = Path("/proc/sys/fs/pipe-max-size")
    old = int(path.read_text())
    if old >= 4 << 20:
        yield
        return
    path.write_text(str(4 << 20))
    try:
        yield
    finally:
        if int(path.read_text()) == 4 << 20:
            path.write_text(str(old))
