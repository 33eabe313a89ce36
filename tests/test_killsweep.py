"""The kill sweep of issue 9's "done when": SIGKILL of `pycpt`, and SIGINT, at 20 evenly
spaced instants across a full chkpnt and across a restore of a 512 MiB container, plain and
compressed (160 stops in all, tests/killsweep.py): in every case the container afterwards
runs with its memory checksum unchanged, or is restorable from a complete dump file with
it unchanged, after at most the one recovery command pycpt printed, and nothing of the
interrupted command is left. `python -m tests.killsweep` prints the same table."""

from __future__ import annotations

import os

import pytest

from tests.killsweep import Sweep


def test_kill_sweep(engine, capsys):
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no cgroups")
    sweep = Sweep(
        mib=int(os.environ.get("PYCPT_KILLSWEEP_MIB", "512")),
        instants=int(os.environ.get("PYCPT_KILLSWEEP_INSTANTS", "20")),
    )
    try:
        sweep.run()
    finally:
        sweep.close()
    table = sweep.table()
    with capsys.disabled():
        print("\n" + table)
    assert all(t.ok for t in sweep.trials), table
    assert len(sweep.trials) == 2 * 2 * 2 * sweep.instants
