"""Benchmarks: print every ratio against its same-run baseline at the end."""

import bench_results


def pytest_terminal_summary(terminalreporter):
    if bench_results.RESULTS:
        terminalreporter.section("pycpt ratios (median / same-run baseline median)")
        for line in bench_results.summary():
            terminalreporter.write_line(line)
