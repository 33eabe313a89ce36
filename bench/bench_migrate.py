"""Migration: online (post-copy) against offline stop-and-copy, between two test hosts.

A container holding N MiB of random memory and a running computation migrates back and forth
between hosts "src" and "dst" (pycpt.testing.testhosts: network namespaces joined through a bridge,
one sshd each): each round is one offline hop (the baseline, `pycpt migrate --mode offline`)
followed by one online hop (`pycpt migrate --online`, post-copy), both typed on the host the
container is on, exactly as a user would. The figures come from `--json`:

- frozen window: from the freeze at the source to the target's "running". Target: under
  150 ms at 512 MiB, and not growing with memory size.
- total: from the start of the command to the source's removal (post-copy: after the last
  page arrived). Target: online total within 1.3x of memory size / link bandwidth, where
  the bandwidth is measured in the same run by a plain TCP transfer between the two hosts.

Each size runs on the plain veth link and on one limited to 1 Gbit/s with tc (both
directions). 2 GiB runs only where MemAvailable allows it (about 4x the size).

Run: python -m pytest bench/bench_migrate.py --benchmark-only -p no:randomly
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from bench_results import RESULTS, record

from pycpt._migration.target import mem_available
from pycpt.container import Container
from pycpt.testing import demo_workload
from pycpt.testing.testhosts import Host, TestHosts

ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "0"))
SIZES = [64, 512, 2048]
LINKS = ["veth", "1gbit"]


def rounds_for(mib: int) -> int:
    return ROUNDS or {64: 7, 512: 5}.get(mib, 3)


def _set_link(hosts: TestHosts, link: str) -> None:
    for h in hosts:
        if link == "veth":
            h.clear_rate()
        else:
            h.limit_rate(link)


def _bandwidth(hosts: TestHosts, nbytes: int = 256 << 20) -> float:
    """Bytes per second of one TCP stream from src to dst (the link's real capacity)."""
    server = hosts["dst"].socket()
    server.bind((hosts["dst"].address, 0))
    server.listen(1)
    got: Dict[str, float] = {}

    def sink() -> None:
        conn, _ = server.accept()
        n = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            n += len(data)
        got["end"], got["bytes"] = time.perf_counter(), n
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    client = hosts["src"].socket()
    client.connect(server.getsockname())
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    for _ in range(nbytes >> 20):
        client.sendall(chunk)
    client.close()
    thread.join()
    server.close()
    return got["bytes"] / (got["end"] - start)


class Hopper:
    """The container and where it is now; hop() migrates it to the other host."""

    def __init__(self, hosts: TestHosts, ct: str, mib: int, report: Path) -> None:
        self.hosts, self.ct, self.where = hosts, ct, "src"
        with hosts["src"].as_current():
            Container.start(ct, [sys.executable, demo_workload.__file__, str(mib), str(report)])
        deadline = time.monotonic() + 300
        while not Path(f"{report}.ready").exists():
            assert time.monotonic() < deadline, "the workload did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        """End the container wherever it is now (its memory is freed before the next test)."""
        with self.hosts[self.where].as_current():
            Container(self.ct).stop(timeout=60)

    def hop(self, *args: str) -> dict:
        here: Host = self.hosts[self.where]
        there = "dst" if self.where == "src" else "src"
        out = here.run(
            ["pycpt", "migrate", "--json", *args, there, self.ct],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr
        self.where = there
        return json.loads(out.stdout)


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("mib", SIZES)
def test_online_vs_offline(benchmark, hosts, tmp_path, mib, link):
    if mem_available() < 4 * (mib << 20):
        pytest.skip(f"{mib} MiB needs about {4 * mib} MiB of available memory")
    _set_link(hosts, link)
    try:
        bandwidth = _bandwidth(hosts)
        hopper = Hopper(hosts, f"mig{mib}-{link}", mib, tmp_path / "report")
        offline: List[dict] = []
        online: List[dict] = []

        def baseline():
            offline.append(hopper.hop("--mode", "offline"))
            return (), {}

        def online_hop():
            online.append(hopper.hop("--online"))

        try:
            benchmark.pedantic(online_hop, setup=baseline, rounds=rounds_for(mib))
        finally:
            hopper.stop()
    finally:
        _set_link(hosts, "veth")
    assert all(s["mode"] == "postcopy" for s in online)
    memory = statistics.median(s["memory_bytes"] for s in online)
    frozen_on = [s["frozen_window"] for s in online]
    frozen_off = [s["frozen_window"] for s in offline]
    total_on = [s["total"] for s in online]
    total_off = [s["total"] for s in offline]
    ideal = memory / bandwidth
    label = f"{mib} MiB, {link}"
    RESULTS.append(
        (
            f"migrate {label}: frozen window online vs offline",
            statistics.median(frozen_on),
            statistics.median(frozen_off),
            statistics.median(frozen_on) / statistics.median(frozen_off),
        )
    )
    RESULTS.append(
        (
            f"migrate {label}: total online vs offline",
            statistics.median(total_on),
            statistics.median(total_off),
            statistics.median(total_on) / statistics.median(total_off),
        )
    )
    RESULTS.append(
        (
            f"migrate {label}: total online vs memory/bandwidth",
            statistics.median(total_on),
            ideal,
            statistics.median(total_on) / ideal,
        )
    )
    record(benchmark, f"migrate {label}: online command vs offline (wall)", total_off)
    benchmark.extra_info.update(
        bandwidth_bytes_per_s=bandwidth,
        memory_bytes=memory,
        frozen_online_median_s=statistics.median(frozen_on),
        frozen_offline_median_s=statistics.median(frozen_off),
        total_online_median_s=statistics.median(total_on),
        total_offline_median_s=statistics.median(total_off),
        online_total_over_ideal=statistics.median(total_on) / ideal,
        online_stages=[s["stages"] for s in online],
    )
