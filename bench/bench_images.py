"""`pycpt inspect` of a 2 GiB checkpoint: how much of the file its summary reads and how
long it takes, beside CRIU's `crit` where one is at hand, and beside reading the file once.

- A container whose init holds 2 GiB of touched memory is checkpointed (Container.chkpnt,
  the streamed dump file: ~2 GiB, on disk under pytest's tmp dir) once per run; this takes a
  while, which is why it lives here and not in the test suite.
- summary: Images.open(dump file) + report(["sockets"]) (what `pycpt inspect DUMPFILE`
  reads: the process tree, each process's command line, memory by kind and pages, namespaces,
  cgroups, descriptors and sockets) in this process, warm. Targets: under 1% of the file's
  bytes (checked), under 100 ms (reported).
- Baselines in the same run: reading the whole dump file once (page cache warm), and, when
  python3-pycriu can be fetched like tests/test_images_schema.py does (apt, the managed
  engine's version), crit's explorers `crit x DIR ps`, `fds`, `mems`, `rss` on the extracted
  images directory, in one fresh Python process, beside `pycpt inspect DUMPFILE` in a fresh
  process (both include their interpreter's start and imports).

Run: python -m pytest bench/bench_images.py --benchmark-only -p no:randomly -s
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from bench_results import record

import pycpt
from pycpt import dumpfile
from pycpt.container import Container, remove_all
from pycpt.images import Images

ROUNDS = int(os.environ.get("PYCPT_BENCH_ROUNDS", "11"))
GIB = 1 << 30

BIG = r"""
import os, sys, time
m = bytearray(2 << 30)
for i in range(0, len(m), 4096):
    m[i] = 1
open(sys.argv[1], "w").close()
while True:
    time.sleep(1000)
"""


@pytest.fixture(scope="module")
def big_dump(tmp_path_factory) -> Iterator[Path]:
    """The dump file of a container holding 2 GiB of touched memory."""
    if os.geteuid() != 0:
        pytest.skip("containers and CRIU need root")
    try:
        pycpt.find_engine()
    except pycpt.EngineError as exc:
        pytest.skip(f"no usable CRIU ({exc.message}); run `pycpt engine install`")
    tmp = tmp_path_factory.mktemp("bench-images")
    old = {k: os.environ.get(k) for k in ("PYCPT_STATE_DIR", "PYCPT_CGROUP_PARENT")}
    os.environ["PYCPT_STATE_DIR"] = str(tmp / "state")
    os.environ["PYCPT_CGROUP_PARENT"] = f"pycpt-bench-{os.getpid()}-images"
    try:
        ready = tmp / "ready"
        ct = Container.start("big", [sys.executable, "-c", BIG, str(ready)])
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert time.monotonic() < deadline, "the 2 GiB container did not get ready"
            time.sleep(0.1)
        t = time.perf_counter()
        path = ct.chkpnt(str(tmp / "Dump.big"))
        print(f"\nchkpnt of the 2 GiB container: {time.perf_counter() - t:.1f} s")
        yield path
    finally:
        remove_all()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _read_once(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.perf_counter() - t


def test_summary_vs_reading_the_file(benchmark, big_dump):
    size = big_dump.stat().st_size
    assert size > 2 * GIB
    read: List[int] = []

    def summary() -> None:
        with Images.open(big_dump) as im:
            im.report(["sockets"])
            read.append(im.bytes_read)

    baseline = [_read_once(big_dump) for _ in range(3)]
    benchmark.pedantic(summary, rounds=ROUNDS, warmup_rounds=1)
    baseline += [_read_once(big_dump) for _ in range(2)]
    fraction = max(read) / size
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes_read=max(read), file_bytes=size, fraction=fraction)
    record(benchmark, "inspect summary of 2 GiB vs reading the file once", baseline)
    print(
        f"\nsummary of a {size / GIB:.2f} GiB dump file: read {max(read)} bytes "
        f"({100 * fraction:.4f} %), median {median * 1e3:.1f} ms over {ROUNDS} rounds "
        f"(target < 100 ms); reading the file once (warm): median "
        f"{statistics.median(baseline):.2f} s"
    )
    assert fraction < 0.01, f"the summary read {100 * fraction:.2f} % of the file"


# --- crit, where it can be fetched -----------------------------------------------------------


@pytest.fixture(scope="module")
def crit_path(tmp_path_factory) -> str:
    """python3-pycriu (crit and pycriu) of the managed engine's CRIU version, fetched with
    apt as the schema tests do; its directory for PYTHONPATH."""
    from pycpt.testing import pycriu

    try:
        root = pycriu.fetch(tmp_path_factory.mktemp("pycriu"))
    except (pycriu.PycriuUnavailable, RuntimeError) as exc:
        pytest.skip(f"no crit to compare with: {exc}")
    if not (root / "crit" / "__main__.py").is_file():
        pytest.skip("python3-pycriu has no crit")
    return str(root)


CRIT = """
import sys
import crit.__main__ as crit
for what in ("ps", "fds", "mems", "rss"):
    crit.explore({"dir": sys.argv[1], "what": what})
"""

PYCPT = [sys.executable, "-m", "pycpt", "inspect"]


def _run(argv: List[str], pythonpath: Optional[str] = None) -> float:
    """Wall-clock seconds of a fresh process (interpreter start and imports included),
    its output discarded."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, env=env, check=True, cwd="/")
    return time.perf_counter() - t


def test_inspect_vs_crit(benchmark, big_dump, crit_path, tmp_path):
    images = tmp_path / "img"
    dumpfile.extract_dump_file(big_dump, images)
    crit_times: List[float] = []

    def crit_round() -> None:
        crit_times.append(_run([sys.executable, "-c", CRIT, str(images)], crit_path))

    # interleaved (crit before each pycpt round), so that load hits both
    benchmark.pedantic(
        lambda: _run([*PYCPT, str(big_dump)]), setup=crit_round, rounds=ROUNDS, warmup_rounds=1
    )
    ratio = record(benchmark, "pycpt inspect (fresh process) vs crit x ps+fds+mems+rss", crit_times)
    print(
        f"\nfresh process, wall clock: `pycpt inspect DUMPFILE` median "
        f"{benchmark.stats.stats.median * 1e3:.0f} ms; `crit x DIR ps`+`fds`+`mems`+`rss` (one "
        f"process, the extracted images directory) median "
        f"{statistics.median(crit_times) * 1e3:.0f} ms; ratio {ratio:.2f}"
    )
