"""Dump files as an attacker would make them: CRIU images of anything, packed with any
manifest config, signed with a key the restoring host trusts (a leaked key) or another, or in
the unsigned format 1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import blake3

from pycpt import dumpfile
from pycpt.dumpfile import _keys, _tar
from pycpt.images import decode_image


def pack(
    path: Path,
    images: Path,
    config: Dict[str, Any],
    *,
    keys: Optional[dumpfile.Keys] = None,
    fmt: int = 2,
) -> None:
    """Every *.img of `images` in a dump file at `path` whose manifest carries `config` as
    given (no schema: pycpt's own writer would refuse a forged one). Format 2 is signed by
    `keys` (default: the state directory's, which this host trusts); format 1 is what pycpt
    wrote before signatures."""
    parts = {p.name: p.read_bytes() for p in sorted(images.iterdir()) if p.name.endswith(".img")}
    if fmt == 1:
        _pack_format1(path, parts, config)
        return
    cs = dumpfile.CHUNK_SIZE
    manifest = dumpfile.Manifest(
        2,
        "0.1.0",
        "4.2.1",
        os.uname().release,
        "2024-01-01T00:00:00+00:00",
        config,
        [
            dumpfile.Part(
                n,
                len(d),
                b"".join(blake3.blake3(d[i : i + cs]).digest() for i in range(0, len(d), cs)),
            )
            for n, d in parts.items()
        ],
        None,
        host="attacker",
    )
    raw = manifest.to_bytes()
    out = _tar.member(dumpfile.MARKER_NAME, b"PYCPT-DUMP 2\n", 0)
    for name, data in parts.items():
        out += _tar.member(name, data, 0)
    out += _tar.member("manifest.json", raw, 0)
    out += _tar.member("manifest.sig", _keys.sign((keys or dumpfile.Keys()).host_key(), raw), 0)
    path.write_bytes(out + _tar.end(len(out)))


def _pack_format1(path: Path, parts: Dict[str, bytes], config: Dict[str, Any]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("PYCPT-DUMP", b"PYCPT-DUMP 1\n")
        for name, data in parts.items():
            add(name, data)
        d: Dict[str, Any] = {
            "format_version": 1,
            "pycpt_version": "0.1.0",
            "criu_version": "4.2.1",
            "kernel": os.uname().release,
            "created": "2024-01-01T00:00:00+00:00",
            "config": config,
            "compression": None,
            "parts": [
                {"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                for n, b in parts.items()
            ],
        }
        canonical = json.dumps(
            d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode()
        d["checksum"] = "sha256:" + hashlib.sha256(canonical).hexdigest()
        add("manifest.json", json.dumps(d).encode())
    path.write_bytes(buf.getvalue())


def edit_image(images: Path, name: str, change: Callable[[Any], None]) -> None:
    """Decode the one-entry image `name` in `images`, apply `change` to its message and write
    it back with the same magics."""
    data = (images / name).read_bytes()
    (entry,) = decode_image(name, data)
    (size,) = struct.unpack("<I", data[8:12])
    assert 12 + size == len(data), f"{name} is not a one-entry image"
    change(entry)
    new = entry.SerializeToString()
    (images / name).write_bytes(data[:8] + struct.pack("<I", len(new)) + new)
