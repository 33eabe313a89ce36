"""Start and talk to test workloads; every process started here is ended by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

from pycpt.testing import demo_workload
from pycpt.testing.demo_workload import chain_after


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def python_tree(code: str, *args: str) -> Iterator[Tuple["subprocess.Popen[bytes]", List[int]]]:
    """Python `code` (with `args`) in a session of its own, every inherited fd closed (as
    CRIU wants a tree it dumps); yields (its Popen, the pids to end): add every pid it makes.
    Afterwards each of them is SIGKILLed and the first one reaped, also when the test fails."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        start_new_session=True,
        close_fds=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = [proc.pid]
    try:
        yield proc, pids
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


class MemHash:
    """pycpt.demo_workload: N MiB of random memory and a hash chain that runs on."""

    PREFIX: List[str] = []

    def __init__(self, mib: int, workdir: Path) -> None:
        self.report = workdir / "report"
        self.proc = subprocess.Popen(
            [*self.PREFIX, sys.executable, demo_workload.__file__, str(mib), str(self.report)],
            start_new_session=True,
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: Path(f"{self.report}.ready").exists() or self.proc.poll() is not None,
            60,
            "the workload to start",
        )
        assert self.proc.poll() is None, "workload exited at start"
        self.pid = (
            int(Path(f"{self.report}.ready").read_text()) if not self.PREFIX else self._ns_init()
        )
        self.pids: List[int] = [self.pid, self.proc.pid]  # every pid it had (restores too)

    def _ns_init(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def sample(self, pid: int = 0, timeout: float = 30.0) -> Tuple[int, str, str]:
        """(step, chain, memory sha256) as the process reports them now."""
        pid = pid or self.pid
        if self.report.exists():
            self.report.unlink()
        os.kill(pid, signal.SIGUSR1)
        wait_for(self.report.exists, timeout, f"a report from pid {pid}")
        step, chain, mem = self.report.read_text().split()
        return int(step), chain, mem

    def adopt(self, pid: int) -> None:
        """Track a pid a restore gave this workload."""
        self.pid = pid
        self.pids.append(pid)

    def reap_original(self) -> int:
        """Wait for the first process (our child) after CRIU killed it; frees its pid."""
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Kill every pid of this workload that still exists; reap our children."""
        for pid in set(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if not _reaped(pid, 5):
                _thaw_v1_freezer_of(pid)  # a frozen v1 task cannot die (a failed test)
                _reaped(pid, 30)


def _reaped(pid: int, timeout: float) -> bool:
    """Wait for pid to end; reap it if it is our child. False if it still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child (restored without rst_sibling)
            if not alive(pid):
                return True
        time.sleep(0.01)
    return False


def _thaw_v1_freezer_of(pid: int) -> None:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            Path("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state").write_text("THAWED")


class PidNsMemHash(MemHash):
    """MemHash as init of its own pid namespace (and session leader there): a restore gets
    a new host pid, so it never waits for the old one to be freed."""

    PREFIX = ["unshare", "--pid", "--fork", "setsid"]


def chain_continues(before: Tuple[int, str, str], after: Tuple[int, str, str]) -> bool:
    """True if `after`'s chain is `before`'s chain hashed on exactly (step difference) times."""
    steps = after[0] - before[0]
    return steps >= 0 and chain_after(before[1], steps) == after[1]


COUNTER_C = (
    "#include <stdio.h>\n#include <unistd.h>\nint main(void){unsigned long i=0;"
    'for(;;){FILE*f=fopen("/counter","w");if(f){fprintf(f,"%lu\\n",i++);'
    "fclose(f);}usleep(20000);}}\n"
)


def build_counter(root: Path) -> None:
    """A static program at `root`/count that writes a rising count to /counter every 20 ms,
    for containers in a private root directory (skips the test when it cannot be built)."""
    import pytest

    source = root.parent / "count.c"
    source.write_text(COUNTER_C)
    built = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(root / "count"), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a static test program: {built.stderr.strip()[:200]}")
