"""The page channel of a migration (pycpt/_migration/pages.py) as an attacker on either host
sees it: a local user who is not root cannot connect to it, or to anything else that
listens, at any moment of a stop-and-copy or a post-copy migration; a connection that does
not prove the migration's key is refused by either end; the sockets and their directories are
gone after a success and after a failure."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from pycpt import errors
from pycpt._migration import pages
from pycpt.container import ContainerStatus
from pycpt.testing.testhosts import SSH_PORT, TestHosts
from tests.helpers.containers import continued
from tests.helpers.nobody import Prober, connect_as_nobody, nobody_missing
from tests.test_migrate import (
    Workload,
    assert_source_intact,
    assert_target_clean,
    status_on,
)


@pytest.fixture(autouse=True)
def _nobody_can_run():
    reason = nobody_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def tmpdirs() -> Iterator[Dict[str, Path]]:
    """A TMPDIR of its own for each side (short: socket paths hold 107 bytes), so that what
    a migration leaves there is exactly what this test looks at."""
    made = {side: Path(tempfile.mkdtemp(prefix=f"pgch-{side}-", dir="/tmp")) for side in "st"}
    for path in made.values():
        path.chmod(0o755)  # like /tmp without the sticky bit: what nobody meets there
    yield {"src": made["s"], "dst": made["t"]}
    for path in made.values():
        shutil.rmtree(path, ignore_errors=True)


def migrate_with(
    hosts: TestHosts, ct: str, tmpdirs: Dict[str, Path], *args: str, target_python: str = ""
) -> "subprocess.CompletedProcess[str]":
    """`pycpt migrate ARGS dst CT --json` on src, each side with its own TMPDIR; the target's
    pycpt is `target_python` (code run before its CLI) if given."""
    remote = f"env TMPDIR={tmpdirs['dst']} pycpt"
    if target_python:
        remote = f"env TMPDIR={tmpdirs['dst']} {sys.executable} {target_python}"
    return hosts["src"].run(
        ["pycpt", "migrate", "--json", "--remote-pycpt", remote, *args, "dst", ct],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TMPDIR": str(tmpdirs["src"])},
    )


def assert_nothing_left(tmpdirs: Dict[str, Path]) -> None:
    """No socket, no directory of the page channel (nor anything else) in either TMPDIR."""
    for side, path in tmpdirs.items():
        left = sorted(str(p) for p in path.rglob("*"))
        assert not left, f"left in the {side} TMPDIR: {left}"


# --- the pieces, step by step (deterministic: every moment is held open) ------------------

_SOURCE_SIDE = r"""
import json, os, sys
from pycpt._migration import pages
from pycpt._migration.ssh import SshConnection, SshTarget

fields = json.loads(sys.argv[1])
conn = SshConnection(SshTarget.parse("dst"), config=sys.argv[2])
forward = conn.forward_socket
local = []


def held_forward(here, there):
    forward(here, there)
    local.append(here)
    st = os.stat(here)
    print(json.dumps({"forwarded": here, "mode": st.st_mode & 0o7777,
                      "dir_mode": os.stat(os.path.dirname(here)).st_mode & 0o7777}), flush=True)
    sys.stdin.readline()  # the test tries it as nobody now


conn.forward_socket = held_forward
try:
    sock = pages.connect(conn, fields)
except Exception as exc:
    result = {"error": type(exc).__name__, "message": str(exc)}
else:
    sock.sendall(b"ping")
    result = {"echo": sock.recv(4).decode()}
    sock.close()
result["local_left"] = bool(local) and os.path.exists(local[0])
conn.close()
result["dir_left"] = os.path.exists(conn.directory)
print(json.dumps(result), flush=True)
"""


def _source_side(hosts: TestHosts, tmp_path: Path, fields: Dict[str, Any]) -> subprocess.Popen:
    script = tmp_path / "source_side.py"
    script.write_text(_SOURCE_SIDE)
    src = hosts["src"]
    return subprocess.Popen(
        src.nsenter([sys.executable, str(script), json.dumps(fields), str(hosts.ssh_config)]),
        env={**src.env, "TMPDIR": "/tmp"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).parent.parent),
    )


def _accept_in_thread(listener: pages.PageListener) -> Dict[str, Any]:
    got: Dict[str, Any] = {}

    def run() -> None:
        try:
            conn = listener.accept(timeout=60)
        except errors.PageChannelError as exc:
            got["error"] = exc
            return
        with conn:
            got["data"] = conn.recv(4)
            conn.sendall(got["data"])

    got["thread"] = threading.Thread(target=run, daemon=True)
    got["thread"].start()
    return got


@pytest.mark.parametrize("key", ["right", "source-wrong", "target-wrong"])
def test_each_step_is_closed_to_nobody_and_needs_the_key(testhosts, tmp_path, key):
    """The target's listener and the source's forwarded socket, each held open while
    `nobody` tries it (EACCES: 0700 directories, 0600 sockets); then the key: a source that
    does not prove the first half is refused by the target before anything is served, a
    target that does not prove the second half by the source. Either way the listener, the
    forward and both directories are gone afterwards."""
    listener = pages.PageListener()
    try:
        assert stat.S_IMODE(listener.dir.stat().st_mode) == 0o700
        assert listener.dir.stat().st_uid == 0
        assert connect_as_nobody(str(listener.path)) == "EACCES"
        fields = listener.fields()
        wrong = bytearray.fromhex(fields["key"])
        if key == "source-wrong":
            wrong[0] ^= 1
        elif key == "target-wrong":
            wrong[-1] ^= 1
        fields["key"] = wrong.hex()
        got = _accept_in_thread(listener)
        proc = _source_side(testhosts, tmp_path, fields)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            forwarded = json.loads(proc.stdout.readline())
            assert forwarded["mode"] == 0o600 and forwarded["dir_mode"] == 0o700, forwarded
            assert connect_as_nobody(forwarded["forwarded"]) == "EACCES"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        got["thread"].join(60)
        if key == "right":
            assert result.get("echo") == "ping", result
            assert got.get("data") == b"ping"
        elif key == "source-wrong":
            assert "did not prove the migration's key" in str(got["error"])
            assert "data" not in got
            # the source only sees the connection end (its migration hears why from the
            # target's control channel)
            assert result["error"] == "PageChannelRefusedError", result
        else:
            # the target's end was proven, but the source closed without a byte
            assert got.get("data") == b"", got
            assert result["error"] == "PageChannelError", result
            assert "other end did not prove the migration's key" in result["message"]
        assert not listener.dir.exists()
        assert not result["local_left"] and not result["dir_left"], result
    finally:
        listener.close()


def test_socket_paths_are_checked():
    with pytest.raises(errors.PageChannelError, match="unusable"):
        pages.check_socket_path("/tmp/a b/pages.sock", "test")
    with pytest.raises(errors.PageChannelError, match="unusable"):
        pages.check_socket_path("/" + "a" * 120, "test")
    with pytest.raises(errors.PageChannelError, match="unusable"):
        pages.check_socket_path("/tmp/../etc/x", "test")
    assert pages.check_socket_path("/tmp/.pycpt-pages-x/pages.sock", "t")


# --- whole migrations, with nobody trying every listener on both hosts throughout ---------


def _probe_all(hosts: TestHosts) -> List[Prober]:
    return [Prober(hosts[name], skip_ports=[SSH_PORT]) for name in ("src", "dst")]


def _stop_all(probers: List[Prober]) -> Dict[str, Any]:
    reports = {}
    for p in probers:
        try:
            reports[p.host.name] = p.stop()
        finally:
            p.close()
    return reports


@pytest.mark.usefixtures("lazy_pipe_size")
@pytest.mark.parametrize("mode", ["stopcopy", "postcopy"])
def test_nobody_cannot_reach_a_migration(testhosts, tmp_path, tmpdirs, mode):
    """`nobody` on each host connects to every TCP port (but sshd's) and every Unix socket
    that listens in that host's network namespace, over and over, while a 64 MiB container
    migrates: nothing accepts it, the migration succeeds, and no socket or directory of the
    page channel is left on either host."""
    src, dst = testhosts["src"], testhosts["dst"]
    w = Workload(src, "pg", 64, tmp_path)
    before = w.sample(src)
    probers = _probe_all(testhosts)
    try:
        out = migrate_with(testhosts, "pg", tmpdirs, "--online", "--mode", mode)
    finally:
        reports = _stop_all(probers)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["mode"] == mode
    for host, report in reports.items():
        assert report["rounds"] > 0, (host, report)
        reached = {k: v for k, v in report["results"].items() if "connected" in v}
        assert not reached, f"nobody on {host} connected to {reached} (all: {report})"
        ports = [k for k in report["results"] if k.startswith("tcp")]
        assert not ports, f"TCP ports listened on {host} during the migration: {ports}"
    assert status_on(dst, "pg") is ContainerStatus.RUNNING
    assert continued(before, w.sample(dst))
    assert_nothing_left(tmpdirs)


# --- failures: the channel refused or broken, everything removed --------------------------

_TARGET_WRAPPER = r"""
import sys
from pycpt import errors
from pycpt._migration import pages
from pycpt.cli import main

FAULT = {fault!r}
fields = pages.PageListener.fields


def bad_fields(self):
    out = fields(self)
    key = bytearray.fromhex(out["key"])
    key[0 if FAULT == "source-wrong" else -1] ^= 1  # the half the source (target) proves
    out["key"] = key.hex()
    return out


if FAULT in ("source-wrong", "target-wrong"):
    pages.PageListener.fields = bad_fields
elif FAULT == "restore":
    from pycpt.container import Container

    def restore_images(*args, **kwargs):
        raise errors.MigrationError("injected: the restore fails after lazy-pages started")

    Container.restore_images = restore_images
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("lazy_pipe_size")
@pytest.mark.parametrize(
    "fault, words",
    [
        ("source-wrong", "did not prove the migration's key"),
        ("target-wrong", "other end did not prove the migration's key"),
        ("restore", "injected: the restore fails"),
    ],
)
def test_a_failed_page_channel_leaves_nothing(testhosts, tmp_path, tmpdirs, fault, words):
    """A post-copy whose page channel fails its key check (either end), or whose restore
    fails once lazy-pages has the channel: the migration fails with the reason, the
    container runs on at the source, the target keeps nothing, and no socket or directory
    of the channel is left on either host."""
    w = Workload(testhosts["src"], "pgf", 8, tmp_path)
    before = w.sample(testhosts["src"])
    wrapper = tmp_path / "target.py"
    wrapper.write_text(_TARGET_WRAPPER.replace("{fault!r}", repr(fault)))
    out = migrate_with(testhosts, "pgf", tmpdirs, "--online", target_python=str(wrapper))
    assert out.returncode == 1, out.stderr
    assert words in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "pgf")
    assert_nothing_left(tmpdirs)


@pytest.mark.usefixtures("lazy_pipe_size")
def test_a_target_sshd_that_will_not_forward_is_named(testhosts, tmp_path, tmpdirs):
    """The target's sshd refuses to forward Unix sockets (AllowStreamLocalForwarding no):
    `--dry-run` already says so, and a migration fails before the freeze with the setting
    to change; the container runs on, nothing is left."""
    dst = testhosts["dst"]
    w = Workload(testhosts["src"], "pgr", 8, tmp_path)
    before = w.sample(testhosts["src"])
    dst.stop_sshd()
    with dst.sshd_config.open("a") as config:
        config.write("AllowStreamLocalForwarding no\n")
    dst.start_sshd()
    for args in (["--dry-run"], []):
        out = migrate_with(testhosts, "pgr", tmpdirs, "--online", *args)
        assert out.returncode == 1, out.stderr
        assert "would not carry the page channel" in out.stderr, out.stderr
        assert "AllowStreamLocalForwarding" in out.stderr, out.stderr
        assert_source_intact(testhosts, w, before)
        assert_target_clean(testhosts, "pgr")
        assert_nothing_left(tmpdirs)


def test_the_listener_refuses_a_second_connection():
    """Once the one connection is taken, the listener is gone: a second connect (even by
    root) finds nothing."""
    listener = pages.PageListener()
    try:
        path = str(listener.path)
        first = socket.socket(socket.AF_UNIX)
        first.connect(path)
        first.sendall(listener.key[: pages.KEY_BYTES // 2])
        conn = listener.accept(timeout=10)
        assert first.recv(pages.KEY_BYTES) == listener.key[pages.KEY_BYTES // 2 :]
        second = socket.socket(socket.AF_UNIX)
        with pytest.raises(FileNotFoundError):
            second.connect(path)
        second.close()
        conn.close()
        first.close()
    finally:
        listener.close()
