"""Benchmarks: print every ratio against its same-run baseline at the end."""

import os
import tempfile

import bench_results
import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir():
    """Benchmarks never touch /var/lib/pycpt (its containers, its host key); the private
    state directory goes with the session."""
    with (
        pytest.MonkeyPatch.context() as mp,
        tempfile.TemporaryDirectory(prefix="pycpt-bench-state-") as state,
    ):
        if not os.environ.get("PYCPT_STATE_DIR"):
            mp.setenv("PYCPT_STATE_DIR", state)
        yield


def pytest_terminal_summary(terminalreporter):
    if bench_results.RESULTS:
        terminalreporter.section("pycpt ratios (median / same-run baseline median)")
        for line in bench_results.summary():
            terminalreporter.write_line(line)
