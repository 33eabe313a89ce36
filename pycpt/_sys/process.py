"""Processes pycpt starts or watches: children that die with us, descriptors taken from
another process (pidfd_getfd), and waiting on several processes at once (pidfds)."""

from __future__ import annotations

import os
import socket
from typing import Callable, List, Optional, Sequence

from pycpt import errors
from pycpt._native import check, ffi, lib

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


class Fence:
    """A small process of its own (csrc/proc.c, pycpt_proc_fence) that holds descriptors
    for us and, should we die before release(), writes given bytes to a given descriptor
    first: e.g. "1" to a cgroup's cgroup.kill, so that what we guarded is dead before the
    descriptors it held (userfaultfds) close. Start it from a thread that lives as long."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = ffi.new("int *")
        try:
            check(lib.pycpt_proc_fence(theirs.fileno(), pid), "starting a fence process")
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock: Optional[socket.socket] = ours
        self.pid = int(pid[0])

    def hold(self, fds: Sequence[int]) -> None:
        """Hold copies of `fds` (instead of those held so far)."""
        self._send(b"H", list(fds)[: lib.PYCPT_FENCE_MAX_FDS])

    def on_our_death(self, fd: int, data: bytes) -> None:
        """Write `data` (at most 15 bytes) to (a copy of) `fd` if we die unreleased."""
        if not 0 < len(data) < 16:
            raise errors.InvalidArgumentError("a fence writes 1 to 15 bytes")
        self._send(b"K" + data, [fd])

    def _send(self, msg: bytes, fds: List[int]) -> None:
        if self.sock is None:
            raise errors.PycptError("the fence was released")
        socket.send_fds(self.sock, [msg], fds)

    def release(self) -> None:
        """Let it go without writing anything; it closes what it held. Idempotent."""
        if self.sock is None:
            return
        try:
            self.sock.send(b"R")
        except OSError:
            pass  # it is gone already
        self.sock.close()
        self.sock = None
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
