"""Reading a dump file: its manifest, where its parts are, a full check, an extraction;
every byte that carries anything is checked on the way."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import stat
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Dict, List, Optional, Tuple

from pycpt import errors
from pycpt._typing import PathLike
from pycpt.dumpfile._arguments import _path_arg
from pycpt.dumpfile._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    Manifest,
    _canonical,
    _valid_name,
)
from pycpt.dumpfile._writing import _BLOCK, _CHUNK, _RECORD, _Hasher

_MARKER_RE = re.compile(rb"PYCPT-DUMP (\d{1,9})\n\Z")
_MAX_MANIFEST = 64 << 20
_GZ_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"


def read_manifest(path: PathLike) -> Manifest:
    """The manifest of dump file `path`, after checking its marker, its structure and that
    every part the manifest names is in the archive with its size. Reads no image data
    (a compressed file is still decompressed once to reach the manifest at its end).

    Raises DumpFileNotFoundError, DumpFileForeignError, DumpFileTooNewError or
    DumpFileCorruptError.
    """
    return _scan(_path_arg(path, "path"), "headers", None)


def compression_of(path: PathLike) -> Optional[str]:
    """ "gz" or "xz" when dump file `path` starts like one, else None (also when it cannot be
    read: the reading functions then say why). Looks at the first bytes only."""
    try:
        with open(_path_arg(path, "path"), "rb") as f:
            head = f.read(len(_XZ_MAGIC))
    except OSError:
        return None
    if head.startswith(_GZ_MAGIC):
        return "gz"
    return "xz" if head.startswith(_XZ_MAGIC) else None


def locate_parts(path: PathLike) -> Tuple[Manifest, Dict[str, Tuple[int, int]]]:
    """read_manifest() of an uncompressed dump file, and where each part's bytes are in it:
    {name: (offset, size)} (to serve them straight from the file). Hashes nothing: verify
    the file before anything restored from those bytes runs. DumpFileError for a
    compressed file (its parts have no offset in it)."""
    offsets: Dict[str, Tuple[int, int]] = {}
    manifest = _scan(_path_arg(path, "path"), "headers", None, offsets)
    if manifest.compression is not None:
        raise errors.DumpFileError(
            f"dump file {path} is {manifest.compression}-compressed: "
            "its parts cannot be served in place",
            path=str(path),
            hint="extract it (extract_dump_file) instead",
        )
    return manifest, offsets


def verify_dump_file(path: PathLike) -> Manifest:
    """Check dump file `path` completely without extracting: every part's size and SHA-256,
    the manifest's checksum, the archive's structure and end. Returns the manifest; raises
    as read_manifest does."""
    return _scan(_path_arg(path, "path"), "hash", None)


def extract_dump_file(path: PathLike, dest_dir: PathLike) -> Manifest:
    """Extract dump file `path` into `dest_dir`, verifying every part as it goes.

    `dest_dir` must be empty or not exist (it is then created, mode 0700). Only regular files
    named in the manifest are written; a path, link, device or unlisted member is refused.
    On any failure everything extracted is removed again (and `dest_dir`, if this call
    created it) before the error is raised. Afterwards `dest_dir` is a CRIU images directory
    ready for restore. Returns the manifest; raises as read_manifest does, ImagesDirError
    for an unusable `dest_dir`, and DumpFileError when writing into it fails.
    """
    src = _path_arg(path, "path")
    dest = _path_arg(dest_dir, "dest_dir")
    created = False
    try:
        os.mkdir(dest, 0o700)
        os.chmod(dest, 0o700)  # the umask may have taken bits, never added: make it exact
        created = True
    except FileExistsError:
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise errors.ImagesDirError(
                f"{dest} exists and is not a directory",
                hint="give an empty or new directory to extract into",
            ) from None
        if os.listdir(dest):
            raise errors.ImagesDirError(
                f"{dest} is not empty", hint="give an empty or new directory to extract into"
            ) from None
    except OSError as exc:
        raise errors.ImagesDirError(
            f"cannot create {dest}: {exc.strerror}",
            hint="give an empty or new directory to extract into",
        ) from exc
    written: List[str] = []
    try:
        return _scan(src, "extract", (dest, written))
    except BaseException:
        for p in written:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if created:
            os.rmdir(dest)
        raise


def _scan(
    path: str,
    action: str,
    extract: Optional[Tuple[str, List[str]]],
    offsets: Optional[Dict[str, Tuple[int, int]]] = None,
) -> Manifest:
    """Walk the dump file once, front to back; `action` is "headers", "hash" or "extract"."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise errors.DumpFileNotFoundError(f"no dump file {path}", path=path) from exc
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot read dump file {path}: {exc.strerror}",
            path=path,
            hint="check the path and its permissions",
        ) from exc
    if stat.S_ISDIR(st.st_mode):
        raise errors.DumpFileForeignError(
            f"{path} is a directory, not a pycpt dump file",
            path=path,
            hint="give the path of the dump file itself",
        )
    if not stat.S_ISREG(st.st_mode):
        raise errors.DumpFileForeignError(
            f"{path} is not a regular file, so not a pycpt dump file", path=path
        )
    if st.st_size == 0:
        raise errors.DumpFileCorruptError(f"dump file {path} is empty (0 bytes)", path=path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot open dump file {path}: {exc.strerror}",
            path=path,
            hint="check the file's permissions",
        ) from exc
    with raw:
        scanner = _Scanner(path, raw, action, extract)
        manifest = scanner.run()
    if offsets is not None:
        offsets.update(scanner.offsets)
    return manifest


class _Scanner:
    def __init__(
        self, path: str, raw: IO[bytes], action: str, extract: Optional[Tuple[str, List[str]]]
    ) -> None:
        self.path = path
        self.raw = raw
        self.action = action
        self.extract = extract
        self.compression: Optional[str] = None
        self.dec: io.BufferedIOBase = raw  # type: ignore[assignment]
        self.pool: Optional[ThreadPoolExecutor] = None
        self.offsets: Dict[str, Tuple[int, int]] = {}  # name -> (offset of its data, size)

    def corrupt(self, why: str) -> errors.DumpFileCorruptError:
        return errors.DumpFileCorruptError(
            f"dump file {self.path} is damaged: {why}", path=self.path
        )

    def run(self) -> Manifest:
        try:
            return self._run()
        except errors.PycptError:
            raise
        except OSError as exc:
            if exc.errno is None:  # gzip's BadGzipFile: damaged data, not the disk
                raise self.corrupt(f"its {self.compression} data cannot be read ({exc})") from exc
            # the file system failed (EIO, ESTALE...): the file may well be intact
            raise errors.DumpFileError(
                f"cannot read dump file {self.path}: {exc.strerror}",
                path=self.path,
                hint="check the disk or file system it is on, then retry",
            ) from exc
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            # all of gzip's, lzma's and tarfile's ways of saying the bytes are wrong
            what = "is truncated" if isinstance(exc, EOFError) else f"cannot be read ({exc})"
            if self.compression:
                what = f"its {self.compression} data {what}"
            raise self.corrupt(what) from exc
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if self.dec is not self.raw:  # type: ignore[comparison-overlap]
                self.dec.close()

    def _run(self) -> Manifest:
        head = self.raw.read(len(_XZ_MAGIC))
        self.raw.seek(0)
        if len(head) < len(_XZ_MAGIC) and (
            _GZ_MAGIC.startswith(head) or _XZ_MAGIC.startswith(head)
        ):
            raise self.corrupt(f"it is truncated after {len(head)} bytes")
        if head.startswith(_GZ_MAGIC):
            self.compression = "gz"
            self.dec = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif head.startswith(_XZ_MAGIC):
            self.compression = "xz"
            self.dec = lzma.LZMAFile(self.raw, "rb")
        self._check_marker_name()
        tar = tarfile.open(fileobj=self.dec, mode="r:")
        first = tar.next()
        if first is None or first.name != MARKER_NAME or not first.isreg() or first.size > 64:
            raise self.corrupt("its first member is not a valid pycpt marker")
        marker = self._read_exact(first.offset_data, first.size)
        if self.action != "headers" and self.dec.read(_BLOCK - first.size) != bytes(
            _BLOCK - first.size
        ):
            raise self.corrupt("the padding after its marker is damaged")
        m = _MARKER_RE.match(marker)
        if not m or int(m.group(1)) < 1:
            raise self.corrupt(f"its marker {marker!r} is not valid")
        version = int(m.group(1))
        if version > FORMAT_VERSION:
            raise self._too_new(version)

        seen: Dict[str, Tuple[int, Optional[str]]] = {}  # name -> (size, sha256 if hashed)
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
            self.offsets[member.name] = (member.offset_data, member.size)
            seen[member.name] = (member.size, self._take_part(member))
        if member.size > _MAX_MANIFEST:
            raise self.corrupt(f"its manifest claims {member.size} bytes")
        raw_manifest = self._read_exact(member.offset_data, member.size)
        self._check_end(member.offset_data + member.size)
        manifest = self._parse_manifest(raw_manifest, version)
        self._check_parts(manifest, seen)
        return manifest

    def _check_marker_name(self) -> None:
        # the marker's tar header starts with its name: anything else is not ours
        want = MARKER_NAME.encode() + b"\0"
        prefix = self.dec.read(len(want))
        if prefix != want:
            if self.compression is None and want.startswith(prefix):
                raise self.corrupt(f"it is truncated after {len(prefix)} bytes")
            if self.compression is not None and len(prefix) < len(want) and want.startswith(prefix):
                raise self.corrupt("its compressed data ends right at its start")
            kind = f"{self.compression}-compressed data" if self.compression else "data"
            raise errors.DumpFileForeignError(
                f"{self.path} is not a pycpt dump file ({kind} without the {MARKER_NAME} marker)",
                path=self.path,
            )
        self.dec.seek(0)

    def _too_new(self, version: int) -> errors.DumpFileTooNewError:
        return errors.DumpFileTooNewError(
            f"dump file {self.path} has format {version}; this pycpt reads formats up to "
            f"{FORMAT_VERSION}",
            path=self.path,
            format_version=version,
            supported=FORMAT_VERSION,
        )

    def _check_member(self, member: tarfile.TarInfo, seen: Dict[str, Any]) -> None:
        name = member.name
        if name in seen or name == MARKER_NAME:
            raise self.corrupt(f"member {name!r} appears twice")
        if not member.isreg():
            kind = (
                "a link"
                if member.issym() or member.islnk()
                else "a device"
                if member.isdev()
                else "a directory"
                if member.isdir()
                else "not a regular file"
            )
            raise self.corrupt(f"member {name!r} is {kind}; a dump holds only regular files")
        if name != MANIFEST_NAME and not _valid_name(name):
            raise self.corrupt(
                f"member {name!r} is not a plain file name (a path outside the images directory?)"
            )

    def _read_exact(self, offset: int, size: int) -> bytes:
        self.dec.seek(offset)
        data = self.dec.read(size)
        if len(data) != size:
            raise self.corrupt("it is truncated")
        return data

    def _take_part(self, member: tarfile.TarInfo) -> Optional[str]:
        """Read a part's data once: hash it, and write it out when extracting."""
        if self.action == "headers":
            return None  # tarfile seeks past it
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
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="pycpt-sha256")
            sha = _Hasher(self.pool)
            left = member.size
            self.dec.seek(member.offset_data)
            while left:
                chunk = self.dec.read(min(left, _CHUNK))  # a fresh bytes: hashed while written
                if not chunk:
                    raise self.corrupt(f"it is truncated inside {member.name}")
                sha.update(chunk)
                if out_fd >= 0:
                    _write_all(out_fd, memoryview(chunk), self.path)
                left -= len(chunk)
            pad = (-member.size) % _BLOCK
            if pad and self.dec.read(pad) != bytes(pad):
                raise self.corrupt(f"the padding after {member.name} is damaged or truncated")
            return sha.hexdigest()
        finally:
            if out_fd >= 0:
                os.close(out_fd)

    def _check_end(self, end: int) -> None:
        """After the manifest only the end-of-archive zeros, up to the writer's record size."""
        self.dec.seek(end)
        rest = b""
        while len(rest) <= _RECORD + 2 * _BLOCK + _BLOCK:
            data = self.dec.read(_RECORD)
            if not data:
                break
            rest += data
        total = end + len(rest)
        if rest.strip(b"\0") or len(rest) > _RECORD + 2 * _BLOCK + _BLOCK:
            raise self.corrupt("there is data after its manifest")
        if len(rest) < 2 * _BLOCK + (-(end) % _BLOCK) or total % _RECORD:
            raise self.corrupt("it is truncated at its end")

    def _parse_manifest(self, raw_manifest: bytes, marker_version: int) -> Manifest:
        try:
            data = json.loads(raw_manifest.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.corrupt(f"its manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise self.corrupt("its manifest is not a JSON object")
        fv = data.get("format_version")
        if isinstance(fv, int) and not isinstance(fv, bool) and fv > FORMAT_VERSION:
            raise self._too_new(fv)
        checksum = data.pop("checksum", None)
        try:
            ok = checksum == "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()
        except ValueError:
            ok = False
        if not ok:
            raise self.corrupt("its manifest does not match its checksum")
        try:
            manifest = Manifest.from_dict(data)
        except ValueError as exc:
            raise self.corrupt(f"bad manifest: {exc}") from exc
        if manifest.format_version != marker_version:
            raise self.corrupt(
                f"its marker says format {marker_version}, its manifest {manifest.format_version}"
            )
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


def _write_all(fd: int, data: memoryview, path: str) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot extract dump file {path}: {exc.strerror}",
            path=path,
            hint="check the free space of the directory extracted into"
            if exc.errno == errno.ENOSPC
            else "",
        ) from exc
