"""Commit before kill: a full chkpnt ends the container only once its dump file is written,
fsynced, renamed into place and its directory fsynced. Whatever fails before (a full file
system, CRIU dying) leaves it running as before, its memory unchanged; and the error says
what the user can act on (the file system, the room needed, the room there is)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import pycpt
from pycpt import dumpfile, errors
from pycpt.container import Container, ContainerStatus
from tests.helpers.containers import Hasher, continued

POINTS = 10


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator["SmallFs"]:
    fs = SmallFs(tmp_path / "small")
    try:
        yield fs
    finally:
        fs.unmount()


class SmallFs:
    """A tmpfs of a chosen size (mode 0700), made and removed by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(mode=0o700)
        self.mounted = False

    def mount(self, free: int) -> None:
        """Mount it afresh with room for `free` bytes (whole pages: tmpfs counts pages)."""
        self.unmount()
        size = max(4096, -(-free // 4096) * 4096)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "pycpt-test", str(self.path)],
            check=True,
        )
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
            self.mounted = False


def _dump_size(h: Hasher, ctenv: Path, compress) -> int:
    """The size of this container's dump file (staged, so that it runs on)."""
    probe = ctenv / f"probe-{compress}.dump"
    h.ct.suspend()
    h.ct.dump(str(probe), compress=compress)
    h.ct.resume()
    size = probe.stat().st_size
    probe.unlink()
    return size


@pytest.mark.parametrize("compress", [None, "gz"], ids=["plain", "gz"])
def test_a_full_file_system_never_costs_the_container(ctenv, small_fs, compress):
    """chkpnt --dumpfile on a file system that fills at 10 points from 1 KiB to 100% of the
    dump's size: every time the container runs on with its memory unchanged, nothing of
    the attempt is left there, and the error names the file system and the space."""
    h = Hasher(ctenv)
    size = _dump_size(h, ctenv, compress)
    for i in range(POINTS):
        free = max(1024, min(size * i // (POINTS - 1), size - 4096))
        small_fs.mount(free)
        before = h.sample()
        with pytest.raises(errors.NoSpaceError) as caught:
            h.ct.chkpnt(str(small_fs.path / "Dump.ct1"), compress=compress)
        message = str(caught.value)
        assert re.search(
            rf"no space left on {re.escape(str(small_fs.path))} \(tmpfs\) \(needed ~[\d.]+ \w+, "
            r"free [\d.]+ \w+\)",
            message,
        ), message
        assert "Broken pipe" not in message.splitlines()[0]
        assert h.ct.status is ContainerStatus.RUNNING, (free, message)
        assert continued(before, h.sample()), free
        assert os.listdir(small_fs.path) == [], (free, os.listdir(small_fs.path))
        assert not (ctenv / "state" / "ct" / "ct1" / "intent.json").exists()


def test_the_cli_says_no_space_not_broken_pipe(ctenv, small_fs):
    h = Hasher(ctenv)
    small_fs.mount(64 << 10)
    r = subprocess.run(
        [os.sys.executable, "-m", "pycpt", "chkpnt", "ct1", "--dumpfile", str(small_fs.path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "no space left on" in r.stderr, r.stderr
    assert "Broken pipe" not in r.stderr.splitlines()[0]
    assert h.ct.status is ContainerStatus.RUNNING


@pytest.mark.parametrize("compress", [None, "gz"], ids=["plain", "gz"])
def test_criu_dying_leaves_the_container_running(ctenv, tmp_path, monkeypatch, compress):
    """CRIU dies: streamed, after doing its whole dump (the dump cannot count: its exit
    says it failed); over RPC, as it starts. Either way the container, which CRIU never
    ends (leave_running), runs on."""
    engine = pycpt.find_engine()
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in dump) ' + " ".join(engine.argv) + ' "$@"; kill -9 $$;; esac\n'
        "exec " + " ".join(engine.argv) + ' "$@"\n'
    )
    wrapper.chmod(0o755)
    h = Hasher(ctenv)
    before = h.sample()
    if compress:  # RPC: the swrk that would dump
        wrapper.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = swrk ]; then kill -9 $$; fi\n'
            "exec " + " ".join(engine.argv) + ' "$@"\n'
        )
    monkeypatch.setenv("PYCPT_CRIU", str(wrapper))
    with pytest.raises(errors.PycptError):
        h.ct.chkpnt(str(ctenv / "dump"), compress=compress)
    assert h.ct.status is ContainerStatus.RUNNING
    assert continued(before, h.sample())
    assert not (ctenv / "dump").exists()
    assert [n for n in os.listdir(ctenv) if n.startswith(".")] == []


def test_the_tree_ends_only_after_the_commit(ctenv, monkeypatch):
    """At the moment chkpnt kills the tree, its dump file is complete and in place (and
    the tree is still frozen)."""
    h = Hasher(ctenv)
    before = h.sample()
    seen = {}
    kill_all = Container._kill_all

    def checked_kill(self, timeout):
        target = ctenv / "state" / "dump" / "Dump.ct1"
        seen["verified"] = dumpfile.verify_dump_file(target) is not None
        seen["frozen"] = pycpt.Freezer(self.cgroup).state is pycpt.FreezerState.FROZEN
        seen["temps"] = [n for n in os.listdir(target.parent) if n.startswith(".")]
        return kill_all(self, timeout)

    monkeypatch.setattr(Container, "_kill_all", checked_kill)
    h.ct.chkpnt()
    assert seen == {"verified": True, "frozen": True, "temps": []}
    ct = Container.restore("ct1")
    assert ct.status is ContainerStatus.RUNNING
    assert continued(before, h.sample())
