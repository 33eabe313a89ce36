"""The dump file against copying the images directory, measured in the same run.

- write: pycpt.dumpfile.write_dump_file of a 64 MiB and a 512 MiB images directory vs
  shutil.copytree of the same directory: what one file with a manifest (one read of every
  image, BLAKE3 per 1 MiB chunk on the way, signature, fsync, rename) costs next to CRIU's
  images directory alone.
- extract: extract_dump_file (every part verified) vs shutil.copytree of the images.
- verify: DumpFile.verify() (signature, structure, every 1 MiB chunk read into a private
  buffer and its BLAKE3 checked, on both cores) of a 512 MiB dump file, as throughput.
  Two baselines, each measured round by round beside it: SHA-256 of the same file read in
  1 MiB chunks (hashlib, one core: the hash format 1 used, and the cheapest a verification
  of it could be), and reading the file into a buffer without hashing (the floor).
  Target: >= 2.5 GB/s.
- hash: the hash alone on 512 MiB in memory, per 1 MiB chunk on two threads as verify()
  does: BLAKE3 vs SHA-256 in the same structure (what the I/O-free floor of each format is).

Everything on tmpfs (/dev/shm), so the figures are CPU and memory bandwidth, not the disk.
The images are random bytes (memory pages compress little anyway); no compression.

Run: python -m pytest bench/bench_dumpfile.py --benchmark-only -p no:randomly
Each benchmark's extra_info holds the baseline median and the ratio; a table of ratios is
printed at the end of the run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
from bench_results import record

from pycpt import dumpfile

ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "11"))
MIB = 1 << 20


def rounds_for(mib: int) -> int:
    """Small runs are cheap and their ratio noisier: give them more rounds."""
    return ROUNDS * 2 if mib <= 64 else ROUNDS


@pytest.fixture(scope="module", params=[64, 512], ids=lambda m: f"{m}MiB")
def images(request):
    """A CRIU-like images dir: one big pages image and a few small ones, random bytes."""
    mib = request.param
    d = Path(tempfile.mkdtemp(prefix="pycpt-bench-img-", dir=ROOT))
    small = {
        "inventory.img": 40,
        "core-1.img": 8 * 1024,
        "mm-1.img": 4 * 1024,
        "pagemap-1.img": 64 * 1024,
        "fdinfo-2.img": 200,
        "files.img": 2 * 1024,
    }
    for name, size in small.items():
        (d / name).write_bytes(os.urandom(size))
    with open(d / "pages-1.img", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    yield mib, d
    shutil.rmtree(d)


def test_write_dump_file_vs_copytree(benchmark, images):
    mib, src = images
    work = Path(tempfile.mkdtemp(prefix="pycpt-bench-dump-", dir=ROOT))
    copies = []
    try:

        def copy_round():
            # both sides write into tmpfs memory the other side just freed
            (work / "Dump.CT").unlink(missing_ok=True)
            t = time.perf_counter()
            shutil.copytree(src, work / "copy")
            copies.append(time.perf_counter() - t)
            shutil.rmtree(work / "copy")
            return (), {}

        def dump_round():
            dumpfile.write_dump_file(
                work / "Dump.CT", src, config={"id": "bench"}, criu_version="4.2"
            )

        benchmark.pedantic(dump_round, setup=copy_round, rounds=rounds_for(mib), warmup_rounds=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record(benchmark, f"dump file write {mib} MiB vs copytree", copies)


def test_extract_dump_file_vs_copytree(benchmark, images):
    mib, src = images
    work = Path(tempfile.mkdtemp(prefix="pycpt-bench-extract-", dir=ROOT))
    copies = []
    try:
        dumpfile.write_dump_file(work / "Dump.CT", src, config={"id": "bench"}, criu_version="4.2")

        def copy_round():
            shutil.rmtree(work / "out", ignore_errors=True)
            t = time.perf_counter()
            shutil.copytree(src, work / "copy")
            copies.append(time.perf_counter() - t)
            shutil.rmtree(work / "copy")
            return (), {}

        def extract_round():
            dumpfile.extract_dump_file(work / "Dump.CT", work / "out")

        benchmark.pedantic(extract_round, setup=copy_round, rounds=rounds_for(mib), warmup_rounds=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record(benchmark, f"dump file extract {mib} MiB vs copytree", copies)


def test_verify_throughput(benchmark, images):
    mib, src = images
    if mib < 512:
        pytest.skip("throughput is measured on the 512 MiB file")
    work = Path(tempfile.mkdtemp(prefix="pycpt-bench-verify-", dir=ROOT))
    reads: list = []
    sha256s: list = []
    try:
        path = work / "Dump.CT"
        dumpfile.write_dump_file(path, src, config={"id": "bench"}, criu_version="4.2")
        size = path.stat().st_size

        def read_round():
            buf = bytearray(MIB)
            view = memoryview(buf)
            t = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
            sha256s.append(time.perf_counter() - t)
            return (), {}

        cpu: list = []  # CPU seconds of this process (all its threads) per verification

        def verify_round():
            c = time.process_time()
            with dumpfile.DumpFile.open(path) as df:
                df.verify()
            cpu.append(time.process_time() - c)

        benchmark.pedantic(verify_round, setup=read_round, rounds=rounds_for(mib), warmup_rounds=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(
            gb_per_s=size / median / 1e9, gb_per_cpu_s=size / statistics.median(cpu) / 1e9
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gbs = size / median / 1e9
    sha_gbs = size / statistics.median(sha256s) / 1e9
    per_cpu = benchmark.extra_info["gb_per_cpu_s"]
    record(
        benchmark,
        f"verify {mib} MiB, BLAKE3 {gbs:.2f} GB/s ({per_cpu:.2f} per CPU s) "
        f"vs SHA-256 {sha_gbs:.2f}",
        sha256s,
    )
    record(benchmark, f"verify {mib} MiB (BLAKE3) vs reading the file", reads)


def test_hash_throughput_blake3_vs_sha256(benchmark):
    """The hash alone, no I/O: 512 MiB in memory, every 1 MiB chunk hashed on a pool of two
    threads as DumpFile.verify() does (both hashes drop the GIL), BLAKE3 (format 2) vs
    SHA-256 (format 1's hash) in the same structure, rounds interleaved."""
    size = 512 * MIB
    data = memoryview(os.urandom(size))
    chunks = [data[i : i + MIB] for i in range(0, size, MIB)]
    sha256s: list = []
    cpu: dict = {"blake3": [], "sha256": []}  # CPU seconds of this process per round
    with ThreadPoolExecutor(2) as pool:

        def sha_round():
            t, c = time.perf_counter(), time.process_time()
            list(pool.map(lambda c: hashlib.sha256(c).digest(), chunks))
            sha256s.append(time.perf_counter() - t)
            cpu["sha256"].append(time.process_time() - c)
            return (), {}

        def blake3_round():
            c = time.process_time()
            list(pool.map(lambda c: blake3.blake3(c).digest(), chunks))
            cpu["blake3"].append(time.process_time() - c)

        benchmark.pedantic(blake3_round, setup=sha_round, rounds=ROUNDS * 2, warmup_rounds=1)
    median = benchmark.stats.stats.median
    gbs, sha_gbs = size / median / 1e9, size / statistics.median(sha256s) / 1e9
    # Per CPU second, i.e. what one free core does: wall-clock GB/s on a loaded machine
    # mostly measures the load; this does not (the hashes run on the CPU, no I/O).
    per_cpu = {k: size / statistics.median(v) / 1e9 for k, v in cpu.items()}
    benchmark.extra_info.update(
        gb_per_s=gbs,
        sha256_gb_per_s=sha_gbs,
        blake3_gb_per_cpu_s=per_cpu["blake3"],
        sha256_gb_per_cpu_s=per_cpu["sha256"],
    )
    record(
        benchmark,
        f"hash 512 MiB, BLAKE3 {gbs:.2f} GB/s vs SHA-256 {sha_gbs:.2f} (per CPU s: "
        f"{per_cpu['blake3']:.2f} vs {per_cpu['sha256']:.2f})",
        sha256s,
    )
