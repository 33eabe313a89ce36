"""A container whose one process has 9 GiB of written memory: its pages image is over 8 GiB,
more than an octal tar size holds. It checkpoints into an uncompressed dump file (streamed,
base-256 header) and restores from it (streamed, every chunk checked) with its memory
intact. Slow (about a minute or two on the project's machine, see the README); it needs
~20 GiB of free memory and disk."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from pycpt import dumpfile
from pycpt.container import Container, ContainerStatus
from tests.helpers import bigmem
from tests.helpers.workload import wait_for

GIB = 1 << 30
SIZE = 9 * GIB


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_a_9_gib_process_checkpoints_and_restores_streamed(ctenv):
    if _available_memory() < SIZE + 4 * GIB:
        pytest.skip(f"needs {SIZE / GIB + 4:.0f} GiB of available memory")
    if shutil.disk_usage(ctenv).free < SIZE + 4 * GIB:
        pytest.skip(f"needs {SIZE / GIB + 4:.0f} GiB free in {ctenv}")
    report = ctenv / "big-report"
    times = {}
    started = time.perf_counter()
    ct = Container.start("big", [sys.executable, bigmem.__file__, str(SIZE), str(report)])
    ready = Path(f"{report}.ready")
    wait_for(ready.exists, 900, "9 GiB written")
    before = ready.read_text()
    times["fill"] = time.perf_counter() - started

    started = time.perf_counter()
    dump = ct.chkpnt(str(ctenv / "Dump.big"))  # uncompressed: criu dump --stream
    times["chkpnt"] = time.perf_counter() - started
    with dumpfile.DumpFile.open(dump) as df:
        (pages,) = [p for p in df.manifest.parts if p.name.startswith("pages-")]
        assert pages.size > 8 * GIB
        offset, _ = df.offsets[pages.name]
    with open(dump, "rb") as f:  # its size is in GNU base-256, the header one block
        f.seek(offset - 512 + 124)
        assert f.read(1) == b"\x80"

    started = time.perf_counter()
    ct = Container.restore("big", str(dump))  # criu restore --stream, every chunk checked
    times["restore"] = time.perf_counter() - started
    assert ct.status is ContainerStatus.RUNNING
    os.kill(ct.init_pid, signal.SIGUSR1)
    wait_for(report.exists, 300, "the restored memory's checksum")
    assert report.read_text() == before
    ct.stop(timeout=120)
    print(
        "9 GiB: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f"; dump file {os.path.getsize(dump) / GIB:.2f} GiB"
    )
