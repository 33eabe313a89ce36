"""The state directory is a trust boundary: pycpt runs as root and acts on what it finds
there, so a directory (or a parent) another user can change is refused, nothing under it is
reached through a symlink, and a record naming someone else's cgroup or process is
refused as tampered with. Each attack is prepared by the unprivileged user `nobody` where
it can be (as it would be), or by hand where only root could (a leftover, a bug), and each
test checks that nothing outside the state directory changed: the victim files' checksums
and the victim cgroup's tasks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from pycpt import errors
from pycpt.container import Container, ContainerStatus, cgroup_root, collect_garbage
from tests.helpers.containers import Hasher
from tests.helpers.recovery import pycpt

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def as_nobody(script: str) -> None:
    """Run a shell script as the unprivileged user nobody."""
    subprocess.run([*NOBODY, "sh", "-ec", script], check=True, capture_output=True)


def snapshot(path: Path) -> Dict[str, str]:
    """Every file, directory and link under `path` with its mode, owner and content hash."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            what = f"{st.st_mode:o} {st.st_uid} {st.st_nlink}"
            if p.is_symlink():
                what += " -> " + os.readlink(p)
            elif p.is_file():
                what += " " + hashlib.sha256(p.read_bytes()).hexdigest()
            seen[str(p.relative_to(path))] = what
    return seen


class Victim:
    """What an attacker would like root to damage: files and directories of root's, and a
    cgroup with a running task, outside any state directory."""

    def __init__(self, base: Path, make_cgroup, spawn) -> None:
        self.dir = base / "victim"
        (self.dir / "sub").mkdir(parents=True)
        (self.dir / "precious").write_bytes(os.urandom(4096))
        (self.dir / "sub" / "more").write_text("do not touch\n")
        (self.dir / "state.json").write_text("{}\n")  # a file of that name, not pycpt's
        self.cgroup = Path(make_cgroup(2))
        self.proc = spawn(str(self.cgroup))[0]
        self.before = snapshot(self.dir)
        self.tasks = self._tasks()

    def _tasks(self) -> List[str]:
        return sorted((self.cgroup / "cgroup.procs").read_text().split())

    def untouched(self) -> None:
        assert snapshot(self.dir) == self.before
        assert self.cgroup.is_dir() and self._tasks() == self.tasks
        assert self.proc.poll() is None


@pytest.fixture
def attack(ctenv, make_cgroup, spawn) -> Iterator[Path]:
    """A base directory nobody can reach (o+x) under /tmp, holding the victim; removed
    afterwards. The state directory is set by each test."""
    base = Path(tempfile.mkdtemp(prefix="pycpt-attack-", dir="/tmp"))
    base.chmod(0o755)
    (base / "home").mkdir()  # where nobody may write
    shutil.chown(base / "home", "nobody", "nogroup")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def victim(attack, make_cgroup, spawn) -> Victim:
    return Victim(attack, make_cgroup, spawn)


def use_state(monkeypatch, path: Path) -> None:
    monkeypatch.setenv("PYCPT_STATE_DIR", str(path))


# --- StrictModes -----------------------------------------------------------------------------


def test_a_state_directory_another_user_owns_is_refused(attack, victim, monkeypatch):
    """nobody prepared the whole state directory, with ct/ct1 a symlink to the victim:
    refused before anything is read or written."""
    state = attack / "home" / "state"
    as_nobody(f"mkdir -p {state}/ct && ln -s {victim.dir} {state}/ct/ct1")
    use_state(monkeypatch, state)
    before = snapshot(state)
    for args in (
        ["start", "ct1", "--", "sleep", "100"],
        ["stop", "ct1"],
        ["status", "ct1"],
        ["gc"],
    ):
        r = pycpt(*args)
        assert r.returncode == 1 and "refusing state directory" in r.stderr, (args, r.stderr)
        assert "owned by uid 65534" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(state) == before
    victim.untouched()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_state_directory_others_can_write_is_refused(attack, victim, monkeypatch, mode):
    state = attack / "state"
    state.mkdir()
    state.chmod(mode)
    use_state(monkeypatch, state)
    r = pycpt("start", "ct1", "--", "sleep", "100")
    assert r.returncode == 1 and "writable by" in r.stderr, r.stderr
    assert os.listdir(state) == []


def test_a_parent_others_can_write_is_refused_unless_sticky(attack, monkeypatch):
    parent = attack / "open"
    parent.mkdir()
    parent.chmod(0o777)
    state = parent / "state"
    state.mkdir(mode=0o700)
    use_state(monkeypatch, state)
    r = pycpt("list")
    assert r.returncode == 1 and f"{parent} is writable by group and others" in r.stderr, r.stderr
    parent.chmod(0o1777)  # as /tmp: others cannot replace what root made there
    assert pycpt("list").returncode == 0


def test_a_subdirectory_another_user_owns_is_refused(attack, victim, monkeypatch):
    """The state directory is root's, but ct/ was handed to nobody, who put a symlink to
    the victim in it: refused as tampered with."""
    state = attack / "state"
    state.mkdir(mode=0o711)
    (state / "ct").mkdir()
    shutil.chown(state / "ct", "nobody", "nogroup")
    as_nobody(f"ln -s {victim.dir} {state}/ct/ct1")
    use_state(monkeypatch, state)
    for args in (["start", "ct1", "--", "sleep", "100"], ["stop", "ct1"]):
        r = pycpt(*args)
        assert r.returncode == 1 and "owned by uid 65534" in r.stderr, (args, r.stderr)
    victim.untouched()


# --- no symlink followed, none created ------------------------------------------------------


@pytest.mark.parametrize("verb", ["start", "stop", "restore", "status", "list", "gc"])
def test_a_symlinked_container_directory_is_refused(ctenv, victim, verb):
    """ct/ct1 is a symlink to the victim (left by someone with root, or a bug): no verb
    follows it, none writes there, `list` and `gc` report it and leave it."""
    link = ctenv / "state" / "ct" / "ct1"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(victim.dir)
    args = {
        "start": ["start", "ct1", "--", "sleep", "100"],
        "stop": ["stop", "ct1"],
        "restore": ["restore", "ct1"],
        "status": ["status", "ct1"],
        "list": ["list"],
        "gc": ["gc"],
    }[verb]
    r = pycpt(*args)
    if verb in ("list", "gc"):
        assert "symbolic link" in r.stdout + r.stderr, r.stdout + r.stderr
    else:
        assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr
    assert link.is_symlink()
    victim.untouched()


@pytest.mark.parametrize("name", ["lock", "console.log", "state.json", "intent.json"])
def test_symlinked_files_in_a_container_directory_are_refused(ctenv, victim, name):
    """A symlink in place of the lock, the console log or a record: root never writes,
    appends or reads through it (O_NOFOLLOW)."""
    ct_dir = ctenv / "state" / "ct" / "ct1"
    ct_dir.mkdir(parents=True, mode=0o700)
    (ct_dir / name).symlink_to(victim.dir / "precious")
    r = pycpt("start", "ct1", "--", "sh", "-c", "echo pwned; sleep 100")
    assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr
    assert not (cgroup_root() / "ct1").exists()
    assert (ct_dir / name).is_symlink()
    victim.untouched()


def test_symlinked_lock_and_console_log_prepared_by_nobody(attack, victim, monkeypatch):
    """nobody owns the container's directory and made its lock and console log symlinks to
    root's files: refused, nothing appended or created there."""
    state = attack / "state"
    state.mkdir(mode=0o711)
    (state / "ct").mkdir(mode=0o711)
    (state / "ct" / "ct1").mkdir()
    shutil.chown(state / "ct" / "ct1", "nobody", "nogroup")
    as_nobody(
        f"ln -s {victim.dir}/precious {state}/ct/ct1/console.log && "
        f"ln -s {victim.dir}/sub/more {state}/ct/ct1/lock"
    )
    use_state(monkeypatch, state)
    r = pycpt("start", "ct1", "--", "sh", "-c", "echo pwned; sleep 100")
    assert r.returncode == 1 and "owned by uid 65534" in r.stderr, r.stderr
    assert not (cgroup_root() / "ct1").exists()
    victim.untouched()


TOKEN = "5a" * 16  # a migration's token, as the source names it


def test_forget_never_empties_a_directory_through_a_symlink(ctenv, victim):
    """`migrate-target --abort` goes through Container.forget(): with ct/ct1 a symlink to
    the victim (holding a record that names the migration), nothing there is removed."""
    link = ctenv / "state" / "ct" / "ct1"
    link.parent.mkdir(mode=0o700)
    record = {"incoming": {"token": TOKEN}, "phase": "receiving"}
    (victim.dir / "state.json").write_text(json.dumps(record))
    victim.before = snapshot(victim.dir)
    link.symlink_to(victim.dir)
    r = pycpt("migrate-target", "ct1", "--abort", TOKEN)
    assert r.returncode == 1 and "symbolic link" in r.stderr, r.stderr
    with pytest.raises(errors.StateTamperedError):
        Container("ct1").forget()
    victim.untouched()


def test_abort_through_a_symlink_prepared_by_nobody(attack, victim, monkeypatch):
    state = attack / "home" / "state"
    as_nobody(f"mkdir -p {state}/ct && ln -s {victim.dir} {state}/ct/ct1")
    use_state(monkeypatch, state)
    r = pycpt("migrate-target", "ct1", "--abort", TOKEN)
    assert r.returncode == 1 and "refusing state directory" in r.stderr, r.stderr
    victim.untouched()


# --- dump files -----------------------------------------------------------------------------


def test_a_dump_file_in_a_directory_another_user_owns_is_refused(
    ctenv, attack, victim, monkeypatch
):
    """A dump file kept in a directory nobody owns, which nobody then swapped for another
    (here: a real dump of a container that would run their program as root): restore
    refuses it and runs nothing; chkpnt refuses to write there at all."""
    theirs = attack / "theirs"
    theirs.mkdir()
    shutil.chown(theirs, "nobody", "nogroup")
    evil = Container.start("evil", ["/bin/sh", "-c", "sleep 1000"])
    evil.chkpnt(str(ctenv / "evil.dump"))
    h = Hasher(ctenv)
    r = pycpt("chkpnt", "ct1", "--dumpfile", str(theirs / "Dump.ct1"))
    assert r.returncode == 1 and "refusing to write a dump file" in r.stderr, r.stderr
    assert h.ct.status is ContainerStatus.RUNNING and os.listdir(theirs) == []
    h.ct.chkpnt(str(ctenv / "ct1.dump"))
    shutil.copy(ctenv / "evil.dump", theirs / "Dump.ct1")  # the swap, as nobody could
    shutil.chown(theirs / "Dump.ct1", "nobody", "nogroup")
    for dump in (theirs / "Dump.ct1",):
        r = pycpt("restore", "ct1", "--dumpfile", str(dump))
        assert r.returncode == 1 and "refusing dump file" in r.stderr, r.stderr
        assert "owned by uid 65534" in r.stderr
    assert Container("ct1").status is ContainerStatus.DUMPED
    assert not (cgroup_root() / "ct1").exists()
    victim.untouched()


def test_a_dump_file_another_user_owns_in_a_sticky_directory_is_refused(ctenv, attack):
    sticky = attack / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    h = Hasher(ctenv)
    h.ct.chkpnt(str(sticky / "Dump.ct1"))  # a sticky directory is a fine place for root's
    as_nobody(f"cp {sticky}/Dump.ct1 {sticky}/Dump.mine 2>/dev/null || echo x > {sticky}/Dump.mine")
    r = pycpt("restore", "ct1", "--dumpfile", str(sticky / "Dump.mine"))
    assert r.returncode == 1 and "owned by uid 65534" in r.stderr, r.stderr
    assert pycpt("restore", "ct1", "--dumpfile", str(sticky / "Dump.ct1")).returncode == 0


# --- records naming what is not the container's ----------------------------------------------


def _forge(ctenv: Path, ct: str, **fields) -> None:
    path = ctenv / "state" / "ct" / ct / "state.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("verb", ["stop", "suspend", "chkpnt", "gc", "list"])
def test_a_forged_cgroup_is_never_killed_or_removed(ctenv, victim, verb):
    """state.json names the victim's cgroup: nothing is frozen, killed or removed on its
    word; the record is reported as tampered with."""
    Container.start("ct1", ["/bin/sh", "-c", "sleep 1000"])
    _forge(ctenv, "ct1", cgroup=str(victim.cgroup))
    args = {
        "stop": ["stop", "ct1"],
        "suspend": ["chkpnt", "ct1", "--suspend"],
        "chkpnt": ["chkpnt", "ct1"],
        "gc": ["gc"],
        "list": ["list"],
    }[verb]
    r = pycpt(*args)
    assert f"names cgroup '{victim.cgroup}'" in r.stdout + r.stderr, r.stdout + r.stderr
    if verb not in ("gc", "list"):
        assert r.returncode == 1
    victim.untouched()
    _forge(ctenv, "ct1", cgroup=str(cgroup_root() / "ct1"))  # so that teardown stops it


def test_a_forged_init_pid_is_never_used(ctenv, victim):
    """state.json names the victim's process (with its real start time) as the init: exec,
    suspend and chkpnt do not enter its namespaces or touch its network."""
    Container.start("ct1", ["/bin/sh", "-c", "sleep 1000"])
    pid = victim.proc.pid
    started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    _forge(ctenv, "ct1", init_pid=pid, init_start=started)
    for args in (["exec", "ct1", "--", "true"], ["chkpnt", "ct1", "--suspend"], ["chkpnt", "ct1"]):
        r = pycpt(*args)
        assert r.returncode == 1 and "is not in" in r.stderr, (args, r.stderr)
    victim.untouched()


@pytest.fixture
def victim_link() -> Iterator[List[str]]:
    """A link named as pycpt names a container's outside veth end ("pc", 10 hex digits, an index),
    in a network namespace of the test's own; the command prefix that enters it."""
    ns = f"pycpt-test-nv-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "pcdeadbeef010", "type", "veth", "peer", "vpeer"],
            check=True,
        )
        yield ["nsenter", f"--net=/run/netns/{ns}", "--"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def _link_there(enter: List[str]) -> bool:
    shown = subprocess.run(
        [*enter, "ip", "-o", "link", "show", "pcdeadbeef010"], capture_output=True, text=True
    )
    return shown.returncode == 0


@pytest.mark.parametrize("verb", ["stop", "suspend"])
def test_a_forged_nic_never_takes_another_link(ctenv, victim, victim_link, verb):
    """state.json gives the container a NIC whose outside end is another link of the host:
    stop would delete it, a suspend would hold it. Refused as tampered with; the link, the
    container and the victim are untouched."""
    Container.start("ct1", ["/bin/sh", "-c", "sleep 1000"])
    forged = {
        "name": "eth0",
        "mac": "02:00:00:00:00:01",
        "bridge": "br0",
        "host_name": "pcdeadbeef010",
        "host_mac": "fe:00:00:00:00:01",
        "addresses": ["10.9.9.2/24"],
        "gateways": [],
        "mtu": 0,
    }
    _forge(ctenv, "ct1", nics=[forged])
    args = {"stop": ["stop", "ct1"], "suspend": ["chkpnt", "ct1", "--suspend"]}[verb]
    r = subprocess.run(
        [*victim_link, sys.executable, "-m", "pycpt", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "names 'pcdeadbeef010'" in r.stderr, r.stderr
    assert _link_there(victim_link)
    assert Container("ct1").status is ContainerStatus.RUNNING
    victim.untouched()
    _forge(ctenv, "ct1", nics=[])  # so that teardown stops it


def test_gc_leaves_a_tampered_record_alone(ctenv, victim):
    Container.start("ct1", ["/bin/sh", "-c", "sleep 1000"])
    _forge(ctenv, "ct1", cgroup=str(victim.cgroup), phase="stopped")
    said = collect_garbage()
    assert any("ct1" in line and "left alone" in line for line in said), said
    assert (ctenv / "state" / "ct" / "ct1" / "state.json").exists()
    victim.untouched()
    _forge(ctenv, "ct1", cgroup=str(cgroup_root() / "ct1"), phase="running")


def test_modes_of_what_pycpt_writes(ctenv):
    """Everything that can hold a container's memory, arguments or output is 0600, its
    directories 0700: state, console log, dump file, kept CRIU logs."""
    h = Hasher(ctenv)
    dump = h.ct.chkpnt()
    state = ctenv / "state"
    for path in [state / "ct", state / "ct" / "ct1", state / "dump"]:
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in [state / "ct" / "ct1" / n for n in ("state.json", "console.log", "lock")] + [dump]:
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_kept_criu_logs_are_private(ctenv, tmp_path, monkeypatch):
    """A failed restore keeps CRIU's log beside the state, mode 0600 (it quotes the
    container's command line), whatever the umask."""
    import pycpt

    h = Hasher(ctenv)
    h.ct.chkpnt()
    engine = pycpt.find_engine()
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\nexec " + " ".join(engine.argv) + ' "$@" --cgroup-yard /nonexistent/yard\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PYCPT_CRIU", str(wrapper))
    old = os.umask(0o022)
    try:
        with pytest.raises(errors.CriuError) as caught:
            Container.restore("ct1")
    finally:
        os.umask(old)
    kept = Path(caught.value.log_path or "")
    assert kept == ctenv / "state" / "ct" / "ct1" / "criu-restore.log"
    assert kept.stat().st_mode & 0o777 == 0o600


def test_criu_dump_into_an_existing_directory_writes_private_images(engine, tmp_path):
    """`pycpt criu dump PID DIR` into a directory that exists (mode 0755): every image and
    stats file CRIU writes there is 0600 (CRIU creates them under pycpt's umask)."""
    images = tmp_path / "img"
    images.mkdir(mode=0o755)
    target = subprocess.Popen(["setsid", "sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pycpt",
                "criu",
                "dump",
                str(target.pid),
                str(images),
                "--leave-running",
                "--shell-job",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    finally:
        target.kill()
        target.wait()
    files = sorted(images.iterdir())
    assert any(p.name.startswith("stats-") for p in files)
    assert [p.name for p in files if p.stat().st_mode & 0o077] == []


def test_a_symlink_of_another_user_on_the_way_is_refused(attack, victim, monkeypatch):
    """/tmp-like: nobody points a name in a sticky directory at a root-owned place, hoping
    root's state directory lands there: refused, nothing created there."""
    sticky = attack / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    as_nobody(f"ln -s {victim.dir} {sticky}/state")
    ours = os.environ["PYCPT_STATE_DIR"]
    use_state(monkeypatch, sticky / "state" / "sub")
    r = pycpt("start", "ct1", "--", "sleep", "100")
    assert r.returncode == 1 and "symbolic link of uid 65534" in r.stderr, r.stderr
    victim.untouched()
    use_state(monkeypatch, Path(ours))
    r = pycpt("restore", "ct1", "--dumpfile", str(sticky / "state" / "precious"))
    assert r.returncode == 1 and "symbolic link of uid 65534" in r.stderr, r.stderr
    victim.untouched()
