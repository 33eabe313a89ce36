"""Reading CRIU's log: its error lines, and which known failure they describe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Type

from pycpt import errors

# Logged by CRIU runs that go on to succeed, so never the reason a run failed (seen in every
# dump and restore log on these machines):
HARMLESS = (
    # no CAP_SYS_RESOURCE: every run
    re.compile(r"Can't setup RLIMIT_NOFILE for self"),
    # CRIU probes for iptables at every dump (-save) and restore (-restore) of a network
    # namespace, whichever lock is used; the binaries are missing here
    re.compile(r"execvp\(\"ip6?tables(-legacy)?-(save|restore)\", \.\.\.\) failed"),
    re.compile(r"ip6?tables(-legacy)?-(save|restore) -V failed"),
    # `ip addr restore` of loopback's addresses, which the new namespace already has
    re.compile(r"ipv[46]: [Aa]ddress already assigned"),
)

# Harmless only followed by the line that names CRIU's own lock table: a streamed restore
# did not replay the nftables image (so that table was never made), and CRIU's unlock
# then fails to delete it.
_NFT_DELETE_MISSING = re.compile(r"Could not process rule: No such file or directory")
_CRIU_LOCK_TABLE = re.compile(r"^\s*delete table inet CRIU-")

# Logged after a failure, because of it: never the line that failed.
CONSEQUENCES = (
    re.compile(r"(Restoring|Dumping|Pre-dumping) FAILED"),
    re.compile(r"cgroupd: recv req error"),
    re.compile(r"Unable to open fd=\d+ id="),
    re.compile(r"Can't wait or bad status"),
)

_ERROR_LINE = re.compile(r"\bError \(|\bError:|BUG at ")
# CRIU's report that a program it ran (tar for a tmpfs, ip, iptables...) failed; what that
# program wrote to stderr went to the log right before it, without CRIU's line format
_CHILD_EXITED = re.compile(r"exited, status=\d+|killed by signal \d+")
_CRIU_FORMAT = re.compile(r"^\s*(\(\d+\.\d+\)|\d+: |pie: |(Error|Warn) \()")
_PREFIX = re.compile(r"^.*?\bError \([^)]*\):\s*|^.*?\bError:\s*")

# (pattern over the error lines, error class); the first match wins.
_KNOWN: Sequence[tuple] = (
    (
        re.compile(r"soft.?dirty|mem_track|Dirty (memory )?tracking", re.I),
        errors.SoftDirtyUnsupportedError,
    ),
    (re.compile(r"BUG at criu/mem\.c"), errors.SoftDirtyUnsupportedError),
    (
        re.compile(
            r"Can't fork for \d+.*File exists|clone3? .*File exists|"
            r"Pid \d+ do not match expected",
            re.I,
        ),
        errors.PidInUseError,
    ),
    (
        re.compile(r"iptables|nftables|network.?lock|Can't lock network", re.I),
        errors.NetworkLockError,
    ),
    (
        re.compile(r"sockets: Can't get \d+:\d+ opt: Operation not supported"),
        errors.InetSocketError,
    ),
    (re.compile(r"page-pipe: (splice|tee)|pipe-max-size|F_SETPIPE_SZ", re.I), errors.PipeSizeError),
    (
        re.compile(r"session leader|A session leader of|sid.*outside", re.I),
        errors.SessionLeaderError,
    ),
)


def is_harmless(line: str) -> bool:
    """True for error lines CRIU logs that do not mean failure here."""
    return any(p.search(line) for p in HARMLESS)


def is_consequence(line: str) -> bool:
    """True for error lines CRIU logs because something else failed before."""
    return any(p.search(line) for p in CONSEQUENCES)


def error_lines(log_path: Optional[Path], limit: int = 40) -> List[str]:
    """The last `limit` error lines of a CRIU log, without the harmless ones."""
    if log_path is None:
        return []
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return error_lines_of(text.splitlines(), limit)


def error_lines_of(lines: Sequence[str], limit: int = 40) -> List[str]:
    """Like error_lines, over lines already read (CRIU's stderr, for example)."""
    found = []
    for i, line in enumerate(lines):
        if not _ERROR_LINE.search(line) or is_harmless(line):
            continue
        if _NFT_DELETE_MISSING.search(line) and _next_says_criu_lock(lines, i):
            continue
        if _CHILD_EXITED.search(line):
            found.extend(_child_output(lines, i))
        found.append(line.strip())
    return found[-limit:]


def _child_output(lines: Sequence[str], i: int, most: int = 3) -> List[str]:
    """The lines a program CRIU ran wrote just before CRIU's line i reported its failure
    (tar: "file changed as we read it"): the cause, where CRIU's own line says only
    "exited, status=1"."""
    start = i
    while start > 0 and i - start < most:
        previous = lines[start - 1]
        if not previous.strip() or _CRIU_FORMAT.search(previous) or _ERROR_LINE.search(previous):
            break
        start -= 1
    return [ln.strip() for ln in lines[start:i] if not is_harmless(ln)]


def _next_says_criu_lock(lines: Sequence[str], i: int) -> bool:
    return any(_CRIU_LOCK_TABLE.search(n) for n in lines[i + 1 : i + 3])


def failing_line(lines: Sequence[str]) -> Optional[str]:
    """The line that says why CRIU failed: the first error line that is not a consequence
    of an earlier one (the harmless ones are gone already, see error_lines); else the last."""
    for line in lines:
        if line and not is_consequence(line):
            return line
    return lines[-1] if lines else None


def failure_text(lines: Sequence[str]) -> str:
    """failing_line() without CRIU's prefix (time, "Error (file:line):"), or ""."""
    line = failing_line(lines)
    return _PREFIX.sub("", line).strip() if line else ""


def classify(lines: Sequence[str]) -> Type[errors.CriuError]:
    """The CriuError subclass for a failure whose error lines are `lines`, named by the line
    that failed (failing_line)."""
    line = failing_line([ln for ln in lines if ln and not is_harmless(ln)])
    if line is None:
        return errors.CriuError
    for pattern, cls in _KNOWN:
        if pattern.search(line):
            return cls
    return errors.CriuError
