"""pycpt._sys.procfs: the cgroup mount table is read once and again only after the kernel
says it changed (a mount or unmount), and a process's cgroup is found in it."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

from pycpt._sys import procfs

CLONE_NEWNS = 0x00020000


def test_a_mount_and_an_unmount_are_seen_at_once(tmp_path):
    where = tmp_path / "cg"
    where.mkdir()
    before = procfs.cgroup_mounts()
    assert before == procfs.cgroup_mounts()  # cached: the same answer
    subprocess.run(["mount", "-t", "cgroup2", "none", str(where)], check=True)
    try:
        assert (str(where), "cgroup2", ["rw"]) in [
            (m, kind, opts[:1]) for m, kind, opts in procfs.cgroup_mounts()
        ]
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert procfs.cgroup_mounts() == before


def test_a_child_process_reads_its_own_table(tmp_path):
    """After fork, the child does not use its parent's open mountinfo (another process's
    view, should the child enter a mount namespace of its own)."""
    procfs.cgroup_mounts()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a mount namespace of its own, a cgroup2 mount only it sees
        ok = False
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNS) == 0:
                subprocess.run(["mount", "--make-rprivate", "/"], check=True)
                subprocess.run(["mount", "-t", "cgroup2", "none", str(tmp_path)], check=True)
                ok = any(m == str(tmp_path) for m, _, _ in procfs.cgroup_mounts())
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    said = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert said == b"1"
    assert all(m != str(tmp_path) for m, _, _ in procfs.cgroup_mounts())


def test_in_cgroup_knows_where_this_process_is():
    mounts = [m for m, kind, _ in procfs.cgroup_mounts() if kind == "cgroup2"]
    if not mounts:
        return
    mount = Path(mounts[0])
    mine = Path(f"/proc/{os.getpid()}/cgroup").read_text().split("0::", 1)[1].split()[0]
    here = mount / mine.lstrip("/")
    assert procfs.in_cgroup(os.getpid(), here)
    assert procfs.in_cgroup(os.getpid(), mount)  # the root holds every process
    assert not procfs.in_cgroup(os.getpid(), here / "not-here")
    assert not procfs.in_cgroup(os.getpid(), Path("/nowhere"))
