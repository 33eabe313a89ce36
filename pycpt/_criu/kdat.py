"""CRIU's kernel-probe cache (/run/criu.kdat) on hosts whose /run is not a tmpfs.

Every CRIU run starts by probing the kernel (20-40 ms here) unless it can load
/run/criu.kdat. CRIU writes that file only when /run is a tmpfs, so that a reboot clears it;
on other hosts it probes on every run and leaves /run/criu.kdat.tmp behind. It does load the
file from any file system, though. So pycpt makes it: once per boot (the boot id is kept
beside it), `criu check` runs in a private mount namespace with a tmpfs on /run, and the file
it writes there is moved to the real /run. A cache from an earlier boot is removed first.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from pycpt._native import check, ffi, lib
from pycpt._typing import PathLike

RUN = Path("/run")
CACHE = RUN / "criu.kdat"
BOOT_STAMP = RUN / "criu.kdat.pycpt-boot"
TMPFS_MAGIC = lib.PYCPT_FS_TMPFS_MAGIC

# Inside the private namespace: keep the real /run reachable at $0, put a tmpfs on /run,
# let CRIU write its cache there, and move it to the real /run under its final name.
_SCRIPT = (
    'mount --bind /run "$0" && mount -t tmpfs -o size=4m,mode=755 pycpt-kdat /run && '
    '"$@" >/dev/null 2>&1; test -s /run/criu.kdat && '
    'cp /run/criu.kdat "$0/.criu.kdat.pycpt" && mv "$0/.criu.kdat.pycpt" "$0/criu.kdat"'
)


@functools.lru_cache(maxsize=None)
def boot_id() -> str:
    """This boot's id (changes at every reboot)."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def is_tmpfs(path: PathLike) -> bool:
    """True if `path` lies on a tmpfs."""
    return _fs_type(path) == TMPFS_MAGIC


@functools.lru_cache(maxsize=None)
def needed() -> bool:
    """True when CRIU cannot keep its cache itself here (/run is not a tmpfs) and pycpt can
    make it (root, with unshare). Asked once per process: every Criu() calls ensure()."""
    try:
        tmpfs = is_tmpfs(RUN)
    except OSError:
        return False
    return not tmpfs and os.geteuid() == 0 and shutil.which("unshare") is not None


def fresh() -> bool:
    """True when /run/criu.kdat exists and was made during this boot."""
    try:
        return CACHE.stat().st_size > 0 and BOOT_STAMP.read_text().strip() == boot_id()
    except OSError:
        return False


def ensure(criu_argv: Sequence[str]) -> bool:
    """Make sure CRIU finds a cache of this boot's kernel probe; returns True when one is in
    place afterwards. Cheap when it already is (two stats); never raises."""
    if not needed():
        return False
    if fresh():
        return True
    try:
        for stale in (CACHE, BOOT_STAMP, RUN / "criu.kdat.tmp"):
            stale.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="pycpt-kdat-") as real_run:
            subprocess.run(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    _SCRIPT,
                    real_run,
                    *criu_argv,
                    "check",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
        if CACHE.is_file():
            tmp = BOOT_STAMP.with_name(BOOT_STAMP.name + ".tmp")
            tmp.write_text(boot_id() + "\n")
            tmp.rename(BOOT_STAMP)
    except (OSError, subprocess.SubprocessError):
        return False
    return fresh()


def _fs_type(path: PathLike) -> int:
    # os.statvfs has no f_type; statfs(2) has
    fs_type = ffi.new("int64_t *")
    check(lib.pycpt_fs_type(os.fsencode(path), fs_type), str(path))
    return int(fs_type[0])
