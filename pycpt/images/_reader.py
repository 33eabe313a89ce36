"""Where image files come from (a directory, a dump file, bytes) and how one is parsed.

Everything read here is untrusted: every size is checked against the bytes that are left
before anything is read or allocated, every loop advances, protobuf's own errors become
ImageError, and nothing is extracted to disk.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple, Union

from google.protobuf.message import DecodeError

from pycpt.errors import ImageError
from pycpt.images import _magic
from pycpt.images._schema import CLASSES

MAX_ENTRY = 64 << 20
"""The largest protobuf entry decoded (CRIU's biggest, mm or cgroup, are a few MiB)."""
MAX_KEPT = 256 << 20
"""How much of a compressed dump file's images is held in memory (pages images never are)."""
MAX_MEMBER = 16 << 20
"""The largest other member (manifest, signature...) read whole."""
_WINDOW = 1 << 20
_U32 = struct.Struct("<I")
_GZ_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class Counter:
    """Bytes read from the underlying files (for the cost of a summary)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.reads = 0
        self.closed = False  # set by Images.close(): the descriptors may be reused since

    def add(self, n: int) -> None:
        self.bytes += n
        self.reads += 1


# --- blobs: one image file's bytes, wherever they are ------------------------------------


class Blob:
    """An image file's bytes: `size`, and `read(offset, n)` of exactly what is asked for."""

    size: int = 0
    name: str = ""

    def read(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ImageError(
                f"reading {n} bytes runs past its end ({self.size} bytes)",
                file=self.name,
                offset=offset,
            )


class FdBlob(Blob):
    """A range of an open file (an image in a directory, or a member of an uncompressed tar)."""

    def __init__(self, name: str, fd: int, start: int, size: int, counter: Counter) -> None:
        self.name, self.fd, self.start, self.size, self.counter = name, fd, start, size, counter

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        if self.counter.closed:
            raise ImageError("cannot be read: the images were closed", file=self.name)
        try:
            data = os.pread(self.fd, n, self.start + offset)
        except OSError as exc:
            raise ImageError(
                f"cannot read: {exc.strerror}",
                file=self.name,
                offset=offset,
                hint="check the disk or file system it is on",
            ) from exc
        self.counter.add(len(data))
        if len(data) != n:
            raise ImageError(
                f"the file ended after {len(data)} of {n} bytes (truncated, or changed while read)",
                file=self.name,
                offset=offset,
            )
        return data


class LazyFileBlob(FdBlob):
    """An image in a directory, opened (relative to the directory, never following a link)
    on first read."""

    def __init__(
        self, name: str, dir_fd: int, size: int, counter: Counter, opened: List[int]
    ) -> None:
        super().__init__(name, -1, 0, size, counter)
        self.dir_fd = dir_fd
        self.opened = opened

    def read(self, offset: int, n: int) -> bytes:
        if self.fd < 0 and not self.counter.closed:
            try:
                fd = os.open(
                    self.name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                    dir_fd=self.dir_fd,
                )
            except OSError as exc:
                raise ImageError(f"cannot open: {exc.strerror}", file=self.name) from exc
            self.opened.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("is not a regular file", file=self.name)
            self.size = st.st_size
            self.fd = fd
        return super().read(offset, n)


class BytesBlob(Blob):
    """Bytes in memory."""

    def __init__(self, name: str, data: Union[bytes, memoryview], counter: Counter) -> None:
        self.name, self.data, self.size, self.counter = name, memoryview(data), len(data), counter

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        self.counter.add(n)
        return bytes(self.data[offset : offset + n])


class MissingBlob(Blob):
    """A member of a compressed dump file that was not kept in memory (a pages image)."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def read(self, offset: int, n: int) -> bytes:
        raise ImageError(
            "its bytes were not kept while the compressed dump file was read "
            "(pages images never are)",
            file=self.name,
            hint="extract the dump file (pycpt.dumpfile.extract_dump_file) and "
            "open the directory to read pages",
        )


# --- sources -----------------------------------------------------------------------------


@dataclass
class Source:
    """What was opened: the image files by name, plus the other members of a dump file."""

    kind: str  # "directory", "dumpfile", "bytes"
    path: str
    blobs: Dict[str, Blob]
    other: Dict[str, int]  # other members (marker, manifest...) -> size
    compression: Optional[str]
    fds: List[int]
    counter: Counter
    size: int  # of the directory's images, or of the dump file
    other_blobs: Dict[str, Blob] = field(default_factory=dict)  # the other members' bytes
    mtime: Optional[float] = None  # of the dump file, or of the directory's inventory.img


def open_directory(path: str, counter: Counter) -> Source:
    """The regular files of an images directory (not followed through links)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open the images directory: {exc.strerror}", file=path) from exc
    fds = [dir_fd]
    blobs: Dict[str, Blob] = {}
    other: Dict[str, int] = {}
    other_blobs: Dict[str, Blob] = {}
    total = 0
    mtime = None
    try:
        with os.scandir(dir_fd) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                total += st.st_size
                blob = LazyFileBlob(entry.name, dir_fd, st.st_size, counter, fds)
                if entry.name.endswith(".img") or _magic.kind_of(entry.name)[0] is not None:
                    blobs[entry.name] = blob
                    if entry.name == "inventory.img":
                        mtime = st.st_mtime
                else:
                    other[entry.name] = st.st_size
                    other_blobs[entry.name] = blob
    except OSError as exc:
        os.close(dir_fd)
        raise ImageError(f"cannot list the images directory: {exc.strerror}", file=path) from exc
    return Source("directory", path, blobs, other, None, fds, counter, total, other_blobs, mtime)


class _CountingFile(io.RawIOBase):
    """A read-only file whose reads are counted (tarfile reads headers through it)."""

    def __init__(self, fd: int, size: int, counter: Counter) -> None:
        self.fd, self.pos, self.size, self.counter = fd, 0, size, counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        # never more than the file holds: a header claiming gigabytes allocates nothing
        left = max(0, self.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        data = os.pread(self.fd, n, self.pos)
        self.counter.add(len(data))
        self.pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = os.pread(self.fd, len(buf), self.pos)
        self.counter.add(len(data))
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


_MAX_EXTENDED = 1 << 20
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory: refuse one bigger
    than any real header (a bomb), and sparse members (a dump file has none)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > _MAX_EXTENDED:
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError("a sparse member")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _member_name(name: str) -> Optional[str]:
    """An image member's file name: a plain name, or one under "images/"; else None."""
    if name.startswith("images/"):
        name = name[len("images/") :]
    if not name or "/" in name or name in (".", ".."):
        return None
    return name


def open_dump_file(path: str, counter: Counter) -> Source:
    """The images inside a pycpt dump file, read in place (uncompressed) or streamed once
    (gz/xz: small images kept in memory, pages images only listed)."""
    try:
        # O_NONBLOCK: a FIFO given as the dump file must not block the open (refused below)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", file=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("is neither an images directory nor a dump file", file=path)
        head = os.pread(fd, 8, 0)
        counter.add(len(head))
        raw = _CountingFile(fd, st.st_size, counter)
        if head.startswith(_GZ_MAGIC) or head.startswith(_XZ_MAGIC):
            comp = "gz" if head.startswith(_GZ_MAGIC) else "xz"
            blobs, others = _stream_tar(path, io.BufferedReader(raw, 1 << 20), comp, counter)
            os.close(fd)
            return _dump_source(path, blobs, others, comp, [], counter, st.st_size, st.st_mtime)
        blobs, others = _index_tar(path, raw, fd, st.st_size, counter)
        return _dump_source(path, blobs, others, None, [fd], counter, st.st_size, st.st_mtime)
    except OSError as exc:  # the file system failed (EIO...), not the content
        os.close(fd)
        raise ImageError(
            f"cannot read: {exc.strerror or exc}",
            file=path,
            hint="check the disk or file system it is on",
        ) from exc
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


def open_bytes(
    data: Union[bytes, bytearray, memoryview], counter: Counter, name: str = "<bytes>"
) -> Source:
    """The images inside a dump file held in memory (tar, plain or gz/xz)."""
    view = memoryview(data).cast("B")
    head = bytes(view[:8])
    if head.startswith(_GZ_MAGIC) or head.startswith(_XZ_MAGIC):
        comp = "gz" if head.startswith(_GZ_MAGIC) else "xz"
        blobs, others = _stream_tar(name, io.BytesIO(view), comp, counter)
        return _dump_source(name, blobs, others, comp, [], counter, len(view), None, "bytes")
    f = io.BytesIO(view)
    plain: Dict[str, Blob] = {}
    rest: Dict[str, Blob] = {}
    for member, image in _members(name, f, len(view)):
        blob = BytesBlob(
            image or member.name,
            view[member.offset_data : member.offset_data + member.size],
            counter,
        )
        if image is None:
            rest[member.name] = blob
        else:
            plain[image] = blob
    return _dump_source(name, plain, rest, None, [], counter, len(view), None, "bytes")


def _dump_source(
    path: str,
    blobs: Dict[str, Blob],
    others: Dict[str, Blob],
    comp: Optional[str],
    fds: List[int],
    counter: Counter,
    size: int,
    mtime: Optional[float],
    kind: str = "dumpfile",
) -> Source:
    sizes = {name: b.size for name, b in others.items()}
    return Source(kind, path, blobs, sizes, comp, fds, counter, size, others, mtime)


def from_files(files: Dict[str, Union[bytes, bytearray, memoryview]], counter: Counter) -> Source:
    """Image files given as {name: bytes}."""
    blobs: Dict[str, Blob] = {}
    for name, data in files.items():
        if not isinstance(name, str) or _member_name(name) != name:
            raise ValueError(f"image name {name!r} is not a plain file name")
        blobs[name] = BytesBlob(name, memoryview(data).cast("B"), counter)
    return Source(
        "bytes", "<files>", blobs, {}, None, [], counter, sum(b.size for b in blobs.values())
    )


# every way tarfile, gzip and lzma say that the bytes are wrong
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _members(path: str, f: IO[bytes], size: int) -> Iterator[Tuple[tarfile.TarInfo, Optional[str]]]:
    """Every regular member of a plain tar and its image name (None: not an image)."""
    seen = set()
    try:
        tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_BoundedTarInfo)
        while True:
            member = tar.next()
            if member is None:
                return
            if not member.isreg():
                continue
            if member.offset_data + member.size > size:
                raise ImageError(
                    f"member {member.name!r} runs past the end of the file (truncated)",
                    file=path,
                    offset=member.offset_data,
                )
            if member.name in seen:
                raise ImageError(
                    f"member {member.name!r} appears twice", file=path, offset=member.offset
                )
            seen.add(member.name)
            image = _member_name(member.name)
            if image is not None and not (
                image.endswith(".img") or _magic.kind_of(image)[0] is not None
            ):
                image = None
            yield member, image
    except _TAR_ERRORS as exc:
        raise ImageError(f"is not a readable tar file ({exc})", file=path) from exc


def _index_tar(
    path: str, raw: _CountingFile, fd: int, size: int, counter: Counter
) -> Tuple[Dict[str, Blob], Dict[str, Blob]]:
    blobs: Dict[str, Blob] = {}
    other: Dict[str, Blob] = {}
    for member, image in _members(path, raw, size):  # type: ignore[arg-type]
        blob = FdBlob(image or member.name, fd, member.offset_data, member.size, counter)
        if image is None:
            other[member.name] = blob
        else:
            blobs[image] = blob
    return blobs, other


def _stream_tar(
    path: str, f: IO[bytes], comp: str, counter: Counter
) -> Tuple[Dict[str, Blob], Dict[str, Blob]]:
    blobs: Dict[str, Blob] = {}
    other: Dict[str, Blob] = {}
    kept = 0
    try:
        dec: IO[bytes] = (
            gzip.GzipFile(fileobj=f, mode="rb")
            if comp == "gz"  # type: ignore[assignment]
            else lzma.LZMAFile(f, "rb")
        )
        with dec, tarfile.open(fileobj=dec, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                image = _member_name(member.name)
                if image in blobs or member.name in other:
                    raise ImageError(f"member {member.name!r} appears twice", file=path)
                is_image = image is not None and (
                    image.endswith(".img") or _magic.kind_of(image)[0] is not None
                )
                name = image if is_image and image is not None else member.name
                kind = _magic.kind_of(name)[0] if is_image else None
                if (
                    (kind is not None and kind.name == "PAGES")
                    or member.size > (MAX_ENTRY if is_image else MAX_MEMBER)
                    or kept + member.size > MAX_KEPT
                ):
                    blob: Blob = MissingBlob(name, member.size)
                else:
                    src = tar.extractfile(member)
                    assert src is not None
                    data = src.read(member.size)
                    if len(data) != member.size:
                        raise ImageError(f"member {member.name!r} is truncated", file=path)
                    kept += len(data)
                    blob = BytesBlob(name, data, Counter())
                if is_image:
                    blobs[name] = blob
                else:
                    other[member.name] = blob
    except _TAR_ERRORS as exc:
        raise ImageError(
            f"its {comp} data or tar structure cannot be read ({exc})", file=path
        ) from exc
    return blobs, other


# --- one image file ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One entry of an image: where it is, its message, and the payload after it."""

    offset: int  # of its u32 size
    message: Any
    extra_offset: int
    extra_size: int


def decode(name: str, message: str, data: bytes, offset: int) -> Any:
    """Parse `data` as `message`; ImageError on anything protobuf rejects."""
    try:
        return CLASSES[message].FromString(data)
    except (DecodeError, RuntimeError, RecursionError, ValueError, TypeError) as exc:
        raise ImageError(
            f"entry of {len(data)} bytes is not a valid {message} ({exc})", file=name, offset=offset
        ) from exc


class Window:
    """Reads of one blob through a cached window, so that many small entries cost one read."""

    def __init__(self, blob: Blob) -> None:
        self.blob = blob
        self.start = 0
        self.data = b""

    def get(self, offset: int, n: int) -> bytes:
        if offset >= self.start and offset + n <= self.start + len(self.data):
            i = offset - self.start
            return self.data[i : i + n]
        if n >= _WINDOW:
            return self.blob.read(offset, n)
        self.start = offset
        self.data = self.blob.read(offset, min(max(_WINDOW, n), self.blob.size - offset))
        return self.data[:n]


def read_magic(blob: Blob) -> Tuple[Optional[int], Optional[int]]:
    """(head magic or None, kind magic) of an image; (None, None) when it is too short."""
    if blob.size < 4:
        return None, None
    first = _U32.unpack(blob.read(0, 4))[0]
    if first in (_magic.IMG_COMMON, _magic.IMG_SERVICE):
        if blob.size < 8:
            return first, None
        return first, _U32.unpack(blob.read(4, 4))[0]
    return None, first


def records(blob: Blob, kind: _magic.Kind) -> Iterator[Record]:
    """Every entry of image `blob` of `kind`, decoded one at a time."""
    name = blob.name
    if kind.message is None or kind.layout == "raw":
        raise ImageError(f"a {kind.name} image holds no entries", file=name)
    need = 8 if kind.head_magic is not None else 4
    if blob.size < need:
        raise ImageError(
            f"is {blob.size} bytes, too short for a {kind.name} image's magic", file=name, offset=0
        )
    head, magic = read_magic(blob)
    if kind.head_magic is not None and head != kind.head_magic:
        raise ImageError(
            f"its first magic is {_hex(head)}, a {kind.name} image starts with "
            f"{_hex(kind.head_magic)}",
            file=name,
            offset=0,
        )
    if magic != kind.magic:
        raise ImageError(
            f"its magic is {_hex(magic)}, not {kind.name}'s {_hex(kind.magic)}",
            file=name,
            offset=4 if kind.head_magic is not None else 0,
        )
    pos = 8 if kind.head_magic is not None else 4
    win = Window(blob)
    size = blob.size
    index = 0
    ghost_chunks = False
    while pos < size:
        message = kind.message
        if kind.layout == "pagemap" and index == 0:
            message = "pagemap_head"
        elif kind.layout == "ghost" and index > 0:
            message = "ghost_chunk_entry"
        msg, after = _entry(win, name, message, pos, size)
        extra = 0
        if kind.layout == "extra":
            extra = _magic.extra_size(kind.name, msg)
        elif kind.layout == "ghost":
            if index == 0:
                ghost_chunks = bool(msg.chunks)
                extra = 0 if ghost_chunks else size - after  # the content follows whole
            else:
                extra = int(msg.len)
        elif kind.layout == "ipc_msg":
            extra = _ipc_messages(win, name, int(msg.qnum), after, size)
        if extra > size - after:
            raise ImageError(
                f"entry {index} ({message}) declares {extra} payload bytes, "
                f"only {size - after} are left",
                file=name,
                offset=pos,
            )
        yield Record(pos, msg, after, extra)
        pos = after + extra
        index += 1
        if kind.layout == "ghost" and not ghost_chunks:
            break


def _entry(win: Window, name: str, message: str, pos: int, size: int) -> Tuple[Any, int]:
    if size - pos < 4:
        raise ImageError(
            f"{size - pos} stray bytes where an entry's size should be (truncated)",
            file=name,
            offset=pos,
        )
    n = _U32.unpack(win.get(pos, 4))[0]
    left = size - pos - 4
    if n > left:
        raise ImageError(
            f"entry claims {n} bytes, only {left} are left (truncated or corrupt)",
            file=name,
            offset=pos,
        )
    if n > MAX_ENTRY:
        raise ImageError(
            f"entry claims {n} bytes, more than the {MAX_ENTRY} this reader decodes",
            file=name,
            offset=pos,
        )
    return decode(name, message, win.get(pos + 4, n), pos), pos + 4 + n


def _ipc_messages(win: Window, name: str, qnum: int, pos: int, size: int) -> int:
    """Bytes taken by a message queue's messages (each a u32 size, an ipc_msg and its text
    padded to 8 bytes)."""
    start = pos
    for _ in range(qnum):
        if pos >= size:
            raise ImageError(
                f"the queue declares {qnum} messages; the image ends before them",
                file=name,
                offset=pos,
            )
        msg, pos = _entry(win, name, "ipc_msg", pos, size)
        text = _magic.round_up(int(msg.msize), 8)
        if text > size - pos:
            raise ImageError(
                f"a queued message of {msg.msize} bytes runs past the end", file=name, offset=pos
            )
        pos += text
    return pos - start


def _hex(v: Optional[int]) -> str:
    return "none" if v is None else f"{v:#010x}"
