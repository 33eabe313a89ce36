"""Restore runs containers only: a dump file that would run a process in the host's namespaces,
outside the container's cgroup, with a forged config, signed by a key this host does not
trust, or unsigned, is refused before anything runs, and nothing is left behind; the error
names the rule it broke. (Damaged files: tests/test_dumpfile.py and test_container.py.)"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pycpt import dumpfile, errors
from pycpt.container import Container, ContainerStatus, cgroup_root
from pycpt.criu import Criu
from pycpt.images import Images
from tests.helpers.dumps import edit_image, pack
from tests.helpers.workload import wait_for


def processes_with(token: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def assert_nothing_left(ct: str, token: str = "") -> None:
    assert not Container(ct).exists, "a state was recorded"
    assert not (cgroup_root() / ct).exists(), "a cgroup was left"
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f".pycpt-restore-{ct}-*"))
    if token:
        assert processes_with(token) == [], "a process of the file runs"


@pytest.fixture
def host_tree(ctenv, engine):
    """CRIU images of a process tree in the host's own namespaces (what `pycpt criu dump PID`
    of any host process gives); the process was killed by the dump. (images dir, token)"""
    token = f"{1000 + os.getpid() % 1000}.{len(str(ctenv))}17"
    proc = subprocess.Popen(
        ["sleep", token], start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL
    )
    images = ctenv / "host-images"
    images.mkdir()
    try:
        with Criu() as criu:
            criu.dump(proc.pid, images, shell_job=False)
    finally:
        proc.kill()
        proc.wait()
    assert processes_with(token) == []
    return images, token


def test_a_host_namespace_tree_signed_by_a_trusted_key_is_refused(host_tree, ctenv):
    """A key can leak, a bug can sign garbage: the signature does not make it a container."""
    images, token = host_tree
    pack(ctenv / "evil.dump", images, {"id": "evil", "argv": ["sleep", token]})
    with pytest.raises(errors.DumpFileRefusedError) as info:
        Container.restore("evil", str(ctenv / "evil.dump"))
    e = info.value
    assert e.rule == "namespaces"
    assert "would run in this host's own ipc, mnt, net, pid, uts namespaces" in str(e)
    assert_nothing_left("evil", token)


def test_a_host_namespace_tree_unsigned_is_refused_even_when_vouched_for(host_tree, ctenv):
    images, token = host_tree
    pack(ctenv / "evil.dump", images, {"id": "evil"}, fmt=1)
    with pytest.raises(errors.DumpFileUnsignedError, match="format 1.*--trust-dumpfile"):
        Container.restore("evil", str(ctenv / "evil.dump"))
    assert_nothing_left("evil", token)
    # --trust-dumpfile skips the trust decision only: the rules still hold
    with pytest.raises(errors.DumpFileRefusedError) as info:
        Container.restore("evil", str(ctenv / "evil.dump"), trust_dumpfile=True)
    assert info.value.rule == "namespaces"
    assert_nothing_left("evil", token)
    r = subprocess.run(
        [sys.executable, "-m", "pycpt", "restore", "evil", "--dumpfile", str(ctenv / "evil.dump")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "format 1, which carries no signature" in r.stderr
    assert "--trust-dumpfile" in r.stderr
    assert_nothing_left("evil", token)


@pytest.fixture
def container_images(ctenv):
    """A real container checkpointed (signed by this host), its images extracted, and its
    state before the restores of the test."""
    # no task forks while it runs, so the images are the same every time
    ct = Container.start("ct1", ["/bin/sh", "-c", "sleep 1000 & wait"])
    wait_for(lambda: len(ct.cgroup.joinpath("cgroup.procs").read_text().split()) == 2, 10)
    dump = ct.chkpnt(str(ctenv / "good.dump"))
    images = ctenv / "ct-images"
    config = dumpfile.extract_dump_file(dump, images).config
    return dump, images, Container("ct1").state, config


def test_a_forged_config_is_refused(container_images, ctenv):
    """Internal keys from a file once made a later `migrate-target --abort` delete /x and /y."""
    dump, images, before, config = container_images
    forged = {
        "id": "ct1",
        "argv": ["/bin/sh"],
        "migration": "tok",
        "images": "/x",
        "made_root": "/y",
    }
    pack(ctenv / "forged.dump", images, forged)  # signed by a trusted (leaked) key
    with pytest.raises(errors.DumpFileRefusedError) as info:
        Container.restore("ct1", str(ctenv / "forged.dump"))
    assert info.value.rule == "config"
    assert "is internal to pycpt" in str(info.value)
    assert Container("ct1").state == before and Container("ct1").status is ContainerStatus.DUMPED
    assert not (cgroup_root() / "ct1").exists()
    for bad in (dict(config, argv="sh"), dict(config, id="../x"), dict(config, colour="red")):
        pack(ctenv / "forged.dump", images, bad)
        with pytest.raises(errors.DumpFileRefusedError, match="config key") as info:
            Container.restore("ct1", str(ctenv / "forged.dump"))
        assert info.value.rule == "config"
    assert Container("ct1").state == before
    Container.restore("ct1", str(dump)).stop()  # the real one still restores


def test_a_task_outside_the_container_cgroup_is_refused(container_images, ctenv):
    """A task recorded in the dumping host's own cgroups would be restored there, outside
    the container (once it was reported running while it sat stopped in 0::/)."""
    dump, images, before, config = container_images
    with Images.open(images) as im:
        child = [t.pid for t in im.process_tree()][1]
        host_set = im.cgroups().dumper
    assert host_set is not None

    def to_host_set(core) -> None:  # where CRIU's restore looks: thread_core, then tc
        core.thread_core.cg_set = host_set
        core.tc.cg_set = host_set

    edit_image(images, f"core-{child}.img", to_host_set)
    pack(ctenv / "escaped.dump", images, config)
    with pytest.raises(errors.DumpFileRefusedError) as info:
        Container.restore("ct1", str(ctenv / "escaped.dump"))
    assert info.value.rule == "cgroup" and f"task {child}" in str(info.value)
    assert Container("ct1").state == before and not (cgroup_root() / "ct1").exists()


def test_a_shared_network_must_be_recorded(ctenv):
    """A container started with --share-net has the host's network namespace: its file
    restores as such, but the same images with share_net false are refused."""
    ct = Container.start("sn", ["/bin/sh", "-c", "sleep 1000 & wait"], share_net=True)
    dump = ct.chkpnt(str(ctenv / "sn.dump"))
    images = ctenv / "sn-images"
    config = dumpfile.extract_dump_file(dump, images).config
    pack(ctenv / "forged.dump", images, dict(config, share_net=False))
    with pytest.raises(errors.DumpFileRefusedError, match="own net namespace") as info:
        Container.restore("sn2", str(ctenv / "forged.dump"))  # as a new container
    assert info.value.rule == "namespaces"
    assert_nothing_left("sn2")
    Container.restore("sn", str(dump)).stop()


def test_a_file_signed_by_an_untrusted_key_is_refused(container_images, ctenv, tmp_path):
    dump, images, before, config = container_images
    other = dumpfile.Keys(tmp_path / "other-host")
    pack(ctenv / "other.dump", images, config, keys=other)
    with pytest.raises(errors.DumpFileUntrustedError) as info:
        Container.restore("ct1", str(ctenv / "other.dump"))
    assert "not signed by a trusted key" in str(info.value)
    assert Container("ct1").state == before and not (cgroup_root() / "ct1").exists()
    r = subprocess.run(
        [sys.executable, "-m", "pycpt", "restore", "ct1", "--dumpfile", str(ctenv / "other.dump")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "pycpt key trust 'pycpt-ed25519 " in r.stderr
    # the user vouches for it (dangerous, but theirs to decide): it restores
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pycpt",
            "restore",
            "ct1",
            "--dumpfile",
            str(ctenv / "other.dump"),
            "--trust-dumpfile",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    Container("ct1").stop()


def test_a_format_1_file_restores_only_when_vouched_for(container_images, ctenv):
    dump, images, before, config = container_images
    pack(ctenv / "old.dump", images, config, fmt=1)
    with pytest.raises(errors.DumpFileUnsignedError):
        Container.restore("ct1", str(ctenv / "old.dump"))
    assert Container("ct1").state == before and not (cgroup_root() / "ct1").exists()
    ct = Container.restore("ct1", str(ctenv / "old.dump"), trust_dumpfile=True)
    assert ct.status is ContainerStatus.RUNNING
    ct.stop()


def test_a_file_from_another_host_restores_there_only_after_key_trust(testhosts, tmp_path):
    """Host "src" checkpoints a container into a file, "dst" gets the file: dst refuses it
    (src's key is not trusted there) and keeps no trace, until `pycpt key trust` of the line
    `pycpt key show` printed on src; then it restores and runs. Each test host has its own
    state directory, hence its own host key."""
    src, dst = testhosts["src"], testhosts["dst"]
    token = f"{2000 + os.getpid() % 1000}.{len(str(tmp_path))}19"
    dump = tmp_path / "Dump.kt"

    def pycpt(host, *args: str) -> subprocess.CompletedProcess:
        return host.run(
            [sys.executable, "-m", "pycpt", *args], capture_output=True, text=True, timeout=300
        )

    r = pycpt(src, "start", "kt", "--", "/bin/sleep", token)
    assert r.returncode == 0, r.stderr
    r = pycpt(src, "chkpnt", "kt", "--dumpfile", str(dump))
    assert r.returncode == 0, r.stderr
    assert processes_with(token) == []

    r = pycpt(dst, "restore", "kt", "--dumpfile", str(dump))
    assert r.returncode == 1
    assert "is not signed by a trusted key" in r.stderr
    assert "pycpt key trust 'pycpt-ed25519 " in r.stderr
    assert not (dst.state_dir / "ct" / "kt" / "state.json").exists()  # (its lock may stay)
    assert pycpt(dst, "status", "kt").returncode != 0  # no such container there
    with dst.as_current():
        assert not (cgroup_root() / "kt").exists()
    assert processes_with(token) == []

    shown = pycpt(src, "key", "show")
    assert shown.returncode == 0 and shown.stdout.startswith("pycpt-ed25519 "), shown.stderr
    assert pycpt(dst, "key", "show").stdout != shown.stdout  # two hosts, two keys
    r = pycpt(dst, "key", "trust", shown.stdout.strip())
    assert r.returncode == 0 and r.stdout.startswith("trusted SHA256:"), r.stderr

    r = pycpt(dst, "restore", "kt", "--dumpfile", str(dump))
    assert r.returncode == 0, r.stderr
    assert len(processes_with(token)) == 1
    r = pycpt(dst, "status", "kt", "--json")
    assert r.returncode == 0 and '"running"' in r.stdout, r.stdout + r.stderr
    assert pycpt(dst, "stop", "kt").returncode == 0
    assert processes_with(token) == []


@pytest.fixture
def zombie_images(ctenv):
    """A container whose second task (a subshell that became `sleep`) never reaps its exited
    child: the dump records that child as a zombie, as it does for any container caught
    between a child's exit and its parent's wait (a shell loop running `sleep`)."""
    ct = Container.start("zc", ["/bin/sh", "-c", "(sleep 0 & exec sleep 1000) & exec sleep 1000"])

    def has_zombie() -> bool:  # an exited task leaves its cgroup: look at the children
        for pid in ct.cgroup.joinpath("cgroup.procs").read_text().split():
            try:
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    stat = Path(f"/proc/{child}/stat").read_text()
                    if stat.rpartition(")")[2].split()[0] == "Z":
                        return True
            except OSError:
                pass
        return False

    wait_for(has_zombie, 10)
    dump = ct.chkpnt(str(ctenv / "zc.dump"))
    images = ctenv / "zc-images"
    config = dumpfile.extract_dump_file(dump, images).config
    return dump, images, config


def test_a_container_with_a_zombie_restores(zombie_images):
    """A zombie has no namespaces or cgroups of its own left (CRIU records none): it is
    restored as its parent's child and exits at once. Once refused as a task "in this host's
    own namespaces" (CI: `pycpt restore` of a `while :; do sleep 0.05; done` container)."""
    dump, images, config = zombie_images
    with Images.open(images) as im:
        states = [t.state.name for t in im.process_tree()]
    assert states == ["ALIVE", "ALIVE", "DEAD"], states
    ct = Container.restore("zc", str(dump))
    assert ct.status is ContainerStatus.RUNNING
    ct.stop()


def _forged(images: Path, ctenv: Path, name: str, image: str, change) -> Path:
    copy = ctenv / name
    subprocess.run(["cp", "-a", str(images), str(copy)], check=True)
    edit_image(copy, image, change)
    return copy


def test_a_forged_zombie_is_still_checked(zombie_images, ctenv):
    """What a zombie is excused from, a task that could run is not: a live task with no
    namespace ids, a "zombie" with children, and a zombie recorded as alive are refused."""
    dump, images, config = zombie_images
    with Images.open(images) as im:
        root, middle, zombie = (t.pid for t in im.process_tree())

    def no_namespaces(ids) -> None:
        for kind in ("pid", "mnt", "net", "ipc", "uts"):
            ids.ClearField(f"{kind}_ns_id")

    def dead(core) -> None:
        core.tc.task_state = 2

    def alive(core) -> None:
        core.tc.task_state = 1

    for name, image, change, rule, words in (
        ("no-ns", f"ids-{middle}.img", no_namespaces, "namespaces", f"task {middle} would run"),
        ("parent", f"core-{middle}.img", dead, "namespaces", "a zombie with children"),
        ("risen", f"core-{zombie}.img", alive, "images", "has no ids"),
    ):
        forged = _forged(images, ctenv, name, image, change)
        pack(ctenv / "forged.dump", forged, config)
        with pytest.raises(errors.DumpFileRefusedError) as info:
            Container.restore("zc", str(ctenv / "forged.dump"))
        assert info.value.rule == rule and words in str(info.value), (name, str(info.value))
        assert Container("zc").status is ContainerStatus.DUMPED
        assert not (cgroup_root() / "zc").exists()
    Container.restore("zc", str(dump)).stop()
