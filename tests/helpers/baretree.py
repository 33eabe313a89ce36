"""A bare process tree checkpointed with pycpt.Criu, for the fidelity tables' other column.

The tree is a command run as pid 1 of new pid, mount, uts, ipc and network namespaces
(`unshare`, loopback up, session leader there, stdio reopened inside), with no cgroup, no
network hold and no dump file: `pycpt.Criu().dump()` into an images directory (CRIU freezes
it with ptrace and kills it at the end, under its own nftables network lock) and
`pycpt.Criu().restore(rst_sibling=True)`, so the restored root is this process's child.
What the tree keeps there is what CRIU keeps; the container column is what pycpt's
containers keep on top of it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import pycpt

# What pycpt's containers ask of CRIU for every checkpoint, asked here too, so that the two
# columns differ by the container path alone (pycpt.container.CRIU_OPTIONS).
from pycpt.container import CRIU_OPTIONS

# Its own /dev/shm, as a container has (csrc/container.c): CRIU saves a tmpfs's content with
# tar, and the host's is shared with other runs (migrations keep page images there) - a file
# written meanwhile fails the dump with "file changed as we read it".
_INIT = (
    "while umount -l /dev/shm 2>/dev/null; do :; done && "
    "mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm && "
    'ip link set lo up && exec >"$0" 2>&1 </dev/null && exec setsid "$@"'
)


class BareTree:
    """`argv` as the root of a bare tree; `pid` is its root (host pid)."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log = log
        self._outer = subprocess.Popen(
            ["unshare", "--pid", "--mount", "--uts", "--ipc", "--net", "--fork",
             "--mount-proc", "sh", "-c", _INIT, str(log), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )  # fmt: skip
        self.pid: Optional[int] = None
        self._restored: Optional[int] = None
        self.pid = self._inner()

    def _inner(self) -> int:
        """The unshare child: pid 1 of the new pid namespace."""
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self._outer.pid}/task/{self._outer.pid}/children")
            try:
                kids = children.read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise AssertionError(f"unshare did not start {shlex.join(map(str, self._outer.args))}")

    def dump(self, images: Path, **options: Any) -> None:
        """Checkpoint the tree into `images` with CRIU_OPTIONS and `options`; CRIU ends it."""
        images.mkdir(parents=True, exist_ok=True)
        with pycpt.Criu() as criu:
            criu.dump(self.pid, images, **{**CRIU_OPTIONS, **options})
        self._outer.wait(timeout=30)  # unshare ends with its child
        self.pid = None

    def restore(self, images: Path, **options: Any) -> int:
        """Rebuild the tree from `images` as a child of this process; its root pid."""
        with pycpt.Criu() as criu:
            restored = criu.restore(
                images, root="/", rst_sibling=True, **{**CRIU_OPTIONS, **options}
            )
        self.pid = self._restored = restored.pid
        return restored.pid

    def close(self) -> None:
        """Kill the tree (pid 1 of its namespace: everything in it goes) and reap."""
        for pid in (self.pid, self._outer.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._outer.poll() is None:
            self._outer.wait(timeout=30)
        if self._restored:
            try:
                os.waitpid(self._restored, 0)
            except ChildProcessError:
                pass
