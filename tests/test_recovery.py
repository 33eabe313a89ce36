"""Never neither: a command stopped at any step (SIGKILL of pycpt, or Ctrl-C, SIGTERM,
SIGHUP) leaves a running or suspended container or a complete dump file, and the next
command finds out which, finishes or undoes the step, and removes what was left.

Each test stops `pycpt` (a real process) at a named step with tests/helpers/die_at.py,
then does what a user would: `pycpt status`, and the one command it prints, if any; the
container's memory and computation must have gone on exactly, and nothing of the
interrupted command may remain. The timed sweep over a 512 MiB container is
tests/test_killsweep.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pycpt import errors
from pycpt.container import Container, ContainerStatus, cgroup_root, collect_garbage
from tests.helpers.containers import Hasher, continued
from tests.helpers.recovery import leftovers, next_command, pycpt, pycpt_stopped_at


def _recover(ct: str, seen) -> str:
    """After `pycpt status CT` (`seen`), the one command it said to run next (if any);
    returns the status afterwards."""
    assert seen.returncode == 0, seen.stderr
    command = next_command(seen.stderr)
    if command is not None:
        done = pycpt(*command)
        assert done.returncode == 0, done.stderr
    after = pycpt("status", ct)
    assert after.returncode == 0 and "note:" not in after.stderr, after.stderr
    return after.stdout.strip()


def _intact(h: Hasher, ctenv: Path, before) -> None:
    """Running with its memory and computation gone on exactly (from the dump if it was
    ended), and nothing of the interrupted command left."""
    if Container(h.ct.id).status is ContainerStatus.DUMPED:
        r = pycpt("restore", h.ct.id)
        assert r.returncode == 0, r.stderr
        h.ct = Container(h.ct.id)
    assert Container(h.ct.id).status is ContainerStatus.RUNNING
    h.ct = Container(h.ct.id)
    assert continued(before, h.sample())
    assert leftovers(ctenv / "state", h.ct.id, cgroup_root()) == []


# where a full chkpnt can be stopped, and what the container is after recovery
CHKPNT_STEPS = [
    ("plain", "pycpt.container:Container._suspend", 1, "running"),  # before the freeze
    ("plain", "pycpt.dumpfile:DumpFileWriter.write", 3, "suspended"),  # CRIU streaming
    ("plain", "pycpt.dumpfile:DumpFileWriter.commit", 1, "suspended"),  # CRIU done
    ("plain", "pycpt.container:Container._kill_all", 1, "dumped"),  # committed
    ("gz", "pycpt._criu.swrk:Swrk.receive", 1, "suspended"),  # CRIU dumping over RPC
    ("gz", "pycpt.dumpfile._writing:_write_archive", 1, "suspended"),  # compressing
    ("gz", "pycpt.container:Container._kill_all", 1, "dumped"),
]


@pytest.mark.parametrize("how, where, nth, after", CHKPNT_STEPS)
def test_chkpnt_killed_at_each_step(ctenv, how, where, nth, after):
    h = Hasher(ctenv)
    before = h.sample()
    extra = ["--compress", "gz"] if how == "gz" else []
    r = pycpt_stopped_at(where, nth, "SIGKILL", "chkpnt", "ct1", *extra)
    assert r.returncode == -signal.SIGKILL, r.stderr
    seen = pycpt("status", "ct1")
    assert seen.stdout.strip() == after, seen.stdout + seen.stderr
    if after == "suspended":
        assert next_command(seen.stderr) == ["chkpnt", "ct1", "--resume"]
    if after == "dumped":
        assert next_command(seen.stderr) == ["restore", "ct1"]
    _recover("ct1", seen)
    _intact(h, ctenv, before)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("how, where, nth, after", CHKPNT_STEPS)
def test_chkpnt_interrupted_at_each_step(ctenv, how, where, nth, after, signame):
    """Ctrl-C, SIGTERM or SIGHUP: the command undoes its own step before it exits (after
    the commit it finishes instead); nothing is left for the next one to do."""
    if signame != "SIGINT" and how == "gz":
        pytest.skip("one signal is enough for the compressed path's steps")
    h = Hasher(ctenv)
    before = h.sample()
    extra = ["--compress", "gz"] if how == "gz" else []
    r = pycpt_stopped_at(where, nth, signame, "chkpnt", "ct1", *extra)
    assert r.returncode == 128 + signal.Signals[signame], r.stderr
    assert f"interrupted ({signame})" in r.stderr
    seen = pycpt("status", "ct1")
    now = "dumped" if after == "dumped" else "running"
    assert seen.stdout.strip() == now, seen.stdout
    assert "note:" not in seen.stderr, seen.stderr
    # what the interrupted command said it left, and the command that goes on
    assert f"  container ct1: {now}\n" in r.stderr, r.stderr
    assert ("  next: pycpt restore ct1" in r.stderr) == (now == "dumped"), r.stderr
    _intact(h, ctenv, before)


RESTORE_STEPS = [
    # (how, where, nth, status after the kill, the command it prints)
    ("plain", "pycpt._criu.streamer:ImageServer._transfer", 5, "dumped", ["restore", "ct1"]),
    # CRIU has rebuilt the tree (stopped), where its tasks landed not yet checked
    ("plain", "pycpt.container:_check_landed", 1, "undumped", ["restore", "ct1", "--resume"]),
    ("plain", "pycpt.container:_let_run", 1, "running", None),
    # compressed: CRIU has rebuilt the tree over RPC (the second update of the record, after
    # CRIU's pid: before the wake)
    (
        "gz",
        "pycpt.container:Container._intent_update",
        2,
        "undumped",
        ["restore", "ct1", "--resume"],
    ),
]


@pytest.mark.parametrize("how, where, nth, after, command", RESTORE_STEPS)
def test_restore_killed_at_each_step(ctenv, how, where, nth, after, command):
    h = Hasher(ctenv)
    before = h.sample()
    extra = ["--compress", "gz"] if how == "gz" else []
    assert pycpt("chkpnt", "ct1", *extra).returncode == 0
    r = pycpt_stopped_at(where, nth, "SIGKILL", "restore", "ct1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    seen = pycpt("status", "ct1")
    assert seen.stdout.strip() == after, seen.stdout + seen.stderr
    assert next_command(seen.stderr) == command
    _recover("ct1", seen)
    _intact(h, ctenv, before)


def test_restore_killed_before_it_ran_can_be_killed_instead(ctenv):
    """The other way out of a tree rebuilt but never run: restore --kill, and then a
    restore from the same dump file."""
    h = Hasher(ctenv)
    before = h.sample()
    assert pycpt("chkpnt", "ct1").returncode == 0
    pycpt_stopped_at("pycpt.container:_check_landed", 1, "SIGKILL", "restore", "ct1")
    assert pycpt("status", "ct1").stdout.strip() == "undumped"
    assert pycpt("restore", "ct1", "--kill").returncode == 0
    assert pycpt("status", "ct1").stdout.strip() == "stopped"
    assert not Container("ct1").cgroup.exists()
    assert pycpt("restore", "ct1").returncode == 0
    _intact(h, ctenv, before)


def test_a_damaged_dump_file_is_caught_when_resuming_an_interrupted_restore(ctenv):
    """A tree rebuilt before the restore's checks finished never runs unchecked: they are
    done again at --resume (the file damaged since: the tree is killed unrun)."""
    h = Hasher(ctenv)
    dump = h.ct.chkpnt()
    pycpt_stopped_at("pycpt.container:_check_landed", 1, "SIGKILL", "restore", "ct1")
    assert pycpt("status", "ct1").stdout.strip() == "undumped"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 1
    dump.write_bytes(bytes(data))
    r = pycpt("restore", "ct1", "--resume")
    said = r.stderr.lower()
    assert r.returncode == 1 and ("damaged" in said or "corrupt" in said), r.stderr
    ct = Container("ct1")
    assert ct.status is ContainerStatus.DUMPED and not ct.cgroup.exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("how, where, nth, after, command", RESTORE_STEPS)
def test_restore_interrupted_at_each_step(ctenv, how, where, nth, after, command, signame):
    """Interrupted, a restore removes what it rebuilt (the dump file is still there)."""
    h = Hasher(ctenv)
    before = h.sample()
    extra = ["--compress", "gz"] if how == "gz" else []
    assert pycpt("chkpnt", "ct1", *extra).returncode == 0
    r = pycpt_stopped_at(where, nth, signame, "restore", "ct1")
    assert r.returncode == 128 + signal.Signals[signame], r.stderr
    seen = pycpt("status", "ct1")
    assert "note:" not in seen.stderr, seen.stderr
    assert seen.stdout.strip() == "dumped"
    assert "  container ct1: dumped\n  next: pycpt restore ct1\n" in r.stderr, r.stderr
    _intact(h, ctenv, before)


def test_start_killed_before_its_record_is_undone(ctenv):
    """A start that died after its init ran but before it was recorded: the container was
    never reported started, so the next command removes it (no orphan keeps running)."""
    r = pycpt_stopped_at(
        "pycpt._sys.state:write_json_at", 2, "SIGKILL", "start", "ct1", "--", "sleep", "1000"
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    cgroup = cgroup_root() / "ct1"
    assert (cgroup / "cgroup.procs").read_text().split()  # the orphan
    seen = pycpt("list")
    assert "start of ct1 was undone" in seen.stderr and "ct1" not in seen.stdout
    assert not cgroup.exists()
    assert leftovers(ctenv / "state", "ct1", cgroup_root()) == []
    assert not (ctenv / "state" / "ct" / "ct1").exists()


def test_resume_killed_after_the_thaw_is_finished(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    h.ct.suspend()
    r = pycpt_stopped_at(
        "pycpt._sys.state:write_json_at", 1, "SIGKILL", "chkpnt", "ct1", "--resume"
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    seen = pycpt("status", "ct1")
    assert seen.stdout.strip() == "running" and "resume of ct1 was finished" in seen.stderr
    _intact(h, ctenv, before)


def test_staged_dump_killed_after_its_commit_is_finished(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    h.ct.suspend()
    r = pycpt_stopped_at(
        # the records: the intent, its temporary directory, CRIU's pid; then the commit
        "pycpt._sys.state:write_json_at",
        4,
        "SIGKILL",
        "chkpnt",
        "ct1",
        "--dump",
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    seen = pycpt("status", "ct1")
    assert seen.stdout.strip() == "suspended (dumped, still frozen)", seen.stdout + seen.stderr
    assert next_command(seen.stderr) == ["chkpnt", "ct1", "--kill"]
    assert pycpt("chkpnt", "ct1", "--kill").returncode == 0
    _intact(h, ctenv, before)


def test_gc_cleans_every_container_but_one_a_live_pycpt_holds(ctenv):
    """`pycpt gc` recovers every interrupted command and removes what it left: temporary
    files and directories, empty cgroups, directories holding only a lock. It never
    touches a container whose lock a live pycpt holds."""
    a, b = Hasher(ctenv, "a"), Hasher(ctenv, "b")
    sample_a, sample_b = a.sample(), b.sample()
    for ct in ("a", "b"):
        r = pycpt_stopped_at("pycpt.dumpfile:DumpFileWriter.commit", 1, "SIGKILL", "chkpnt", ct)
        assert r.returncode == -signal.SIGKILL
    assert pycpt("status", "nosuch").returncode == 1  # leaves no lock-only directory
    (ctenv / "state" / "ct" / "lockonly").mkdir(mode=0o700)
    (ctenv / "state" / "ct" / "lockonly" / "lock").write_bytes(b"")
    busy = Container("b").lock()  # a live pycpt works on b
    try:
        r = pycpt("gc")
        assert r.returncode == 0, r.stderr
        assert "b: a live pycpt holds it" in r.stdout
        assert "a: an interrupted chkpnt of a had not committed" in r.stdout
        assert leftovers(ctenv / "state", "a", cgroup_root()) == []
        assert leftovers(ctenv / "state", "b", cgroup_root())  # untouched
        assert not (ctenv / "state" / "ct" / "lockonly").exists()
        assert not (ctenv / "state" / "ct" / "nosuch").exists()
    finally:
        busy.release()
    assert pycpt("gc").returncode == 0
    assert leftovers(ctenv / "state", "b", cgroup_root()) == []
    for h, before in ((a, sample_a), (b, sample_b)):
        assert pycpt("chkpnt", h.ct.id, "--resume").returncode == 0
        _intact(h, ctenv, before)
    assert collect_garbage() == []


def test_gc_removes_the_empty_cgroup_of_a_gone_container(ctenv):
    h = Hasher(ctenv)
    h.ct.chkpnt()
    cgroup = cgroup_root() / "ct1"
    cgroup.mkdir()  # as a command killed after its rmdir was due might leave it
    r = pycpt("gc")
    assert f"removed its empty cgroup {cgroup}" in r.stdout and not cgroup.exists()


# --- tracebacks that became errors ---------------------------------------------------------


def test_verbs_on_a_container_that_does_not_exist_write_nothing(ctenv):
    with pytest.raises(errors.ContainerNotFoundError):
        Container("nosuch").stop()
    for args in (
        ["restore", "nosuch", "--resume"],
        ["restore", "nosuch", "--kill"],
        ["chkpnt", "nosuch"],
        ["chkpnt", "nosuch", "--suspend"],
        ["stop", "nosuch"],
        ["exec", "nosuch", "--", "true"],
    ):
        r = pycpt(*args)
        assert r.returncode == 1 and "no container nosuch" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (ctenv / "state" / "ct" / "nosuch").exists()


@pytest.mark.parametrize("ct", ["cgroup.procs", "cpu.stat", "memory.max", "tasks"])
def test_ids_that_name_cgroup_files_are_refused(ctenv, ct):
    r = pycpt("start", ct, "--", "sleep", "10")
    assert r.returncode == 2 and "cgroup interface file" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="cgroup interface file"):
        Container(ct)


def test_a_read_only_state_directory_is_an_error(ctenv, tmp_path):
    state = tmp_path / "ro"
    state.mkdir(mode=0o700)
    os.environ["PYCPT_STATE_DIR"] = str(state)
    import subprocess

    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state)], check=True
    )
    try:
        (state / "ct" / "old").mkdir(parents=True, mode=0o700)
        (state / "ct" / "old" / "lock").write_bytes(b"")
        (state / "ct" / "old" / "state.json").write_text('{"id": "old", "phase": "stopped"}')
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        for args in (["start", "new", "--", "true"], ["stop", "old"], ["chkpnt", "old"]):
            r = pycpt(*args)
            assert r.returncode == 1 and "read-only" in r.stderr, (args, r.stderr)
            assert "Traceback" not in r.stderr
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=True)
