"""What a client sees of an online migration: the blackout against pycpt's frozen window.

A container with its own address on the test hosts' bridge (`pycpt start --net`) holds
512 MiB of random memory and serves an echo protocol; a client in another namespace sends
a 16-byte request every 10 ms over one TCP connection and timestamps every answer. Then
`pycpt migrate --online` moves the container: post-copy, stop-and-copy, and post-copy once
more with the kick switched off on the target (PYCPT_NET_KICK=0), for comparison. The
client's blackout is the longest gap between two answers; pycpt's frozen window is its own
`frozen_window` (from the freeze at the source to the target's "running"). A thread here
also watches both cgroups' `cgroup.events`, which places the gap: from the last answer to
the source's freeze, and from the target's thaw to the first answer. The difference is the
client's TCP retransmission timing, and for post-copy the memory the first answer needs
(see the README's Networking); the target is blackout <= frozen window + 250 ms. One run
each (a migration of 512 MiB takes seconds; the figure is one connection's experience).

Run: python -m pytest bench/bench_network.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from bench_results import RESULTS

from pycpt.testing.testhosts import TestHosts

MIB = int(os.environ.get("PYCPT_BENCH_NET_MIB", "512"))
PORT = 7000
BUDGET = 0.250  # seconds the blackout may exceed the frozen window

# The container's init: MIB of random memory (touched, so that it must move), an echo
# server for IPv4 and IPv6 on PORT, one thread per connection.
SERVER = """\
import os, socket, sys, threading
memory = bytearray(os.urandom(int(sys.argv[1]) << 20))
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
listener = socket.create_server(("::", int(sys.argv[2])), family=socket.AF_INET6,
                                dualstack_ipv6=True, backlog=16)
open(sys.argv[3], "w").close()
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[TestHosts]:
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    pipe = Path("/proc/sys/fs/pipe-max-size")
    if int(pipe.read_text()) < 4 << 20:  # CRIU's lazy source needs it; never lowered
        pipe.write_text(str(4 << 20))
    with TestHosts(["src", "dst"], tmp_path_factory.mktemp("hosts")) as made:
        yield made


class Client:
    """One connection from the client namespace: a request every 10 ms, each answer's time
    kept (monotonic), until stop()."""

    def __init__(self, hosts: TestHosts, address: str) -> None:
        self.sock = hosts.client().socket()
        self.sock.settimeout(120)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect((address, PORT))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the server did not listen"
                time.sleep(0.05)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.answers: List[float] = []
        self.error: "BaseException | None" = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client")
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                msg = b"%015d\n" % n
                self.sock.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = self.sock.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    got += chunk
                if got != msg:
                    raise ValueError(f"answer {got!r} to {msg!r}")
                self.answers.append(time.monotonic())
                n += 1
                time.sleep(0.01)
        except BaseException as exc:  # handed to stop()
            self.error = exc

    def stop(self) -> "tuple[float, float]":
        """End the client; the longest gap between two answers: (its start, its end)."""
        self._stop.set()
        self._thread.join(180)
        self.sock.close()
        if self.error is not None:
            raise self.error
        assert len(self.answers) > 10, "the client got almost no answers"
        return max(zip(self.answers, self.answers[1:], strict=False), key=lambda g: g[1] - g[0])


class Watcher:
    """When the container froze at the source and thawed at the target, as this process's
    clock sees it: its two cgroups' `cgroup.events`, read every millisecond."""

    def __init__(self, hosts: TestHosts, ct: str) -> None:
        self.src = _cgroup(hosts["src"], ct) / "cgroup.events"
        self.dst = _cgroup(hosts["dst"], ct) / "cgroup.events"
        self.frozen: "float | None" = None
        self.thawed: "float | None" = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher")
        self._thread.start()

    def _run(self) -> None:
        seen_frozen = False
        while not self._stop.is_set() and self.thawed is None:
            now = time.monotonic()
            if self.frozen is None and _frozen(self.src) is True:
                self.frozen = now
            state = _frozen(self.dst)
            seen_frozen = seen_frozen or state is True
            if seen_frozen and state is False:
                self.thawed = now
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cgroup(host, ct: str) -> Path:
    return Path("/sys/fs/cgroup/unified", host.cgroup_parent, ct)


def _frozen(events: Path) -> "bool | None":
    try:
        return "frozen 1" in events.read_text()
    except OSError:
        return None


@pytest.mark.parametrize(
    "mode, kick",
    [("postcopy", True), ("stopcopy", True), ("postcopy", False)],
    ids=["postcopy", "stopcopy", "postcopy-nokick"],
)
def test_client_blackout_vs_frozen_window(benchmark, hosts, tmp_path, mode, kick):
    src, dst = hosts["src"], hosts["dst"]
    ct = f"net-{mode}-{int(kick)}"
    # without the kick (PYCPT_NET_KICK=0 for pycpt on the target): what the client's own
    # retransmission timer alone gives
    remote = [] if kick else ["--remote-pycpt", "env PYCPT_NET_KICK=0 pycpt"]
    address = hosts.container_address(0)
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    ready = tmp_path / "ready"
    net = f"bridge=br0,ip={address}/24,gw={hosts.subnet}.1"
    start = [sys.executable, str(script), str(MIB), str(PORT), str(ready)]
    done = src.run(["pycpt", "start", "--net", net, ct, "--", *start], capture_output=True)
    assert done.returncode == 0, done.stderr
    where = src
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        client = Client(hosts, address)
        time.sleep(1.0)  # steady state: the client's RTT estimate settles
        watcher = Watcher(hosts, ct)
        stats: dict = {}

        def migrate() -> None:
            out = src.run(
                ["pycpt", "migrate", "--json", "--online", "--mode", mode, *remote, "dst", ct],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert out.returncode == 0, out.stderr
            stats.update(json.loads(out.stdout))

        try:
            benchmark.pedantic(migrate, rounds=1, iterations=1)
        finally:
            watcher.stop()
        where = dst
        time.sleep(1.0)  # answers after the move
        gap = client.stop()
    finally:
        where.run(["pycpt", "stop", ct], capture_output=True)
    frozen = stats["frozen_window"]
    blackout = gap[1] - gap[0]
    # where the gap lies: from the last answer to the source's freeze, and from the
    # target's thaw to the next answer (cgroup.events, seen from here)
    assert watcher.frozen is not None and watcher.thawed is not None
    before = watcher.frozen - gap[0]
    after = gap[1] - watcher.thawed
    cgroup_frozen = watcher.thawed - watcher.frozen
    label = f"{MIB} MiB {mode}" + ("" if kick else " without the kick")
    RESULTS.append((f"blackout vs frozen window, {label}", blackout, frozen, blackout / frozen))
    benchmark.extra_info.update(
        memory_mib=MIB,
        mode=mode,
        kick=kick,
        blackout_s=blackout,
        frozen_window_s=frozen,
        overshoot_s=blackout - frozen,
        last_answer_before_freeze_s=before,
        cgroups_frozen_s=cgroup_frozen,
        first_answer_after_thaw_s=after,
        within_budget=blackout <= frozen + BUDGET,
        client_port=client.port,
        load=os.getloadavg()[0],
    )
    print(
        f"\n{label}: client blackout {blackout * 1e3:.1f} ms, frozen window "
        f"{frozen * 1e3:.1f} ms, overshoot {(blackout - frozen) * 1e3:+.1f} ms "
        f"(target <= +{BUDGET * 1e3:.0f} ms); last answer {before * 1e3:.1f} ms before the "
        f"source froze, frozen until the target thawed {cgroup_frozen * 1e3:.1f} ms, first "
        f"answer {after * 1e3:.1f} ms after the thaw; load {os.getloadavg()[0]:.1f}"
    )
