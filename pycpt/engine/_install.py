"""Installing the managed engine: unpacked into a private prefix, checked, swapped in."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Dict, Optional

from pycpt._native import check, lib
from pycpt.engine._apt import (
    _BASE_SUITE,
    _NEW_SUITE,
    Apt,
    _apt_problem,
    _deb_name_version,
    _resolve_and_download,
    find_debian_mirror,
)
from pycpt.engine._find import (
    _MANIFEST_FORMAT,
    MANIFEST_NAME,
    Engine,
    Progress,
    _error,
    _managed_argv,
    _managed_candidate,
    _probe,
    managed_engine_dir,
)
from pycpt.errors import (
    EngineError,
)


def _find_loader(prefix: str) -> str:
    loaders = sorted(glob.glob(os.path.join(prefix, "usr/lib/*-linux-gnu*/ld-linux*.so.*")))
    loaders = [p for p in loaders if os.path.isfile(p)]
    if not loaders:
        raise _error(
            EngineError,
            f"the unpacked packages in {prefix} contain no dynamic loader (ld-linux*.so.*): "
            "libc6 is missing",
            path=prefix,
        )
    return loaders[0]


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False if the system cannot."""
    ret = lib.pycpt_fs_exchange(os.fsencode(a), os.fsencode(b))
    if ret in (-errno.EINVAL, -errno.ENOSYS):
        return False
    check(ret, f"renameat2({a}, {b}, RENAME_EXCHANGE)")
    return True


def replace_dir(new: str, target: str) -> None:
    """Put directory `new` at `target`, atomically replacing an existing one (which is removed)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old install
        return
    old = tempfile.mkdtemp(prefix=".pycpt-engine-old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _reuse(prefix: str, progress: Progress) -> Optional[Engine]:
    """The existing verified managed install in `prefix`, or None (saying why) if there is none."""
    if not os.path.exists(os.path.join(prefix, MANIFEST_NAME)):
        return None
    try:
        path, argv = _managed_candidate(prefix, "managed")
        engine = _probe("managed", path, argv, verify=True)
    except EngineError as exc:
        progress(f"pycpt: the existing engine in {prefix} is unusable, reinstalling: {exc.message}")
        return None
    progress(
        f"pycpt: CRIU {engine.version_string} is already installed in {prefix} and passes "
        "`criu check`; nothing to do (force=True reinstalls)"
    )
    return engine


def install_engine(
    *, prefix: Optional[str] = None, force: bool = False, progress: Progress = print
) -> Engine:
    """Install Debian sid's CRIU with its libraries into `prefix` and return it as an Engine.

    `prefix` defaults to ``$PYCPT_ENGINE_DIR`` or ``/var/lib/pycpt/engine``. Idempotent: an
    existing install that passes `criu check` with version >= MIN_VERSION is reused unless
    `force`. A criu on PATH is not consulted: this always provides the managed install (the
    CLI decides whether one is needed). The system is not changed: apt runs with a private
    configuration and the packages are unpacked with ``dpkg-deb -x``. The new install is built
    in a temporary directory next to `prefix` and moved into place only after `criu check`
    passed, so a failed install leaves the previous one intact. `progress` receives one line
    per step. Needs root, apt-get, dpkg-deb and a Debian mirror in apt's sources; raises
    EngineError (CriuTooOldError/CriuBrokenError when the result does not work).
    """
    prefix = os.path.abspath(prefix or managed_engine_dir())
    if os.geteuid() != 0:
        raise _error(
            EngineError,
            "installing CRIU needs root: the install is verified with `criu check`, which needs "
            f"root (apt and dpkg-deb alone would not), and {prefix} must be writable",
            hint="run `pycpt engine install` as root",
        )
    if not force:
        engine = _reuse(prefix, progress)
        if engine is not None:
            return engine

    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise _error(
            EngineError,
            f"installing CRIU needs Debian's package tools; not found: {', '.join(missing)}",
            hint="on a non-Debian system install CRIU >= 4.2 with its package manager and set "
            "PYCPT_CRIU",
        )
    mirror, keyring = find_debian_mirror()
    parent = os.path.dirname(prefix)
    os.makedirs(parent, mode=0o755, exist_ok=True)

    started = time.monotonic()
    with open(os.path.join(parent, ".pycpt-engine.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time per directory
        if not force:  # another process may have finished one meanwhile
            engine = _reuse(prefix, lambda _msg: None)
            if engine is not None:
                progress(f"pycpt: CRIU {engine.version_string} was just installed in {prefix}")
                return engine
        work = tempfile.mkdtemp(prefix=".pycpt-engine-apt-", dir=parent)
        stage = tempfile.mkdtemp(prefix=".pycpt-engine-new-", dir=parent)
        try:
            engine = _build(prefix, stage, work, mirror, keyring, progress)
            replace_dir(stage, prefix)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # verify again where it now lives: the paths in argv changed with the move
    path, argv = _managed_candidate(prefix, "managed")
    engine = _probe("managed", path, argv, verify=True)
    progress(
        f"pycpt: installed CRIU {engine.version_string} in {prefix} "
        f"({time.monotonic() - started:.1f} s); `criu check` passed"
    )
    return engine


def _build(
    prefix: str, stage: str, work: str, mirror: str, keyring: str, progress: Progress
) -> Engine:
    """Download, unpack and verify into `stage`; write the manifest for its final place `prefix`."""
    apt = Apt(work, mirror, keyring)
    progress(f"pycpt: fetching package lists for {_NEW_SUITE} and {_BASE_SUITE} from {mirror}")
    rc, out = apt.run("update")
    if rc != 0 or "Err:" in out:
        raise _error(
            EngineError,
            f"could not fetch the package lists of {_NEW_SUITE} and {_BASE_SUITE} from {mirror} "
            f"(apt-get update, exit status {rc}):\n{_apt_problem(out)}",
            hint="check the network and that the mirror serves sid and trixie",
            output=out,
        )
    progress(f"pycpt: resolving criu from {_NEW_SUITE}, its libraries from {_BASE_SUITE}")
    wanted = _resolve_and_download(apt, progress)
    debs = sorted(glob.glob(os.path.join(apt.archives, "*.deb")))
    size = sum(os.path.getsize(d) for d in debs)
    progress(
        f"pycpt: downloaded {len(debs)} packages ({size / 1e6:.1f} MB); from {_NEW_SUITE}: "
        + ", ".join(w.split("/")[0] for w in wanted)
    )

    packages: Dict[str, str] = {}
    for deb in debs:
        name, version = _deb_name_version(deb)
        packages[name] = version
        subprocess.run(["dpkg-deb", "-x", deb, stage], check=True, timeout=300)
    os.chmod(stage, 0o755)

    criu = os.path.join(stage, "usr/sbin/criu")
    if not os.path.isfile(criu):
        raise _error(
            EngineError, f"the criu package did not contain usr/sbin/criu (unpacked in {stage})"
        )
    loader = _find_loader(stage)
    libdir = os.path.dirname(loader)
    progress(f"pycpt: unpacked into {stage}; running `criu check`")
    engine = _probe("managed", criu, (loader, "--library-path", libdir, criu), verify=True)

    rel = {
        "criu": os.path.relpath(criu, stage),
        "loader": os.path.relpath(loader, stage),
        "libdir": os.path.relpath(libdir, stage),
    }
    manifest = {
        "format": _MANIFEST_FORMAT,
        "version": engine.version_string,
        "criu_package": packages.get("criu", ""),
        "packages": dict(sorted(packages.items())),
        "from_new_suite": [w.split("/")[0] for w in wanted],
        "suites": [_NEW_SUITE, _BASE_SUITE],
        "paths": rel,
        "argv": list(_managed_argv(prefix, {"paths": rel})[1]),
        "download_bytes": size,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(stage, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return engine
