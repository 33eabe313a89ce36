"""Ratios of each benchmark to the baseline measured beside it, for the end-of-run table."""

from __future__ import annotations

import resource
import statistics
from typing import List, Sequence, Tuple

RESULTS: List[Tuple[str, float, float, float]] = []  # (what, median, baseline median, ratio)


def record(benchmark, what: str, baseline: Sequence[float]) -> float:
    """Store the baseline's median and the ratio median(benchmark) / median(baseline)."""
    median = benchmark.stats.stats.median
    base = statistics.median(baseline)
    ratio = median / base
    benchmark.extra_info.update(baseline_median_s=base, ratio=ratio, baseline_rounds=len(baseline))
    RESULTS.append((what, median, base, ratio))
    return ratio


def record_values(what: str, values: Sequence[float], baseline: Sequence[float]) -> float:
    """Like record(), for figures the benchmark itself did not time (e.g. CPU seconds)."""
    median, base = statistics.median(values), statistics.median(baseline)
    RESULTS.append((what, median, base, median / base))
    return median / base


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that were waited for
    (the criu it ran): on a loaded machine, what a run cost without the time it waited."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def summary() -> List[str]:
    """The table printed at the end of a benchmark run."""
    lines = [f"{'benchmark':58} {'median':>11} {'baseline':>11} {'ratio':>7}"]
    for what, median, base, ratio in RESULTS:
        lines.append(f"{what:58} {_fmt(median):>11} {_fmt(base):>11} {ratio:7.3f}")
    return lines


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"
