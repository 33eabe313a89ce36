"""Migration as a transaction (issue 11): what it costs, against the path before it and
against stop-and-copy, all measured in the same run.

The transaction adds to every hop: durable records on both sides (fsynced at "resume" sent
and at the commit), heartbeats both ways on the control channel, and in post-copy the source
freezing its tree again once CRIU's lazy dump is ready, the target's copies of lazy-pages'
userfaultfds and its fence process. "Before" is a second pycpt install of the code before
the transaction (commit fdbbd0b, the parent of d8f26fb), named by $PYCPT_BENCH_BEFORE (its
bin directory, holding its `pycpt`); without it the comparison with it is skipped.

Two containers of N MiB of random memory with a running computation, one per install, hop
back and forth between test hosts "src" and "dst"; each hop uses one install on both ends
(`pycpt migrate --json`, typed on the host the container is on, the target's pycpt named by
PYCPT_REMOTE_PYCPT). Each round: a post-copy hop (`--online`) and a stop-and-copy hop
(`--mode stopcopy`) per install, the installs' order alternating round by round. Ratios of
medians (after / before, and post-copy / stop-and-copy of the current code): frozen window
(freeze at the source to the target's "running") and total (the command's start to the
source's removal: in post-copy after the last page arrived). Unshaped veth link.

Run (the "before" install made once; see README, Benchmarks, Migration as a transaction):
    PYCPT_BENCH_BEFORE=/tmp/pycpt-before/.venv/bin \\
        python -m pytest bench/bench_migrate_tx.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from bench_results import RESULTS, record

from pycpt.testing import demo_workload
from pycpt.testing.testhosts import TestHosts

ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "0"))
SIZES = [64, 512]
MODES = {"postcopy": ["--online"], "stopcopy": ["--mode", "stopcopy"]}


def rounds_for(mib: int) -> int:
    return ROUNDS or {64: 9, 512: 5}.get(mib, 3)


def before_bin() -> Optional[str]:
    """The bin directory of the pre-transaction install, if one is named and usable."""
    path = os.environ.get("PYCPT_BENCH_BEFORE")
    if not path:
        return None
    if not os.access(os.path.join(path, "pycpt"), os.X_OK):
        raise pytest.UsageError(f"PYCPT_BENCH_BEFORE={path}: no executable pycpt there")
    return path


class Hopper:
    """One install's container and where it is now; hop() migrates it to the other host
    with that install's pycpt on both ends."""

    def __init__(self, hosts: TestHosts, ct: str, mib: int, report: Path, bindir: str) -> None:
        self.hosts, self.ct, self.where = hosts, ct, "src"
        self.pycpt = os.path.join(bindir, "pycpt")
        # each install starts and stops its own container: no record of one is read by the other
        self._pycpt(
            "src", "start", ct, "--", sys.executable, demo_workload.__file__, str(mib), str(report)
        )
        deadline = time.monotonic() + 300
        while not Path(f"{report}.ready").exists():
            assert time.monotonic() < deadline, "the workload did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self._pycpt(self.where, "stop", self.ct)

    def _pycpt(self, host: str, *args: str) -> str:
        out = self.hosts[host].run(
            [self.pycpt, *args],
            env={"PYCPT_REMOTE_PYCPT": self.pycpt},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, f"{self.pycpt} {' '.join(args)}: {out.stderr}"
        return out.stdout

    def hop(self, mode: str) -> dict:
        there = "dst" if self.where == "src" else "src"
        stats = json.loads(
            self._pycpt(self.where, "migrate", "--json", *MODES[mode], there, self.ct)
        )
        self.where = there
        assert stats["mode"] == mode, stats
        return stats


def _median(runs: List[dict], key: str) -> float:
    return statistics.median(s[key] for s in runs)


@pytest.mark.parametrize("mib", SIZES)
def test_transaction_cost(benchmark, hosts, tmp_path, mib):
    before = before_bin()
    installs: Dict[str, str] = {"after": os.path.dirname(os.path.abspath(sys.executable))}
    if before is not None:
        installs["before"] = before
    runs: Dict[Tuple[str, str], List[dict]] = {(i, m): [] for i in installs for m in MODES}
    hoppers: Dict[str, Hopper] = {}
    try:
        for name, bindir in installs.items():
            hoppers[name] = Hopper(hosts, f"tx{mib}-{name}", mib, tmp_path / name, bindir)
        order = list(installs)
        state = {"round": 0}

        def others() -> Tuple[tuple, dict]:
            # everything but the timed hop (the current code's post-copy), order alternating
            turn = order if state["round"] % 2 == 0 else order[::-1]
            state["round"] += 1
            for name in turn:
                for mode in MODES:
                    if (name, mode) != ("after", "postcopy"):
                        runs[(name, mode)].append(hoppers[name].hop(mode))
            return (), {}

        def timed() -> None:
            runs[("after", "postcopy")].append(hoppers["after"].hop("postcopy"))

        benchmark.pedantic(timed, setup=others, rounds=rounds_for(mib))
    finally:
        for hopper in hoppers.values():
            hopper.stop()

    label = f"{mib} MiB"
    after_pc, after_sc = runs[("after", "postcopy")], runs[("after", "stopcopy")]
    pairs = [(f"{label}: post-copy vs stop-and-copy", after_pc, after_sc)]
    if before is not None:
        for mode in MODES:
            now, then = runs[("after", mode)], runs[("before", mode)]
            pairs.append((f"{label}: {mode} vs before", now, then))
    for what, runs_a, runs_b in pairs:
        for key, name in (("frozen_window", "frozen"), ("total", "total")):
            a, b = _median(runs_a, key), _median(runs_b, key)
            RESULTS.append((f"migrate-tx {name} {what}", a, b, a / b))
    record(
        benchmark,
        f"migrate-tx {label}: post-copy command vs stop-and-copy (wall)",
        [s["total"] for s in after_sc],
    )
    benchmark.extra_info.update(
        {
            f"{name}_{mode}_{key}": [s[key] for s in runs[(name, mode)]]
            for (name, mode) in runs
            for key in ("frozen_window", "total")
        }
    )
    benchmark.extra_info["stages"] = {
        f"{name}_{mode}": [s["stages"] for s in found] for (name, mode), found in runs.items()
    }
