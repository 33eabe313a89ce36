"""pycpt's CRIU client against its baselines, measured in the same run.

- RPC round trip (VERSION): a fresh `criu swrk` per call vs one kept session.
- dump and restore of 64 MiB and 512 MiB: pycpt.Criu vs the `criu` command line, same CRIU,
  same workload, same options, images on tmpfs; rounds interleaved so noise hits both.

Run: python -m pytest bench/bench_criu.py --benchmark-only -p no:randomly
Each benchmark's extra_info holds the baseline median and the ratio; a table of ratios is
printed at the end of the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from bench_results import record

import pycpt
from pycpt.testing import demo_workload

IMAGES_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "11"))


def rounds_for(mib: int) -> int:
    """Small dumps are cheap and their ratio noisier: give them more rounds."""
    return ROUNDS * 2 if mib <= 64 else ROUNDS


@pytest.fixture(scope="module")
def engine():
    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    try:
        return pycpt.find_engine()
    except pycpt.EngineError as exc:
        pytest.skip(f"no usable CRIU ({exc.message}); run `pycpt engine install`")


class PidNsWorkload:
    """memhash as init of its own pid namespace and session leader there, so a restore never
    waits for the host to free the old pid."""

    def __init__(self, mib: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pycpt-bench-"))
        report = self.dir / "report"
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "setsid",
                sys.executable,
                demo_workload.__file__,
                str(mib),
                str(report),
            ],
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready = Path(f"{report}.ready")
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "workload died"
            time.sleep(0.02)
        self.pid = int(_children(self.proc.pid)[0])  # the namespace's init, seen from here

    def stop(self) -> None:
        for pid in (self.pid, self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> list:
    out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert out, f"pid {pid} has no child yet"
    return out


def _state(pid: int) -> str:
    """The process state letter, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _fresh_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"pycpt-bench-{tag}-", dir=IMAGES_ROOT))


def _criu_cli(engine, *args: str) -> None:
    subprocess.run(
        engine.command(*args),
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


# --- RPC round trip --------------------------------------------------------------------


def test_version_round_trip_session(benchmark, engine):
    fresh = []

    oneshot = pycpt.Criu(engine, session=False)

    def one_fresh_call():
        t = time.perf_counter()
        oneshot.version()
        fresh.append(time.perf_counter() - t)

    with pycpt.Criu(engine) as session:
        session.version()  # start the kept swrk
        benchmark.pedantic(
            session.version, setup=one_fresh_call, rounds=max(ROUNDS, 30), warmup_rounds=1
        )
    record(benchmark, "VERSION round trip: kept session vs fresh swrk", fresh)


# --- dump ------------------------------------------------------------------------------


@pytest.mark.parametrize("mib", [64, 512])
def test_dump_vs_criu_cli(benchmark, engine, mib):
    w = PidNsWorkload(mib)
    cli_times, dirs = [], []
    try:
        # Each side writes into tmpfs memory the other side's images just freed: fresh guest
        # memory costs a VM far more to touch than recycled memory, which would skew the pair.
        def cli_round():
            while dirs:
                shutil.rmtree(dirs.pop())
            d = _fresh_dir("cli")
            t = time.perf_counter()
            _criu_cli(
                engine,
                "dump",
                "-t",
                str(w.pid),
                "-D",
                str(d),
                "-o",
                "dump.log",
                "--leave-running",
                "--network-lock",
                "nftables",
            )
            cli_times.append(time.perf_counter() - t)
            shutil.rmtree(d)
            d = _fresh_dir("rpc")
            dirs.append(d)
            return (d,), {}

        def pycpt_round(d):
            with pycpt.Criu(engine) as c:
                c.dump(w.pid, d, leave_running=True, network_lock="nftables")

        benchmark.pedantic(pycpt_round, setup=cli_round, rounds=rounds_for(mib), warmup_rounds=1)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        w.stop()
    record(benchmark, f"dump {mib} MiB: pycpt vs criu CLI", cli_times)


# --- restore -----------------------------------------------------------------------------


@pytest.mark.parametrize("mib", [64, 512])
def test_restore_vs_criu_cli(benchmark, engine, mib):
    w = PidNsWorkload(mib)
    images = _fresh_dir("img")
    cli_times, restored = [], []
    try:
        with pycpt.Criu(engine) as c:
            c.dump(w.pid, images, network_lock="nftables")
        w.stop()

        def kill_restored():
            # and wait until its memory is gone, so that no round shares the CPUs with the
            # teardown of the previous one
            while restored:
                pid = restored.pop()
                os.kill(pid, signal.SIGKILL)
                while _state(pid) not in ("Z", ""):
                    time.sleep(0.001)

        def cli_round():
            kill_restored()
            pidfile = images / "cli.pid"
            t = time.perf_counter()
            _criu_cli(
                engine,
                "restore",
                "-D",
                str(images),
                "-o",
                "restore-cli.log",
                "-d",
                "--pidfile",
                str(pidfile),
            )
            cli_times.append(time.perf_counter() - t)
            restored.append(int(pidfile.read_text()))
            pidfile.unlink()
            kill_restored()
            return (), {}

        def pycpt_round():
            with pycpt.Criu(engine) as c:
                restored.append(c.restore(images).pid)

        benchmark.pedantic(pycpt_round, setup=cli_round, rounds=rounds_for(mib), warmup_rounds=1)
        kill_restored()
    finally:
        w.stop()
        shutil.rmtree(images, ignore_errors=True)
    record(benchmark, f"restore {mib} MiB: pycpt vs criu CLI", cli_times)
