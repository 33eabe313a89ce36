"""Writing a dump file: all at once from an images directory (write_dump_file), or while
CRIU streams its images (DumpFileWriter)."""

from __future__ import annotations

import datetime
import errno
import gzip
import hashlib
import io
import lzma
import os
import secrets
import stat
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

from pycpt import errors
from pycpt._typing import PathLike
from pycpt._version import __version__
from pycpt.dumpfile._arguments import _path_arg
from pycpt.dumpfile._manifest import (
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    Manifest,
    Part,
    _canonical,
    _manifest_bytes,
    _valid_name,
)

_CHUNK = 1 << 20  # big enough that per-call overhead vanishes next to hashing and copying
_STREAM_AT = 1 << 20  # a streamed part held in memory up to this size, then written through
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_GZ_LEVEL = 6  # gzip's own default: level 9 costs far more time for little on memory pages
_XZ_PRESET = 6


def write_dump_file(
    path: PathLike,
    images_dir: PathLike,
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
        raise errors.InvalidArgumentError(f"compress must be None, 'gz' or 'xz', not {compress!r}")
    if not isinstance(criu_version, str):
        raise errors.InvalidArgumentError(
            f"criu_version must be a str, not {type(criu_version).__name__}"
        )
    if not isinstance(config, dict):
        raise errors.InvalidArgumentError(f"config must be a dict, not {type(config).__name__}")
    try:
        _canonical(config)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgumentError(f"config must be JSON-able: {exc}") from exc
    if isinstance(extra_files, (str, bytes)) or not all(isinstance(n, str) for n in extra_files):
        raise errors.InvalidArgumentError("extra_files must be a sequence of file names (str)")

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
                f"cannot write dump file {target}: {exc.strerror or exc}", path=target
            ) from exc
        raise
    try:
        _fsync_dir(parent)
    except OSError as exc:
        raise errors.DumpFileError(
            f"dump file {target} is written but its directory could not be synced: {exc.strerror}",
            path=target,
            hint="the file may not survive a crash of this host; check the file system",
        ) from exc
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

    def __init__(self, path: PathLike, *, config: Dict[str, Any], criu_version: str) -> None:
        self.path = _path_arg(path, "path")
        self._parent = os.path.dirname(os.path.abspath(self.path))
        self._tmp, self._fd = _create_temp(self.path)
        self.manifest = Manifest(
            format_version=FORMAT_VERSION,
            pycpt_version=__version__,
            criu_version=criu_version,
            kernel=os.uname().release,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            config=config,
        )
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
            raise errors.ImagesDirError(
                f"CRIU sent an image named {name!r}, which a dump file cannot carry"
            )
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
                raise errors.ImagesDirError(
                    f"images still open at the end of the dump: {open_parts}"
                )
            if not any(n.endswith(".img") for n in self._names):
                raise errors.ImagesDirError(
                    "CRIU sent no images", hint="read the CRIU log for why the dump stopped"
                )
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
            raise errors.DumpFileError(
                f"cannot write dump file {self.path}: {exc.strerror}", path=self.path
            ) from exc
        finally:
            self._pool.shutdown(wait=True)
        try:
            _fsync_dir(self._parent)
        except OSError as exc:
            raise errors.DumpFileError(
                f"dump file {self.path} is written but its directory could not be synced: "
                f"{exc.strerror}",
                path=self.path,
                hint="the file may not survive a crash of this host; check the file system",
            ) from exc
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
        raise errors.DumpFileError(
            f"image {name} is {size} bytes; a streamed dump file holds images below 8 GiB",
            hint="dump with compression instead",
        )
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
        raise errors.DumpFileError(
            f"cannot write dump file {path}: {exc.strerror}",
            path=path,
            hint="check the free space where the dump file goes"
            if exc.errno == errno.ENOSPC
            else "",
        ) from exc


def _check_target(target: str, parent: str) -> None:
    """Refuse a dump file path that is a directory or lies in a missing one."""
    if os.path.isdir(target):
        raise errors.DumpFileError(
            f"cannot write dump file {target}: it is a directory",
            path=target,
            hint="give the dump file's own path, not a directory",
        )
    if not os.path.isdir(parent):
        raise errors.DumpFileError(
            f"cannot write dump file {target}: no directory {parent}",
            path=target,
            hint=f"create {parent} first",
        )


def _create_temp(target: str) -> Tuple[str, int]:
    """A new temporary file beside `target`, mode 0600 from creation; (its path, fd)."""
    parent = os.path.dirname(os.path.abspath(target))
    _check_target(target, parent)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # 0600 from creation: the file holds process memory, not one byte may be world-readable
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot create a file in {parent}: {exc.strerror}", path=target
        ) from exc
    return tmp, fd


def _collect_parts(src: str, extra_files: Sequence[str]) -> List[str]:
    """The names to pack: regular *.img files and the extra files, sorted, each once."""
    try:
        with os.scandir(src) as it:
            names = {
                e.name for e in it if e.name.endswith(".img") and e.is_file(follow_symlinks=False)
            }
    except OSError as exc:
        raise errors.ImagesDirError(
            f"cannot read the images directory {src}: {exc.strerror}",
            hint="give the directory CRIU dumped into",
        ) from exc
    for name in extra_files:
        if not _valid_name(name):
            raise errors.InvalidArgumentError(
                f"extra file {name!r} is not a plain file name in the images directory"
            )
        try:
            st = os.lstat(os.path.join(src, name))
        except OSError as exc:
            raise errors.ImagesDirError(f"extra file {name} in {src}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise errors.ImagesDirError(f"extra file {name} in {src} is not a regular file")
        names.add(name)
    bad = sorted(n for n in names if not _valid_name(n))
    if bad:
        raise errors.ImagesDirError(
            f"{src} holds files a dump file cannot carry: {bad}",
            hint="rename or remove them; names are plain (letters, digits, ._+-)",
        )
    if not any(n.endswith(".img") for n in names):
        raise errors.ImagesDirError(
            f"{src} holds no CRIU images (*.img)", hint="give the directory CRIU dumped into"
        )
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
                    tar.addfile(info, reader)
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
