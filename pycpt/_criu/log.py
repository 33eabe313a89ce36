"""Reading CRIU's log: its error lines, and which known failure they describe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Type

from pycpt import errors

# Logged by CRIU runs that go on to succeed: every run without CAP_SYS_RESOURCE, and every
# network namespace dump/restore on a host without iptables binaries.
HARMLESS = (
    re.compile(r"Can't setup RLIMIT_NOFILE for self"),
    re.compile(
        r"execvp\(\"ip6?tables(-legacy)?-(save|restore)\"|ip6?tables(-legacy)?-save -V failed"
    ),
    re.compile(r"ipv[46]: [Aa]ddress already assigned"),
)

_ERROR_LINE = re.compile(r"\bError \(|\bError:|BUG at ")

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
    found = [ln.strip() for ln in lines if _ERROR_LINE.search(ln) and not is_harmless(ln)]
    return found[-limit:]


def classify(lines: Sequence[str]) -> Type[errors.CriuError]:
    """The CriuError subclass for a failure whose error lines are `lines`."""
    text = "\n".join(lines)
    for pattern, cls in _KNOWN:
        if pattern.search(text):
            return cls
    return errors.CriuError
