"""Containers: pycpt's vzctl verbs against the `criu` command line and the raw kernel freeze.

- chkpnt of a 64 MiB and a 512 MiB container: Container.chkpnt (freeze, `criu dump --stream`
  into the dump file, kill) vs `criu dump --freeze-cgroup` of an identical container writing
  its images
  directory (and killing the tree, as chkpnt does). Target: within 1.25x.
- restore of the same sizes: Container.restore from the dump file (served to `criu restore
  --stream` while every BLAKE3 chunk hash is checked, the signature first; the tree runs
  once all match) vs `criu restore -d --root /` from the same images. Target: within 1.10x.
- suspend with 1, 10 and 100 busy tasks: Container.suspend() vs writing the cgroup's freeze
  file and waiting for the kernel to say frozen (_workloads.RawFreezer). Target: within 2x.
- the same suspend vs the design before the network hold (the container's links taken down
  on a C thread while the cgroup freezes, then the phase recorded). Target (issue 12): not
  slower by more than 1 ms (extra_info diff_ms).
- what the dump file alone costs over CRIU's images directory: bench_dumpfile.py.

Both sides use the same CRIU, the same options (nftables lock and container.CRIU_OPTIONS:
established TCP, file locks, ghost limit, skip in-flight) and tmpfs (/dev/shm) for images,
dump files and pycpt's temporary directories; rounds are interleaved so that noise hits both.
The state directory stays on disk, as in real use.

Run: python -m pytest bench/bench_container.py --benchmark-only -p no:randomly
Each benchmark's extra_info holds the baseline median and the ratio; a table of ratios is
printed at the end of the run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from _workloads import RawFreezer, raw_thaw
from bench_results import cpu_seconds, record, record_values

import pycpt
from pycpt import dumpfile
from pycpt._criu.options import command_line_args
from pycpt._native import ffi, lib
from pycpt.container import CRIU_OPTIONS, Container, ContainerStatus, remove_all
from pycpt.testing import demo_workload

IMAGES_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "11"))
SUSPEND_ROUNDS = 40
SETTLE = 0.02  # s of running after a thaw, so that the tasks are busy again when frozen
# What Container passes to CRIU besides the images (container.CRIU_OPTIONS), as CLI flags.
SAME_OPTIONS = command_line_args(CRIU_OPTIONS)


def rounds_for(mib: int) -> int:
    """Small dumps are cheap and their ratio noisier: give them more rounds."""
    return ROUNDS * 2 if mib <= 64 else ROUNDS


@pytest.fixture(scope="module")
def engine():
    if os.geteuid() != 0:
        pytest.skip("containers and CRIU need root")
    try:
        return pycpt.find_engine()
    except pycpt.EngineError as exc:
        pytest.skip(f"no usable CRIU ({exc.message}); run `pycpt engine install`")


@pytest.fixture
def ctenv(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state directory and cgroup parent, pycpt's temporary directories on tmpfs
    (like the CLI's images); every container is killed and every cgroup removed at the end,
    even when the benchmark fails."""
    monkeypatch.setenv("PYCPT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYCPT_CGROUP_PARENT", f"pycpt-bench-{os.getpid()}-ct")
    monkeypatch.setenv("TMPDIR", str(IMAGES_ROOT))
    monkeypatch.setattr(tempfile, "tempdir", str(IMAGES_ROOT))
    yield tmp_path
    remove_all()


def _discard(cgroup: Path) -> None:
    """Kill every task of `cgroup`, wait until they are gone (and their memory with them),
    remove it."""
    if cgroup.is_dir():
        pycpt.Freezer(cgroup).kill(timeout=30)
        _rmdir(cgroup)


def _rmdir(path: Path) -> None:
    # a task killed a moment ago may still be leaving: EBUSY for a short while
    deadline = time.monotonic() + 10
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _start_workload(ctenv: Path, ct: str, mib: int) -> Container:
    """A container whose init is the demo workload holding `mib` MiB, once it is ready."""
    report = ctenv / f"{ct}-report"
    c = Container.start(ct, [sys.executable, demo_workload.__file__, str(mib), str(report)])
    ready = Path(f"{report}.ready")
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert c.init_pid is not None and time.monotonic() < deadline, "workload died"
        time.sleep(0.01)
    return c


def _criu_cli(engine, *args: str) -> None:
    subprocess.run(
        engine.command(*args),
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --- chkpnt --------------------------------------------------------------------------------


@pytest.mark.parametrize("mib", [64, 512])
def test_chkpnt_vs_criu_cli(benchmark, engine, ctenv, mib):
    out = Path(tempfile.mkdtemp(prefix="pycpt-bench-chkpnt-", dir=IMAGES_ROOT))
    names = itertools.count()
    cli_times: List[float] = []
    cpu: Dict[str, List[float]] = {"cli": [], "pycpt": []}
    try:

        def cli_round():
            # Each side writes into tmpfs memory the other side's output just freed: fresh
            # guest memory costs a VM far more to touch than recycled memory.
            _clear(out)
            c = _start_workload(ctenv, f"cli{mib}-{next(names)}", mib)
            images = out / "images"
            images.mkdir()  # as the CLI wants it
            t, c0 = time.perf_counter(), cpu_seconds()
            _criu_cli(
                engine,
                "dump",
                "-t",
                str(c.init_pid),
                "-D",
                str(images),
                "--freeze-cgroup",
                str(c.cgroup),
                "--network-lock",
                "nftables",
                *SAME_OPTIONS,
                "-o",
                "dump.log",
            )
            cli_times.append(time.perf_counter() - t)
            cpu["cli"].append(cpu_seconds() - c0)
            _discard(c.cgroup)  # CRIU killed the tree; wait until it is gone
            shutil.rmtree(images)
            return (_start_workload(ctenv, f"ct{mib}-{next(names)}", mib),), {}

        def pycpt_round(c):
            c0 = cpu_seconds()
            c.chkpnt(str(out / f"Dump.{c.id}"))
            cpu["pycpt"].append(cpu_seconds() - c0)

        benchmark.pedantic(pycpt_round, setup=cli_round, rounds=rounds_for(mib), warmup_rounds=1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record(benchmark, f"chkpnt {mib} MiB: Container vs criu CLI dump", cli_times)
    record_values(f"chkpnt {mib} MiB, CPU seconds: Container vs criu CLI", cpu["pycpt"], cpu["cli"])


# --- restore -------------------------------------------------------------------------------


@pytest.mark.parametrize("mib", [64, 512])
def test_restore_vs_criu_cli(benchmark, engine, ctenv, mib):
    work = Path(tempfile.mkdtemp(prefix="pycpt-bench-restore-", dir=IMAGES_ROOT))
    ct = f"rst{mib}"
    cli_times: List[float] = []
    cpu: Dict[str, List[float]] = {"cli": [], "pycpt": []}
    try:
        dump = _start_workload(ctenv, ct, mib).chkpnt(str(work / f"Dump.{ct}"))
        images = work / "images"
        dumpfile.extract_dump_file(dump, images)  # the very images inside the dump file
        c = Container(ct)

        def end_previous():
            # and wait until its memory is gone, so that no round shares the CPUs with the
            # teardown of the previous one
            if c.status is ContainerStatus.RUNNING:
                c.stop(timeout=30)
            _discard(c.cgroup)  # the CLI's tree (CRIU puts it back into the same cgroup)

        def cli_round():
            end_previous()
            t, c0 = time.perf_counter(), cpu_seconds()
            _criu_cli(
                engine,
                "restore",
                "-D",
                str(images),
                "-d",
                "--root",
                "/",
                *SAME_OPTIONS,
                "-o",
                "restore-cli.log",
            )
            cli_times.append(time.perf_counter() - t)
            cpu["cli"].append(cpu_seconds() - c0)
            assert pycpt.Freezer(c.cgroup).pids(), "the CLI restored nothing"
            end_previous()
            return (), {}

        def pycpt_round():
            c0 = cpu_seconds()
            Container.restore(ct, str(dump))
            cpu["pycpt"].append(cpu_seconds() - c0)

        benchmark.pedantic(pycpt_round, setup=cli_round, rounds=rounds_for(mib), warmup_rounds=1)
        end_previous()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record(benchmark, f"restore {mib} MiB: Container vs criu CLI", cli_times)
    record_values(
        f"restore {mib} MiB, CPU seconds: Container vs criu CLI", cpu["pycpt"], cpu["cli"]
    )


# --- suspend -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 100])
def test_suspend_vs_raw_freeze(benchmark, ctenv, n):
    busy = f"for i in $(seq {n}); do (while :; do :; done) & done; wait"
    c = Container.start(f"busy{n}", ["sh", "-c", busy])
    cgroup = c.cgroup
    deadline = time.monotonic() + 30
    while len(pycpt.Freezer(cgroup).pids()) < n + 1:  # the busy tasks and their sh
        assert time.monotonic() < deadline, "the busy tasks did not start"
        time.sleep(0.01)
    version = 2 if (cgroup / "cgroup.freeze").exists() else 1
    raw = RawFreezer(str(cgroup), version)
    baseline: List[float] = []

    def setup():
        # One raw round between two pycpt rounds: both see the same conditions.
        if c.status is ContainerStatus.SUSPENDED:
            c.resume()
        time.sleep(SETTLE)
        baseline.append(raw.freeze())
        raw_thaw(str(cgroup), version)
        time.sleep(SETTLE)

    try:
        benchmark.pedantic(c.suspend, setup=setup, rounds=SUSPEND_ROUNDS, iterations=1)
    finally:
        raw.close()
    c.stop(timeout=30)
    benchmark.extra_info.update(cgroup_version=version, tasks=n)
    record(benchmark, f"suspend v{version}, {n:3} busy tasks: Container vs raw freeze", baseline)


def _links_down_suspend(c: Container) -> float:
    """The suspend before the network hold: the links taken down on a C thread while the
    cgroup freezes, then the phase recorded (inside the container's lock, as it was done).
    Its C shim still exists, for containers an older pycpt suspended. Seconds taken."""
    started = time.perf_counter()
    with c._locked():
        buf = ffi.new("char[]", 4096)
        job = ffi.new("pycpt_links_t **")
        assert lib.pycpt_container_links_start(c.init_pid, 0, buf, 4096, job) == 0
        pycpt.Freezer(c.cgroup).freeze()
        length = ffi.new("int *")
        assert lib.pycpt_container_links_join(job[0], length) == 0
        down = ffi.string(buf, length[0]).decode().split()
        c._save(phase="suspended", dump_done=False, links_down=down)
    return time.perf_counter() - started


@pytest.mark.parametrize("n", [1, 10, 100])
def test_suspend_hold_vs_links_down(benchmark, ctenv, n):
    busy = f"for i in $(seq {n}); do (while :; do :; done) & done; wait"
    c = Container.start(f"hold{n}", ["sh", "-c", busy])
    deadline = time.monotonic() + 30
    while len(pycpt.Freezer(c.cgroup).pids()) < n + 1:
        assert time.monotonic() < deadline, "the busy tasks did not start"
        time.sleep(0.01)
    baseline: List[float] = []

    def setup():
        # one round of the old suspend between two of today's; resume() brings the links
        # up again (links_down) as it does for a container an older pycpt suspended
        if c.status is ContainerStatus.SUSPENDED:
            c.resume()
        time.sleep(SETTLE)
        baseline.append(_links_down_suspend(c))
        c.resume()
        time.sleep(SETTLE)

    benchmark.pedantic(c.suspend, setup=setup, rounds=SUSPEND_ROUNDS, iterations=1)
    c.resume()
    c.stop(timeout=30)
    record(benchmark, f"suspend, {n:3} busy tasks: network hold vs links down", baseline)
    diff_ms = (benchmark.stats.stats.median - statistics.median(baseline)) * 1e3
    benchmark.extra_info.update(tasks=n, diff_ms=diff_ms)
