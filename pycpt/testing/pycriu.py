"""CRIU's own Python package, python3-pycriu, of the managed engine's CRIU version: fetched
with a private apt the way the engine is installed, and unpacked, never installed. The
schema tests compare pycpt's declarations of CRIU's messages with its protoc output, and the
images benchmark runs its `crit` as a baseline. Test infrastructure, not API."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any


class PycriuUnavailable(Exception):
    """This host cannot fetch python3-pycriu (no root, no apt, no managed engine); the
    message says which. A failure of apt itself is a RuntimeError instead."""


def fetch(workdir: Path) -> Path:
    """Download python3-pycriu=<the managed engine's criu package version> into `workdir`
    and unpack it there; the directory that holds its `pycriu` and `crit` packages."""
    from pycpt import engine
    from pycpt.engine._apt import Apt
    from pycpt.errors import EngineError

    if os.geteuid() != 0 or not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise PycriuUnavailable("needs root, apt-get and dpkg-deb to fetch python3-pycriu")
    try:
        version = engine.read_manifest(engine.managed_engine_dir())["criu_package"]
    except (OSError, KeyError, ValueError, EngineError):
        raise PycriuUnavailable(
            "no pycpt-managed CRIU whose python3-pycriu could be fetched; "
            "run `pycpt engine install`"
        ) from None
    apt = Apt(str(workdir / "apt"), *engine.find_debian_mirror())
    rc, out = apt.run("update")
    if rc != 0:
        raise RuntimeError(f"apt-get update failed: {out[-2000:]}")
    rc, out = apt.run(
        "-y", "--download-only", "--no-install-recommends", "-t", "sid", "install",
        f"python3-pycriu={version}",
    )  # fmt: skip
    debs = list(Path(apt.archives).glob("python3-pycriu_*.deb"))
    if not debs:
        raise RuntimeError(f"python3-pycriu {version} was not downloaded: {out[-2000:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "x")], check=True)
    found = list((workdir / "x").rglob("pycriu/__init__.py"))
    if not found:
        raise RuntimeError("python3-pycriu holds no pycriu package")
    return found[0].parent.parent


def serialized_descriptor(pb2: Path) -> Any:
    """The FileDescriptorProto a protoc-made `*_pb2.py` registers, read from its source (the
    module is never imported)."""
    from google.protobuf import descriptor_pb2

    for node in ast.walk(ast.parse(pb2.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, bytes):
                return descriptor_pb2.FileDescriptorProto.FromString(arg.value)
    raise AssertionError(f"no serialized descriptor in {pb2}")
