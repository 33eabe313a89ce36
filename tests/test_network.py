"""Container NICs (pycpt.network, csrc/nic.c): the --net syntax and its checks, the C shims
against the kernel, and containers with an address on the test hosts' bridge serving a
client namespace through start, chkpnt and restore, with the client's connection intact."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import pytest

import pycpt
from pycpt import network
from pycpt._sys import nic as sysnic
from pycpt.network import NetSpec
from pycpt.testing.testhosts import Host
from tests.helpers import nic as h
from tests.helpers.hosts import testhosts_missing
from tests.helpers.workload import wait_for

ROOT = os.geteuid() == 0

# --- the --net syntax ----------------------------------------------------------------------


def test_a_spec_is_parsed_normalised_and_printed_back():
    spec = NetSpec.parse(
        "bridge=br0,ip=192.0.2.10/24,ip6=2001:DB8::A/64,gw=192.0.2.1,gw6=fe80::1,"
        "mac=02:AA:bb:cc:dd:ee,name=eth1,mtu=1400"
    )
    assert spec.bridge == "br0" and spec.name == "eth1" and spec.mtu == 1400
    assert spec.addresses == ("192.0.2.10/24", "2001:db8::a/64")
    assert spec.gateways == ("192.0.2.1", "fe80::1")
    assert spec.mac == "02:aa:bb:cc:dd:ee"
    assert NetSpec.parse(str(spec)) == spec
    assert NetSpec("br0", addresses=["10.0.0.2/8"]).addresses == ("10.0.0.2/8",)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty"),
        ("ip=10.0.0.2/24", "no bridge"),
        ("bridge=br0", "at least one ip"),
        ("bridge=br0,ip=10.0.0.2", "needs its prefix"),
        ("bridge=br0,ip=10.0.0.300/24", "malformed"),
        ("bridge=br0,ip=10.0.0.0/24", "network or broadcast"),
        ("bridge=br0,ip=10.0.0.255/24", "network or broadcast"),
        ("bridge=br0,ip=127.0.0.2/8", "loopback"),
        ("bridge=br0,ip=224.0.0.5/24", "multicast"),
        ("bridge=br0,ip=fe80::5/64", "link-local"),
        ("bridge=br0,ip=10.0.0.2/0", "/0"),
        ("bridge=br0,ip6=10.0.0.2/24", "not an IPv6"),
        ("bridge=br0,ip=10.0.0.2/24,ip=10.0.0.2/16", "given twice"),
        ("bridge=br0,ip=10.0.0.2/24,gw=10.0.1.1", "not on-link"),
        ("bridge=br0,ip=10.0.0.2/24,gw=10.0.0.2", "own address"),
        ("bridge=br0,ip=10.0.0.2/24,gw=2001:db8::1", "no IPv6 address"),
        ("bridge=br0,ip=10.0.0.2/24,gw=10.0.0.1,gw=10.0.0.3", "one gateway per"),
        ("bridge=br0,ip=10.0.0.2/24,gw6=10.0.0.1", "not an IPv6"),
        ("bridge=br0,ip=10.0.0.2/24,gw=nope", "not an address"),
        ("bridge=br0,ip=10.0.0.2/24,mac=01:00:5e:00:00:01", "not a unicast"),
        ("bridge=br0,ip=10.0.0.2/24,mac=00:00:00:00:00:00", "not a unicast"),
        ("bridge=br0,ip=10.0.0.2/24,mac=02:00:00:00:00", "not a MAC"),
        ("bridge=br0,ip=10.0.0.2/24,name=lo", "loopback"),
        ("bridge=br0,ip=10.0.0.2/24,name=a-name-far-too-long", "not an interface name"),
        ("bridge=br/0,ip=10.0.0.2/24", "not an interface name"),
        ("bridge=br0,ip=10.0.0.2/24,mtu=20", "between 68"),
        ("bridge=br0,ip=10.0.0.2/24,mtu=big", "not a number"),
        ("bridge=br0,ip=10.0.0.2/24,colour=red", "unknown key"),
        ("bridge=br0,bridge=br1,ip=10.0.0.2/24", "given twice"),
        ("bridge=br0,ip", "not KEY=VALUE"),
    ],
)
def test_a_bad_spec_is_refused_with_what_is_wrong(text, says):
    with pytest.raises(pycpt.NetSpecError, match=says) as info:
        NetSpec.parse(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pycpt.PycptError)
    assert "bridge=BR" in info.value.hint


def test_nics_are_checked_together():
    a = "bridge=br0,ip=10.0.0.2/24,gw=10.0.0.1"
    assert [s.addresses for s in network.specs_from([a, "bridge=br1,ip=10.1.0.2/24"])] == [
        ("10.0.0.2/24",),
        ("10.1.0.2/24",),
    ]
    assert network.specs_from(None) == [] and len(network.specs_from(a)) == 1
    for bad, says in [
        ([a, "bridge=br1,ip=10.0.0.2/16"], "given to both"),
        ([a, "bridge=br1,ip=10.1.0.2/24,gw=10.1.0.1"], "one gateway per address family"),
        ([a, "bridge=br1,ip=10.1.0.2/24,name=eth0"], "same name"),
        (["bridge=br0,ip=10.0.0.2/24,mac=02:00:00:00:00:01"] * 2, "given to both"),
        ([f"bridge=br0,ip=10.0.{i}.2/24" for i in range(9)], "at most 8"),
    ]:
        with pytest.raises(pycpt.NetSpecError, match=says):
            network.specs_from(bad)


def test_planned_nics_have_names_macs_and_outside_ends():
    nics = network.plan(network.specs_from(["bridge=br0,ip=10.0.0.2/24"] * 1), "/s\0ct1")
    (n,) = nics
    assert n.name == "eth0" and n.bridge == "br0" and n.addresses == ["10.0.0.2/24"]
    assert n.mac.startswith("02:") and n.host_mac.startswith("fe:")
    assert n.host_name == network.host_name_for("/s\0ct1", 0) and len(n.host_name) == 13
    assert network.host_name_for("/other\0ct1", 0) != n.host_name
    again = network.from_records(network.records(nics))
    assert again == nics  # a state file's record reads back as it was written
    moved = network.from_records(network.records(nics), "/t\0ct1")
    assert moved[0].host_name == network.host_name_for("/t\0ct1", 0) and moved[0].mac == n.mac


@pytest.mark.parametrize(
    "change, says",
    [
        ({"host_name": "eth0"}, "not one of pycpt's"),
        ({"host_name": "pc0123456789a0; rm"}, "not one of pycpt's"),
        ({"mac": None}, "not a MAC"),
        ({"addresses": "10.0.0.2/24"}, "sequences"),
        ({"addresses": ["10.0.0.2"]}, "prefix"),
        ({"bridge": 5}, "not an interface name"),
        ({"host_mac": "ff:ff:ff:ff:ff:ff"}, "not a unicast"),
    ],
)
def test_recorded_nics_are_untrusted(change, says):
    (rec,) = network.records(network.plan([NetSpec("br0", ("10.0.0.2/24",))], "k"))
    rec.update(change)
    with pytest.raises(pycpt.NetSpecError, match=says):
        network.from_records([rec])
    with pytest.raises(pycpt.NetSpecError, match="list"):
        network.from_records({"nics": 1})
    rec = network.records(network.plan([NetSpec("br0", ("10.0.0.2/24",))], "k"))[0]
    del rec["bridge"]
    with pytest.raises(pycpt.NetSpecError, match="lacks"):
        network.from_records([rec])


def test_net_and_share_net_exclude_each_other(tmp_path):
    with pytest.raises(pycpt.NetSpecError, match="share-net"):
        pycpt.Container.start(
            "x",
            ["/bin/true"],
            state_dir_path=str(tmp_path),
            share_net=True,
            net="bridge=br0,ip=10.0.0.2/24",
        )


# --- the C shims against the kernel -------------------------------------------------------


@pytest.fixture
def scratch():
    """Two fresh network namespaces, "host" (a bridge br0 at 10.9.0.1/24, fd09::1/64) and
    "ct", held by descriptors only: closing them removes everything."""
    if not ROOT:
        pytest.skip("network namespaces need root")
    host, ct = sysnic.netns_new(), sysnic.netns_new()

    def ip(ns: int, *argv: str) -> str:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{os.getpid()}/fd/{ns}", "ip", *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    ip(host, "link", "add", "br0", "address", "02:00:00:00:09:01", "type", "bridge")
    ip(host, "addr", "add", "10.9.0.1/24", "dev", "br0")
    ip(host, "addr", "add", "fd09::1/64", "dev", "br0", "nodad")
    ip(host, "link", "set", "br0", "up")
    socks = {"host": sysnic.Sockets(host), "ct": sysnic.Sockets(ct)}
    yield host, ct, socks, ip
    for s in socks.values():
        s.close()
    os.close(ct)
    os.close(host)


def test_c_shims_make_wire_hold_probe_and_remove_a_nic(scratch):
    host, ct, socks, ip = scratch
    hs, cs = socks["host"], socks["ct"]
    br = hs.link("br0")
    assert br.kind == "bridge" and br.up and not br.stp and br.mac == "02:00:00:00:09:01"
    with pytest.raises(OSError) as info:
        hs.link("nope0")
    assert info.value.errno == 19 and hs.find_link("nope0") is None
    out = hs.veth_add("pcw13t0", "eth0", ct, "02:11:22:33:44:55", "fe:00:00:00:00:01", 1400)
    hs.link_set(out, master=br.ifindex, up=1)
    eth = cs.link("eth0")
    assert eth.kind == "veth" and eth.mac == "02:11:22:33:44:55"
    cs.addr_add(eth.ifindex, ipaddress.ip_interface("10.9.0.5/24"))
    cs.addr_add(eth.ifindex, ipaddress.ip_interface("fd09::5/64"))
    cs.link_set(eth.ifindex, up=1)
    cs.route_default(eth.ifindex, ipaddress.ip_address("10.9.0.1"))
    cs.route_default(eth.ifindex, ipaddress.ip_address("fd09::1"))
    assert "default via 10.9.0.1 dev eth0" in ip(ct, "route")
    assert "default via fd09::1 dev eth0" in ip(ct, "-6", "route")
    assert "nodad" in ip(ct, "addr", "show", "eth0") and "mtu 1400" in ip(ct, "link")
    assert {str(a) for a in cs.addresses(eth.ifindex)} >= {"10.9.0.5/24", "fd09::5/64"}
    outside = hs.link("pcw13t0")
    assert outside.master == br.ifindex and outside.mac == "fe:00:00:00:00:01"
    # duplicate-address probes from the bridge: the container answers for its addresses
    for addr, owner in [("10.9.0.5", eth.mac), ("fd09::5", eth.mac), ("10.9.0.6", None)]:
        got = hs.probe(br.ifindex, br.mac, ipaddress.ip_address(addr), timeout_ms=300)
        assert got == owner, addr
    # a migration target ignores the moving container's own answer
    assert (
        hs.probe(br.ifindex, br.mac, ipaddress.ip_address("10.9.0.5"), ignore_mac=eth.mac) is None
    )
    # the hold: the port disabled, nothing answers, the container's link keeps its carrier
    hs.port_state(out, sysnic.PORT_DISABLED)
    assert (
        "state disabled"
        in subprocess.run(
            ["nsenter", f"--net=/proc/{os.getpid()}/fd/{host}", "bridge", "link"],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert hs.probe(br.ifindex, br.mac, ipaddress.ip_address("10.9.0.5")) is None
    assert "LOWER_UP" in ip(ct, "link", "show", "eth0")
    hs.port_state(out, sysnic.PORT_FORWARDING)
    assert hs.probe(br.ifindex, br.mac, ipaddress.ip_address("10.9.0.5")) == eth.mac
    # an announcement reaches the host: its stale neighbour entry takes the MAC
    for addr in ("10.9.0.5", "fd09::5"):
        ip(host, "neigh", "replace", addr, "lladdr", "02:00:00:00:00:99", "dev", "br0", "nud",
           "stale")  # fmt: skip
        cs.announce(eth.ifindex, eth.mac, ipaddress.ip_address(addr))
        wait_for(lambda a=addr: eth.mac in ip(host, "neigh", "show", a), 5, f"announcing {addr}")
    # the kick is a well-formed ICMP error (the kernel takes it; no connection: ignored)
    cs.kick((ipaddress.ip_address("10.9.0.1"), 4000), (ipaddress.ip_address("10.9.0.5"), 80), 1)
    cs.kick((ipaddress.ip_address("fd09::1"), 4000), (ipaddress.ip_address("fd09::5"), 80), 1)
    with pytest.raises(OSError):
        hs.veth_add("pcw13t0", "eth1", ct, None, None)  # the name is taken
    hs.link_del(out)
    assert hs.find_link("pcw13t0") is None and cs.find_link("eth0") is None


def test_stp_bridge_is_seen_and_its_ports_refuse_a_state(scratch):
    host, ct, socks, ip = scratch
    hs = socks["host"]
    ip(host, "link", "add", "brs", "type", "bridge", "stp_state", "1")
    assert hs.link("brs").stp and not hs.link("br0").stp


def test_the_kick_makes_a_backed_off_peer_retransmit_at_once(scratch):
    """A peer whose segments go unanswered for a while backs off (its retransmission timer
    doubles each time); after the hold is released, the kick makes it retransmit at once
    instead of at its next, far later, timer."""
    host, ct, socks, ip = scratch
    hs, cs = socks["host"], socks["ct"]
    br = hs.link("br0")
    out = hs.veth_add("pcw13t1", "eth0", ct, "02:11:22:33:44:56", "fe:00:00:00:00:02")
    hs.link_set(out, master=br.ifindex, up=1)
    eth = cs.link("eth0")
    cs.addr_add(eth.ifindex, ipaddress.ip_interface("10.9.0.5/24"))
    cs.link_set(eth.ifindex, up=1)
    server = _socket_in(ct)
    server.bind(("10.9.0.5", 7000))
    server.listen(1)
    client = _socket_in(host)
    client.connect(("10.9.0.5", 7000))
    conn, peer = server.accept()
    client.sendall(b"a")
    assert conn.recv(1) == b"a"
    rcv_nxt = _rcv_nxt(conn)  # the peer's snd_una from now on: the byte it will resend
    hs.port_state(out, sysnic.PORT_DISABLED)
    client.sendall(b"b")  # unanswered: resent at about 0.2, 0.6, 1.4, 3.0, 6.2, 12.6 s
    time.sleep(6.5)
    hs.port_state(out, sysnic.PORT_FORWARDING)
    backoff, rto = _backoff(client)
    assert backoff >= 4, "the peer has not backed off: the hold let something through"
    started = time.monotonic()
    for _ in range(network.KICKS):
        cs.kick(
            (ipaddress.ip_address(peer[0]), peer[1]),
            (ipaddress.ip_address("10.9.0.5"), 7000),
            rcv_nxt,
        )
    conn.settimeout(30)
    assert conn.recv(1) == b"b"
    waited = time.monotonic() - started
    # without the kick it comes with the peer's next timer, ~6 s away (its RTO is >= 3.2 s)
    assert waited < rto / 2, f"resent after {waited:.2f} s, its timeout is {rto:.1f} s"
    for s in (conn, server, client):
        s.close()
    hs.link_del(out)


def _backoff(sock) -> "tuple[int, float]":
    """tcp_info's backoff count and current retransmission timeout (seconds)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 16)
    return info[4], struct.unpack_from("I", info, 8)[0] / 1e6


def _socket_in(nsfd: int):
    fd = sysnic.socket_in(nsfd, socket.AF_INET, socket.SOCK_STREAM, 0)
    return socket.socket(fileno=fd)


def _rcv_nxt(conn) -> int:
    """The socket's rcv_nxt, read as CRIU reads it (TCP_REPAIR, TCP_QUEUE_SEQ)."""
    TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_RECV_QUEUE = 19, 20, 21, 1
    conn.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        conn.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        return struct.unpack("I", conn.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
    finally:
        conn.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)


# --- containers on the test hosts' bridge --------------------------------------------------


@pytest.fixture
def nethosts(engine, tmp_path):
    """Test hosts "src" and "dst" with a bridge each on one segment, and a client namespace;
    removed afterwards, containers and NICs included."""
    from pycpt.testing.testhosts import TestHosts

    reason = testhosts_missing()
    if reason:
        pytest.skip(reason)
    with TestHosts(["src", "dst"], tmp_path / "hosts") as hosts:
        yield hosts


def _no_trace(host, ct: str, name: str) -> None:
    """Nothing of container ct's NIC is left on host: no link by its outside name."""
    assert name not in h.host_links(host), f"{name} is still on {host.name}"


def test_a_container_with_an_address_serves_a_client(nethosts, tmp_path):
    src = nethosts["src"]
    client = nethosts.client()
    address = h.start_redis(nethosts, src, "kv", tmp_path)
    r = h.Resp(client.socket(), address)
    assert r.call("PING") == b"PONG"
    assert h.redis_peer_port(r) == r.port  # no NAT: the server sees the client as it is
    v6 = h.Resp(client.socket(socket.AF_INET6), nethosts.container_address(0, True))
    assert v6.call("PING") == b"PONG"
    listed = h.pycpt(src, "list")
    assert f"{address},{nethosts.container_address(0, True)}" in listed
    status = h.pycpt(src, "status", "kv")
    assert status.startswith("running") and f"{address}/24" in status and "on br0" in status
    # the NIC's outside end is a port of the host's bridge, the inside end eth0 with a route
    name = h.outside_name(src, "kv")
    assert f"{name}@" in h.host_links(src) and "master br0" in h.host_links(src)
    routes = h.pycpt(src, "exec", "kv", "--", "ip", "route")
    assert f"default via {nethosts.subnet}.1 dev eth0" in routes
    # and a container on the other host reaches it over the segment too
    dst = nethosts["dst"]
    h.start_redis(nethosts, dst, "kv2", tmp_path, n=1)
    out = h.pycpt(dst, "exec", "kv2", "--", h.need("redis-cli")[0], "-h", address, "PING")
    assert "PONG" in out
    r.close()
    v6.close()
    h.pycpt(src, "stop", "kv")
    _no_trace(src, "kv", name)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("bridge=br9,ip=10.213.0.120/24", "no bridge br9"),
        ("bridge=eth0,ip=10.213.0.120/24", "not a bridge"),
        ("bridge=br0,ip=10.213.0.50/24", "in use on br0's segment by"),
        ("bridge=br0,ip=fd00:213::32/64", "in use on br0's segment by"),
        ("bridge=br0,ip=10.213.0.2/24", "in use on br0's segment by"),
        ("bridge=br0,ip=10.213.0.1/24", "in use by this host"),
        ("bridge=br0,ip=10.213.0.120", "needs its prefix"),
        ("bridge=br0,ip=10.213.0.120/24,gw=10.9.9.9", "not on-link"),
    ],
)
def test_a_bad_nic_is_refused_before_anything_starts(nethosts, spec, says):
    src = nethosts["src"]
    links = h.host_links(src)
    done = h.run_pycpt(src, "start", "--net", spec, "ct1", "--", "/bin/sleep", "100")
    assert done.returncode != 0 and says in done.stderr, done.stderr
    # nothing started: no container, no cgroup, no veth
    assert "ct1" not in h.pycpt(src, "list")
    assert not list(Path("/sys/fs/cgroup/unified").glob(f"{src.cgroup_parent}/ct1"))
    assert h.host_links(src).count("\n") == links.count("\n")


def test_an_address_of_another_container_here_is_refused_even_while_it_is_held(nethosts):
    src = nethosts["src"]
    spec = h.net_spec(nethosts, 3, v6=False)
    h.pycpt(src, "start", "--net", spec, "a", "--", "/bin/sleep", "1000")
    h.pycpt(src, "chkpnt", "a", "--suspend")  # its port is disabled: it answers no probe
    done = h.run_pycpt(src, "start", "--net", spec, "b", "--", "/bin/sleep", "1000")
    assert done.returncode == 2 and "in use by container a" in done.stderr  # a ValueError
    h.pycpt(src, "chkpnt", "a", "--resume")
    h.pycpt(src, "stop", "a")


@dataclass
class Session:
    """A container serving a client that holds one connection to it: `during()` sends a
    request meant to be answered only after a hold, `ping()` one request and its checked
    answer, `check(held)` that the connection is the very same one, from the same port,
    with the server's data intact, and still answers."""

    host: Host
    ct: str
    during: Callable[[], None]
    ping: Callable[[], None]
    check: Callable[[bool], None]
    close: Callable[[], None]


def _redis_session(nethosts, tmp_path, host="src") -> Session:
    src = nethosts[host]
    address = h.start_redis(nethosts, src, "kv", tmp_path)
    r = h.Resp(nethosts.client().socket(), address)
    digest = h.redis_fill(r)
    client_id = r.call("CLIENT", "ID")
    port = r.port
    pings = [0]

    def during() -> None:  # a request sent while the container is held: answered later
        r.send("INCR", "held")

    def ping() -> None:
        pings[0] += 1
        assert r.call("INCR", "pings") == pings[0]

    def check(held: bool) -> None:
        if held:
            assert r.reply() == 1
        assert r.port == port and r.sock.getsockname()[1] == port
        assert r.call("CLIENT", "ID") == client_id  # the very same connection
        assert h.redis_peer_port(r) == port
        assert h.redis_digest(r) == digest
        assert int(r.call("GET", "pings") or 0) == pings[0]  # not one increment lost or doubled
        assert r.call("SET", "after", "yes") == b"OK" and r.call("GET", "after") == b"yes"

    return Session(src, "kv", during, ping, check, r.close)


def _nginx_session(nethosts, tmp_path, host="src") -> Session:
    src = nethosts[host]
    address = h.start_nginx(nethosts, src, "web", tmp_path)
    k = h.KeepAlive(nethosts.client().socket(), address)
    serial, port = h.connection_info(k)
    assert int(port) == k.port
    status, body = k.get("/blob")
    assert status == 200 and hashlib.sha256(body).hexdigest() == h.BLOB_SHA

    def during() -> None:
        k.conn.request("GET", "/blob")  # its answer comes after the resume

    def ping() -> None:
        assert list(h.connection_info(k)) == [serial, str(k.port)]

    def check(held: bool) -> None:
        if held:
            resp = k.conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and not resp.will_close
            assert hashlib.sha256(body).hexdigest() == h.BLOB_SHA
        assert list(h.connection_info(k)) == [serial, str(k.port)]  # the same connection
        status, body = k.get("/blob")
        assert status == 200 and hashlib.sha256(body).hexdigest() == h.BLOB_SHA

    return Session(src, "web", during, ping, check, k.close)


WORKLOADS = {"redis": _redis_session, "nginx": _nginx_session}


def _chkpnt_restore(src, ct, during) -> None:
    h.pycpt(src, "chkpnt", ct)
    assert h.outside_name(src, ct) not in h.host_links(src)  # CRIU's kill freed it
    during()
    h.pycpt(src, "restore", ct)


def _staged_kill_undump_resume(src, ct, during) -> None:
    name = h.outside_name(src, ct)
    h.pycpt(src, "chkpnt", ct, "--suspend")
    during()
    h.pycpt(src, "chkpnt", ct, "--dump")
    h.pycpt(src, "chkpnt", ct, "--kill")
    assert name not in h.host_links(src)  # deleted before the kill, not a minute later
    h.pycpt(src, "restore", ct, "--undump")
    # rebuilt, frozen, its outside end down and on no bridge until --resume
    links = [line for line in h.host_links(src).splitlines() if f"{name}@" in line]
    assert links and "master" not in links[0] and "state DOWN" in links[0]
    h.pycpt(src, "restore", ct, "--resume")


def _staged_dump_resume(src, ct, during) -> None:
    h.pycpt(src, "chkpnt", ct, "--suspend")
    during()
    h.pycpt(src, "chkpnt", ct, "--dump")
    h.pycpt(src, "chkpnt", ct, "--resume")


PATHS: Dict[str, Callable] = {
    "chkpnt+restore": _chkpnt_restore,
    "suspend-dump-kill+undump-resume": _staged_kill_undump_resume,
    "suspend-dump-resume": _staged_dump_resume,
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_clients_connection_survives(nethosts, tmp_path, workload, path):
    session = WORKLOADS[workload](nethosts, tmp_path)
    src, ct = session.host, session.ct
    name = h.outside_name(src, ct)
    try:
        PATHS[path](src, ct, session.during)
        session.check(True)
        status = h.pycpt(src, "status", ct)
        assert status.startswith("running")
        bridge = src.run(["bridge", "link"], capture_output=True, text=True).stdout
        assert any(name in line and "forwarding" in line for line in bridge.splitlines())
    finally:
        session.close()
    h.pycpt(src, "stop", ct)
    _no_trace(src, ct, name)


# --- migration -----------------------------------------------------------------------------


def _migrate(host, ct: str, *args: str) -> "subprocess.CompletedProcess[str]":
    return h.run_pycpt(host, "migrate", *args, "dst", ct, timeout=300)


class _Pinger:
    """Requests over the held connection on a thread, one every 10 ms, while a migration
    runs: each answer checked, the first error kept."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.answers = 0
        self.error: "BaseException | None" = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pinger")
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.session.ping()
                self.answers += 1
                time.sleep(0.01)
        except BaseException as exc:  # handed to join()
            self.error = exc

    def join(self) -> int:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "a request got no answer"
        if self.error is not None:
            raise self.error
        return self.answers


@pytest.mark.parametrize("mode", ["postcopy", "stopcopy"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_clients_connection_survives_migration(
    nethosts, tmp_path, lazy_pipe_size, workload, mode
):
    session = WORKLOADS[workload](nethosts, tmp_path)
    src, dst, ct = nethosts["src"], nethosts["dst"], session.ct
    name = h.outside_name(src, ct)
    try:
        pinger = _Pinger(session)
        out = _migrate(src, ct, "--online", "--mode", mode)
        try:
            answers = pinger.join()
        except BaseException as exc:
            exc.add_note(f"the migration said ({out.returncode}):\n{out.stderr}")
            raise
        assert out.returncode == 0, out.stderr
        assert answers > 0
        session.check(False)
        # the source has no trace of it: no container, no outside end on its bridge
        assert ct not in h.pycpt(src, "list")
        _no_trace(src, ct, name)
        # the target runs it with the same address and MAC, its port on the target's bridge
        moved = h.outside_name(dst, ct)
        bridge = dst.run(["bridge", "link"], capture_output=True, text=True).stdout
        assert any(f"{moved}@" in line and "forwarding" in line for line in bridge.splitlines())
        status = h.pycpt(dst, "status", ct)
        assert status.startswith("running") and nethosts.container_address(0) in status
        mac = json.loads((dst.state_dir / "ct" / ct / "state.json").read_text())["nics"][0]["mac"]
        assert mac in h.pycpt(dst, "exec", ct, "--", "ip", "link", "show", "eth0")
    finally:
        session.close()
    h.pycpt(dst, "stop", ct)
    _no_trace(dst, ct, moved)


def _untouched(nethosts, session: Session, name: str) -> None:
    """The failed migration changed nothing: the source runs the container, its port
    forwards, the client's connection answers; the target has nothing of it."""
    src, dst = nethosts["src"], nethosts["dst"]
    assert h.pycpt(src, "status", session.ct).startswith("running")
    bridge = src.run(["bridge", "link"], capture_output=True, text=True).stdout
    assert any(f"{name}@" in line and "forwarding" in line for line in bridge.splitlines())
    session.check(False)
    assert session.ct not in h.pycpt(dst, "list")
    assert ": pc" not in h.host_links(dst)


def test_a_target_without_the_bridge_is_refused_in_preflight(nethosts, tmp_path):
    src = nethosts["src"]
    src.run(["ip", "link", "add", "br1", "type", "bridge"], check=True)
    src.run(["ip", "link", "set", "br1", "up"], check=True)
    h.pycpt(src, "start", "--net", "bridge=br1,ip=10.77.0.5/24", "lone", "--", "/bin/sleep", "1000")
    name = h.outside_name(src, "lone")
    out = _migrate(src, "lone", "--online")
    assert out.returncode == 1, out.stderr
    assert "on the target: there is no bridge br1 on this host" in out.stderr
    assert h.pycpt(src, "status", "lone").startswith("running")
    assert f"{name}@" in h.host_links(src)
    assert "lone" not in h.pycpt(nethosts["dst"], "list")
    h.pycpt(src, "stop", "lone")


def test_an_address_taken_on_the_targets_segment_is_refused_in_preflight(nethosts, tmp_path):
    session = _redis_session(nethosts, tmp_path)
    name = h.outside_name(session.host, session.ct)
    address = nethosts.container_address(0)
    client = nethosts.client()
    try:
        dry = _migrate(session.host, session.ct, "--online", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "bridge br0 up" in dry.stderr and f"{address} free on br0" in dry.stderr
        # somebody else claims the address (the client, with its own MAC)
        client.run(["ip", "addr", "add", f"{address}/32", "dev", "eth0"], check=True)
        out = _migrate(session.host, session.ct, "--online")
        assert out.returncode == 1, out.stderr
        assert f"address {address} of eth0 is in use on br0's segment by" in out.stderr
        assert "on the target: " in out.stderr
        client.run(["ip", "addr", "del", f"{address}/32", "dev", "eth0"], check=True)
        _untouched(nethosts, session, name)
    finally:
        session.close()


def _nic_facts(host, ct: str, name: str, inside: str = "eth0") -> Dict[str, object]:
    """What must come back exactly after a rollback, a restore or a move: the outside end
    (MAC, bridge, flags, MTU, bridge port state), and the container's own link `inside`, its
    addresses and the container's routes."""
    link = json.loads(
        host.run(["ip", "-j", "-d", "link", "show", name], capture_output=True, text=True).stdout
    )[0]
    slave = link.get("linkinfo", {}).get("info_slave_data", {})
    return {
        "outside": [link["address"], link.get("master"), sorted(link["flags"]), link["mtu"]],
        "port": slave.get("state"),
        # (the link-local address may still be "tentative" right after the start)
        "inside": sorted(
            line.split(None, 1)[1].replace(" tentative", "")
            for line in _ip_in(host, ct, "-o", "addr", "show", inside).splitlines()
        ),
        inside: _ip_in(host, ct, "-o", "link", "show", inside).split()[2:],
        "routes": _ip_in(host, ct, "route") + _ip_in(host, ct, "-6", "route", "show", "default"),
    }


def _ip_in(host, ct: str, *argv: str) -> str:
    """What `ip ARGV` in container ct prints on its stdout. (Its stderr may say "Peer netns
    reference is invalid": for a veth's link-netnsid, iproute2 looks for a name among
    /run/netns, where other test hosts' namespaces come and go.)"""
    done = h.run_pycpt(host, "exec", ct, "--", "ip", *argv)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_failed_migration_brings_the_source_nic_back_exactly(nethosts, tmp_path):
    """The target's restore fails after the source froze (no cgroup can be made there): the
    source's NIC comes back as it was, and the client's connection goes on."""
    session = _redis_session(nethosts, tmp_path)
    src, dst = nethosts["src"], nethosts["dst"]
    name = h.outside_name(src, session.ct)
    before = _nic_facts(src, session.ct, name)
    with dst.as_current():
        from pycpt.container import cgroup_root

        parent = cgroup_root()
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.max.descendants").write_text("0")
    try:
        out = _migrate(src, session.ct, "--online", "--mode", "stopcopy")
        assert out.returncode == 1 and "on the target" in out.stderr, out.stderr
        assert _nic_facts(src, session.ct, name) == before
        _untouched(nethosts, session, name)
    finally:
        (parent / "cgroup.max.descendants").write_text("max")
        session.close()


def test_two_nics_keep_their_macs_addresses_and_routes_on_every_path(nethosts, tmp_path):
    """A container with two NICs, each with its own bridge, MAC, addresses and default route
    (eth1 with an MTU of its own): both come back exactly through every staged path here and
    through a migration, and nothing of either is left where the container no longer is."""
    src, dst = nethosts["src"], nethosts["dst"]
    for host in (src, dst):  # a second segment, on each host alone
        host.run(["ip", "link", "add", "br1", "type", "bridge"], check=True)
        host.run(["ip", "link", "set", "br1", "up"], check=True)
    second = "bridge=br1,ip=10.77.0.5/24,ip6=fd77::5/64,gw6=fd77::1,mac=02:00:0a:4d:00:05,mtu=1400"
    nets = ["--net", h.net_spec(nethosts, 4, v6=False), "--net", second]
    h.pycpt(src, "start", *nets, "two", "--", "/bin/sleep", "1000")

    def facts(host) -> list:
        return [
            _nic_facts(host, "two", h.outside_name(host, "two", i), inside)
            for i, inside in enumerate(["eth0", "eth1"])
        ]

    before = facts(src)
    assert "02:00:0a:4d:00:05" in before[1]["eth1"] and "1400" in before[1]["eth1"]
    assert "default via fd77::1 dev eth1" in before[1]["routes"]
    names = [h.outside_name(src, "two", i) for i in range(2)]
    for path, walk in PATHS.items():
        walk(src, "two", lambda: None)
        assert facts(src) == before, path
    out = _migrate(src, "two", "--online", "--mode", "stopcopy")
    assert out.returncode == 0, out.stderr
    for name in names:
        _no_trace(src, "two", name)
    moved_names = [h.outside_name(dst, "two", i) for i in range(2)]
    assert facts(dst) == before
    h.pycpt(dst, "stop", "two")
    for name in moved_names:
        _no_trace(dst, "two", name)
