"""The kill sweep of issue 9's "done when": SIGKILL of `pycpt`, and SIGINT, at evenly
spaced instants across a full chkpnt and across a restore of a container, plain and
compressed (tests/killsweep.py): in every case the container afterwards runs with its
memory checksum unchanged, or is restorable from a complete dump file with it unchanged,
after at most the one recovery command pycpt printed, and nothing of the interrupted
command is left.

CI runs it at 64 MiB and 5 instants (40 stops, a few minutes). The full sweep of the issue
(512 MiB, 20 instants: 160 stops, most of an hour here) is

    PYCPT_KILLSWEEP_MIB=512 PYCPT_KILLSWEEP_INSTANTS=20 pytest tests/test_killsweep.py
    python -m tests.killsweep --mib 512 --instants 20      (prints the table as it goes)
"""

from __future__ import annotations

import os

import pytest

from tests.killsweep import Sweep


@pytest.mark.slow
def test_kill_sweep(engine, capsys):
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no cgroups")
    sweep = Sweep(
        mib=int(os.environ.get("PYCPT_KILLSWEEP_MIB", "64")),
        instants=int(os.environ.get("PYCPT_KILLSWEEP_INSTANTS", "5")),
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
