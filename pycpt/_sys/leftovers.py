"""What an interrupted command leaves behind, and how the next one tells what happened: a
dump file committed or not (its identity), temporary files and directories of pycpt's
(by name, never through a symlink), processes a dead command started."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from pycpt._sys.procfs import mounts_below, running
from pycpt._sys.state import list_dir, remove_tree_at, unlink_at


def identity(path: Path) -> Optional[List[int]]:
    """[device, inode] of the file at `path` (not following a symlink), or None. A dump
    file renamed into place has another one than the file it replaced."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def committed(target: Path, previous: Any) -> bool:
    """True if a file was renamed into `target` since its identity was `previous` (recorded
    when the step began): only a commit does that, after the file's fsync."""
    now = identity(target)
    return now is not None and now != previous


def fsync_parent(path: Path) -> None:
    """fsync the directory holding `path` (so that a rename into it survives a crash)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_gone(processes: Sequence[Any], timeout: float) -> Optional[int]:
    """Wait until every recorded process ([pid, start time]) has exited; None when all
    have, else the pid still there after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for entry in processes:
        try:
            pid, started = int(entry[0]), entry[1]
        except (TypeError, ValueError, IndexError):
            continue
        while started is not None and running(pid, started):
            if time.monotonic() > deadline:
                return pid
            time.sleep(0.02)
    return None


def remove_temp(path: Path, ct: str) -> None:
    """Remove a temporary directory pycpt made for container `ct` (named
    .pycpt-<what>-<ct>-...), only if it is one of ours (root's directory, no symlink) and
    never through a symlink below it. CRIU may have left mounts in it (its cgroup yard)."""
    if not path.name.startswith(".pycpt-") or f"-{ct}-" not in path.name:
        return
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return
    for mount in mounts_below(str(path)):
        subprocess.run(["umount", "--lazy", mount], stdin=subprocess.DEVNULL, capture_output=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        remove_tree_at(fd, path.name)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_dump_temps(target: Path) -> None:
    """Remove the temporary files of a dump file that was never committed
    (.<name>.<random>.tmp beside it, root's regular files)."""
    try:
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        prefix = f".{target.name}."
        for name in list_dir(fd):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    unlink_at(fd, name)
    finally:
        os.close(fd)
