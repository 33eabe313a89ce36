"""Running the `pycpt` command as a user would (and stopped at a chosen point), and what an
interrupted command may leave behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

DIE_AT = Path(__file__).with_name("die_at.py")


def pycpt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`pycpt ARGS` in this test's environment (state dir, cgroup parent)."""
    return subprocess.run(
        [sys.executable, "-m", "pycpt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def pycpt_stopped_at(
    where: str, nth: int, signal_name: str, *args: str
) -> subprocess.CompletedProcess:
    """`pycpt ARGS`, sent `signal_name` when `where` (MODULE:QUALNAME) is called the nth
    time (tests/helpers/die_at.py)."""
    return subprocess.run(
        [sys.executable, str(DIE_AT), where, str(nth), signal_name, "--", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


def next_command(stderr: str) -> Optional[List[str]]:
    """The recovery command pycpt printed ("  next: pycpt ..."), as arguments, or None."""
    found = re.findall(r"^\s+next: pycpt (.+)$", stderr, re.M)
    assert len(found) <= 1, stderr
    return found[0].split() if found else None


def leftovers(state: Path, ct: str, cgroup_parent: Path) -> List[str]:
    """What an interrupted command of container `ct` may have left and must not be there
    once it is recovered: temporary files and directories, an intent record, a lock-only
    directory, an empty cgroup of a container that does not run."""
    found = []
    dump_dir = state / "dump"
    for directory in (dump_dir, Path(tempfile.gettempdir())):
        if directory.is_dir():
            found += [
                str(directory / n)
                for n in os.listdir(directory)
                if n.startswith((f".Dump.{ct}.", f".pycpt-images-{ct}-", f".pycpt-restore-{ct}-"))
            ]
    ct_dir = state / "ct" / ct
    if (ct_dir / "intent.json").exists():
        found.append(str(ct_dir / "intent.json"))
    if ct_dir.is_dir() and not (ct_dir / "state.json").exists():
        found.append(f"{ct_dir} (no record)")
    cgroup = cgroup_parent / ct
    if cgroup.is_dir() and not (cgroup / "cgroup.procs").read_text().split():
        found.append(f"{cgroup} (empty)")
    return found
