"""Progress bars on stderr for work that takes more than a moment (chkpnt, restore), drawn
by tqdm. The work itself reports nothing: a thread samples how far it got from what the
kernel shows (the dump file growing, the restored processes' memory), so no layer below the
command needs a callback. Only on a terminal, never with --quiet: piped output stays as it
was."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

# a bar appears only for work that has run this long (seconds)
DELAY = 0.5


def wanted(args: argparse.Namespace) -> bool:
    """True when progress should be drawn: stderr is a terminal and no --quiet/--json."""
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        return False
    return sys.stderr.isatty()


class Progress:
    """`with Progress(...)`: a bar of `sample()` bytes out of `total` (None: unknown), updated
    every 0.1 s on a thread while the block runs."""

    def __init__(
        self, enabled: bool, what: str, sample: Callable[[], int], total: Optional[int]
    ) -> None:
        self.enabled = enabled
        self.what = what
        self.sample = sample
        self.total = total
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=self.what,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                delay=DELAY,
                leave=False,
                file=sys.stderr,
                ncols=_size()[0],
                nrows=_size()[1],
            )
            self._thread = threading.Thread(target=self._run, name="pycpt-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                done = self.sample()
            except OSError:
                continue
            if self.total is not None:
                done = min(done, self.total)
            # never backwards: a finished dump file is renamed away from where it was sampled
            self._bar.n = max(done, self._bar.n)
            self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._bar.close()


def _size() -> Tuple[int, int]:
    """The terminal's columns and rows; 80x24 for one that says 0 (a pty nobody sized)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


def dump_written(ct_id: str, target: Path) -> Callable[[], int]:
    """Bytes written so far of a dump file being made at `target`: its temporary file, plus
    an images directory when the dump goes through one (compressed)."""
    parent = target.parent

    def sample() -> int:
        total = 0
        for entry in os.scandir(parent):
            if entry.name.startswith(f".{target.name}.") and entry.name.endswith(".tmp"):
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.name.startswith(f".pycpt-images-{ct_id}-") and entry.is_dir():
                for image in os.scandir(entry.path):
                    total += image.stat(follow_symlinks=False).st_size
        return total

    return sample


def memory_of(cgroup: Path) -> Callable[[], int]:
    """Resident memory of the tasks in `cgroup` (and below): how far a restore got, or how
    much a dump has to write."""
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> int:
        total = 0
        for procs in cgroup.rglob("cgroup.procs") if cgroup.is_dir() else ():
            for pid in procs.read_text().split():
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    pass
        return total

    return sample
