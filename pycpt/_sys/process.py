"""Processes pycpt starts or watches: children that die with us, descriptors taken from
another process (pidfd_getfd), and waiting on several processes at once (pidfds)."""

from __future__ import annotations

import os
from typing import Callable, List

from pycpt._native import check, lib

USERFAULTFD = "anon_inode:[userfaultfd]"


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen: the child gets PR_SET_PDEATHSIG(SIGKILL), so it
    dies when the thread that started it ends (start it from a thread that lives as long as
    the child should: the main thread, usually). A child whose parent already died exits."""
    parent = os.getpid()

    def preexec() -> None:
        if lib.pycpt_proc_die_with_parent(parent) < 0:
            os._exit(127)

    return preexec


def take_fd(pidfd: int, fd: int) -> int:
    """A copy (close-on-exec) of descriptor `fd` of the process behind `pidfd`."""
    return check(lib.pycpt_proc_getfd(pidfd, fd), f"pidfd_getfd of descriptor {fd}")


def fds_of_kind(pid: int, kind: str) -> List[int]:
    """Descriptor numbers of `pid` whose /proc link reads `kind` (e.g. USERFAULTFD)."""
    found = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for entry in entries:
        try:
            if os.readlink(f"/proc/{pid}/fd/{entry}") == kind:
                found.append(int(entry))
        except OSError:
            continue  # closed meanwhile
    return found
