"""Benchmarks: print every ratio against its same-run baseline at the end."""

import os
import tempfile
from pathlib import Path
from typing import Iterator

import bench_results
import pytest

from pycpt.testing.testhosts import TestHosts

PIPE_MAX_SIZE = 4 << 20  # CRIU's lazy source needs it (see README, known limits)


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


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[TestHosts]:
    """The pretend hosts src and dst for a module's migrations; fs.pipe-max-size raised for
    them and put back after."""
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    pipe = Path("/proc/sys/fs/pipe-max-size")
    old = pipe.read_text().strip()
    if int(old) < PIPE_MAX_SIZE:
        pipe.write_text(str(PIPE_MAX_SIZE))
    try:
        with TestHosts(["src", "dst"], tmp_path_factory.mktemp("hosts")) as made:
            yield made
    finally:
        pipe.write_text(old)


def pytest_terminal_summary(terminalreporter):
    if bench_results.RESULTS:
        terminalreporter.section("pycpt ratios (median / same-run baseline median)")
        for line in bench_results.summary():
            terminalreporter.write_line(line)
