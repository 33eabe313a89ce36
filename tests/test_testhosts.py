"""The pretend hosts of migration tests (pycpt.testing.testhosts), tried for real:
namespaces, veths, sshd, tc, and a teardown that leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from pycpt._sys.procfs import cgroup_mounts
from pycpt.testing import testhosts as testhosts_module
from pycpt.testing.testhosts import Host, TestHostError, TestHosts
from tests.helpers.hosts import testhosts_missing

BIN_DIR = os.path.dirname(os.path.abspath(sys.executable))


def ssh(
    hosts: TestHosts,
    frm: str,
    to: str,
    *argv: str,
    timeout: float = 60,
    options: Tuple[str, ...] = (),
) -> "subprocess.CompletedProcess[str]":
    cmd = ["ssh", *options, "-F", str(hosts.ssh_config), to, *argv]
    return hosts[frm].run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def transfer(sender: Host, receiver: Host, nbytes: int) -> float:
    """Send `nbytes` over TCP from `sender` to `receiver`; seconds until all arrived."""
    server = receiver.socket()
    server.bind((receiver.address, 0))
    server.listen(1)
    port = server.getsockname()[1]
    got: List[object] = []

    def receive() -> None:
        conn, peer = server.accept()
        total = 0
        with conn:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
        got.extend([peer[0], total])

    thread = threading.Thread(target=receive)
    thread.start()
    block = b"x" * (1 << 20)
    client = sender.socket()
    start = time.monotonic()
    with client:
        client.connect((receiver.address, port))
        for _ in range(nbytes // len(block)):
            client.sendall(block)
    thread.join(timeout=120)
    elapsed = time.monotonic() - start
    server.close()
    assert got == [sender.address, nbytes], "the peer was not the sender's address, or bytes lost"
    return elapsed


def leftovers(prefix: str) -> Dict[str, List[str]]:
    """What carries `prefix` in its name: namespaces, links, cgroups, processes."""
    found: Dict[str, List[str]] = {}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found["netns"] = [line for line in netns.splitlines() if prefix in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found["links"] = [line for line in links.splitlines() if prefix in line]
    found["cgroups"] = [
        str(p) for mnt, _k, _o in cgroup_mounts() for p in Path(mnt).glob(f"{prefix}*")
    ]
    procs = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if prefix in cmdline or "/testhosts-left/" in cmdline:
                procs.append(f"{entry.name}: {cmdline}")
    found["processes"] = procs
    return {k: v for k, v in found.items() if v}


# --- pure logic ------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [[], ["a", "a"], ["Src"], ["1x"], ["a b"], ["x" * 21]])
def test_bad_names_are_refused(names, tmp_path):
    with pytest.raises(ValueError):
        TestHosts(names, tmp_path)


# --- the real thing ------------------------------------------------------------------------


def test_hosts_have_their_own_address_state_and_cgroup(testhosts):
    src, dst = testhosts["src"], testhosts["dst"]
    assert src.address != dst.address and src.netns != dst.netns
    assert src.state_dir != dst.state_dir and src.cgroup_parent != dst.cgroup_parent
    assert dst.env["PYCPT_STATE_DIR"] == str(dst.state_dir)
    assert dst.env["PYCPT_CGROUP_PARENT"] == dst.cgroup_parent
    assert dst.env["PYCPT_SSH_CONFIG"] == str(testhosts.ssh_config)
    assert dst.env["PATH"].split(":")[0] == BIN_DIR
    # the host's address lives on its bridge, its uplink eth0 plugged into it
    out = dst.run(
        ["ip", "-o", "addr", "show", "dev", dst.bridge],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"inet {dst.address}/24" in out and f"inet6 {dst.address6}/64" in out
    eth0 = dst.run(["ip", "-o", "link", "show", "dev", "eth0"], capture_output=True, text=True)
    assert f"master {dst.bridge}" in eth0.stdout
    # the cgroup hierarchies stay visible inside (nsenter keeps the mount namespace)
    assert (
        dst.run(["test", "-d", "/sys/fs/cgroup/unified"]).returncode == 0
        or dst.run(["test", "-d", "/sys/fs/cgroup/freezer"]).returncode == 0
    )


def test_ssh_from_src_to_dst_without_password(testhosts):
    done = ssh(testhosts, "src", "dst", "echo", "hello from", "$SSH_CONNECTION")
    assert done.returncode == 0, done.stderr
    client, _cport, server, sport = done.stdout.split()[2:6]
    assert (client, server, sport) == (testhosts["src"].address, testhosts["dst"].address, "22")
    log = (testhosts["dst"].dir / "sshd.log").read_text()
    assert f"Accepted publickey for root from {testhosts['src'].address}" in log


def test_ssh_session_has_the_hosts_env_and_path(testhosts):
    dst = testhosts["dst"]
    done = ssh(testhosts, "src", "dst", "env; echo pycpt=$(command -v pycpt)")
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert env["PYCPT_STATE_DIR"] == str(dst.state_dir)
    assert env["PYCPT_CGROUP_PARENT"] == dst.cgroup_parent
    assert env["PYCPT_SSH_CONFIG"] == str(testhosts.ssh_config)
    # root's ~/.bashrc prepends to PATH after sshd's SetEnv; the ForceCommand undoes that
    assert env["PATH"].split(":")[0] == BIN_DIR
    assert env["pycpt"] == os.path.join(BIN_DIR, "pycpt")


def test_pycpt_runs_on_dst_with_its_own_state(testhosts):
    src, dst = testhosts["src"], testhosts["dst"]
    done = ssh(testhosts, "src", "dst", "pycpt start ct1 -- sleep 100000 && pycpt list")
    assert done.returncode == 0, done.stderr
    assert "ct1" in done.stdout and "running" in done.stdout
    assert (dst.state_dir / "ct" / "ct1").is_dir()
    assert not (src.state_dir / "ct" / "ct1").exists()
    on_src = src.run(["pycpt", "list"], capture_output=True, text=True)
    assert on_src.returncode == 0 and "ct1" not in on_src.stdout
    cgroups = [Path(m, dst.cgroup_parent, "ct1") for m, _k, _o in cgroup_mounts()]
    assert any(p.is_dir() for p in cgroups), "ct1's cgroup is not under dst's parent"
    # left running on purpose: the fixture's teardown must remove it


def test_a_container_on_dst_checkpoints_and_restores(testhosts, engine):
    # the hosts' namespaces must not show up as mounts in containers (CRIU refuses those)
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if " - nsfs " in line
    ]
    assert not [m for m in mounts if testhosts.prefix in m]
    if mounts:
        pytest.skip(
            f"namespace mounts of someone else ({', '.join(mounts[:3])}) are copied into "
            "every container, and CRIU refuses to dump those"
        )
    for step in (
        "pycpt start ct1 -- sleep 100000",
        "pycpt chkpnt ct1",
        "pycpt restore ct1",
        "pycpt status ct1",
    ):
        done = ssh(testhosts, "src", "dst", step, timeout=120)
        assert done.returncode == 0, f"{step}: {done.stdout}{done.stderr}"
    assert "running" in done.stdout


def test_tcp_between_the_addresses(testhosts):
    seconds = transfer(testhosts["src"], testhosts["dst"], 64 << 20)
    print(f"\n64 MiB src -> dst: {seconds * 1000:.0f} ms ({64 / seconds:.0f} MiB/s)")


def test_link_down_cuts_ssh_and_link_up_restores_it(testhosts):
    dst = testhosts["dst"]
    assert ssh(testhosts, "src", "dst", "true").returncode == 0
    dst.link_down()
    start = time.monotonic()
    # longer than ARP's ~3 s give-up: a cut link must look like silence, not "no route"
    done = ssh(testhosts, "src", "dst", "true", options=("-o", "ConnectTimeout=4"))
    elapsed = time.monotonic() - start
    assert done.returncode == 255
    assert "timed out" in done.stderr, done.stderr
    assert elapsed < 10
    dst.link_up()
    done = ssh(testhosts, "src", "dst", "true", options=("-o", "ConnectTimeout=10"))
    assert done.returncode == 0, done.stderr


def test_link_down_stalls_an_open_connection_which_then_goes_on(testhosts):
    src, dst = testhosts["src"], testhosts["dst"]
    proc = src.popen(
        ["ssh", "-F", str(testhosts.ssh_config), "dst", "sleep 3; echo still here"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    dst.link_down()
    time.sleep(3)
    dst.link_up()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "still here"


def test_stop_sshd_refuses_connections_until_started_again(testhosts):
    dst = testhosts["dst"]
    dst.stop_sshd()
    assert not dst.sshd_running
    done = ssh(testhosts, "src", "dst", "true")
    assert done.returncode == 255 and "Connection refused" in done.stderr, done.stderr
    dst.start_sshd()
    assert dst.sshd_running
    assert ssh(testhosts, "src", "dst", "true").returncode == 0


def test_limit_rate_slows_transfers_both_ways(testhosts):
    src, dst = testhosts["src"], testhosts["dst"]
    size = 16 << 20
    free = transfer(src, dst, size)
    dst.limit_rate("100mbit")
    to_dst = transfer(src, dst, size)
    from_dst = transfer(dst, src, size)
    dst.clear_rate()
    again = transfer(src, dst, size)
    mbit = [size * 8 / s / 1e6 for s in (free, to_dst, from_dst, again)]
    print(
        f"\n16 MiB: unlimited {mbit[0]:.0f} Mbit/s; at 100mbit: to dst {mbit[1]:.0f}, "
        f"from dst {mbit[2]:.0f} Mbit/s (ratio {to_dst / free:.1f}x slower); "
        f"cleared {mbit[3]:.0f} Mbit/s"
    )
    # generous bounds: shaped stays near 100 Mbit/s, unshaped far above it
    assert mbit[1] < 150 and mbit[2] < 150
    assert mbit[0] > 300 and mbit[3] > 300


def test_nothing_is_left_after_the_with_block(tmp_path):
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path / "testhosts-left" / "w"
    with TestHosts(["src", "dst"], workdir) as hosts:
        prefix = hosts.prefix
        assert len(leftovers(prefix)["processes"]) >= 3  # the namespaces' holders
        done = ssh(hosts, "src", "dst", "pycpt start ct1 -- sleep 100000")
        assert done.returncode == 0, done.stderr
        session = hosts["src"].popen(
            ["ssh", "-F", str(hosts.ssh_config), "dst", "sleep", "100000"], stdin=subprocess.DEVNULL
        )
        loose = hosts["dst"].popen(["sleep", "100001"])
        time.sleep(0.5)
    session.wait(timeout=10)
    loose.wait(timeout=10)
    assert leftovers(prefix) == {}
    assert not workdir.exists()
    assert not any(
        prefix in line
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.splitlines()
    )


def test_cleanup_when_the_body_fails(tmp_path):
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"):
        with TestHosts(["a", "b", "c"], tmp_path / "w") as hosts:
            prefix = hosts.prefix
            raise RuntimeError("boom")
    assert leftovers(prefix) == {}
    hosts.close()  # idempotent


def test_cleanup_when_setup_fails(tmp_path, monkeypatch):
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(testhosts_module, "SSHD", "/bin/false")
    hosts = TestHosts(["src", "dst"], tmp_path / "w")
    with pytest.raises(TestHostError, match="sshd of src exited"):
        hosts.up()
    assert leftovers(hosts.prefix) == {}
    assert not (tmp_path / "w").exists()


def test_command_line_up_and_down(tmp_path):
    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path / "cli"
    up = subprocess.run(
        [sys.executable, "-m", "pycpt.testing.testhosts", "up", str(workdir), "one", "two"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert up.returncode == 0, up.stderr
        config = workdir / "ssh_config"
        assert f"ssh config: {config}" in up.stdout
        assert f"ssh -F {config} two pycpt list" in up.stdout
        hosts = TestHosts.load(workdir)
        assert hosts["one"].sshd_running and hosts["two"].sshd_running
        assert ssh(hosts, "one", "two", "pycpt list").returncode == 0
        again = subprocess.run(
            [sys.executable, "-m", "pycpt.testing.testhosts", "up", str(workdir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "pycpt.testing.testhosts", "down", str(workdir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert down.returncode == 0, down.stderr
    assert leftovers(hosts.prefix) == {}
    assert not workdir.exists()
