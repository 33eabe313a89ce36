"""Migration with the page channel as a Unix socket through ssh (protocol 3) against the TCP
page channel of an earlier pycpt, in the same run, between two test hosts.

The baseline is another checkout of pycpt whose page channel is a TCP port (e.g. main at
8ed57bc), named by PYCPT_BENCH_BEFORE (its pycpt/ needs the C extension: copy pycpt/_cpt.abi3.so
of this tree there when csrc/ is the same); without it the benchmark skips. One container
hops back and forth between hosts "src" and "dst": each round is one hop with the earlier
code on both hosts (the baseline), then one with this tree's, same mode, same memory. The
figures come from `--json`: the frozen window (freeze at the source to "running" at the
target) and the total (the command's start to the source's removal; post-copy: after the
last page arrived), medians and ratios this/baseline.

Run: PYCPT_BENCH_BEFORE=/path/to/old/checkout \
     python -m pytest bench/bench_page_channel.py --benchmark-only -p no:randomly
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from bench_results import RESULTS, record

import pycpt
from pycpt._migration.target import mem_available
from pycpt.container import Container
from pycpt.testing import demo_workload
from pycpt.testing.testhosts import Host, TestHosts

ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "0"))
SIZES = [64, 256]
MODES = ["stopcopy", "postcopy"]
THIS_TREE = Path(pycpt.__file__).resolve().parent.parent


def rounds_for(mib: int) -> int:
    return ROUNDS or {64: 5}.get(mib, 3)


@pytest.fixture(scope="module")
def before() -> Path:
    text = os.environ.get("PYCPT_BENCH_BEFORE")
    if not text:
        pytest.skip("PYCPT_BENCH_BEFORE (a checkout with the TCP page channel) is not set")
    tree = Path(text).resolve()
    if not (tree / "pycpt" / "_migration" / "pages.py").is_file():
        pytest.skip(f"{tree} is not a pycpt checkout")
    if not list((tree / "pycpt").glob("_cpt*.so")):
        pytest.skip(f"{tree}/pycpt has no C extension (copy or build _cpt.abi3.so there)")
    return tree


class Hopper:
    """The container and where it is now; hop(tree) migrates it to the other host with the
    pycpt of `tree` on both hosts."""

    def __init__(self, hosts: TestHosts, ct: str, mib: int, report: Path) -> None:
        self.hosts, self.ct, self.where = hosts, ct, "src"
        with hosts["src"].as_current():
            Container.start(ct, [sys.executable, demo_workload.__file__, str(mib), str(report)])
        deadline = time.monotonic() + 300
        while not Path(f"{report}.ready").exists():
            assert time.monotonic() < deadline, "the workload did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        with self.hosts[self.where].as_current():
            Container(self.ct).stop(timeout=60)

    def hop(self, tree: Path, mode: str) -> dict:
        here: Host = self.hosts[self.where]
        there = "dst" if self.where == "src" else "src"
        remote = f"env PYTHONPATH={tree} pycpt"
        out = here.run(
            ["pycpt", "migrate", "--json", "--online", "--mode", mode, "--remote-pycpt", remote]
            + [there, self.ct],
            capture_output=True,
            text=True,
            timeout=900,
            env={"PYTHONPATH": str(tree)},
        )
        assert out.returncode == 0, out.stderr
        self.where = there
        return json.loads(out.stdout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mib", SIZES)
def test_unix_channel_vs_tcp(benchmark, hosts, before, tmp_path, mib, mode):
    if mem_available() < 4 * (mib << 20):
        pytest.skip(f"{mib} MiB needs about {4 * mib} MiB of available memory")
    hopper = Hopper(hosts, f"pc{mib}-{mode}", mib, tmp_path / "report")
    old: List[dict] = []
    new: List[dict] = []
    old_wall: List[float] = []

    def baseline():
        start = time.perf_counter()
        old.append(hopper.hop(before, mode))
        old_wall.append(time.perf_counter() - start)
        return (), {}

    def unix_hop():
        new.append(hopper.hop(THIS_TREE, mode))

    try:
        benchmark.pedantic(unix_hop, setup=baseline, rounds=rounds_for(mib))
    finally:
        hopper.stop()
    label = f"migrate {mode} {mib} MiB"
    medians: Dict[str, float] = {}
    for what in ("frozen_window", "total"):
        mine = statistics.median(s[what] for s in new)
        base = statistics.median(s[what] for s in old)
        medians[f"{what}_unix_median_s"] = mine
        medians[f"{what}_tcp_median_s"] = base
        RESULTS.append((f"{label}: {what} Unix socket vs TCP", mine, base, mine / base))
    record(benchmark, f"{label}: command, Unix socket vs TCP (wall)", old_wall)
    benchmark.extra_info.update(
        **medians,
        unix_stages=[s["stages"] for s in new],
        tcp_stages=[s["stages"] for s in old],
    )
