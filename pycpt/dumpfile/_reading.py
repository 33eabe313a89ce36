"""Reading a dump file: trust first, then every byte checked before it is used.

DumpFile.open() checks, in this order, before one byte of any part is read: the marker (a
foreign or newer file is said so), the archive's structure (uncompressed: every header,
without reading the data; compressed: the marker, manifest and signature come first), the
signature (this host's key or a trusted one, unless the caller vouches for the file), the
manifest (strictly), the config (its schema), and that the members are exactly the parts
the manifest lists, each of its size. After that every read goes through the chunk hashes:
read_part() and chunks() hand out only bytes whose chunk matched, extract() writes only
checked chunks and never more than the manifest declares.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import gzip
import lzma
import os
import re
import stat
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Deque, Dict, Iterator, List, Optional, Tuple

import blake3

from pycpt import errors
from pycpt._typing import PathLike
from pycpt.dumpfile import _format1, _keys, _tar
from pycpt.dumpfile._arguments import _path_arg
from pycpt.dumpfile._config import check_config
from pycpt.dumpfile._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    MAX_MANIFEST,
    MAX_PARTS,
    SIGNATURE_NAME,
    Manifest,
    Part,
    valid_name,
)

_MARKER_RE = re.compile(rb"PYCPT-DUMP (\d{1,9})\n\Z")
_GZ_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_MAX_MARKER = 64
_AHEAD = 4  # chunks read and hashed ahead of the one being used
_PAGES = re.compile(r"pages-\d+\.img\Z")  # process memory: streamed, never held whole
SMALL_PART = 16 << 20
SMALL_PARTS = 256 << 20


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """Who signed a dump file, as this host sees it (`signature_of`, `DumpFile.signature`).

    `signed` is False for a format 1 file (no signature); then the key fields are "".
    `comment` is how this host knows the key ("this host", its trusted_keys comment) or ""
    when it does not trust it. `valid` says whether the signature verifies over the
    manifest's bytes."""

    format_version: int
    signed: bool
    key_line: str = ""
    fingerprint: str = ""
    comment: str = ""
    trusted: bool = False
    valid: bool = False

    def describe(self) -> str:
        """ "signed by SHA256:... (this host)", "signed by an untrusted key SHA256:...",
        "unsigned (format 1)" ..."""
        if not self.signed:
            return f"unsigned (format {self.format_version})"
        if not self.valid:
            return f"signature by {self.fingerprint} does not match its manifest"
        if self.trusted:
            return f"signed by {self.fingerprint} ({self.comment})"
        return f"signed by an untrusted key {self.fingerprint}"


@dataclasses.dataclass
class _Member:
    name: str
    offset: int  # of its data
    size: int


class DumpFile:
    """An open dump file whose signature (or the caller's word) and structure are checked.

    Use DumpFile.open(); close() (or `with`) releases the file. `manifest` is the parsed
    manifest (its config checked against the schema), `signature` who signed it, `offsets`
    where each part's bytes are ({name: (offset, size)}, uncompressed files only).
    """

    def __init__(
        self,
        path: str,
        raw: IO[bytes],
        manifest: Manifest,
        signature: SignatureInfo,
        compression: Optional[str],
        offsets: Dict[str, Tuple[int, int]],
        stream: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.signature = signature
        self.compression = compression
        self.offsets = offsets
        self._raw = raw
        self._stream = stream  # compressed: the decompressor, just after the signature
        self._pool: Optional[ThreadPoolExecutor] = None

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        trust_dumpfile: bool = False,
        keys: Optional[_keys.Keys] = None,
        check_trust: bool = True,
    ) -> "DumpFile":
        """Open dump file `path` and check it as far as it can be without reading its parts.

        A format 2 file must be signed by this host's key or a key in its trusted_keys
        (`keys`, default the state directory's), else DumpFileUntrustedError; a format 1
        file has no signature: DumpFileUnsignedError. trust_dumpfile=True skips this trust
        decision only (DANGEROUS: the file then runs as root whatever it holds); hashes,
        structure, caps and the config's schema still apply. check_trust=False only reads
        who signed it (for inspection), deciding nothing.

        Raises DumpFileNotFoundError, DumpFileForeignError, DumpFileTooNewError,
        DumpFileCorruptError (damaged), DumpFileUntrustedError / DumpFileUnsignedError, or
        DumpFileRefusedError (a config that breaks the schema).
        """
        src = _path_arg(path, "path")
        raw = _open_file(src)
        try:
            return _Opener(src, raw, trust_dumpfile, keys, check_trust).run()
        except BaseException:
            raw.close()
            raise

    def close(self) -> None:
        """Release the file (and the threads reading it). Idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._raw.close()

    def __enter__(self) -> "DumpFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config(self) -> Dict[str, Any]:
        """The container config of the manifest, checked against the schema."""
        return self.manifest.config

    def _corrupt(self, why: str) -> errors.DumpFileCorruptError:
        return errors.DumpFileCorruptError(
            f"dump file {self.path} is damaged: {why}", path=self.path
        )

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="pycpt-verify")
        return self._pool

    def _served_in_place(self, name: str) -> Tuple[Part, int]:
        if self.compression is not None or self.manifest.format_version != FORMAT_VERSION:
            raise errors.DumpFileError(
                f"dump file {self.path} cannot be read in place "
                f"({self.compression or 'format 1'}): extract it",
                path=self.path,
            )
        part = self.manifest.part(name)
        if part is None:
            raise KeyError(f"no part {name} in {self.path}")
        return part, self.offsets[name][0]

    # --- reading in place (uncompressed format 2) ----------------------------------------

    def read_part(self, name: str) -> bytes:
        """Part `name` whole, every chunk checked (meant for the small parts)."""
        part, offset = self._served_in_place(name)
        data = bytearray(part.size)
        view = memoryview(data)
        cs = self.manifest.chunk_size
        self._read_into(view, offset, name)
        for i in range(part.chunk_count):
            if blake3.blake3(view[i * cs : (i + 1) * cs]).digest() != part.digest(i):
                raise self._corrupt(f"part {name} does not match its hash (chunk {i})")
        return bytes(data)

    def read_small_parts(
        self, each: int = SMALL_PART, budget: int = SMALL_PARTS
    ) -> Dict[str, bytes]:
        """Every part but the memory pages (pages-N.img) up to `each` bytes, smallest first
        while they fit in `budget` bytes, read whole and checked: what a restore serves
        from memory and what the checks of the images (check_restorable) read."""
        held: Dict[str, bytes] = {}
        total = 0
        for part in sorted(self.manifest.parts, key=lambda p: (p.size, p.name)):
            if _PAGES.match(part.name) or part.size > each or total + part.size > budget:
                continue
            held[part.name] = self.read_part(part.name)
            total += part.size
        return held

    def chunks(self, name: str, ahead: int = _AHEAD) -> Iterator[memoryview]:
        """Part `name` chunk by chunk, each read into a private buffer and checked against its
        hash before it is handed out (pool threads read and hash `ahead` chunks ahead).
        A chunk handed out stays valid until the next one is asked for. A mismatch raises
        DumpFileCorruptError before the bad chunk is handed out."""
        part, offset = self._served_in_place(name)
        cs = self.manifest.chunk_size
        n = part.chunk_count
        pool = self._threads()
        buffers = [memoryview(bytearray(cs)) for _ in range(min(ahead, n) + 1)]
        pending: Deque["Future[memoryview]"] = collections.deque()

        def load(i: int) -> memoryview:
            length = min(cs, part.size - i * cs)
            view = buffers[i % len(buffers)][:length]
            self._read_into(view, offset + i * cs, name)
            if blake3.blake3(view).digest() != part.digest(i):
                raise self._corrupt(f"part {name} does not match its hash (chunk {i})")
            return view

        for i in range(min(ahead, n)):
            pending.append(pool.submit(load, i))
        try:
            for i in range(n):
                view = pending.popleft().result()
                if i + ahead < n:  # into the buffer of chunk i - 1, which is done with
                    pending.append(pool.submit(load, i + ahead))
                yield view
        finally:
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    try:
                        future.result()
                    except BaseException:
                        pass

    def verify(self) -> None:
        """Check every part's every chunk (both cores); DumpFileCorruptError on a mismatch."""
        if self.compression is not None or self.manifest.format_version != FORMAT_VERSION:
            self._verify_by_reading()
            return
        for part in self.manifest.parts:
            for _ in self.chunks(part.name):
                pass

    def _verify_by_reading(self) -> None:
        if self.manifest.format_version != FORMAT_VERSION:
            _format1.verify(self.path, self._raw)
            return
        self._extract_stream(None, [])

    def _read_into(self, view: memoryview, offset: int, name: str) -> None:
        fd = self._raw.fileno()
        got = 0
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise self._corrupt(f"it is truncated inside {name}")
                got += n
        except OSError as exc:
            raise _read_error(self.path, exc) from exc

    # --- extracting ----------------------------------------------------------------------

    def extract(self, dest_dir: PathLike) -> None:
        """Write every part into `dest_dir` (empty or new; made 0700), each chunk checked
        before it is written and never more than the manifest declares: a member the
        manifest does not list, or longer than listed, stops it at once (a gzip bomb stops
        within one chunk of its declaration). First checks that the declared sizes fit
        the free space there and this host's memory. On any failure everything extracted
        is removed again (and `dest_dir`, if this call made it). Once per DumpFile for a
        compressed file."""
        dest = _path_arg(dest_dir, "dest_dir")
        created = _make_dest(dest)
        written: List[str] = []
        try:
            self._check_space(dest)
            if self.manifest.format_version != FORMAT_VERSION:
                _format1.extract(self.path, self._raw, dest, written, self.manifest)
            elif self.compression is not None:
                self._extract_stream(dest, written)
            else:
                for part in self.manifest.parts:
                    with _create_part(dest, part.name, self.path, written) as out:
                        for chunk in self.chunks(part.name):
                            _write_all(out, chunk, self.path)
        except BaseException:
            for p in written:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            if created:
                try:
                    os.rmdir(dest)
                except OSError:
                    pass
            raise

    def _check_space(self, dest: str) -> None:
        need = self.manifest.size
        try:
            st = os.statvfs(dest)
        except OSError as exc:
            raise errors.ImagesDirError(f"cannot look at {dest}: {exc.strerror}") from exc
        free = st.f_bavail * st.f_frsize
        if need + need // 100 > free:
            raise errors.DumpFileError(
                f"dump file {self.path} declares {need} bytes of images; {dest} has {free} free",
                path=self.path,
                hint="free space there, or restore from an uncompressed file (served in place)",
            )
        limit = _memory_bound()
        if limit and need > limit:
            raise errors.DumpFileRefusedError(
                f"dump file {self.path} declares {need} bytes of images, more than twice this "
                f"host's memory and swap ({limit // 2} bytes): no container it could hold",
                path=self.path,
                rule="size",
            )

    def _extract_stream(self, dest: Optional[str], written: List[str]) -> None:
        """The compressed file's parts, in order after the signature: each checked against
        the manifest (listed, its size) before one byte of it is decompressed."""
        stream = self._stream
        if stream is None:
            raise errors.DumpFileError(
                f"dump file {self.path} was read already; open it again", path=self.path
            )
        self._stream = None
        listed = {p.name: p for p in self.manifest.parts}
        cs = self.manifest.chunk_size
        try:
            seen = set()
            while True:
                head = _read_block(stream, self._corrupt)
                entry = self._parse(head)
                if entry is None:
                    break
                name, size = entry
                if name in seen or name in (MARKER_NAME, MANIFEST_NAME, SIGNATURE_NAME):
                    raise self._corrupt(f"member {name[:60]!r} appears twice")
                if not valid_name(name):
                    raise self._corrupt(f"member {name[:60]!r} is not a plain file name")
                part = listed.get(name)
                if part is None:
                    raise self._corrupt(f"member {name!r} is not in its manifest")
                if size != part.size:
                    raise self._corrupt(
                        f"member {name} has {size} bytes, its manifest says {part.size}"
                    )
                seen.add(name)
                out = _create_part(dest, name, self.path, written) if dest else None
                try:
                    for i in range(part.chunk_count):
                        chunk = stream.read(min(cs, size - i * cs))
                        if len(chunk) != min(cs, size - i * cs):
                            raise self._corrupt(f"it is truncated inside {name}")
                        if blake3.blake3(chunk).digest() != part.digest(i):
                            raise self._corrupt(f"part {name} does not match its hash (chunk {i})")
                        if out is not None:
                            _write_all(out.fileno(), memoryview(chunk), self.path)
                finally:
                    if out is not None:
                        out.close()
                pad = _tar.padding(size)
                if pad and stream.read(pad) != bytes(pad):
                    raise self._corrupt(f"the padding after {name} is damaged or truncated")
            missing = sorted(set(listed) - seen)
            if missing:
                raise self._corrupt(f"part {missing[0]} of its manifest is missing")
            # the second zero block, zeros to the end of the record, and then the end of
            # the compressed stream (which checks its CRC)
            rest = stream.read(_tar.RECORD + 1)
            if len(rest) < _tar.BLOCK:
                raise self._corrupt("it is truncated at its end")
            if any(rest) or len(rest) > _tar.RECORD or stream.read(1):
                raise self._corrupt("there is data after the end of its archive")
        except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
            raise self._corrupt(f"its {self.compression} data cannot be read ({exc})") from exc
        except OSError as exc:
            raise _read_error(self.path, exc) from exc
        finally:
            stream.close()

    def _parse(self, block: bytes) -> Optional[Tuple[str, int]]:
        try:
            return _tar.parse_header(block)
        except ValueError as exc:
            raise self._corrupt(str(exc)) from None


class _Opener:
    """DumpFile.open()'s steps, in the order the module docstring gives."""

    def __init__(
        self,
        path: str,
        raw: IO[bytes],
        trust_dumpfile: bool,
        keys: Optional[_keys.Keys],
        check_trust: bool,
    ) -> None:
        self.path = path
        self.raw = raw
        self.trust_dumpfile = trust_dumpfile
        self.keys = keys
        self.check_trust = check_trust
        self.compression: Optional[str] = None

    def corrupt(self, why: str) -> errors.DumpFileCorruptError:
        return errors.DumpFileCorruptError(
            f"dump file {self.path} is damaged: {why}", path=self.path
        )

    def run(self) -> DumpFile:
        try:
            return self._run()
        except OSError as exc:
            if isinstance(exc, gzip.BadGzipFile) or exc.errno is None:
                raise self.corrupt(f"its {self.compression} data cannot be read ({exc})") from exc
            raise _read_error(self.path, exc) from exc
        except (EOFError, zlib.error, lzma.LZMAError) as exc:
            raise self.corrupt(f"its {self.compression} data cannot be read ({exc})") from exc

    def _run(self) -> DumpFile:
        head = self.raw.read(len(_XZ_MAGIC))
        self.raw.seek(0)
        if len(head) < len(_XZ_MAGIC) and (
            _GZ_MAGIC.startswith(head) or _XZ_MAGIC.startswith(head)
        ):
            raise self.corrupt(f"it is truncated after {len(head)} bytes")
        stream: Any = self.raw
        if head.startswith(_GZ_MAGIC):
            self.compression = "gz"
            stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif head.startswith(_XZ_MAGIC):
            self.compression = "xz"
            stream = lzma.LZMAFile(self.raw, "rb")
        try:
            version = self._marker(stream)
            if version == 1:
                return self._format1()
            if self.compression:
                return self._compressed(stream)
            stream = None
            return self._uncompressed()
        except BaseException:
            if stream is not None and stream is not self.raw:
                stream.close()
            raise

    def _marker(self, stream: Any) -> int:
        """The format version the marker gives; a foreign file is said so at its first
        bytes, a newer format before anything else is read."""
        head = stream.read(_tar.BLOCK)
        want = MARKER_NAME.encode() + b"\0"
        if not head.startswith(want):
            if want.startswith(head):
                raise self.corrupt(f"it is truncated after {len(head)} bytes")
            kind = f"{self.compression}-compressed data" if self.compression else "data"
            raise errors.DumpFileForeignError(
                f"{self.path} is not a pycpt dump file ({kind} without the {MARKER_NAME} marker)",
                path=self.path,
            )
        if len(head) < _tar.BLOCK:
            raise self.corrupt(f"it is truncated after {len(head)} bytes")
        try:
            size = int(head[124:135], 8)  # leniently: format 1's header came from tarfile
        except ValueError:
            raise self.corrupt("its marker's tar header is damaged") from None
        if size > _MAX_MARKER:
            raise self.corrupt("its first member is not a valid pycpt marker")
        data = stream.read(_tar.BLOCK)
        marker = data[:size]
        m = _MARKER_RE.match(marker)
        if len(data) < size or not m or int(m.group(1)) < 1:
            raise self.corrupt(f"its marker {marker!r} is not valid")
        version = int(m.group(1))
        if version > FORMAT_VERSION:
            raise errors.DumpFileTooNewError(
                f"dump file {self.path} has format {version}; this pycpt reads formats up to "
                f"{FORMAT_VERSION}",
                path=self.path,
                format_version=version,
                supported=FORMAT_VERSION,
            )
        if version == FORMAT_VERSION:
            # format 2's own header rules, from its first member on
            entry = self._parse(head)
            if entry != (MARKER_NAME, size) or any(data[size:]):
                raise self.corrupt("its marker member is damaged")
        return version

    def _parse(self, block: bytes) -> Optional[Tuple[str, int]]:
        try:
            return _tar.parse_header(block)
        except ValueError as exc:
            raise self.corrupt(str(exc)) from None

    def _format1(self) -> DumpFile:
        if self.check_trust and not self.trust_dumpfile:
            raise errors.DumpFileUnsignedError(
                f"dump file {self.path} has format 1, which carries no signature: pycpt "
                "restores it only with --trust-dumpfile",
                path=self.path,
            )
        manifest = _format1.read(self.path, self.raw)
        manifest.config = self._config(manifest)
        return DumpFile(
            self.path, self.raw, manifest, SignatureInfo(1, False), manifest.compression, {}
        )

    def _uncompressed(self) -> DumpFile:
        """Walk the headers (never the data) from the first member to the end."""
        fd = self.raw.fileno()
        total = os.fstat(fd).st_size
        members: List[_Member] = []
        offset = _tar.BLOCK * 2  # after the marker, checked already
        while True:
            if len(members) > MAX_PARTS + 2:
                raise self.corrupt(f"it has more than {MAX_PARTS} parts")
            block = os.pread(fd, _tar.BLOCK, offset)
            entry = self._parse(block)
            if entry is None:
                break
            name, size = entry
            data = offset + _tar.BLOCK
            after = data + size + _tar.padding(size)
            if after > total:
                raise self.corrupt(f"it is truncated inside {name[:60]}")
            members.append(_Member(name, data, size))
            offset = after
        tail = total - offset
        if tail > _tar.RECORD + _tar.BLOCK or any(os.pread(fd, tail, offset)):
            raise self.corrupt("there is data after the end of its archive")
        if tail < 2 * _tar.BLOCK or total % _tar.RECORD:
            raise self.corrupt("it is truncated at its end")
        names = [m.name for m in members]
        if names[:2] == [MANIFEST_NAME, SIGNATURE_NAME]:
            meta, parts = members[:2], members[2:]
        elif names[-2:] == [MANIFEST_NAME, SIGNATURE_NAME]:
            meta, parts = members[-2:], members[:-2]
        else:
            raise self.corrupt("its manifest and signature are not where format 2 has them")
        for m, limit in zip(meta, (MAX_MANIFEST, _keys.MAX_SIGNATURE), strict=True):
            if m.size > limit:
                raise self.corrupt(f"its {m.name} claims {m.size} bytes")
        manifest_bytes = os.pread(fd, meta[0].size, meta[0].offset)
        sig = os.pread(fd, meta[1].size, meta[1].offset)
        self._padding_is_zero(fd, members)
        signature = self._trust(sig, manifest_bytes)
        manifest = self._manifest(manifest_bytes)
        self._check_members(manifest, [(m.name, m.size) for m in parts])
        offsets = {m.name: (m.offset, m.size) for m in parts}
        return DumpFile(self.path, self.raw, manifest, signature, None, offsets)

    def _padding_is_zero(self, fd: int, members: List[_Member]) -> None:
        for m in members:
            pad = _tar.padding(m.size)
            if pad and any(os.pread(fd, pad, m.offset + m.size)):
                raise self.corrupt(f"the padding after {m.name} is damaged")

    def _compressed(self, stream: Any) -> DumpFile:
        """Marker, manifest and signature come first: read them, nothing else, and decide."""
        got = []
        for name, limit in ((MANIFEST_NAME, MAX_MANIFEST), (SIGNATURE_NAME, _keys.MAX_SIGNATURE)):
            entry = self._parse(_read_block(stream, self.corrupt))
            if entry is None or entry[0] != name:
                raise self.corrupt(
                    f"its member after the {'marker' if name == MANIFEST_NAME else 'manifest'} "
                    f"is not {name} (a compressed file carries its signed manifest first)"
                )
            if entry[1] > limit:
                raise self.corrupt(f"its {name} claims {entry[1]} bytes")
            data = stream.read(entry[1])
            pad = _tar.padding(entry[1])
            if len(data) != entry[1] or (pad and stream.read(pad) != bytes(pad)):
                raise self.corrupt(f"it is truncated or damaged inside {name}")
            got.append(data)
        signature = self._trust(got[1], got[0])
        manifest = self._manifest(got[0])
        return DumpFile(self.path, self.raw, manifest, signature, self.compression, {}, stream)

    def _trust(self, sig: bytes, manifest: bytes) -> SignatureInfo:
        try:
            raw, valid = _keys.check_signature(sig, manifest)
        except ValueError as exc:
            raise self.corrupt(str(exc)) from None
        trusted = (self.keys or _keys.Keys()).trusted(create=self.check_trust)
        line = _keys.key_line(raw)
        info = SignatureInfo(
            FORMAT_VERSION,
            True,
            key_line=line,
            fingerprint=_keys.fingerprint(raw),
            comment=trusted.get(raw, ""),
            trusted=raw in trusted,
            valid=valid,
        )
        if not self.check_trust:
            return info
        if not info.trusted and not self.trust_dumpfile:
            raise errors.DumpFileUntrustedError(
                f"dump file {self.path} is not signed by a trusted key (signed by "
                f"{info.fingerprint}, which is neither this host's key nor in its trusted keys)",
                path=self.path,
                key_line=line,
                fingerprint=info.fingerprint,
            )
        if not valid:
            raise self.corrupt(f"its signature by {info.fingerprint} does not match its manifest")
        return info

    def _manifest(self, raw: bytes) -> Manifest:
        try:
            manifest = Manifest.parse(raw)
        except ValueError as exc:
            raise self.corrupt(f"bad manifest: {exc}") from None
        if manifest.compression != self.compression:
            raise self.corrupt(
                f"its manifest says compression {manifest.compression}, the file is "
                f"{self.compression or 'uncompressed'}"
            )
        manifest.config = self._config(manifest)
        return manifest

    def _config(self, manifest: Manifest) -> Dict[str, Any]:
        if not self.check_trust:
            return manifest.config
        try:
            return check_config(manifest.config)
        except errors.ConfigSchemaError as exc:
            raise errors.DumpFileRefusedError(
                f"dump file {self.path} is refused: {exc.message}", path=self.path, rule="config"
            ) from exc

    def _check_members(self, manifest: Manifest, members: List[Tuple[str, int]]) -> None:
        names = [name for name, _ in members]
        for i, name in enumerate(names):
            if name in names[:i] or name in (MARKER_NAME, MANIFEST_NAME, SIGNATURE_NAME):
                raise self.corrupt(f"member {name[:60]!r} appears twice")
        for name in names:
            if not valid_name(name):
                raise self.corrupt(f"member {name[:60]!r} is not a plain file name")
        listed = {p.name: p for p in manifest.parts}
        for name, size in members:
            part = listed.get(name)
            if part is None:
                raise self.corrupt(f"member {name!r} is not in its manifest")
            if size != part.size:
                raise self.corrupt(f"member {name} has {size} bytes, its manifest says {part.size}")
        missing = sorted(set(listed) - set(names))
        if missing:
            raise self.corrupt(f"part {missing[0]} of its manifest is missing")


# --- module functions --------------------------------------------------------------------


def signature_of(path: PathLike, state_dir_path: Optional[PathLike] = None) -> SignatureInfo:
    """Who signed dump file `path` and whether this host (the state directory's keys)
    trusts that key; decides nothing (for `pycpt inspect`). Raises as DumpFile.open() does
    for a file that is not a readable dump file."""
    keys = _keys.Keys(state_dir_path)
    with DumpFile.open(path, keys=keys, check_trust=False) as df:
        return df.signature


def read_manifest(
    path: PathLike, *, trust_dumpfile: bool = False, keys: Optional[_keys.Keys] = None
) -> Manifest:
    """The manifest of dump file `path` once its signature, structure and members are
    checked (DumpFile.open()); reads no part."""
    with DumpFile.open(path, trust_dumpfile=trust_dumpfile, keys=keys) as df:
        return df.manifest


def verify_dump_file(
    path: PathLike, *, trust_dumpfile: bool = False, keys: Optional[_keys.Keys] = None
) -> Manifest:
    """Check dump file `path` completely without extracting: signature, structure, every
    chunk of every part. Returns the manifest; raises as DumpFile.open() does."""
    with DumpFile.open(path, trust_dumpfile=trust_dumpfile, keys=keys) as df:
        df.verify()
        return df.manifest


def extract_dump_file(
    path: PathLike,
    dest_dir: PathLike,
    *,
    trust_dumpfile: bool = False,
    keys: Optional[_keys.Keys] = None,
) -> Manifest:
    """Extract dump file `path` into `dest_dir` (DumpFile.extract()); returns the manifest."""
    _path_arg(dest_dir, "dest_dir")
    with DumpFile.open(path, trust_dumpfile=trust_dumpfile, keys=keys) as df:
        df.extract(dest_dir)
        return df.manifest


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


# --- helpers -------------------------------------------------------------------------------


def _open_file(path: str) -> IO[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise errors.DumpFileNotFoundError(f"no dump file {path}", path=path) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise errors.DumpFileError(
                f"dump file {path} is a symbolic link, which pycpt does not follow",
                path=path,
                hint="give the path of the file itself",
            ) from exc
        if exc.errno == errno.EISDIR:
            raise errors.DumpFileForeignError(
                f"{path} is a directory, not a pycpt dump file",
                path=path,
                hint="give the path of the dump file itself",
            ) from exc
        raise errors.DumpFileError(
            f"cannot open dump file {path}: {exc.strerror}",
            path=path,
            hint="check the path and its permissions",
        ) from exc
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise errors.DumpFileForeignError(
            f"{path} is a directory, not a pycpt dump file",
            path=path,
            hint="give the path of the dump file itself",
        )
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise errors.DumpFileForeignError(
            f"{path} is not a regular file, so not a pycpt dump file", path=path
        )
    if st.st_size == 0:
        os.close(fd)
        raise errors.DumpFileCorruptError(f"dump file {path} is empty (0 bytes)", path=path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_error(path: str, exc: OSError) -> errors.DumpFileError:
    # the file system failed (EIO, ESTALE...): the file may well be intact
    return errors.DumpFileError(
        f"cannot read dump file {path}: {exc.strerror}",
        path=path,
        hint="check the disk or file system it is on, then retry",
    )


def _read_block(stream: Any, corrupt: Any) -> bytes:
    block = stream.read(_tar.BLOCK)
    if len(block) != _tar.BLOCK:
        raise corrupt("it is truncated inside a tar header")
    return bytes(block)


def _make_dest(dest: str) -> bool:
    """Make `dest` (0700) or check it is an empty directory; True if made here."""
    try:
        os.mkdir(dest, 0o700)
        os.chmod(dest, 0o700)  # the umask may have taken bits, never added: make it exact
        return True
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
        return False
    except OSError as exc:
        raise errors.ImagesDirError(
            f"cannot create {dest}: {exc.strerror}",
            hint="give an empty or new directory to extract into",
        ) from exc


def _create_part(dest: Optional[str], name: str, path: str, written: List[str]) -> Any:
    target = os.path.join(dest or "", name)
    try:
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot create {target}: {exc.strerror}", path=path, hint=f"check {dest}"
        ) from exc
    written.append(target)
    return os.fdopen(fd, "wb", buffering=0)


def _write_all(out: Any, data: memoryview, path: str) -> None:
    fd = out if isinstance(out, int) else out.fileno()
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as exc:
        raise errors.DumpFileError(
            f"cannot extract dump file {path}: {exc.strerror}",
            path=path,
            hint="check the free space of the directory extracted into"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "",
        ) from exc


def _memory_bound() -> int:
    """Twice this host's memory and swap: more images than that cannot be one container."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "SwapTotal"):
                    total += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 2 * total
