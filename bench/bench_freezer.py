"""Freeze latency: pycpt.Freezer.freeze() vs the raw kernel operation, v1 and v2.

    python -m pytest bench/bench_freezer.py --benchmark-only

Each round thaws the busy workload, lets it run, and freezes it until the kernel says
frozen. pycpt rounds (benchmarked) and raw rounds (the baseline, see _workloads.RawFreezer)
alternate on the same cgroup, so the ratio (median pycpt / median raw, in extra_info and in
the table at the end) compares like with like. Needs root; target: ratio within 2.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Iterator, List

import pytest
from _workloads import BusyCgroup, RawFreezer, cgroup_mount, raw_thaw
from bench_results import record

from pycpt.freezer import Freezer

ROUNDS = 40
SETTLE = 0.02  # s of running after a thaw, so that the tasks are busy again when frozen


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request: pytest.FixtureRequest) -> int:
    if os.geteuid() != 0:
        pytest.skip("the freezer needs root")
    if cgroup_mount(request.param) is None:
        pytest.skip(f"cgroup v{request.param} freezer not mounted")
    return int(request.param)


@pytest.fixture
def make_busy_cgroup() -> Iterator[Callable[[int, int, str], BusyCgroup]]:
    made = []

    def make(version: int, n: int, name: str) -> BusyCgroup:
        cg = BusyCgroup(version, n, name)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.close()


@pytest.mark.parametrize("n", [1, 10, 100])
def test_freeze_latency(benchmark, make_busy_cgroup, version: int, n: int) -> None:
    cg = make_busy_cgroup(version, n, f"freeze-{n}")
    raw = RawFreezer(cg.path, version)
    freezer = Freezer(cg.path)
    baseline: List[float] = []

    def thaw_and_settle() -> None:
        raw_thaw(cg.path, version)
        time.sleep(SETTLE)

    def setup() -> None:
        # One raw round between two pycpt rounds: both see the same conditions.
        thaw_and_settle()
        baseline.append(raw.freeze())
        thaw_and_settle()

    try:
        benchmark.pedantic(
            lambda: freezer.freeze(timeout=30), setup=setup, rounds=ROUNDS, iterations=1
        )
    finally:
        freezer.close()
        raw.close()
    ratio = record(
        benchmark, f"freeze v{version}, {n:3} busy tasks: Freezer vs raw write+wait", baseline
    )
    benchmark.extra_info.update(
        cgroup_version=version,
        tasks=n,
        raw_median_ms=round(statistics.median(baseline) * 1e3, 4),
        pycpt_median_ms=round(benchmark.stats.stats.median * 1e3, 4),
    )
    print(f"\nfreeze v{version} {n} busy: pycpt/raw median ratio {ratio:.2f}")
