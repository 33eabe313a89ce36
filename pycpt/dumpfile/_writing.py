"""Writing a dump file (format 2): all at once from an images directory (write_dump_file),
or while CRIU streams its images (DumpFileWriter). Each 1 MiB chunk of a part is hashed
(BLAKE3) on a pool thread while the next one is read, the manifest is signed with this
host's key, and the file appears at its path complete and fsynced, or not at all."""

from __future__ import annotations

import datetime
import errno
import gzip
import lzma
import os
import secrets
import socket
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

import blake3

from pycpt import errors
from pycpt._typing import PathLike
from pycpt._version import __version__
from pycpt.dumpfile import _keys, _tar
from pycpt.dumpfile._arguments import _path_arg
from pycpt.dumpfile._config import check_config
from pycpt.dumpfile._manifest import (
    CHUNK_SIZE,
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    SIGNATURE_NAME,
    Manifest,
    Part,
    valid_name,
)

_STREAM_AT = 1 << 20  # a streamed part held in memory up to this size, then written through
_GZ_LEVEL = 6  # gzip's own default: level 9 costs far more time for little on memory pages
_XZ_PRESET = 6
MARKER = b"PYCPT-DUMP %d\n" % FORMAT_VERSION

Data = Union[bytes, bytearray, memoryview]


def _new_manifest(config: Dict[str, Any], criu_version: str, compress: Optional[str]) -> Manifest:
    if not isinstance(criu_version, str):
        raise errors.InvalidArgumentError(
            f"criu_version must be a str, not {type(criu_version).__name__}"
        )
    return Manifest(
        format_version=FORMAT_VERSION,
        pycpt_version=__version__,
        criu_version=criu_version[:256],
        kernel=os.uname().release[:256],
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=socket.gethostname()[:255],
        config=check_config(config),  # pycpt never signs a config it would refuse to read
        compression=compress,
    )


def _signer(keys: Optional[_keys.Keys]) -> Any:
    """This host's key, loaded (or made) before anything is written: a key problem fails
    the dump before CRIU runs."""
    if keys is not None and not isinstance(keys, _keys.Keys):
        raise errors.InvalidArgumentError(
            f"keys must be a pycpt.dumpfile.Keys, not {type(keys).__name__}"
        )
    return (keys or _keys.Keys()).host_key()


def write_dump_file(
    path: PathLike,
    images_dir: PathLike,
    *,
    config: Dict[str, Any],
    criu_version: str,
    compress: Optional[str] = None,
    extra_files: Sequence[str] = (),
    keys: Optional[_keys.Keys] = None,
) -> Manifest:
    """Pack the CRIU images in `images_dir` and a signed manifest into the dump file `path`.

    Takes the regular `*.img` files of `images_dir` plus `extra_files` (names of other files
    there, e.g. a log); skips everything else. `config` (a container config, see
    check_config) and `criu_version` go into the manifest, which is signed with the host key
    of `keys` (default: the state directory's). `compress` is None, "gz" or "xz". The file
    appears at `path` complete and fsynced, mode 0600, or not at all: an existing file there
    is replaced only on success. Returns the manifest written.

    Raises ValueError on bad arguments, ImagesDirError when an image cannot be read,
    HostKeyError when the host key cannot be used, and DumpFileError when the file cannot
    be written.
    """
    target = _path_arg(path, "path")
    src = _path_arg(images_dir, "images_dir")
    if compress not in COMPRESSIONS:
        raise errors.InvalidArgumentError(f"compress must be None, 'gz' or 'xz', not {compress!r}")
    if not isinstance(config, dict):
        raise errors.InvalidArgumentError(f"config must be a dict, not {type(config).__name__}")
    if isinstance(extra_files, (str, bytes)) or not all(isinstance(n, str) for n in extra_files):
        raise errors.InvalidArgumentError("extra_files must be a sequence of file names (str)")
    manifest = _new_manifest(config, criu_version, compress)
    key = _signer(keys)
    names = _collect_parts(src, extra_files)
    parent = os.path.dirname(os.path.abspath(target))
    tmp, fd = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            with ThreadPoolExecutor(1, thread_name_prefix="pycpt-blake3") as pool:
                _write_archive(f, src, names, manifest, key, pool)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(target, exc) from exc
        raise
    _sync_parent(target, parent)
    return manifest


class _ChunkHasher:
    """The BLAKE3 digest of each chunk of one part, computed on a pool thread one chunk
    behind the copy (blake3 drops the GIL), so hashing runs on the other core."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._digests: List[bytes] = []
        self._pending: Optional["Future[bytes]"] = None
        self._partial = bytearray()

    def update(self, data: Data) -> None:
        """Hash `data` after what came before; a whole chunk is hashed in place, so `data`
        must stay unchanged until the next update() or digests()."""
        view = memoryview(data).cast("B")
        if self._partial:
            take = min(CHUNK_SIZE - len(self._partial), len(view))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) == CHUNK_SIZE:
                self._submit(bytes(self._partial))
                self._partial = bytearray()
        while len(view) >= CHUNK_SIZE:
            self._submit(view[:CHUNK_SIZE])
            view = view[CHUNK_SIZE:]
        if len(view):
            self._partial += view

    def _submit(self, chunk: Data) -> None:
        self.wait()
        self._pending = self._pool.submit(_digest, chunk)

    def wait(self) -> None:
        """Block until every whole chunk given so far is hashed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._digests.append(pending.result())

    def digests(self) -> bytes:
        """The concatenated digests of every chunk (the last one may be short)."""
        if self._partial:
            self._submit(bytes(self._partial))
            self._partial = bytearray()
        self.wait()
        return b"".join(self._digests)


def _digest(chunk: Data) -> bytes:
    return blake3.blake3(chunk).digest()


class StreamedPart:
    """One image arriving in pieces (from CRIU's image streamer); see DumpFileWriter."""

    def __init__(self, name: str, pool: ThreadPoolExecutor) -> None:
        self.name = name
        self.size = 0
        self.hasher = _ChunkHasher(pool)
        self.done = False
        self.chunks: List[bytes] = []  # held in memory until it is written out
        self.held = 0
        self.header_at = -1  # where its tar header is, once it streams into the file
        self.digests = b""


class DumpFileWriter:
    """An uncompressed format 2 dump file written while its images arrive, several at a time.

    A part is held in memory until it ends, and then written whole, unless it grows past
    1 MiB while no other part streams: then it owns the end of the file and its bytes go
    straight there (its tar header is written with size 0 and rewritten once its size is
    known: octal below 8 GiB, base-256 above). CRIU sends a small pagemap beside each big
    pages image, so the pages stream and the pagemap waits. Every chunk is hashed on a pool
    thread while the next is read. commit() adds the signed manifest (the last members:
    their hashes are known only now) and makes the file appear at `path` as
    write_dump_file() does; abort() removes the temporary file. Thread-safe.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        config: Dict[str, Any],
        criu_version: str,
        keys: Optional[_keys.Keys] = None,
    ) -> None:
        self.path = _path_arg(path, "path")
        self.manifest = _new_manifest(config, criu_version, None)
        self._key = _signer(keys)
        self._parent = os.path.dirname(os.path.abspath(self.path))
        self._tmp, self._fd = _create_temp(self.path)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="pycpt-blake3")
        self._offset = 0
        self._owner: Optional[StreamedPart] = None
        self._finished: List[StreamedPart] = []  # ended while another part streamed
        self._names: Dict[str, StreamedPart] = {}
        self._append(_tar.member(MARKER_NAME, MARKER, int(time.time())))

    def open_part(self, name: str) -> StreamedPart:
        """A new part `name` (a plain file name, once per file)."""
        if not valid_name(name):
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
        part.hasher.update(data)
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
        part.digests = part.hasher.digests()
        with self._lock:
            part.done = True
            if part is self._owner:
                self._end_owner()
            elif self._owner is None:
                self._write_whole(part)
            else:
                self._finished.append(part)

    def commit(self) -> Manifest:
        """Every part is closed: add the signed manifest, fsync, rename into place. Returns
        the manifest."""
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
                self.manifest.parts.append(Part(part.name, part.size, part.digests))
            self._append(_signed_manifest(self.manifest, self._key))
            self._append(_tar.end(self._offset))
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from exc
        finally:
            self._pool.shutdown(wait=True)
        _sync_parent(self.path, self._parent)
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
        self._append(_tar.header(part.name, 0, int(time.time())))
        for chunk in part.chunks:
            self._append(chunk)
        part.chunks, part.held = [], 0
        self._owner = part

    def _end_owner(self) -> None:
        part = self._owner
        assert part is not None
        self._append(bytes(_tar.padding(part.size)))
        header = _tar.header(part.name, part.size, int(time.time()))
        _pwrite_all(self._fd, header, part.header_at, self.path)
        self._owner = None
        for done in self._finished:
            self._write_whole(done)
        self._finished = []
        growing = [p for p in self._names.values() if not p.done and p.held >= _STREAM_AT]
        if growing:
            self._own(max(growing, key=lambda p: p.held))

    def _write_whole(self, part: StreamedPart) -> None:
        self._append(_tar.header(part.name, part.size, int(time.time())))
        for chunk in part.chunks:
            self._append(chunk)
        self._append(bytes(_tar.padding(part.size)))
        part.chunks, part.held = [], 0

    def _append(self, data: Data) -> None:
        _pwrite_all(self._fd, data, self._offset, self.path)
        self._offset += len(data)


def _signed_manifest(manifest: Manifest, key: Any) -> bytes:
    """The manifest.json and manifest.sig members."""
    raw = manifest.to_bytes()
    now = int(time.time())
    return _tar.member(MANIFEST_NAME, raw, now) + _tar.member(
        SIGNATURE_NAME, _keys.sign(key, raw), now
    )


def _pwrite_all(fd: int, data: Data, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as exc:
        raise _write_error(path, exc) from exc


def _write_error(path: str, exc: OSError) -> errors.DumpFileError:
    return errors.DumpFileError(
        f"cannot write dump file {path}: {exc.strerror or exc}",
        path=path,
        hint="check the free space where the dump file goes"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "",
    )


def _sync_parent(target: str, parent: str) -> None:
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise errors.DumpFileError(
            f"dump file {target} is written but its directory could not be synced: {exc.strerror}",
            path=target,
            hint="the file may not survive a crash of this host; check the file system",
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
        if not valid_name(name):
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
    bad = sorted(n for n in names if not valid_name(n))
    if bad:
        raise errors.ImagesDirError(
            f"{src} holds files a dump file cannot carry: {bad}",
            hint="rename or remove them; names are plain (letters, digits, ._+-), at most "
            "100 characters",
        )
    if not any(n.endswith(".img") for n in names):
        raise errors.ImagesDirError(
            f"{src} holds no CRIU images (*.img)", hint="give the directory CRIU dumped into"
        )
    return sorted(names)


def _open_image(src: str, name: str) -> IO[bytes]:
    p = os.path.join(src, name)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.ImagesDirError(f"cannot open {p}: {exc.strerror}") from exc
    f = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise errors.ImagesDirError(f"{p} is not a regular file")
    return f


def _copy_part(
    src: str, name: str, out: Any, hasher: _ChunkHasher, buffers: List[memoryview]
) -> int:
    """Read image `name` chunk by chunk into `out` (a writable file, or None), each chunk
    hashed on the pool while the next is read; returns its size."""
    size = 0
    turn = 0
    with _open_image(src, name) as f:
        while True:
            try:
                n = f.readinto(buffers[turn])  # type: ignore[attr-defined]
            except OSError as exc:
                raise errors.ImagesDirError(f"cannot read {src}/{name}: {exc.strerror}") from exc
            if not n:
                break
            chunk = buffers[turn][:n]
            hasher.update(chunk)  # the buffer is refilled only after the next update()
            if out is not None:
                out.write(chunk)
            size += n
            turn ^= 1
    hasher.wait()
    return size


def _write_archive(
    f: IO[bytes],
    src: str,
    names: List[str],
    manifest: Manifest,
    key: Any,
    pool: ThreadPoolExecutor,
) -> None:
    buffers = [memoryview(bytearray(CHUNK_SIZE)) for _ in range(2)]
    now = int(time.time())
    if manifest.compression is None:
        # one pass: the parts, then the manifest, whose hashes are known only then
        f.write(_tar.member(MARKER_NAME, MARKER, now))
        for name in names:
            header_at = f.tell()
            f.write(_tar.header(name, 0, now))
            hasher = _ChunkHasher(pool)
            size = _copy_part(src, name, f, hasher, buffers)
            f.write(bytes(_tar.padding(size)))
            end = f.tell()
            f.seek(header_at)
            f.write(_tar.header(name, size, now))
            f.seek(end)
            manifest.parts.append(Part(name, size, hasher.digests()))
        f.write(_signed_manifest(manifest, key))
        f.write(_tar.end(f.tell()))
        return
    # compressed: the signed manifest must come first (the reader checks it before it
    # decompresses one byte of a part), so every part is hashed first, then compressed
    for name in names:
        hasher = _ChunkHasher(pool)
        size = _copy_part(src, name, None, hasher, buffers)
        manifest.parts.append(Part(name, size, hasher.digests()))
    comp: Any
    if manifest.compression == "gz":
        comp = gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=_GZ_LEVEL, mtime=0)
    else:
        comp = lzma.LZMAFile(f, "wb", preset=_XZ_PRESET)
    with comp:
        offset = 0

        def put(data: Data) -> None:
            nonlocal offset
            comp.write(data)
            offset += len(data)

        put(_tar.member(MARKER_NAME, MARKER, now))
        put(_signed_manifest(manifest, key))
        for part in manifest.parts:
            put(_tar.header(part.name, part.size, now))
            hasher = _ChunkHasher(pool)
            if _copy_part(src, part.name, comp, hasher, buffers) != part.size or (
                hasher.digests() != part.chunks
            ):
                raise errors.ImagesDirError(f"{src}/{part.name} changed while it was packed")
            offset += part.size
            put(bytes(_tar.padding(part.size)))
        put(_tar.end(offset))
