"""The dump file: a CRIU images directory and its manifest in one file (OpenVZ's Dump.CT).

The file is a POSIX tar (`tar tvf` lists it), plain or gzip/xz-compressed:

    PYCPT-DUMP      marker, b"PYCPT-DUMP <format version>\\n": a foreign file is refused at
                    its first bytes, a newer format before anything else is read
    *.img ...       the images (and any extra files named by the caller), regular files only
    manifest.json   last: format, pycpt and CRIU versions, kernel, creation time, the
                    container's config, and name, size and SHA-256 of every part

Writing reads every image once, hashing it on its way into the archive, and is atomic: a
temporary file (O_EXCL, mode 0600 from creation) in the target's directory, fsync, rename,
fsync of the directory. Reading checks every byte of the archive that carries anything: tar
headers by their checksums, parts by the manifest's SHA-256, the manifest by its own
checksum, the gzip/xz stream by its CRC, and the end of the archive by its exact length.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import secrets
import stat
import tarfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

from pycpt import errors
from pycpt._version import __version__

__all__ = [
    "DumpFileWriter", "FORMAT_VERSION", "MANIFEST_NAME", "MARKER_NAME", "Manifest", "Part",
    "extract_dump_file", "locate_parts", "read_manifest", "verify_dump_file", "write_dump_file",
]

FORMAT_VERSION: int = 1
"""The dump format this pycpt writes, and the newest it reads."""

MARKER_NAME = "PYCPT-DUMP"
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = (None, "gz", "xz")

PathArg = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20  # big enough that per-call overhead vanishes next to hashing and copying
_STREAM_AT = 1 << 20  # a streamed part held in memory up to this size, then written through
_MARKER_RE = re.compile(rb"PYCPT-DUMP (\d{1,9})\n\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}\Z")  # a plain file name, no path
_RESERVED = (MARKER_NAME, MANIFEST_NAME)
_MAX_MANIFEST = 64 << 20
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_GZ_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZ_LEVEL = 6  # gzip's own default: level 9 costs far more time for little on memory pages
_XZ_PRESET = 6


# --- the manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One file of the images directory as stored in the dump file."""

    name: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """What a dump file holds and where it comes from (its manifest.json)."""

    format_version: int
    pycpt_version: str
    criu_version: str
    kernel: str
    created: str
    config: Dict[str, Any]
    parts: List[Part] = field(default_factory=list)
    compression: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The manifest as JSON-able data (what manifest.json holds, less its checksum)."""
        d = dataclasses.asdict(self)
        d["parts"] = [dataclasses.asdict(p) for p in self.parts]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Build a Manifest from `to_dict()` data; ValueError names the first bad field.

        Unknown keys are ignored, so that a later pycpt may add fields within one format.
        """
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")

        def get(key: str, types: Union[type, Tuple[type, ...]]) -> Any:
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
            if not isinstance(name, str) or not _valid_name(name):
                raise ValueError(f"the manifest names a bad part {name!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"part {name} has a bad size {size!r}")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError(f"part {name} has a bad sha256 {sha!r}")
            parts.append(Part(name, size, sha))
        if len({p.name for p in parts}) != len(parts):
            raise ValueError("the manifest names a part twice")
        return cls(
            format_version=get("format_version", int),
            pycpt_version=get("pycpt_version", str),
            criu_version=get("criu_version", str),
            kernel=get("kernel", str),
            created=created,
            config=get("config", dict),
            parts=parts,
            compression=compression,
        )


def _canonical(data: Dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _manifest_bytes(manifest: Manifest) -> bytes:
    # The checksum covers every value (the config too, which no part hash covers).
    data = manifest.to_dict()
    data["checksum"] = "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"


# --- writing -----------------------------------------------------------------------------


def write_dump_file(
    path: PathArg,
    images_dir: PathArg,
    *,
    config: Dict[str, Any],
    criu_version: str,
    compress: Optional[str] = None,
    extra_files: Sequence[str] = (),
) -> Manifest:
    """Pack the CRIU images in `images_dir` and a manifest into the dump file `path`.

    Takes the regular `*.img` files of `images_dir` plus `extra_files` (names of other files
    there, e.g. a log); skips everything else. `config` (JSON-able) and `criu_version` go into
    the manifest. `compress` is None, "gz" or "xz". The file appears at `path` complete and
    fsynced, mode 0600, or not at all: an existing file there is replaced only on success.
    Returns the manifest written.

    Raises ValueError on bad arguments, ImagesDirError when an image cannot be read, and
    DumpFileError when the file cannot be written.
    """
    target = _path_arg(path, "path")
    src = _path_arg(images_dir, "images_dir")
    if compress not in COMPRESSIONS:
        raise ValueError(f"compress must be None, 'gz' or 'xz', not {compress!r}")
    if not isinstance(criu_version, str):
        raise ValueError(f"criu_version must be a str, not {type(criu_version).__name__}")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, not {type(config).__name__}")
    try:
        _canonical(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-able: {exc}") from exc
    if isinstance(extra_files, (str, bytes)) or not all(isinstance(n, str) for n in extra_files):
        raise ValueError("extra_files must be a sequence of file names (str)")

    names = _collect_parts(src, extra_files)
    parent = os.path.dirname(os.path.abspath(target))

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        pycpt_version=__version__,
        criu_version=criu_version,
        kernel=os.uname().release,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=config,
        compression=compress,
    )
    tmp, fd = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, src, names, manifest)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise errors.DumpFileError(
                f"cannot write dump file {target}: {exc.strerror or exc}", path=target) from exc
        raise
    try:
        _fsync_dir(parent)
    except OSError as exc:
        raise errors.DumpFileError(
            f"dump file {target} is written but its directory could not be synced: "
            f"{exc.strerror}", path=target,
            hint="the file may not survive a crash of this host; check the file system") from exc
    return manifest


class StreamedPart:
    """One image arriving in pieces (from CRIU's image streamer); see DumpFileWriter."""

    def __init__(self, name: str, pool: ThreadPoolExecutor) -> None:
        self.name = name
        self.size = 0
        self.sha = _Hasher(pool)
        self.done = False
        self.chunks: List[bytes] = []  # held in memory until it is written out
        self.held = 0
        self.header_at = -1  # where its tar header is, once it streams into the file


class DumpFileWriter:
    """An uncompressed dump file written while its images arrive, several at a time.

    A part is held in memory until it ends, and then written whole, unless it grows past
    1 MiB while no other part streams: then it owns the end of the file and its bytes go
    straight there (its tar header is written with size 0 and rewritten once its size is
    known). CRIU sends a small pagemap beside each big pages image, so the pages stream and
    the pagemap waits. commit() adds the manifest and makes the file appear at `path` as
    write_dump_file() does; abort() removes the temporary file. Thread-safe.
    """

    def __init__(self, path: PathArg, *, config: Dict[str, Any], criu_version: str) -> None:
        self.path = _path_arg(path, "path")
        self._parent = os.path.dirname(os.path.abspath(self.path))
        self._tmp, self._fd = _create_temp(self.path)
        self.manifest = Manifest(
            format_version=FORMAT_VERSION, pycpt_version=__version__,
            criu_version=criu_version, kernel=os.uname().release,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            config=config)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="pycpt-sha256")
        self._offset = 0
        self._owner: Optional[StreamedPart] = None
        self._finished: List[StreamedPart] = []  # ended while another part streamed
        self._names: Dict[str, StreamedPart] = {}
        self._append(_member(MARKER_NAME, b"PYCPT-DUMP %d\n" % FORMAT_VERSION))

    def open_part(self, name: str) -> StreamedPart:
        """A new part `name` (a plain file name, once per file)."""
        if not _valid_name(name):
            raise errors.ImagesDirError(f"CRIU sent an image named {name!r}, which a dump file "
                                        "cannot carry")
        with self._lock:
            if name in self._names:
                raise errors.ImagesDirError(f"CRIU sent image {name} twice")
            part = self._names[name] = StreamedPart(name, self._pool)
        return part

    def write(self, part: StreamedPart, data: memoryview) -> None:
        """Add `data` to `part`: hashed on a pool thread (one chunk behind, so `data` must
        stay unchanged until the next write or close of this part) and written out or held."""
        part.sha.update(data)  # type: ignore[arg-type]
        part.size += len(data)
        with self._lock:
            if part is self._owner:
                self._append(data)
                return
            part.chunks.append(bytes(data))
            part.held += len(data)
            if self._owner is None and part.held >= _STREAM_AT:
                self._own(part)

    def close_part(self, part: StreamedPart) -> None:
        """`part` is complete; waits until its last chunk is hashed."""
        part.sha.wait()
        with self._lock:
            part.done = True
            if part is self._owner:
                self._end_owner()
            elif self._owner is None:
                self._write_whole(part)
            else:
                self._finished.append(part)

    def commit(self) -> Manifest:
        """Every part is closed: add the manifest, fsync, rename into place. Returns it."""
        with self._lock:
            open_parts = [p.name for p in self._names.values() if not p.done]
            if open_parts:
                raise errors.ImagesDirError(f"images still open at the end of the dump: {open_parts}")
            if not any(n.endswith(".img") for n in self._names):
                raise errors.ImagesDirError("CRIU sent no images",
                                            hint="read the CRIU log for why the dump stopped")
            for part in sorted(self._names.values(), key=lambda p: p.name):
                self.manifest.parts.append(Part(part.name, part.size, part.sha.hexdigest()))
            self._append(_member(MANIFEST_NAME, _manifest_bytes(self.manifest)))
            end = self._offset + 2 * _BLOCK
            self._append(bytes(end + (-end) % _RECORD - self._offset))
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise errors.DumpFileError(f"cannot write dump file {self.path}: {exc.strerror}",
                                       path=self.path) from exc
        finally:
            self._pool.shutdown(wait=True)
        try:
            _fsync_dir(self._parent)
        except OSError as exc:
            raise errors.DumpFileError(
                f"dump file {self.path} is written but its directory could not be synced: "
                f"{exc.strerror}", path=self.path,
                hint="the file may not survive a crash of this host; check the file system") from exc
        return self.manifest

    def abort(self) -> None:
        """Drop the temporary file; the target is untouched. Idempotent."""
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    # --- under self._lock ----------------------------------------------------------------

    def _own(self, part: StreamedPart) -> None:
        part.header_at = self._offset
        self._append(_header(part.name, 0))
        for chunk in part.chunks:
            self._append(chunk)
        part.chunks, part.held = [], 0
        self._owner = part

    def _end_owner(self) -> None:
        part = self._owner
        assert part is not None
        self._append(bytes((-part.size) % _BLOCK))
        _pwrite_all(self._fd, _header(part.name, part.size), part.header_at, self.path)
        self._owner = None
        for done in self._finished:
            self._write_whole(done)
        self._finished = []
        growing = [p for p in self._names.values() if not p.done and p.held >= _STREAM_AT]
        if growing:
            self._own(max(growing, key=lambda p: p.held))

    def _write_whole(self, part: StreamedPart) -> None:
        self._append(_header(part.name, part.size))
        for chunk in part.chunks:
            self._append(chunk)
        self._append(bytes((-part.size) % _BLOCK))
        part.chunks, part.held = [], 0

    def _append(self, data: Union[bytes, memoryview]) -> None:
        _pwrite_all(self._fd, data, self._offset, self.path)
        self._offset += len(data)


def _header(name: str, size: int) -> bytes:
    """A one-block ustar header (its length never depends on `size`, so it can be rewritten
    in place; ustar holds sizes below 8 GiB)."""
    if size >= 8 << 30:
        raise errors.DumpFileError(f"image {name} is {size} bytes; a streamed dump file holds "
                                   "images below 8 GiB", hint="dump with compression instead")
    return _tarinfo(name, size, int(time.time())).tobuf(tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + bytes((-len(data)) % _BLOCK)


def _pwrite_all(fd: int, data: Union[bytes, memoryview], offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as exc:
        raise errors.DumpFileError(f"cannot write dump file {path}: {exc.strerror}", path=path,
                                   hint="check the free space where the dump file goes"
                                   if exc.errno == errno.ENOSPC else "") from exc


def _check_target(target: str, parent: str) -> None:
    """Refuse a dump file path that is a directory or lies in a missing one."""
    if os.path.isdir(target):
        raise errors.DumpFileError(f"cannot write dump file {target}: it is a directory",
                                   path=target, hint="give the dump file's own path, not a directory")
    if not os.path.isdir(parent):
        raise errors.DumpFileError(f"cannot write dump file {target}: no directory {parent}",
                                   path=target, hint=f"create {parent} first")


def _create_temp(target: str) -> Tuple[str, int]:
    """A new temporary file beside `target`, mode 0600 from creation; (its path, fd)."""
    parent = os.path.dirname(os.path.abspath(target))
    _check_target(target, parent)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # 0600 from creation: the file holds process memory, not one byte may be world-readable
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
    except OSError as exc:
        raise errors.DumpFileError(f"cannot create a file in {parent}: {exc.strerror}",
                                   path=target) from exc
    return tmp, fd


def _collect_parts(src: str, extra_files: Sequence[str]) -> List[str]:
    """The names to pack: regular *.img files and the extra files, sorted, each once."""
    try:
        with os.scandir(src) as it:
            names = {e.name for e in it if e.name.endswith(".img") and e.is_file(follow_symlinks=False)}
    except OSError as exc:
        raise errors.ImagesDirError(f"cannot read the images directory {src}: {exc.strerror}",
                                    hint="give the directory CRIU dumped into") from exc
    for name in extra_files:
        if not _valid_name(name):
            raise ValueError(f"extra file {name!r} is not a plain file name in the images directory")
        try:
            st = os.lstat(os.path.join(src, name))
        except OSError as exc:
            raise errors.ImagesDirError(f"extra file {name} in {src}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise errors.ImagesDirError(f"extra file {name} in {src} is not a regular file")
        names.add(name)
    bad = sorted(n for n in names if not _valid_name(n))
    if bad:
        raise errors.ImagesDirError(f"{src} holds files a dump file cannot carry: {bad}",
                                    hint="rename or remove them; names are plain (letters, digits, ._+-)")
    if not any(n.endswith(".img") for n in names):
        raise errors.ImagesDirError(f"{src} holds no CRIU images (*.img)",
                                    hint="give the directory CRIU dumped into")
    return sorted(names)


class _Hasher:
    """SHA-256 one chunk behind the copy: hashlib drops the GIL on big buffers, so hashing a
    chunk on a second core overlaps reading and writing the next (SHA-256 is the slow part)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._sha = hashlib.sha256()
        self._pending: Optional["Future[None]"] = None

    def update(self, data: bytes) -> None:
        """Hash `data` (which must not change afterwards) after the chunks before it."""
        self.wait()
        self._pending = self._pool.submit(self._sha.update, data)

    def wait(self) -> None:
        """Block until every chunk given so far is hashed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def hexdigest(self) -> str:
        self.wait()
        return self._sha.hexdigest()


class _HashingReader:
    """A file read once: what tarfile copies into the archive is hashed on the way."""

    def __init__(self, f: IO[bytes], path: str, pool: ThreadPoolExecutor) -> None:
        self._f = f
        self._path = path
        self.sha = _Hasher(pool)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
        except OSError as exc:
            raise errors.ImagesDirError(f"cannot read {self._path}: {exc.strerror}") from exc
        self.sha.update(data)
        self.size += len(data)
        return data


def _write_archive(f: IO[bytes], src: str, names: List[str], manifest: Manifest) -> None:
    out: io.BufferedIOBase = f  # type: ignore[assignment]
    comp: Optional[io.BufferedIOBase] = None
    if manifest.compression == "gz":
        comp = gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=_GZ_LEVEL)
    elif manifest.compression == "xz":
        comp = lzma.LZMAFile(f, "wb", preset=_XZ_PRESET)
    if comp is not None:
        out = comp
    tar = tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK)
    pool = ThreadPoolExecutor(1, thread_name_prefix="pycpt-sha256")
    try:
        _add_bytes(tar, MARKER_NAME, b"PYCPT-DUMP %d\n" % FORMAT_VERSION)
        for name in names:
            p = os.path.join(src, name)
            try:
                img = open(p, "rb", buffering=0)
            except OSError as exc:
                raise errors.ImagesDirError(f"cannot open {p}: {exc.strerror}") from exc
            with img:
                st = os.fstat(img.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise errors.ImagesDirError(f"{p} is not a regular file")
                info = _tarinfo(name, st.st_size, int(st.st_mtime))
                reader = _HashingReader(img, p, pool)
                try:
                    tar.addfile(info, reader)  # type: ignore[arg-type]
                except OSError as exc:
                    if reader.size < st.st_size:  # tarfile's "unexpected end of data"
                        raise errors.ImagesDirError(f"{p} shrank while it was packed") from exc
                    raise
                if img.read(1):
                    raise errors.ImagesDirError(f"{p} grew while it was packed")
            manifest.parts.append(Part(name, reader.size, reader.sha.hexdigest()))
        _add_bytes(tar, MANIFEST_NAME, _manifest_bytes(manifest))
    finally:
        pool.shutdown(wait=True)
        tar.close()
        if comp is not None:
            comp.close()


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o600
    info.type = tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data), int(time.time())), io.BytesIO(data))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -----------------------------------------------------------------------------


def read_manifest(path: PathArg) -> Manifest:
    """The manifest of dump file `path`, after checking its marker, its structure and that
    every part the manifest names is in the archive with its size. Reads no image data
    (a compressed file is still decompressed once to reach the manifest at its end).

    Raises DumpFileNotFoundError, DumpFileForeignError, DumpFileTooNewError or
    DumpFileCorruptError.
    """
    return _scan(_path_arg(path, "path"), "headers", None)


def compression_of(path: PathArg) -> Optional[str]:
    """"gz" or "xz" when dump file `path` starts like one, else None (also when it cannot be
    read: the reading functions then say why). Looks at the first bytes only."""
    try:
        with open(_path_arg(path, "path"), "rb") as f:
            head = f.read(len(_XZ_MAGIC))
    except OSError:
        return None
    if head.startswith(_GZ_MAGIC):
        return "gz"
    return "xz" if head.startswith(_XZ_MAGIC) else None


def locate_parts(path: PathArg) -> Tuple[Manifest, Dict[str, Tuple[int, int]]]:
    """read_manifest() of an uncompressed dump file, and where each part's bytes are in it:
    {name: (offset, size)} (to serve them straight from the file). Hashes nothing: verify
    the file before anything restored from those bytes runs. DumpFileError for a
    compressed file (its parts have no offset in it)."""
    offsets: Dict[str, Tuple[int, int]] = {}
    manifest = _scan(_path_arg(path, "path"), "headers", None, offsets)
    if manifest.compression is not None:
        raise errors.DumpFileError(f"dump file {path} is {manifest.compression}-compressed: "
                                   "its parts cannot be served in place", path=str(path),
                                   hint="extract it (extract_dump_file) instead")
    return manifest, offsets


def verify_dump_file(path: PathArg) -> Manifest:
    """Check dump file `path` completely without extracting: every part's size and SHA-256,
    the manifest's checksum, the archive's structure and end. Returns the manifest; raises
    as read_manifest does."""
    return _scan(_path_arg(path, "path"), "hash", None)


def extract_dump_file(path: PathArg, dest_dir: PathArg) -> Manifest:
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
            raise errors.ImagesDirError(f"{dest} exists and is not a directory",
                                        hint="give an empty or new directory to extract into") from None
        if os.listdir(dest):
            raise errors.ImagesDirError(f"{dest} is not empty",
                                        hint="give an empty or new directory to extract into") from None
    except OSError as exc:
        raise errors.ImagesDirError(f"cannot create {dest}: {exc.strerror}",
                                    hint="give an empty or new directory to extract into") from exc
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


def _scan(path: str, action: str, extract: Optional[Tuple[str, List[str]]],
          offsets: Optional[Dict[str, Tuple[int, int]]] = None) -> Manifest:
    """Walk the dump file once, front to back; `action` is "headers", "hash" or "extract"."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise errors.DumpFileNotFoundError(f"no dump file {path}", path=path) from exc
    except OSError as exc:
        raise errors.DumpFileError(f"cannot read dump file {path}: {exc.strerror}", path=path,
                                   hint="check the path and its permissions") from exc
    if stat.S_ISDIR(st.st_mode):
        raise errors.DumpFileForeignError(f"{path} is a directory, not a pycpt dump file",
                                          path=path, hint="give the path of the dump file itself")
    if not stat.S_ISREG(st.st_mode):
        raise errors.DumpFileForeignError(f"{path} is not a regular file, so not a pycpt dump file",
                                          path=path)
    if st.st_size == 0:
        raise errors.DumpFileCorruptError(f"dump file {path} is empty (0 bytes)", path=path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise errors.DumpFileError(f"cannot open dump file {path}: {exc.strerror}", path=path,
                                   hint="check the file's permissions") from exc
    with raw:
        scanner = _Scanner(path, raw, action, extract)
        manifest = scanner.run()
    if offsets is not None:
        offsets.update(scanner.offsets)
    return manifest


class _Scanner:
    def __init__(self, path: str, raw: IO[bytes], action: str,
                 extract: Optional[Tuple[str, List[str]]]) -> None:
        self.path = path
        self.raw = raw
        self.action = action
        self.extract = extract
        self.compression: Optional[str] = None
        self.dec: io.BufferedIOBase = raw  # type: ignore[assignment]
        self.pool: Optional[ThreadPoolExecutor] = None
        self.offsets: Dict[str, Tuple[int, int]] = {}  # name -> (offset of its data, size)

    def corrupt(self, why: str) -> errors.DumpFileCorruptError:
        return errors.DumpFileCorruptError(f"dump file {self.path} is damaged: {why}", path=self.path)

    def run(self) -> Manifest:
        try:
            return self._run()
        except errors.PycptError:
            raise
        except OSError as exc:
            if exc.errno is None:  # gzip's BadGzipFile: damaged data, not the disk
                raise self.corrupt(f"its {self.compression} data cannot be read ({exc})") \
                    from exc
            # the file system failed (EIO, ESTALE...): the file may well be intact
            raise errors.DumpFileError(
                f"cannot read dump file {self.path}: {exc.strerror}", path=self.path,
                hint="check the disk or file system it is on, then retry") from exc
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            # all of gzip's, lzma's and tarfile's ways of saying the bytes are wrong
            what = "is truncated" if isinstance(exc, EOFError) else f"cannot be read ({exc})"
            if self.compression:
                what = f"its {self.compression} data {what}"
            raise self.corrupt(what) from exc
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if self.dec is not self.raw:
                self.dec.close()

    def _run(self) -> Manifest:
        head = self.raw.read(len(_XZ_MAGIC))
        self.raw.seek(0)
        if len(head) < len(_XZ_MAGIC) and (_GZ_MAGIC.startswith(head) or _XZ_MAGIC.startswith(head)):
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
        if self.action != "headers" and self.dec.read(_BLOCK - first.size) != bytes(_BLOCK - first.size):
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
                raise self.corrupt(f"it ends {last} without a manifest (truncated, or a broken "
                                   "tar header)")
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
                path=self.path)
        self.dec.seek(0)

    def _too_new(self, version: int) -> errors.DumpFileTooNewError:
        return errors.DumpFileTooNewError(
            f"dump file {self.path} has format {version}; this pycpt reads formats up to "
            f"{FORMAT_VERSION}", path=self.path, format_version=version, supported=FORMAT_VERSION)

    def _check_member(self, member: tarfile.TarInfo, seen: Dict[str, Any]) -> None:
        name = member.name
        if name in seen or name == MARKER_NAME:
            raise self.corrupt(f"member {name!r} appears twice")
        if not member.isreg():
            kind = ("a link" if member.issym() or member.islnk() else
                    "a device" if member.isdev() else "a directory" if member.isdir() else
                    "not a regular file")
            raise self.corrupt(f"member {name!r} is {kind}; a dump holds only regular files")
        if name != MANIFEST_NAME and not _valid_name(name):
            raise self.corrupt(f"member {name!r} is not a plain file name (a path outside the "
                               "images directory?)")

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
                out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise errors.DumpFileError(f"cannot create {target}: {exc.strerror}",
                                           path=self.path, hint=f"check {dest}") from exc
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
            raise self.corrupt(f"its marker says format {marker_version}, its manifest "
                               f"{manifest.format_version}")
        if manifest.compression != self.compression:
            raise self.corrupt(f"its manifest says compression {manifest.compression}, the file "
                               f"is {self.compression or 'uncompressed'}")
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
            data = data[os.write(fd, data):]
    except OSError as exc:
        raise errors.DumpFileError(f"cannot extract dump file {path}: {exc.strerror}", path=path,
                                   hint="check the free space of the directory extracted into"
                                   if exc.errno == errno.ENOSPC else "") from exc


# --- arguments -------------------------------------------------------------------------------


def _path_arg(value: Any, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{what} must be a non-empty path (str or os.PathLike), not {value!r}")
    return value


def _valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in _RESERVED
