"""`pycpt demo`: checkpoint and restore a live process, saying what happened and how long
each step took."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from pycpt import demo_workload
from pycpt.criu import Criu
from pycpt.engine import find_engine


class _Workload:
    """The demo workload, a child of ours in its own session; asked for samples by signal."""

    def __init__(self, mib: int, workdir: Path) -> None:
        self.report = workdir / "report"
        self.proc = subprocess.Popen(
            [sys.executable, demo_workload.__file__, str(mib), str(self.report)],
            start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self._wait(lambda: Path(f"{self.report}.ready").exists(), 120, "the workload to start")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not _alive(self.pid):
                raise RuntimeError(f"the demo workload (pid {self.pid}) exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def sample(self) -> Tuple[int, str, str]:
        if self.report.exists():
            self.report.unlink()
        os.kill(self.pid, signal.SIGUSR1)
        self._wait(self.report.exists, 60, "the workload's report")
        step, chain, mem = self.report.read_text().split()
        return int(step), chain, mem

    def stop(self) -> None:
        for pid in {self.pid, self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_demo(mib: int = 64, keep: bool = False, out: Callable[[str], None] = print) -> Dict:
    """Start a workload, dump it, restore it, and prove it went on; returns the figures."""
    t0 = time.perf_counter()
    engine = find_engine()
    workdir = Path(tempfile.mkdtemp(prefix="pycpt-demo-"))
    images = workdir / "images"
    out(f"pycpt demo: checkpoint and restore a live process with CRIU "
        f"{engine.version_string} ({engine.source}: {engine.path})")
    out(f"  images go to {images}")
    workload: Optional[_Workload] = None
    figures: Dict = {"mib": mib}

    def step(n: int, text: str, seconds: float) -> None:
        out(f"  [{n}] {text:<66} {seconds * 1e3:8.1f} ms")

    try:
        t = time.perf_counter()
        workload = _Workload(mib, workdir)
        before = workload.sample()
        figures["start_s"] = time.perf_counter() - t
        step(1, f"started pid {workload.pid}: {mib} MiB of random memory, hashing on",
             figures["start_s"])
        out(f"      it reports step {before[0]}, memory sha256 {before[2][:16]}…")

        with Criu(engine) as criu:
            dumped = criu.dump(workload.pid, images)
            figures["dump_s"] = dumped.elapsed
            figures["frozen_s"] = dumped.frozen_time
            pages = dumped.stats.get("pages_written", 0)
            workload.proc.wait()  # CRIU killed it after the dump; reap it to free its pid
            step(2, f"dumped it: {pages * 4096 >> 20} MiB of images, frozen "
                 f"{dumped.frozen_time * 1e3:.0f} ms; the process is gone", dumped.elapsed)

            restored = criu.restore(images, rst_sibling=True)
            workload.pid = restored.pid
            figures["restore_s"] = restored.elapsed
            step(3, f"restored it from the images as pid {restored.pid}", restored.elapsed)

        after = workload.sample()
        steps = after[0] - before[0]
        mem_ok = after[2] == before[2]
        chain_ok = steps > 0 and demo_workload.chain_after(before[1], steps) == after[1]
        figures.update(memory_ok=mem_ok, computation_ok=chain_ok, steps_after=steps)
        out(f"  [4] it reports step {after[0]}: memory checksum "
            f"{'matches' if mem_ok else 'DIFFERS'}, hash chain "
            f"{'continued exactly' if chain_ok else 'BROKEN'} (+{steps} steps since [1])")
    finally:
        if workload is not None:
            workload.stop()
        if keep:
            out(f"  images kept in {images}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    figures["total_s"] = time.perf_counter() - t0
    ok = figures["memory_ok"] and figures["computation_ok"]
    out(f"{'done' if ok else 'FAILED'} in {figures['total_s']:.2f} s")
    figures["ok"] = ok
    return figures
