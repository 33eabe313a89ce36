"""Removing a cgroup directory, which stays busy for a moment after its last task was killed."""

from __future__ import annotations

import errno
import time
from pathlib import Path


def remove_cgroup(cgroup: Path, timeout: float = 10.0) -> None:
    """rmdir `cgroup` (gone already is fine), retrying while the kernel says EBUSY: a task
    killed a moment ago may still be leaving. Raises the OSError once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
