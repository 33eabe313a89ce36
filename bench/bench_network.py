"""What a client sees of an online migration: the blackout against pycpt's frozen window.

A container with its own address on the test hosts' bridge (`pycpt start --net`) holds
512 MiB of random memory and serves an echo protocol; a client in another namespace sends
a 16-byte request every 10 ms over one TCP connection and timestamps every answer. Then
`pycpt migrate --online` moves the container (post-copy; stop-and-copy as a second run).
The client's blackout is the longest gap between two answers; pycpt's frozen window is its
own `frozen_window` (from the freeze at the source to the target's "running"). The
difference is the client's TCP retransmission timing (see the README's Networking); the
target is blackout <= frozen window + 250 ms. One run each (a migration of 512 MiB takes
seconds; the figure is about one connection's experience).

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

    def stop(self) -> float:
        """End the client; the longest gap between two answers (seconds)."""
        self._stop.set()
        self._thread.join(180)
        self.sock.close()
        if self.error is not None:
            raise self.error
        assert len(self.answers) > 10, "the client got almost no answers"
        return max(b - a for a, b in zip(self.answers, self.answers[1:], strict=False))


@pytest.mark.parametrize("mode", ["postcopy", "stopcopy"])
def test_client_blackout_vs_frozen_window(benchmark, hosts, tmp_path, mode):
    src, dst = hosts["src"], hosts["dst"]
    ct = f"net-{mode}"
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
        stats: dict = {}

        def migrate() -> None:
            out = src.run(
                ["pycpt", "migrate", "--json", "--online", "--mode", mode, "dst", ct],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert out.returncode == 0, out.stderr
            stats.update(json.loads(out.stdout))

        benchmark.pedantic(migrate, rounds=1, iterations=1)
        where = dst
        time.sleep(1.0)  # answers after the move
        blackout = client.stop()
    finally:
        where.run(["pycpt", "stop", ct], capture_output=True)
    frozen = stats["frozen_window"]
    RESULTS.append(
        (f"client blackout vs frozen window, {MIB} MiB {mode}", blackout, frozen, blackout / frozen)
    )
    benchmark.extra_info.update(
        memory_mib=MIB,
        mode=mode,
        blackout_s=blackout,
        frozen_window_s=frozen,
        overshoot_s=blackout - frozen,
        within_budget=blackout <= frozen + BUDGET,
        client_port=client.port,
        load=os.getloadavg()[0],
    )
    print(
        f"\n{MIB} MiB {mode}: client blackout {blackout * 1e3:.1f} ms, frozen window "
        f"{frozen * 1e3:.1f} ms, overshoot {(blackout - frozen) * 1e3:+.1f} ms "
        f"(target <= +{BUDGET * 1e3:.0f} ms), load {os.getloadavg()[0]:.1f}"
    )
