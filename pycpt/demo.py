"""`pycpt demo`: the vzctl workflow on a live container, saying what happened and how long
each step took: start, chkpnt to one dump file, restore, then the same in stages, then an
online migration between two test hosts built on this machine (pycpt.testing.testhosts)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from pycpt._criu.lazy_pages import LAZY_PIPE_SIZE
from pycpt.container import Container, cgroup_root
from pycpt.engine import find_engine
from pycpt.freezer import Freezer
from pycpt.testing import demo_workload
from pycpt.testing.testhosts import TestHosts


def run_demo(mib: int = 64, keep: bool = False, out: Callable[[str], None] = print) -> Dict:
    """Run the demo in a private state directory and cgroup parent; returns the figures."""
    t0 = time.perf_counter()
    engine = find_engine()
    workdir = Path(tempfile.mkdtemp(prefix="pycpt-demo-"))
    saved = {k: os.environ.get(k) for k in ("PYCPT_STATE_DIR", "PYCPT_CGROUP_PARENT")}
    os.environ["PYCPT_STATE_DIR"] = str(workdir / "state")
    os.environ["PYCPT_CGROUP_PARENT"] = f"pycpt-demo-{os.getpid()}"
    report = workdir / "report"
    figures: Dict = {"mib": mib}
    out(
        f"pycpt demo: the vzctl workflow with CRIU {engine.version_string} "
        f"({engine.source}: {engine.path})"
    )
    out(f"  state in {workdir / 'state'}")

    def step(n: int, text: str, seconds: float, key: str) -> None:
        figures[key] = seconds
        out(f"  [{n}] {text:<68} {seconds * 1e3:8.1f} ms")

    def timed(fn: Callable, *args: Any, **kw: Any) -> Tuple[Any, float]:
        t = time.perf_counter()
        result = fn(*args, **kw)
        return result, time.perf_counter() - t

    ct = None
    try:
        ct, seconds = timed(
            Container.start, "demo", [sys.executable, demo_workload.__file__, str(mib), str(report)]
        )
        _wait(lambda: Path(f"{report}.ready").exists(), 120)
        step(
            1,
            f"pycpt start demo: init pid {ct.init_pid}, {mib} MiB of random memory, hashing on",
            seconds,
            "start_s",
        )
        before = _sample(ct, report)
        out(f"      it reports step {before[0]}, memory sha256 {before[2][:16]}…")

        dump, seconds = timed(ct.chkpnt)
        step(
            2,
            f"pycpt chkpnt demo: {Path(str(dump)).stat().st_size >> 20} MiB dump file; "
            "container gone",
            seconds,
            "chkpnt_s",
        )
        ct, seconds = timed(Container.restore, "demo")
        step(3, f"pycpt restore demo: running again, init pid {ct.init_pid}", seconds, "restore_s")
        middle = _sample(ct, report)
        ok1 = _continued(before, middle)
        out(
            f"      it reports step {middle[0]}: memory "
            f"{'matches' if middle[2] == before[2] else 'DIFFERS'}, hash chain "
            f"{'continued exactly' if ok1 else 'BROKEN'}"
        )

        _, seconds = timed(ct.suspend)
        step(
            4,
            "pycpt chkpnt demo --suspend: every process frozen, network held",
            seconds,
            "suspend_s",
        )
        _, seconds = timed(ct.dump)
        step(5, "pycpt chkpnt demo --dump: dump file written; still frozen", seconds, "dump_s")
        _, seconds = timed(ct.kill)
        step(6, "pycpt chkpnt demo --kill", seconds, "kill_s")
        ct, seconds = timed(Container.restore, "demo", undump_only=True)
        frozen = Freezer(ct.cgroup).state.name.lower()
        step(
            7,
            f"pycpt restore demo --undump: rebuilt, {frozen}, not one instruction run",
            seconds,
            "undump_s",
        )
        _, seconds = timed(ct.resume)
        step(8, "pycpt restore demo --resume: running", seconds, "resume_s")
        after = _sample(ct, report)
        ok2 = _continued(middle, after)
        out(
            f"      it reports step {after[0]}: memory "
            f"{'matches' if after[2] == before[2] else 'DIFFERS'}, hash chain "
            f"{'continued exactly' if ok2 else 'BROKEN'} (+{after[0] - before[0]} steps "
            "since [1])"
        )
        figures.update(memory_ok=after[2] == before[2] == middle[2], computation_ok=ok1 and ok2)
        ct.stop()
        figures["migrate_ok"] = _migration(mib, workdir, step, out, figures)
    finally:
        if ct is not None and ct.cgroup.is_dir():
            ct.stop()
        parent = cgroup_root()
        if parent.is_dir():
            parent.rmdir()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if keep:
            out(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    figures["total_s"] = time.perf_counter() - t0
    figures["ok"] = bool(
        figures.get("memory_ok") and figures.get("computation_ok") and figures.get("migrate_ok")
    )
    out(f"{'done' if figures['ok'] else 'FAILED'} in {figures['total_s']:.2f} s")
    return figures


def _migration(
    mib: int,
    workdir: Path,
    step: Callable[[int, str, float, str], None],
    out: Callable[[str], None],
    figures: Dict,
) -> bool:
    """vzmigrate --online between two test hosts on this machine: a container started on
    "src" moves to "dst" while it computes; its memory and hash chain are checked there."""
    t = time.perf_counter()
    pipe = Path("/proc/sys/fs/pipe-max-size")
    old_pipe = pipe.read_text().strip()
    with contextlib.ExitStack() as undo:
        if int(old_pipe) < LAZY_PIPE_SIZE:
            out(
                f"      (fs.pipe-max-size {old_pipe} -> {LAZY_PIPE_SIZE} for post-copy, "
                "put back at the end)"
            )
            pipe.write_text(str(LAZY_PIPE_SIZE))
            undo.callback(pipe.write_text, old_pipe)
        hosts = undo.enter_context(TestHosts(["src", "dst"], workdir / "hosts"))
        src, dst = hosts["src"], hosts["dst"]
        step(
            9,
            f"test hosts up: src {src.address} and dst {dst.address}, an sshd each",
            time.perf_counter() - t,
            "hosts_s",
        )
        report = workdir / "web-report"
        with src.as_current():
            ct, seconds = _timed(
                Container.start,
                "web",
                [sys.executable, demo_workload.__file__, str(mib), str(report)],
            )
            _wait(lambda: Path(f"{report}.ready").exists(), 120)
            before = _sample(ct, report)
        step(10, f"on src: pycpt start web ({mib} MiB, hashing on)", seconds, "start2_s")
        t = time.perf_counter()
        done = src.run(
            ["pycpt", "migrate", "--online", "--json", "dst", "web"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            out(f"      migrate failed: {done.stderr.strip()}")
            return False
        stats = json.loads(done.stdout)
        figures["migrate"] = stats
        step(
            11,
            f"on src: pycpt migrate --online dst web ({stats['mode']}): frozen "
            f"{stats['frozen_window'] * 1e3:.0f} ms",
            time.perf_counter() - t,
            "migrate_s",
        )
        with dst.as_current():
            after = _sample(Container("web"), report)
        with src.as_current():
            gone = not Container("web").exists
        ok = _continued(before, after) and gone
        out(
            f"      on dst it reports step {after[0]}: memory "
            f"{'matches' if after[2] == before[2] else 'DIFFERS'}, hash chain "
            f"{'continued exactly' if _continued(before, after) else 'BROKEN'}; "
            f"{'gone from src' if gone else 'STILL ON src'}"
        )
        return ok
    return False


def _timed(fn: Callable, *args: Any, **kw: Any) -> Tuple[Any, float]:
    t = time.perf_counter()
    result = fn(*args, **kw)
    return result, time.perf_counter() - t


def _wait(ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the demo workload did not answer")
        time.sleep(0.01)


def _sample(ct: Container, report: Path) -> Tuple[int, str, str]:
    if report.exists():
        report.unlink()
    os.kill(ct.init_pid or 0, signal.SIGUSR1)
    _wait(report.exists, 60)
    step, chain, mem = report.read_text().split()
    return int(step), chain, mem


def _continued(before: Tuple[int, str, str], after: Tuple[int, str, str]) -> bool:
    steps = after[0] - before[0]
    return (
        steps > 0
        and demo_workload.chain_after(before[1], steps) == after[1]
        and before[2] == after[2]
    )
