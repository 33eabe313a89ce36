"""Containers running the demo workload, and what their reports must show."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pycpt.container import Container
from pycpt.testing import demo_workload
from tests.helpers.workload import chain_after, wait_for


class Hasher:
    """The demo workload as a container's init, sampled through its report file."""

    def __init__(self, ctenv: Path, ct: str = "ct1", mib: int = 16) -> None:
        self.report = ctenv / f"{ct}-report"
        self.ct = Container.start(
            ct, [sys.executable, demo_workload.__file__, str(mib), str(self.report)]
        )
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
