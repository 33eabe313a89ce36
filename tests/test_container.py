"""Containers and the vzctl workflow against the real kernel and CRIU."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import pycpt
from pycpt import dumpfile, errors
from pycpt._criu import streamer
from pycpt._sys import nethold
from pycpt.container import Container, ContainerStatus, list_containers
from tests.helpers import nft
from tests.helpers.containers import Hasher, continued
from tests.helpers.workload import build_counter, wait_for


def test_start_status_exec_stop(ctenv):
    h = Hasher(ctenv)
    ct = h.ct
    assert ct.status is ContainerStatus.RUNNING
    pid = ct.init_pid
    assert Path(f"/proc/{pid}/ns/pid").resolve() != Path("/proc/self/ns/pid").resolve()
    assert str(pid) in (ct.cgroup / "cgroup.procs").read_text().split()
    out = (
        ct.exec(["sh", "-c", "echo $$; hostname; cat /proc/1/comm"], stdout=subprocess.PIPE)
        .communicate(timeout=30)[0]
        .decode()
        .split()
    )
    assert out[1] == "ct1"  # its uts namespace
    assert int(out[0]) < 100  # a pid of its pid namespace, not the host's
    assert out[2] == Path(f"/proc/{pid}/comm").read_text().strip()  # its init is pid 1 there
    assert [c.id for c in list_containers()] == ["ct1"]
    ct.stop()
    assert ct.status is ContainerStatus.STOPPED and not ct.cgroup.exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_full_chkpnt_and_restore(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    dump = h.ct.chkpnt()
    assert dump == ctenv / "state" / "dump" / "Dump.ct1"
    assert dump.stat().st_mode & 0o777 == 0o600
    assert h.ct.status is ContainerStatus.DUMPED and h.ct.init_pid is None
    ct = Container.restore("ct1")
    assert ct.status is ContainerStatus.RUNNING
    assert continued(before, h.sample())


def test_host_transient_mounts_stay_out_of_a_container(ctenv):
    """A container started while another restore's CRIU has its cgroup yard mounted (in the
    host's namespace, inside that restore's images directory) and while a scratch tmpfs is
    mounted below /tmp does not keep copies of them: its dump, made while both are there,
    restores after the yard went as CRIU removes it (before, such a copy made the restore
    fail with `mnt-v2: Can't stat mountpoint .../.criu.cgyard.*`, and a tmpfs being filled
    failed the dump with `Can't dump tmpfs content`)."""
    other = Path(tempfile.mkdtemp(prefix=".pycpt-restore-other-"))
    yard, scratch = other / ".criu.cgyard.test", ctenv / "scratch"
    mounted = []
    try:
        for point in (yard, scratch):
            point.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "pycpt-test-transient", str(point)], check=True)
            mounted.append(point)
        h = Hasher(ctenv)
        mounts = Path(f"/proc/{h.ct.init_pid}/mountinfo").read_text()
        assert str(yard) not in mounts and str(scratch) not in mounts, mounts
        before = h.sample()
        h.ct.chkpnt()
        subprocess.run(["umount", "-l", str(yard)], check=True)  # as CRIU ends its restore
        mounted.remove(yard)
        yard.rmdir()
        (scratch / "changed").write_text("the scratch tmpfs changes\n")
        ct = Container.restore("ct1")
        assert ct.status is ContainerStatus.RUNNING
        assert continued(before, h.sample())
    finally:
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(other, ignore_errors=True)


def test_chkpnt_streams_into_the_dump_file(ctenv, monkeypatch):
    """Uncompressed: CRIU's images go straight into the file, never through an images
    directory packed afterwards (write_dump_file); none is left."""

    def packed(*args, **kwargs):
        raise AssertionError("the images went through a directory")

    monkeypatch.setattr(dumpfile, "write_dump_file", packed)
    h = Hasher(ctenv)
    dump = h.ct.chkpnt()
    assert sorted(os.listdir(dump.parent)) == [dump.name]
    names = {p.name for p in dumpfile.verify_dump_file(dump).parts}
    assert "inventory.img" in names and any(n.startswith("pages-") for n in names)


@pytest.mark.parametrize("compress", ["gz"])
def test_compressed_chkpnt_and_restore(ctenv, compress):
    """Compressed: dumped into an images directory over RPC, restored from an extraction."""
    h = Hasher(ctenv)
    before = h.sample()
    dump = h.ct.chkpnt(str(ctenv / "ct1.dump"), compress=compress)
    assert dumpfile.read_manifest(dump).compression == compress
    ct = Container.restore("ct1", str(dump))
    assert ct.status is ContainerStatus.RUNNING
    assert continued(before, h.sample())


def test_staged_chkpnt_and_restore(ctenv):
    h = Hasher(ctenv)
    ct = h.ct
    before = h.sample()
    ct.suspend()
    assert ct.status is ContainerStatus.SUSPENDED
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    with pytest.raises(errors.ContainerStateError, match="no dump yet"):
        ct.kill()
    ct.dump(str(ctenv / "staged.dump"))
    assert ct.status is ContainerStatus.SUSPENDED and ct.dumped
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    ct.kill()
    assert ct.status is ContainerStatus.DUMPED
    ct = Container.restore("ct1", str(ctenv / "staged.dump"), undump_only=True)
    assert ct.status is ContainerStatus.UNDUMPED
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    ct.resume()
    assert ct.status is ContainerStatus.RUNNING
    assert continued(before, h.sample())


def test_suspend_resume_loses_nothing(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    h.ct.suspend()
    h.ct.resume()
    assert h.ct.status is ContainerStatus.RUNNING and continued(before, h.sample())


@pytest.mark.parametrize("step", ["dump", "kill", "resume"])
def test_steps_out_of_order_change_nothing(ctenv, step):
    h = Hasher(ctenv)
    before = h.sample()
    with pytest.raises(errors.ContainerStateError, match="it is running"):
        getattr(h.ct, step)()
    assert h.ct.status is ContainerStatus.RUNNING and continued(before, h.sample())


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "x" * 65, "-x"])
def test_bad_ids(ctenv, bad):
    with pytest.raises(ValueError):
        Container(bad)


def _lo(pid: int) -> str:
    """`ip -o addr show lo` in pid's network namespace: its flags and addresses."""
    return (
        subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", "-o", "addr", "show", "lo"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        + subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "lo"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.split("<", 1)[1]
        .split(">", 1)[0]
    )


def _lo_as_started(pid: int) -> None:
    text = _lo(pid)
    assert "127.0.0.1/8" in text and "::1/128" in text and "UP" in text.split()[-1].split(",")


def test_suspend_holds_the_network_and_resume_releases_it(ctenv):
    """Suspend wakes the hold (the nf_tables table the container's init made dormant) and
    leaves the links, addresses and routes as they were, so that CRIU records them so."""
    h = Hasher(ctenv)
    pid = h.ct.init_pid
    assert nethold.held(pid) is False  # made at start, asleep
    h.ct.suspend()
    assert nethold.held(pid) is True
    _lo_as_started(pid)
    assert not h.ct.state.get("links_down")
    h.ct.resume()
    assert nethold.held(pid) is False
    _lo_as_started(pid)


def test_suspend_makes_a_missing_hold(ctenv):
    """A container whose hold table is gone (it flushed its ruleset, or an older pycpt
    started it) gets one, active, at suspend; resume leaves it dormant."""
    h = Hasher(ctenv)
    pid = h.ct.init_pid
    nethold.hold(pid, nethold.HoldOp.DELETE)
    assert nethold.held(pid) is None
    h.ct.suspend()
    assert nethold.held(pid) is True
    h.ct.resume()
    assert nethold.held(pid) is False


def test_restored_container_has_its_network_back(ctenv):
    h = Hasher(ctenv)
    h.ct.chkpnt()
    ct = Container.restore("ct1")
    assert nethold.held(ct.init_pid) is False
    _lo_as_started(ct.init_pid)


@pytest.mark.parametrize("compress", [None, "gz"])
def test_undumped_container_is_held_until_resume(ctenv, compress):
    h = Hasher(ctenv)
    dump = h.ct.chkpnt(str(ctenv / "ct1.dump"), compress=compress)
    ct = Container.restore("ct1", str(dump), undump_only=True)
    assert nethold.held(ct.init_pid) is True
    _lo_as_started(ct.init_pid)
    ct.resume()
    assert nethold.held(ct.init_pid) is False


def test_dump_of_an_older_pycpt_gets_its_links_back(ctenv):
    """Dump files written before the hold recorded the links taken down (links_down):
    they are brought up again at restore."""
    h = Hasher(ctenv)
    pid = h.ct.init_pid
    h.ct.suspend()
    subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "link", "set", "lo", "down"], check=True)
    h.ct._save(links_down=["lo"])  # as an older pycpt recorded it
    dump = h.ct.dump(str(ctenv / "old.dump"))
    h.ct.kill()
    assert dumpfile.read_manifest(dump).config["links_down"] == ["lo"]
    ct = Container.restore("ct1", str(dump))
    assert "UP" in _lo(ct.init_pid).split()[-1].split(",")
    assert nethold.held(ct.init_pid) is False


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "newer":
        path.write_bytes(data.replace(b"PYCPT-DUMP 2\n", b"PYCPT-DUMP 9\n", 1))


@pytest.mark.parametrize(
    "how, error",
    [
        ("truncated", errors.DumpFileCorruptError),
        ("flipped", errors.DumpFileCorruptError),
        ("empty", errors.DumpFileCorruptError),
        ("directory", errors.DumpFileForeignError),
        ("newer", errors.DumpFileTooNewError),
    ],
)
def test_bad_dump_file_starts_nothing(ctenv, how, error):
    h = Hasher(ctenv)
    dump = h.ct.chkpnt()
    before = dict(h.ct.state)
    _damage(dump, how)
    with pytest.raises(error) as ei:
        Container.restore("ct1")
    assert ei.value.hint
    ct = Container("ct1")
    assert ct.status is ContainerStatus.DUMPED and ct.state == before
    assert not ct.cgroup.exists()


def test_restore_of_a_running_container_is_refused(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    dump = ctenv / "copy.dump"
    h.ct.suspend()
    h.ct.dump(str(dump))
    h.ct.resume()
    with pytest.raises(errors.ContainerStateError, match="it is running"):
        Container.restore("ct1", str(dump))
    assert continued(before, h.sample())


@pytest.mark.parametrize("step", ["suspend", "dump", "kill", "resume", "exec"])
def test_steps_on_a_dumped_container_are_refused(ctenv, step):
    h = Hasher(ctenv)
    h.ct.chkpnt()
    state = dict(h.ct.state)
    args = (["true"],) if step == "exec" else ()
    with pytest.raises(errors.ContainerStateError, match="it is dumped"):
        getattr(h.ct, step)(*args)
    assert h.ct.state == state


def test_suspend_twice_is_refused(ctenv):
    h = Hasher(ctenv)
    h.ct.suspend()
    with pytest.raises(errors.ContainerStateError, match="it is suspended"):
        h.ct.suspend()
    h.ct.resume()


def test_a_failed_dump_leaves_the_container_running(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    blocker = ctenv / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(errors.DumpFileError, match="cannot write a dump file") as ei:
        h.ct.chkpnt(str(blocker / "Dump.ct1"))
    # refused before anything was frozen (the directory is checked first, never made)
    assert "is not a directory" in str(ei.value) and "hint:" in str(ei.value)
    assert h.ct.status is ContainerStatus.RUNNING
    assert nethold.held(h.ct.init_pid) is False
    _lo_as_started(h.ct.init_pid)
    assert continued(before, h.sample())


def test_two_commands_at_once_do_not_interleave(ctenv):
    h = Hasher(ctenv)
    with h.ct.lock():
        with pytest.raises(errors.ContainerBusyError, match="busy"):
            h.ct.suspend()
    assert h.ct.status is ContainerStatus.RUNNING


def test_state_dir_and_cgroup_parent_come_from_the_environment(ctenv):
    h = Hasher(ctenv)
    assert h.ct.dir == ctenv / "state" / "ct" / "ct1"
    assert h.ct.cgroup.parent.name == f"pycpt-test-{os.getpid()}-ct"


def test_private_root_directory(ctenv):
    """A container in its own root (pivot_root: the host's tree is not in its mount
    namespace) is checkpointed and restored; it writes into its root and goes on counting."""
    root = ctenv / "root"
    root.mkdir()
    build_counter(root)
    ct = Container.start("rooted", ["/count"], root=str(root))
    counter = root / "counter"
    wait_for(lambda: counter.exists() and counter.read_text().strip(), 10, "the counter")
    seen = set(os.listdir(f"/proc/{ct.init_pid}/root"))  # its / is the root directory
    assert {"count", "counter", "proc"} <= seen and "usr" not in seen
    ct.chkpnt()
    # the counter truncates its file, then writes it: it may have been frozen in between
    stopped_at = int(counter.read_text().strip() or 0)
    ct = Container.restore("rooted")
    wait_for(lambda: int(counter.read_text() or 0) > stopped_at + 2, 10, "counting to go on")
    assert ct.log_path == root / ".pycpt-console.log"


def test_restore_under_another_cgroup_parent(ctenv, monkeypatch):
    """As on another host: the dump names the source's cgroup, the restore goes into the
    target's own (CRIU's cg_root), never back into the source's."""
    h = Hasher(ctenv)
    before = h.sample()
    source_cgroup = h.ct.cgroup
    dump = h.ct.chkpnt(str(ctenv / "moved.dump"))
    source_key = dumpfile.Keys(ctenv / "state").public_line()
    monkeypatch.setenv("PYCPT_STATE_DIR", str(ctenv / "other-state"))
    monkeypatch.setenv("PYCPT_CGROUP_PARENT", f"pycpt-test-{os.getpid()}-other")
    try:
        # another state directory has another key: the source's must be trusted first
        with pytest.raises(errors.DumpFileUntrustedError):
            Container.restore("ct1", str(dump))
        assert not Container("ct1").exists
        dumpfile.Keys().trust(source_key)
        ct = Container.restore("ct1", str(dump))
        assert ct.cgroup != source_cgroup and not source_cgroup.exists()
        assert str(ct.init_pid) in (ct.cgroup / "cgroup.procs").read_text().split()
        h.ct = ct
        assert continued(before, h.sample())
    finally:
        from pycpt.container import remove_all

        remove_all()


def test_named_network_namespace_on_the_host_does_not_stop_a_checkpoint(ctenv):
    """`ip netns add` bind-mounts a namespace file under /run/netns; a container's copy of
    the host's mounts must not carry it (CRIU cannot dump it)."""
    name = f"pycpt-t{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        h = Hasher(ctenv)
        before = h.sample()
        h.ct.chkpnt()
        Container.restore("ct1")
        assert continued(before, h.sample())
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_criu_error_without_a_log_is_kept_as_it_is(ctenv):
    """CRIU may die before writing its log: keeping the log must not replace its error."""
    err = errors.CriuError(
        "CRIU DUMP failed", request="DUMP", log_path=str(ctenv / "never-written.log")
    )
    Container("ct1")._keep_criu_log(err, "criu-dump.log")
    assert err.log_path == str(ctenv / "never-written.log")


def test_own_nftables_ruleset_is_kept_on_the_streamed_path(ctenv, monkeypatch):
    """`criu restore --stream` does not replay the nftables image: a dump holding a table of
    the container's own is restored through an images directory instead, and the table is
    there again; the hold is released as usual."""
    h = Hasher(ctenv)
    assert nft.in_netns(h.ct.init_pid, "add", "w12-own")
    h.ct.chkpnt()
    streamed = []
    real = streamer.restore
    monkeypatch.setattr(streamer, "restore", lambda *a, **k: streamed.append(1) or real(*a, **k))
    ct = Container.restore("ct1")
    assert not streamed, "restored through the streamer: the table would be lost"
    assert nft.in_netns(ct.init_pid, "has", "w12-own")
    assert nethold.held(ct.init_pid) is False


def test_dump_without_own_nftables_is_streamed(ctenv, monkeypatch):
    h = Hasher(ctenv)
    h.ct.chkpnt()
    streamed = []
    real = streamer.restore
    monkeypatch.setattr(streamer, "restore", lambda *a, **k: streamed.append(1) or real(*a, **k))
    Container.restore("ct1")
    assert streamed
