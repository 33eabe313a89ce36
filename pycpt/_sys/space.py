"""Which file system a path is on, how much room it has, and what a write that ran out of
room (or hit a read-only or failing file system) should tell the user."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple

from pycpt._sys.procfs import _unescape

# The errnos that mean "this file system cannot take the file", not "pycpt has a bug".
FS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def free_bytes(path: str) -> int:
    """Free space (for an unprivileged writer, as df shows it) of the file system at `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mount_of(path: str) -> Tuple[str, str]:
    """(mount point, file system type) of the file system holding `path`."""
    real = os.path.realpath(path)
    best, kind = "/", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return best, kind
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, (right.split() or ["?"])[0]
    return best, kind


def human(n: int) -> str:
    """Bytes as a short human figure (1.5 KiB, 512.0 MiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fs_errno(exc: BaseException) -> Optional[int]:
    """The file-system errno (ENOSPC, EDQUOT, EROFS, EIO, EFBIG) behind `exc`, looking down
    its chain of causes, or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FS_ERRNOS:
            return e.errno
        text = str(e)
        for number, words in (
            (errno.ENOSPC, "No space left on device"),
            (errno.EDQUOT, "Disk quota exceeded"),
            (errno.EROFS, "Read-only file system"),
        ):
            if words in text or any(words in line for line in getattr(e, "log_lines", ()) or ()):
                return number
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def describe_failure(number: int, directory: Path, needed: int) -> str:
    """What happened, in the terms the user can act on: the file system, the space it
    would have needed and the space it has."""
    point, kind = mount_of(str(directory))
    where = f"{point} ({kind})"
    try:
        free = free_bytes(str(directory))
    except OSError:
        free = -1
    room = f"needed ~{human(needed)}, free {human(free) if free >= 0 else '?'}"
    if number == errno.ENOSPC:
        return f"no space left on {where} ({room})"
    if number == errno.EDQUOT:
        return f"disk quota exceeded on {where} ({room})"
    if number == errno.EFBIG:
        return f"the file is too large for {where} ({room})"
    if number == errno.EROFS:
        return f"{where} is read-only"
    return f"I/O error on {where}: the device failed"
