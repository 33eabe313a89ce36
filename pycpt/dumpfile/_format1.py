"""Reading format 1 dump files (pycpt before format 2): a tar of the marker, the images and
a manifest last, with one SHA-256 per part and a checksum of the manifest, but no
signature: anyone who can write the file can recompute both. They are read only for a
restore with --trust-dumpfile; nothing writes them any more.

Every byte that carries anything is still checked: tar headers by their checksums, parts by
the manifest's SHA-256, the gzip/xz stream by its CRC, the end of the archive by its length.
Extraction first reads the manifest (one pass, writing nothing), then extracts only the parts
it lists, each capped at its listed size: a member that is not listed, or longer than
listed, stops it at once.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from typing import IO, Any, Dict, List, Optional, Tuple

from pycpt import errors
from pycpt.dumpfile._manifest import (
    COMPRESSIONS,
    MANIFEST_NAME,
    MARKER_NAME,
    Manifest,
    Part,
)
from pycpt.dumpfile._tar import BLOCK, RECORD

_CHUNK = 1 << 20
_MAX_MANIFEST = 64 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}\Z")  # format 1 allowed 255


def manifest_from_dict(data: Any) -> Manifest:
    """A format 1 manifest from its JSON data; ValueError names the first bad field.
    Unknown keys are ignored (format 1 allowed a later pycpt to add fields)."""
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a JSON object")

    def get(key: str, types: Any) -> Any:
        if key not in data:
            raise ValueError(f"the manifest has no {key!r}")
        value = data[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"the manifest's {key!r} has the wrong type")
        return value

    compression = data.get("compression")
    if compression not in COMPRESSIONS:
        raise ValueError(f"the manifest's compression {compression!r} is unknown")
    created = get("created", str)
    try:
        datetime.datetime.fromisoformat(created)
    except ValueError:
        raise ValueError(f"the manifest's creation time {created!r} is not ISO 8601") from None
    parts = []
    for raw in get("parts", list):
        if not isinstance(raw, dict):
            raise ValueError("a part of the manifest is not a JSON object")
        name, size, sha = raw.get("name"), raw.get("size"), raw.get("sha256")
        if not isinstance(name, str) or not _valid_name1(name):
            raise ValueError(f"the manifest names a bad part {name!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"part {name} has a bad size {size!r}")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"part {name} has a bad sha256 {sha!r}")
        parts.append(Part(name, size, sha256=sha))
    if len({p.name for p in parts}) != len(parts):
        raise ValueError("the manifest names a part twice")
    return Manifest(
        format_version=get("format_version", int),
        pycpt_version=get("pycpt_version", str),
        criu_version=get("criu_version", str),
        kernel=get("kernel", str),
        created=created,
        config=get("config", dict),
        parts=parts,
        compression=compression,
        hash="sha256",
        chunk_size=0,
    )


def canonical(data: Dict[str, Any]) -> bytes:
    """The bytes format 1's manifest checksum is computed over."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _valid_name1(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in (MARKER_NAME, MANIFEST_NAME)


def read(path: str, raw: IO[bytes]) -> Manifest:
    """The manifest of the format 1 file open as `raw`, its structure checked (a compressed
    file is decompressed once, writing nothing)."""
    return _Scanner(path, raw, "headers", None, None).run()


def verify(path: str, raw: IO[bytes]) -> Manifest:
    """Every part's SHA-256 and the archive's structure checked; the manifest."""
    return _Scanner(path, raw, "hash", None, None).run()


def extract(path: str, raw: IO[bytes], dest: str, written: List[str], cap: Manifest) -> Manifest:
    """Extract into `dest` (names appended to `written`), every part checked against its
    SHA-256 and capped at the size `cap` (the manifest read before) lists."""
    expected = {p.name: p.size for p in cap.parts}
    return _Scanner(path, raw, "extract", (dest, written), expected).run()


class _Scanner:
    def __init__(
        self,
        path: str,
        raw: IO[bytes],
        action: str,
        extract: Optional[Tuple[str, List[str]]],
        expected: Optional[Dict[str, int]],
    ) -> None:
        self.path = path
        self.raw = raw
        self.action = action
        self.extract = extract
        self.expected = expected
        self.compression: Optional[str] = None
        self.dec: io.BufferedIOBase = raw  # type: ignore[assignment]

    def corrupt(self, why: str) -> errors.DumpFileCorruptError:
        return errors.DumpFileCorruptError(
            f"dump file {self.path} is damaged: {why}", path=self.path
        )

    def run(self) -> Manifest:
        self.raw.seek(0)
        try:
            return self._run()
        except errors.PycptError:
            raise
        except OSError as exc:
            if exc.errno is None:  # gzip's BadGzipFile: damaged data, not the disk
                raise self.corrupt(f"its {self.compression} data cannot be read ({exc})") from exc
            raise errors.DumpFileError(
                f"cannot read dump file {self.path}: {exc.strerror}",
                path=self.path,
                hint="check the disk or file system it is on, then retry",
            ) from exc
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            what = "is truncated" if isinstance(exc, EOFError) else f"cannot be read ({exc})"
            if self.compression:
                what = f"its {self.compression} data {what}"
            raise self.corrupt(what) from exc
        finally:
            if self.dec is not self.raw:  # type: ignore[comparison-overlap]
                self.dec.close()

    def _run(self) -> Manifest:
        head = self.raw.read(6)
        self.raw.seek(0)
        if head.startswith(b"\x1f\x8b"):
            self.compression = "gz"
            self.dec = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif head.startswith(b"\xfd7zXZ\x00"):
            self.compression = "xz"
            self.dec = lzma.LZMAFile(self.raw, "rb")
        tar = tarfile.open(fileobj=self.dec, mode="r:")
        first = tar.next()
        if first is None or first.name != MARKER_NAME or not first.isreg() or first.size > 64:
            raise self.corrupt("its first member is not a valid pycpt marker")
        marker = self._read_exact(first.offset_data, first.size)
        if self.action != "headers" and self.dec.read(BLOCK - first.size) != bytes(
            BLOCK - first.size
        ):
            raise self.corrupt("the padding after its marker is damaged")
        if marker != b"PYCPT-DUMP 1\n":
            raise self.corrupt(f"its marker {marker!r} is not format 1's")
        seen: Dict[str, Tuple[int, Optional[str]]] = {}
        while True:
            member = tar.next()
            if member is None:
                last = f"after {list(seen)[-1]}" if seen else "after its marker"
                raise self.corrupt(
                    f"it ends {last} without a manifest (truncated, or a broken tar header)"
                )
            self._check_member(member, seen)
            if member.name == MANIFEST_NAME:
                break
            seen[member.name] = (member.size, self._take_part(member))
        if member.size > _MAX_MANIFEST:
            raise self.corrupt(f"its manifest claims {member.size} bytes")
        raw_manifest = self._read_exact(member.offset_data, member.size)
        self._check_end(member.offset_data + member.size)
        manifest = self._parse_manifest(raw_manifest)
        self._check_parts(manifest, seen)
        return manifest

    def _check_member(self, member: tarfile.TarInfo, seen: Dict[str, Any]) -> None:
        name = member.name
        if name in seen or name == MARKER_NAME:
            raise self.corrupt(f"member {name!r} appears twice")
        if not member.isreg():
            raise self.corrupt(f"member {name!r} is not a regular file")
        if name != MANIFEST_NAME and not _valid_name1(name):
            raise self.corrupt(f"member {name!r} is not a plain file name")
        if self.expected is not None and name != MANIFEST_NAME:
            # the caps of extraction: decided before one byte of the member is written
            if name not in self.expected:
                raise self.corrupt(f"member {name!r} is not in its manifest")
            if member.size != self.expected[name]:
                raise self.corrupt(
                    f"member {name} has {member.size} bytes, its manifest says "
                    f"{self.expected[name]}"
                )

    def _read_exact(self, offset: int, size: int) -> bytes:
        self.dec.seek(offset)
        data = self.dec.read(size)
        if len(data) != size:
            raise self.corrupt("it is truncated")
        return data

    def _take_part(self, member: tarfile.TarInfo) -> Optional[str]:
        if self.action == "headers":
            return None
        out_fd = -1
        if self.extract is not None:
            dest, written = self.extract
            target = os.path.join(dest, member.name)
            try:
                out_fd = os.open(
                    target,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                raise errors.DumpFileError(
                    f"cannot create {target}: {exc.strerror}", path=self.path, hint=f"check {dest}"
                ) from exc
            written.append(target)
        try:
            sha = hashlib.sha256()
            left = member.size
            self.dec.seek(member.offset_data)
            while left:
                chunk = self.dec.read(min(left, _CHUNK))
                if not chunk:
                    raise self.corrupt(f"it is truncated inside {member.name}")
                sha.update(chunk)
                if out_fd >= 0:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out_fd, view) :]
                left -= len(chunk)
            pad = (-member.size) % BLOCK
            if pad and self.dec.read(pad) != bytes(pad):
                raise self.corrupt(f"the padding after {member.name} is damaged or truncated")
            return sha.hexdigest()
        finally:
            if out_fd >= 0:
                os.close(out_fd)

    def _check_end(self, end: int) -> None:
        self.dec.seek(end)
        rest = b""
        while len(rest) <= RECORD + 3 * BLOCK:
            data = self.dec.read(RECORD)
            if not data:
                break
            rest += data
        total = end + len(rest)
        if rest.strip(b"\0") or len(rest) > RECORD + 3 * BLOCK:
            raise self.corrupt("there is data after its manifest")
        if len(rest) < 2 * BLOCK + (-end % BLOCK) or total % RECORD:
            raise self.corrupt("it is truncated at its end")

    def _parse_manifest(self, raw_manifest: bytes) -> Manifest:
        try:
            data = json.loads(raw_manifest.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.corrupt(f"its manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise self.corrupt("its manifest is not a JSON object")
        checksum = data.pop("checksum", None)
        try:
            ok = checksum == "sha256:" + hashlib.sha256(canonical(data)).hexdigest()
        except ValueError:
            ok = False
        if not ok:
            raise self.corrupt("its manifest does not match its checksum")
        try:
            manifest = manifest_from_dict(data)
        except ValueError as exc:
            raise self.corrupt(f"bad manifest: {exc}") from exc
        if manifest.format_version != 1:
            raise self.corrupt(f"its marker says format 1, its manifest {manifest.format_version}")
        if manifest.compression != self.compression:
            raise self.corrupt(
                f"its manifest says compression {manifest.compression}, the file "
                f"is {self.compression or 'uncompressed'}"
            )
        return manifest

    def _check_parts(self, manifest: Manifest, seen: Dict[str, Tuple[int, Optional[str]]]) -> None:
        listed = {p.name: p for p in manifest.parts}
        for name in seen:
            if name not in listed:
                raise self.corrupt(f"member {name!r} is not in its manifest")
        for p in manifest.parts:
            if p.name not in seen:
                raise self.corrupt(f"part {p.name} of its manifest is missing")
            size, sha = seen[p.name]
            if size != p.size:
                raise self.corrupt(f"part {p.name} has {size} bytes, its manifest says {p.size}")
            if sha is not None and sha != p.sha256:
                raise self.corrupt(f"part {p.name} does not match its SHA-256")
