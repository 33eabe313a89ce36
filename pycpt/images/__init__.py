"""Read CRIU image files without restoring anything: `pycpt.images`.

Opens an images directory, a pycpt dump file (plain tar, read in place; gz/xz, streamed once
without extracting) or bytes, and lists every image file with its magic and kind; entries
are decoded lazily with CRIU's own message definitions (pycpt.images._schema). On top, the
facts other parts of pycpt need, each read from the fewest images:

    with Images.open("/var/lib/pycpt/dump/Dump.ct1") as im:
        im.process_tree()    # [Task(pid, ppid, pgid, sid, threads, state, comm, uid, ...)]
        im.task_states()     # {pid: TaskState.ALIVE | STOPPED | DEAD}
        im.namespaces()      # which namespaces each task is in; which are the dumper's own
        im.cgroups()         # the cgroup paths of each task
        im.memory(pid)       # VMAs by kind; pages dumped / lazy / in parent, found via pagemap
        im.files(pid), im.sockets(), im.summary()

Everything read is untrusted: a malformed image raises ImageError (file, offset), never
anything else; an image kind this reader does not know is listed by name and size.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import json
import os
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from pycpt.images import _magic, _reader
from pycpt.images._reader import MAX_ENTRY, ImageError, Record

__all__ = [
    "Cgroups",
    "ImageError",
    "ImageFile",
    "ImageInfo",
    "Images",
    "MAX_ENTRY",
    "Memory",
    "NAMESPACE_KINDS",
    "Namespaces",
    "OpenFile",
    "PageRun",
    "REPORT_SCHEMA",
    "REPORT_SECTIONS",
    "Record",
    "Socket",
    "Task",
    "TaskState",
    "Vma",
    "decode_image",
    "diff_reports",
    "format_diff",
    "format_report",
]

PAGE_SIZE = 4096  # x86-64, the one architecture whose registers are declared
REPORT_SCHEMA = 1
"""The version of Images.report()'s keys: a later pycpt may add keys within one version and
changes the number before it removes or changes one."""
REPORT_SECTIONS = ("files", "memory", "sockets", "manifest")
"""The optional parts of a report (`pycpt inspect --files`, `--mem`, `--sockets`,
`--manifest`)."""
PE_PARENT, PE_LAZY, PE_PRESENT = 1 << 0, 1 << 1, 1 << 2
NAMESPACE_KINDS = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")
# namespace kind -> the image a dumped namespace of that kind leaves, named by its id
_NS_IMAGES = {
    "net": "netns",
    "ipc": "ipcns-var",
    "uts": "utsns",
    "mnt": "mountpoints",
    "user": "userns",
    "time": "timens",
    "pid": "pidns",
}
_MAX_READ = 1 << 20  # the most read_memory() returns
_MARKER, _MANIFEST = "PYCPT-DUMP", "manifest.json"  # pycpt.dumpfile's names, read here as-is
_MARKER_RE = re.compile(rb"PYCPT-DUMP (\d{1,9})\n\Z")

PathArg = Union[str, "os.PathLike[str]"]
Data = Union[bytes, bytearray, memoryview]


class TaskState(IntEnum):
    """A task's state as CRIU records it (core-PID.img, tc.task_state; compel's values).

    A zombie is recorded as DEAD; HELPER, THREAD and UNDEF are CRIU's restore-time states
    and should not appear in images.
    """

    ALIVE = 0x01
    DEAD = 0x02
    STOPPED = 0x03
    ZOMBIE = 0x06
    HELPER = 0x80
    THREAD = 0x81
    UNDEF = 0xFF

    @property
    def label(self) -> str:
        """ "alive", "stopped", "dead", ..."""
        return self.name.lower()


# VMA status bits (CRIU's VMA_AREA_* / VMA_*), most specific first: the first that is set
# names the VMA's kind
_VMA_KINDS = [
    (1 << 31, "unsupported"),
    (1 << 2, "vsyscall"),
    (1 << 3, "vdso"),
    (1 << 12, "vvar"),
    (1 << 15, "shadow-stack"),
    (1 << 17, "uprobes"),
    (1 << 13, "aio"),
    (1 << 10, "sysvipc"),
    (1 << 11, "socket"),
    (1 << 14, "memfd"),
    (1 << 1, "stack"),
    (1 << 5, "heap"),
    (1 << 6, "file-private"),
    (1 << 7, "file-shared"),
    (1 << 8, "anon-shared"),
    (1 << 9, "anon-private"),
]
_MAP_GROWSDOWN = 0x100
_MAP_SHARED = 0x01
_VMA_FILE = (1 << 6) | (1 << 7) | (1 << 14)  # file-private, file-shared, memfd: shmid is a file id
_INET_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
_SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 10: "packet"}
_PROTOS = {0: "ip", 6: "tcp", 17: "udp", 136: "udplite", 1: "icmp", 58: "icmpv6"}
_FAMILIES = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink", 17: "packet"}


# --- the listing -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """One file as listed: its name and size, and its kind and magics where known."""

    name: str
    size: int
    kind: Optional[str]  # CRIU's name for it (CORE, PAGEMAP, PAGES...), None if unknown
    magic: Optional[int]
    head_magic: Optional[int]


class ImageFile:
    """One image file; its entries are decoded only when iterated."""

    def __init__(self, blob: _reader.Blob) -> None:
        self._blob = blob
        self.name = blob.name
        kind, self.number = _magic.kind_of(blob.name)
        self._magics: Optional[Tuple[Optional[int], Optional[int]]] = None
        self._kind = kind
        if kind is None and blob.size >= 4:
            try:
                kind = _magic.kind_by_magic(self.magics()[1] or 0)
            except ImageError:
                kind = None
        self._kind = kind

    @property
    def size(self) -> int:
        """Its size in bytes."""
        return self._blob.size

    @property
    def kind(self) -> Optional[str]:
        """CRIU's name of its kind (by its file name, else its magic), None if unknown."""
        return self._kind.name if self._kind else None

    @property
    def decodable(self) -> bool:
        """Whether it has protobuf entries this reader can decode."""
        return self._kind is not None and self._kind.message is not None

    def magics(self) -> Tuple[Optional[int], Optional[int]]:
        """(head magic, kind magic) as found in the file; raw images have neither."""
        if self._magics is None:
            if self._kind is not None and self._kind.layout == "raw":
                self._magics = (None, None)
            else:
                self._magics = _reader.read_magic(self._blob)
        return self._magics

    def info(self) -> ImageInfo:
        """Name, size, kind and magics (reads at most its first 8 bytes; never raises for a
        file that is merely unknown or unreadable)."""
        try:
            head, magic = self.magics()
        except ImageError:
            head, magic = None, None
        return ImageInfo(self.name, self.size, self.kind, magic, head)

    def records(self) -> Iterator[Record]:
        """Its entries with their offsets and payload spans, decoded one at a time."""
        if self._kind is None:
            raise ImageError("is not an image kind this reader knows", file=self.name)
        return _reader.records(self._blob, self._kind)

    def entries(self) -> Iterator[Any]:
        """Its entries' messages, decoded one at a time."""
        return (r.message for r in self.records())

    def first(self) -> Any:
        """Its first entry's message; ImageError if it has none."""
        for message in self.entries():
            return message
        raise ImageError("has no entries", file=self.name)

    def payload(self, record: Record, limit: int = MAX_ENTRY) -> bytes:
        """The payload bytes after `record` (pipe data, queued packets, TCP queues...)."""
        if record.extra_size > limit:
            raise ImageError(
                f"payload of {record.extra_size} bytes is above the limit {limit}",
                file=self.name,
                offset=record.extra_offset,
            )
        return self._blob.read(record.extra_offset, record.extra_size)

    @property
    def available(self) -> bool:
        """False for an image of a compressed dump file whose bytes were not kept (pages)."""
        return not isinstance(self._blob, _reader.MissingBlob)

    def read(self, offset: int, n: int) -> bytes:
        """`n` raw bytes at `offset` (for raw images such as pages-N.img)."""
        return self._blob.read(offset, n)

    def __repr__(self) -> str:
        return f"<ImageFile {self.name} {self.size} bytes {self.kind or 'unknown'}>"


def decode_image(name: str, data: Data) -> List[Any]:
    """Every entry of one image file given as bytes (`name` says its kind)."""
    blob = _reader.BytesBlob(name, memoryview(data).cast("B"), _reader.Counter())
    return list(ImageFile(blob).entries())


# --- facts -------------------------------------------------------------------------------


@dataclass
class Task:
    """One process of the tree (pstree.img, core-PID.img, mm-PID.img)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: List[int]
    state: TaskState
    stop_signo: Optional[int]  # the signal that stopped it, when CRIU recorded one
    exit_code: int
    comm: str
    uid: Optional[int]
    gid: Optional[int]
    exe: Optional[str]
    cg_set: Optional[int]
    seccomp: Optional[str]
    children: List[int] = field(default_factory=list)


@dataclass
class Namespaces:
    """The namespaces of each task, as CRIU's ids (not the kernel's inode numbers).

    CRIU numbers every namespace it meets during one dump; `dumper` holds the ids of the
    namespaces the dumping CRIU itself was in (inventory.img root_ids). A task whose id
    equals the dumper's shared that namespace with the dumping host: CRIU does not save it
    and, on restore, the task simply stays in the namespace of the restoring CRIU.
    """

    root_pid: int
    tasks: Dict[int, Dict[str, int]]
    dumper: Dict[str, int]
    saved: Dict[str, List[int]]  # kind -> ids whose images are in the dump (utsns-ID.img...)
    zombies: Dict[int, List[int]] = field(default_factory=dict)
    """Each zombie (recorded DEAD: no namespace ids left) -> its children, which a real
    zombie has none of. CRIU restores a zombie as its parent's child that exits at once."""

    def shared_with_dumper(self, pid: Optional[int] = None) -> Set[str]:
        """The kinds of namespace task `pid` (default: the root) shares with the dumper."""
        ids = self.tasks.get(self.root_pid if pid is None else pid, {})
        return {k for k, v in ids.items() if self.dumper.get(k) == v}

    def own(self, pid: Optional[int] = None) -> Set[str]:
        """The kinds of namespace in which task `pid` (default: the root) is not the
        dumper's: those CRIU saved and will create anew on restore."""
        ids = self.tasks.get(self.root_pid if pid is None else pid, {})
        return {k for k in ids if self.dumper.get(k) != ids[k]}

    def created_on_restore(self) -> Set[str]:
        """The kinds of namespace CRIU's restore creates for the root task, as CRIU decides
        it (criu/pstree.c): those whose id differs from the dumper's, except pid, which is
        new only when the root's pid is 1. Every other kind is the restoring CRIU's own."""
        kinds = self.own()
        if self.root_pid != 1:
            kinds.discard("pid")
        return kinds


@dataclass
class Cgroups:
    """cgroup.img: each set of cgroups, which set each task is in, and the dumper's set.

    CRIU does not write the dumping CRIU's own set into cgroup.img: a task whose set is
    `dumper` was in the dumper's cgroups, and is restored into the restoring CRIU's.
    """

    sets: Dict[int, Dict[str, str]]  # set id -> {controller ("" for cgroup v2): path}
    tasks: Dict[int, int]  # pid -> set id (tc.cg_set)
    dumper: Optional[int]  # inventory.img root_cg_set

    def of(self, pid: int) -> Dict[str, str]:
        """The cgroup paths of task `pid` by controller ({} if none recorded)."""
        return dict(self.sets.get(self.tasks.get(pid, -1), {}))


@dataclass
class PageRun:
    """One pagemap entry: nr_pages pages from vaddr, and where their bytes are."""

    vaddr: int
    nr_pages: int
    flags: int
    offset: Optional[int]  # in the pages image, for present pages

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)


@dataclass
class Vma:
    """One memory area of a process (mm-PID.img), and how many of its pages the dump holds.

    Private memory is dumped per process (pagemap-PID); shared anonymous memory, memfd and
    SysV shared memory once per object (pagemap-shmem-SHMID), and counted here in every VMA
    that maps them. Pages in no pagemap entry were never touched or were the zero page
    (anonymous memory: restored as zeros) or are read from the mapped file on restore."""

    start: int
    end: int
    kind: str  # anon-private, anon-shared, file-private, file-shared, stack, heap, vdso, ...
    prot: int
    flags: int
    status: int
    file: Optional[str]
    pgoff: int
    pages_dumped: int = 0
    pages_lazy: int = 0
    pages_in_parent: int = 0
    shmid: Optional[int] = None  # the shared object whose pages are in pagemap-shmem-SHMID

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def pages_absent(self) -> int:
        """Pages in no pagemap entry (zero, or from the file; see the class)."""
        return max(0, self.pages - self.pages_dumped - self.pages_lazy - self.pages_in_parent)

    @property
    def prot_text(self) -> str:
        """ "rw-p" as /proc/PID/maps writes it."""
        return (
            ("r" if self.prot & 1 else "-")
            + ("w" if self.prot & 2 else "-")
            + ("x" if self.prot & 4 else "-")
            + ("s" if self.flags & _MAP_SHARED else "p")
        )


# the kinds whose pages in no pagemap entry are restored as zeros, and those read from a file
ANON_KINDS = frozenset(
    {"anon-private", "anon-shared", "stack", "heap", "memfd", "sysvipc", "shadow-stack"}
)
FILE_KINDS = frozenset({"file-private", "file-shared"})


@dataclass
class Memory:
    """A process's address space and how much of it the dump holds."""

    pid: int
    vmas: List[Vma]
    runs: List[PageRun]
    pages_image: Optional[str]
    pages_dumped: int  # private pages present in the pages image
    pages_lazy: int  # left behind for lazy restore (not in the pages image)
    pages_in_parent: int
    pages_not_dumped: int  # in a VMA but in no pagemap entry: never touched, or the zero page
    pages_shared: int = 0  # of shared objects (pagemap-shmem) mapped here, dumped
    pages_zero: int = 0  # anonymous, in no pagemap entry: restored as zeros
    pages_from_file: int = 0  # file-backed, in no pagemap entry: restored from the file

    @property
    def size(self) -> int:
        return sum(v.size for v in self.vmas)

    def by_kind(self) -> Dict[str, Dict[str, int]]:
        """{vma kind: {"vmas": n, "bytes": mapped size, "dumped": bytes dumped}}."""
        out: Dict[str, Dict[str, int]] = {}
        for v in self.vmas:
            d = out.setdefault(v.kind, {"vmas": 0, "bytes": 0, "dumped": 0})
            d["vmas"] += 1
            d["bytes"] += v.size
            d["dumped"] += v.pages_dumped * PAGE_SIZE
        return out

    def locate(self, vaddr: int) -> Optional[Tuple[str, int]]:
        """(pages image, offset) of the dumped byte at `vaddr`, or None if not dumped."""
        run = _find_run(self.runs, vaddr)
        if run is None or run.offset is None or self.pages_image is None:
            return None
        return self.pages_image, run.offset + (vaddr - run.vaddr)


@dataclass
class OpenFile:
    """One descriptor of a process: what it is (fdinfo-ID.img + files.img)."""

    fd: int
    id: int
    type: str  # REG, PIPE, INETSK, UNIXSK, EVENTFD, ...
    cloexec: bool
    description: str  # a path, "pipe:[ID]", "tcp 127.0.0.1:80 -> ...", ...
    flags: Optional[int] = None
    pos: Optional[int] = None
    details: Dict[str, Any] = field(default_factory=dict)  # the type's facts (path, peer...)


@dataclass
class Socket:
    """One socket (files.img) and who holds it."""

    id: int
    ino: int
    family: str
    type: str
    protocol: str
    state: str
    local: Optional[str]
    peer: Optional[str]
    owners: List[Tuple[int, int]]  # (pid, fd)
    inq: Optional[int] = None  # bytes queued to read (TCP: tcp-stream; others: sk-queues)
    outq: Optional[int] = None  # bytes queued to send (TCP)
    unsent: Optional[int] = None  # of outq, not yet sent (TCP)


# --- the reader --------------------------------------------------------------------------


class Images:
    """The image files of one checkpoint. Use `Images.open(...)`; close() (or `with`)
    releases the open files."""

    def __init__(self, source: _reader.Source) -> None:
        self._source = source
        self._files = {name: ImageFile(blob) for name, blob in sorted(source.blobs.items())}
        self._cache: Dict[Tuple[str, str], Any] = {}

    @classmethod
    def open(cls, source: Union[PathArg, Data]) -> "Images":
        """Open an images directory, a pycpt dump file (plain, gz or xz) or a dump file
        held in memory (bytes)."""
        counter = _reader.Counter()
        if isinstance(source, (bytes, bytearray, memoryview)):
            return cls(_reader.open_bytes(source, counter))
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if not isinstance(source, str) or not source or "\0" in source:
            raise ValueError(f"source must be a path or bytes, not {source!r}")
        if os.path.isdir(source):
            return cls(_reader.open_directory(source, counter))
        return cls(_reader.open_dump_file(source, counter))

    @classmethod
    def from_files(cls, files: Dict[str, Data]) -> "Images":
        """Image files given as {file name: bytes}."""
        return cls(_reader.from_files(dict(files), _reader.Counter()))

    def close(self) -> None:
        """Close the files opened for reading (later reads raise ImageError). Idempotent."""
        self._source.counter.closed = True
        fds, self._source.fds[:] = list(self._source.fds), []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Images":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- listing -------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The path (or "<bytes>") opened."""
        return self._source.path

    @property
    def compression(self) -> Optional[str]:
        """ "gz" or "xz" for a compressed dump file, else None."""
        return self._source.compression

    @property
    def bytes_read(self) -> int:
        """How many bytes of the underlying files were read so far."""
        return self._source.counter.bytes

    @property
    def source_kind(self) -> str:
        """ "dumpfile", "directory" or "bytes"."""
        return self._source.kind

    @property
    def source_size(self) -> int:
        """The dump file's size, or the images' total size."""
        return self._source.size

    def names(self) -> List[str]:
        """Names of the image files, sorted."""
        return list(self._files)

    def other_members(self) -> Dict[str, int]:
        """Members of a dump file that are not images (marker, manifest...) and their sizes."""
        return dict(self._source.other)

    @property
    def modified(self) -> Optional[float]:
        """The dump file's modification time (of inventory.img for a directory), or None."""
        return self._source.mtime

    def member(self, name: str, limit: int = _reader.MAX_MEMBER) -> Optional[bytes]:
        """The bytes of a member that is not an image (PYCPT-DUMP, manifest.json...), or
        None if there is none; ImageError if it is larger than `limit` or was not kept."""
        blob = self._source.other_blobs.get(name)
        if blob is None:
            return None
        if blob.size > limit:
            raise ImageError(
                f"is {blob.size} bytes, more than the {limit} this reader reads of it", file=name
            )
        return blob.read(0, blob.size)

    def dump_format(self) -> Optional[int]:
        """The format version in the dump file's marker (PYCPT-DUMP), None if there is no
        marker (an images directory); ImageError for a marker that is not one."""
        data = self.member(_MARKER, 64)
        if data is None:
            return None
        m = _MARKER_RE.match(data)
        if m is None:
            raise ImageError(
                f"is not a pycpt marker ({data[:20]!r})",
                file=_MARKER,
                offset=0,
                hint="this is not a pycpt dump file, or it is damaged",
            )
        return int(m.group(1))

    def manifest(self) -> Optional[Dict[str, Any]]:
        """The dump file's manifest.json as JSON data, None if it has none. Not verified:
        its checksum, signature and part hashes are pycpt.dumpfile's business; here it is
        only read (at most MAX_MEMBER bytes)."""
        data = self.member(_MANIFEST)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ImageError(f"is not JSON ({exc})", file=_MANIFEST) from exc
        if not isinstance(value, dict):
            raise ImageError("is not a JSON object", file=_MANIFEST, offset=0)
        return value

    def list(self) -> List[ImageInfo]:
        """Every image file with its size, kind and magics; never fails on one file."""
        return [f.info() for f in self._files.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __iter__(self) -> Iterator[ImageFile]:
        return iter(self._files.values())

    def __getitem__(self, name: str) -> ImageFile:
        try:
            return self._files[name]
        except KeyError:
            raise KeyError(f"no image {name} in {self.source}") from None

    def get(self, name: str) -> Optional[ImageFile]:
        """Image file `name`, or None."""
        return self._files.get(name)

    # --- decoded images, cached ----------------------------------------------------------

    def _all(self, name: str) -> List[Any]:
        key = ("all", name)
        if key not in self._cache:
            f = self._files.get(name)
            self._cache[key] = list(f.entries()) if f is not None else []
        return self._cache[key]

    def _one(self, name: str, required: bool = True) -> Any:
        entries = self._all(name)
        if not entries:
            if required:
                raise ImageError(
                    "is missing or empty",
                    file=name,
                    hint="a CRIU dump always writes it; the images are incomplete",
                )
            return None
        return entries[0]

    def inventory(self) -> Any:
        """inventory.img's entry (how the dump was made)."""
        return self._one("inventory.img")

    def pstree(self) -> List[Any]:
        """pstree.img's entries, root first."""
        entries = self._all("pstree.img")
        if not entries:
            raise ImageError("is missing or empty", file="pstree.img")
        return entries

    def core(self, tid: int) -> Any:
        """core-TID.img's entry (a thread's registers; a process's main thread also has tc)."""
        return self._one(f"core-{_int(tid)}.img")

    def ids(self, pid: int) -> Any:
        """The kernel-object ids of process `pid` (ids-PID.img, else its core's ids); None
        for a zombie, which has none left (no files, memory or namespaces of its own)."""
        ids = self._one(f"ids-{_int(pid)}.img", required=False)
        if ids is None:
            core = self.core(pid)
            if not core.HasField("ids"):
                if core.HasField("tc") and _state(core.tc.task_state) is TaskState.DEAD:
                    return None
                raise ImageError("has no ids and there is no ids image", file=f"core-{pid}.img")
            ids = core.ids
        return ids

    def mm(self, pid: int) -> Any:
        """mm-PID.img's entry (the address space and its VMAs)."""
        return self._one(f"mm-{_int(pid)}.img")

    def file_entries(self) -> Dict[int, Any]:
        """files.img by file id."""
        key = ("files", "")
        if key not in self._cache:
            self._cache[key] = {e.id: e for e in self._all("files.img")}
        return self._cache[key]

    # --- the tree and its tasks ----------------------------------------------------------

    def _pids(self) -> List[int]:
        return [int(e.pid) for e in self.pstree()]

    def process_tree(self) -> List[Task]:
        """Every process, root first, with its state, threads, name, uid and executable."""
        entries = self.pstree()
        files = None
        tasks: Dict[int, Task] = {}
        for e in entries:
            core = self.core(e.pid)
            tc = core.tc if core.HasField("tc") else None
            creds = (
                core.thread_core.creds
                if core.HasField("thread_core") and core.thread_core.HasField("creds")
                else None
            )
            exe = None
            mm_file = self.get(f"mm-{e.pid}.img")
            if mm_file is not None:
                if files is None:
                    files = self.file_entries()
                exe = self._path_of(files.get(self.mm(e.pid).exe_file_id))
            state = _state(tc.task_state) if tc is not None else TaskState.UNDEF
            seccomp = None
            if core.HasField("thread_core") and core.thread_core.HasField("seccomp_mode"):
                seccomp = _enum_name(core.thread_core, "seccomp_mode")
            tasks[e.pid] = Task(
                pid=e.pid,
                ppid=e.ppid,
                pgid=e.pgid,
                sid=e.sid,
                threads=list(e.threads),
                state=state,
                stop_signo=int(tc.stop_signo)
                if tc is not None and tc.HasField("stop_signo")
                else None,
                exit_code=int(tc.exit_code) if tc is not None else 0,
                comm=_text(tc.comm) if tc is not None else "",
                uid=int(creds.uid) if creds is not None else None,
                gid=int(creds.gid) if creds is not None else None,
                exe=exe,
                cg_set=_cg_set(core),
                seccomp=seccomp,
            )
        for t in tasks.values():
            if t.ppid in tasks:
                tasks[t.ppid].children.append(t.pid)
        return list(tasks.values())

    def task_states(self) -> Dict[int, TaskState]:
        """{pid: state at the dump} (ALIVE: was running or sleeping; STOPPED: by a signal,
        see Task.stop_signo; DEAD: a zombie)."""
        out = {}
        for pid in self._pids():
            core = self.core(pid)
            if not core.HasField("tc"):
                raise ImageError("has no task core (tc) for a process", file=f"core-{pid}.img")
            out[pid] = _state(core.tc.task_state)
        return out

    def argv(self, pid: int) -> Optional[List[str]]:
        """The command line, read from the process's dumped memory (mm_arg_start..end; a
        page or two of the pages image). None when those pages are not in the dump."""
        mm = self.mm(pid)
        start, end = int(mm.mm_arg_start), int(mm.mm_arg_end)
        if not 0 < end - start <= _MAX_READ:
            return None
        data = self.read_memory(pid, start, end - start)
        if data is None:
            return None
        return [a.decode(errors="replace") for a in data.rstrip(b"\0").split(b"\0")]

    # --- namespaces and cgroups ----------------------------------------------------------

    def namespaces(self) -> Namespaces:
        """Which namespaces each process is in, and which are the dumper's own."""
        inv = self.inventory()
        dumper = _ns_ids(inv.root_ids) if inv.HasField("root_ids") else {}
        entries = self.pstree()
        pids = [int(e.pid) for e in entries]
        tasks = {}
        zombies: Dict[int, List[int]] = {}
        for pid in pids:
            ids = self.ids(pid)
            tasks[pid] = _ns_ids(ids) if ids is not None else {}
            core = self.core(pid)
            if core.HasField("tc") and _state(core.tc.task_state) in _ZOMBIE_STATES:
                zombies[pid] = [int(e.pid) for e in entries if int(e.ppid) == pid]
        saved: Dict[str, List[int]] = {}
        for name, f in self._files.items():
            if f.number is None or not name[:-4].rpartition("-")[2].isdigit():
                continue
            for kind, prefix in _NS_IMAGES.items():
                if name.startswith(prefix + "-") and name[len(prefix) + 1 : -4].isdigit():
                    saved.setdefault(kind, []).append(int(f.number))
        saved_ids = {k: sorted(v) for k, v in saved.items()}
        return Namespaces(pids[0], tasks, dumper, saved_ids, zombies)

    def cgroups(self) -> Cgroups:
        """cgroup.img's sets, and each process's set (from its core)."""
        entry = self._one("cgroup.img", required=False)
        sets: Dict[int, Dict[str, str]] = {}
        if entry is not None:
            for s in entry.sets:
                sets[int(s.id)] = {_text(m.name): _text(m.path) for m in s.ctls}
        tasks = {}
        for pid in self._pids():
            cg_set = _cg_set(self.core(pid))
            if cg_set is not None:
                tasks[pid] = cg_set
        inv = self.inventory()
        dumper = int(inv.root_cg_set) if inv.HasField("root_cg_set") else None
        return Cgroups(sets, tasks, dumper)

    # --- memory --------------------------------------------------------------------------

    def memory(self, pid: int) -> Memory:
        """The VMAs of process `pid` by kind, and its pages as the pagemaps place them."""
        pid = _int(pid)
        mm = self.mm(pid)
        files = self.file_entries() if any(v.status & _VMA_FILE for v in mm.vmas) else {}
        vmas = []
        for v in mm.vmas:
            if v.end < v.start:
                raise ImageError(
                    f"a VMA ends ({v.end:#x}) before it starts ({v.start:#x})", file=f"mm-{pid}.img"
                )
            kind = next((name for bit, name in _VMA_KINDS if v.status & bit), "other")
            # CRIU never sets its STACK bit: the stack is the anonymous VMA that holds
            # mm_start_stack, or one that grows down
            if kind == "anon-private" and (
                v.start <= mm.mm_start_stack < v.end or v.flags & _MAP_GROWSDOWN
            ):
                kind = "stack"
            path, shmid = None, None
            if kind.startswith("file"):
                path = self._path_of(files.get(v.shmid))
            elif kind == "memfd":
                # CRIU dumps a shared anonymous mapping as a memfd too (its inode is named
                # /dev/zero); vma.shmid is then the id of the memfd's file
                inode = self._memfd_inode(files.get(v.shmid))
                if inode is not None:
                    shmid = int(inode.shmid)
                    name = _text(inode.name)
                    if name.startswith("/dev/zero") or not name:
                        kind = "anon-shared"
                    else:
                        path = f"memfd:{name}"
            elif kind in ("anon-shared", "sysvipc"):
                shmid = int(v.shmid)
            vmas.append(
                Vma(
                    int(v.start),
                    int(v.end),
                    kind,
                    int(v.prot),
                    int(v.flags),
                    int(v.status),
                    path,
                    int(v.pgoff),
                    shmid=shmid,
                )
            )
        pages_image, runs = self._pagemap(pid)
        dumped = sum(r.nr_pages for r in runs if r.present)
        lazy = sum(r.nr_pages for r in runs if r.lazy and not r.present)
        parent = sum(r.nr_pages for r in runs if r.in_parent and not r.present)
        _count_pages([v for v in vmas if v.shmid is None], runs, lambda v: v.start)
        shared = 0
        by_object: Dict[int, List[Vma]] = {}
        for v in vmas:
            if v.shmid is not None:
                by_object.setdefault(v.shmid, []).append(v)
        for shmid, mapped in by_object.items():
            # the object's pagemap places pages by their offset in the object
            _count_pages(mapped, self._shmem_runs(shmid), lambda v: v.pgoff)
            shared += sum(v.pages_dumped for v in mapped)
        return Memory(
            pid,
            vmas,
            runs,
            pages_image,
            dumped,
            lazy,
            parent,
            sum(v.pages_absent for v in vmas),
            pages_shared=shared,
            pages_zero=sum(v.pages_absent for v in vmas if v.kind in ANON_KINDS),
            pages_from_file=sum(v.pages_absent for v in vmas if v.kind in FILE_KINDS),
        )

    def _memfd_inode(self, fe: Any) -> Any:
        """The memfd.img entry of a memfd file entry, or None."""
        if fe is None or not fe.HasField("memfd"):
            return None
        return self.memfd_inodes().get(int(fe.memfd.inode_id))

    def _path_of(self, fe: Any) -> Optional[str]:
        """The path of a regular file entry, "memfd:NAME" of a memfd; else None."""
        if fe is None:
            return None
        if fe.HasField("reg"):
            return _text(fe.reg.name)
        if fe.HasField("memfd"):
            inode = self._memfd_inode(fe)
            if inode is None:
                return f"memfd:(inode {fe.memfd.inode_id})"
            return f"memfd:{_text(inode.name)}"
        return None

    def memfd_inodes(self) -> Dict[int, Any]:
        """memfd.img by inode id (each memfd's name, size and shmid)."""
        key = ("memfd", "")
        if key not in self._cache:
            self._cache[key] = {int(e.inode_id): e for e in self._all("memfd.img")}
        return self._cache[key]

    def _shmem_runs(self, shmid: int) -> List[PageRun]:
        key = ("shmem", str(shmid))
        if key not in self._cache:
            self._cache[key] = self._pagemap_runs(f"pagemap-shmem-{shmid}.img")[1]
        return self._cache[key]

    def _pagemap(self, pid: int) -> Tuple[Optional[str], List[PageRun]]:
        return self._pagemap_runs(f"pagemap-{pid}.img")

    def _pagemap_runs(self, name: str) -> Tuple[Optional[str], List[PageRun]]:
        """(pages image, runs in address order) of a pagemap image; the runs are checked
        not to overlap (CRIU never writes that), which also keeps every count over them
        linear."""
        key = ("runs", name)
        if key in self._cache:
            return self._cache[key]
        entries = self._all(name)
        if not entries:
            return None, []
        pages = f"pages-{int(entries[0].pages_id)}.img"
        runs = []
        offset = 0
        for e in entries[1:]:
            nr = int(e.nr_pages) if e.HasField("nr_pages") else int(e.compat_nr_pages)
            if e.HasField("flags"):
                flags = int(e.flags)
            else:  # images of older CRIUs: in_parent, or else present
                flags = PE_PARENT if e.in_parent else PE_PRESENT
            run = PageRun(int(e.vaddr), nr, flags, offset if flags & PE_PRESENT else None)
            if flags & PE_PRESENT:
                offset += nr * PAGE_SIZE
            runs.append(run)
        f = self.get(pages)
        if f is not None and f.size < offset:
            raise ImageError(
                f"its pagemap places {offset} bytes of pages in {pages}, which has {f.size}",
                file=name,
            )
        runs.sort(key=lambda r: r.vaddr)
        for before, after in itertools.pairwise(runs):
            if after.vaddr < before.vaddr + before.nr_pages * PAGE_SIZE:
                raise ImageError(
                    f"two of its runs of pages overlap at {after.vaddr:#x}",
                    file=name,
                    hint="CRIU never writes that: the images are damaged",
                )
        self._cache[key] = (pages, runs)
        return pages, runs

    def read_memory(self, pid: int, vaddr: int, n: int) -> Optional[bytes]:
        """`n` bytes (at most 1 MiB) of process `pid`'s memory at `vaddr` as dumped: read
        from the pages image where present; None if any of it was not dumped here (lazy,
        in a parent image, or never touched) or the pages image was not kept (a
        compressed dump file)."""
        if not 0 <= n <= _MAX_READ:
            raise ValueError(f"n must be between 0 and {_MAX_READ}")
        pages, runs = self._pagemap(_int(pid))
        if pages is None or pages not in self._files or not self._files[pages].available:
            return None
        out = bytearray()
        addr = vaddr
        while len(out) < n:
            run = _find_run(runs, addr)
            if run is None or run.offset is None:
                return None
            take = min(n - len(out), run.vaddr + run.nr_pages * PAGE_SIZE - addr)
            out += self._files[pages].read(run.offset + addr - run.vaddr, take)
            addr += take
        return bytes(out)

    # --- files and sockets ---------------------------------------------------------------

    def fdinfo(self, pid: int) -> List[Any]:
        """The fdinfo entries (fd -> file id) of process `pid`."""
        ids = self.ids(pid)
        if ids is None:  # a zombie
            return []
        per_id = self.inventory().fdinfo_per_id
        return self._all(f"fdinfo-{ids.files_id if per_id else _int(pid)}.img")

    def files(self, pid: int) -> List[OpenFile]:
        """The open descriptors of process `pid`, with what each one is."""
        entries = self.file_entries()
        out = []
        for fi in self.fdinfo(pid):
            fe = entries.get(fi.id)
            kind = _enum_name(fi, "type")
            desc, flags, pos, details = (
                self._describe(fe)
                if fe is not None
                else (f"file id {fi.id} (not in files.img)", None, None, {})
            )
            out.append(
                OpenFile(
                    int(fi.fd), int(fi.id), kind, bool(fi.flags & 1), desc, flags, pos, details
                )
            )
        return out

    def cwd(self, pid: int) -> Tuple[Optional[str], Optional[str]]:
        """(working directory, root directory) of process `pid` (fs-PID.img)."""
        fs = self._one(f"fs-{_int(pid)}.img", required=False)
        if fs is None:
            return None, None
        entries = self.file_entries()
        return self._path_of(entries.get(fs.cwd_id)), self._path_of(entries.get(fs.root_id))

    def sockets(self) -> List[Socket]:
        """Every socket of the tree with its addresses, TCP state, queues and holders."""
        owners: Dict[int, List[Tuple[int, int]]] = {}
        for pid in self._pids():
            if self.get(f"ids-{pid}.img") is None and self.get(f"core-{pid}.img") is None:
                continue
            for fi in self.fdinfo(pid):
                owners.setdefault(int(fi.id), []).append((pid, int(fi.fd)))
        queued: Dict[int, int] = {}
        for pkt in self._all("sk-queues.img"):
            queued[int(pkt.id_for)] = queued.get(int(pkt.id_for), 0) + int(pkt.length)
        out = []
        for fe in self.file_entries().values():
            if fe.HasField("isk"):
                s = fe.isk
                family = _FAMILIES.get(s.family, str(s.family))
                sock = Socket(
                    int(fe.id),
                    int(s.ino),
                    family,
                    _SOCK_TYPES.get(s.type, str(s.type)),
                    _PROTOS.get(s.proto, str(s.proto)),
                    _INET_STATES.get(s.state, str(s.state)),
                    _endpoint(s.src_addr, s.src_port),
                    _endpoint(s.dst_addr, s.dst_port) if s.dst_port or any(s.dst_addr) else None,
                    owners.get(int(fe.id), []),
                )
                tcp = self._one(f"tcp-stream-{int(s.ino):x}.img", required=False)
                if tcp is not None:
                    sock.inq, sock.outq = int(tcp.inq_len), int(tcp.outq_len)
                    sock.unsent = int(tcp.unsq_len) if tcp.HasField("unsq_len") else None
                elif int(fe.id) in queued:
                    sock.inq = queued[int(fe.id)]
            elif fe.HasField("usk"):
                s = fe.usk
                sock = Socket(
                    int(fe.id),
                    int(s.ino),
                    "unix",
                    _SOCK_TYPES.get(s.type, str(s.type)),
                    "",
                    _INET_STATES.get(s.state, str(s.state)),
                    _unix_name(s.name),
                    f"ino {s.peer}" if s.peer else None,
                    owners.get(int(fe.id), []),
                )
                if int(fe.id) in queued:
                    sock.inq = queued[int(fe.id)]
            elif fe.HasField("nlsk"):
                s = fe.nlsk
                sock = Socket(
                    int(fe.id),
                    int(s.ino),
                    "netlink",
                    "",
                    str(s.protocol),
                    str(s.state),
                    f"portid {s.portid}",
                    None,
                    owners.get(int(fe.id), []),
                )
            elif fe.HasField("psk"):
                s = fe.psk
                sock = Socket(
                    int(fe.id),
                    0,
                    "packet",
                    _SOCK_TYPES.get(s.type, str(s.type)),
                    str(s.protocol),
                    "",
                    f"ifindex {s.ifindex}",
                    None,
                    owners.get(int(fe.id), []),
                )
            else:
                continue
            out.append(sock)
        return out

    def pipe_data(self) -> Dict[int, int]:
        """{pipe id: bytes queued in it at the dump} (pipes-data.img, fifo-data.img)."""
        key = ("pipe-data", "")
        if key not in self._cache:
            queued: Dict[int, int] = {}
            for name in ("pipes-data.img", "fifo-data.img"):
                f = self._files.get(name)
                if f is None:
                    continue
                for r in f.records():
                    pipe_id = int(r.message.pipe_id)
                    queued[pipe_id] = queued.get(pipe_id, 0) + r.extra_size
            self._cache[key] = queued
        return self._cache[key]

    def _describe(self, fe: Any) -> Tuple[str, Optional[int], Optional[int], Dict[str, Any]]:
        """(description, open flags, position, details) of a files.img entry; details are
        the type's own facts as JSON-able data (path, addresses, queued bytes...)."""
        if fe.HasField("reg"):
            path = _text(fe.reg.name)
            d: Dict[str, Any] = {"path": path}
            if fe.reg.HasField("size"):
                d["size"] = int(fe.reg.size)
            return path, int(fe.reg.flags), int(fe.reg.pos), d
        if fe.HasField("pipe"):
            pipe_id = int(fe.pipe.pipe_id)
            queued = self.pipe_data().get(pipe_id, 0)
            text = f"pipe:[{pipe_id}]" + (f" ({queued} bytes queued)" if queued else "")
            return text, int(fe.pipe.flags), None, {"pipe_id": pipe_id, "queued": queued}
        if fe.HasField("fifo"):
            pipe_id = int(fe.fifo.pipe_id)
            fifo = self._path_of(self.file_entries().get(fe.fifo.regf_id))
            queued = self.pipe_data().get(pipe_id, 0)
            text = f"fifo {fifo or ''} pipe:[{pipe_id}]".replace("  ", " ")
            return text, None, None, {"path": fifo, "pipe_id": pipe_id, "queued": queued}
        if fe.HasField("isk"):
            s = fe.isk
            proto = _PROTOS.get(s.proto, str(s.proto))
            local = _endpoint(s.src_addr, s.src_port)
            peer = _endpoint(s.dst_addr, s.dst_port) if s.dst_port else None
            state = _INET_STATES.get(s.state, str(s.state))
            text = f"{proto} {local}" + (f" -> {peer}" if peer else "") + f" {state}"
            d = {
                "family": _FAMILIES.get(s.family, str(s.family)),
                "protocol": proto,
                "local": local,
                "peer": peer,
                "state": state,
                "ino": int(s.ino),
            }
            return text, int(s.flags), None, d
        if fe.HasField("usk"):
            s = fe.usk
            kind = _SOCK_TYPES.get(s.type, str(s.type))
            name = _unix_name(s.name)
            state = _INET_STATES.get(s.state, str(s.state))
            text = f"unix {kind} {name or '(unnamed)'} {state}"
            if s.peer:
                text += f" peer ino {s.peer}"
            d = {"type": kind, "name": name, "state": state, "ino": int(s.ino)}
            d["peer_ino"] = int(s.peer) if s.peer else None
            return text, int(s.flags), None, d
        if fe.HasField("nlsk"):
            d = {"protocol": int(fe.nlsk.protocol), "portid": int(fe.nlsk.portid)}
            return f"netlink protocol {fe.nlsk.protocol}", int(fe.nlsk.flags), None, d
        if fe.HasField("psk"):
            d = {"protocol": int(fe.psk.protocol), "ifindex": int(fe.psk.ifindex)}
            return f"packet socket ifindex {fe.psk.ifindex}", int(fe.psk.flags), None, d
        if fe.HasField("efd"):
            d = {"counter": int(fe.efd.counter)}
            return f"eventfd counter {fe.efd.counter}", int(fe.efd.flags), None, d
        if fe.HasField("epfd"):
            fds = sorted({int(t.tfd) for t in fe.epfd.tfd})
            text = f"eventpoll watching fds {' '.join(map(str, fds))}" if fds else "eventpoll"
            return text, int(fe.epfd.flags), None, {"watches": fds}
        if fe.HasField("sgfd"):
            d = {"sigmask": int(fe.sgfd.sigmask)}
            return f"signalfd mask {fe.sgfd.sigmask:#x}", int(fe.sgfd.flags), None, d
        if fe.HasField("tfd"):
            d = {"clockid": int(fe.tfd.clockid), "ticks": int(fe.tfd.ticks)}
            return f"timerfd clock {fe.tfd.clockid}", int(fe.tfd.flags), None, d
        if fe.HasField("ify"):
            d = {"watches": len(fe.ify.wd)}
            return f"inotify {len(fe.ify.wd)} watches", int(fe.ify.flags), None, d
        if fe.HasField("ffy"):
            d = {"marks": len(fe.ffy.mark)}
            return f"fanotify {len(fe.ffy.mark)} marks", int(fe.ffy.flags), None, d
        if fe.HasField("nsf"):
            d = {"clone_flag": int(fe.nsf.ns_cflag), "ns_id": int(fe.nsf.ns_id)}
            text = f"namespace file (clone flag {fe.nsf.ns_cflag:#x})"
            return text, int(fe.nsf.flags), None, d
        if fe.HasField("tunf"):
            return f"tun {_text(fe.tunf.netdev)}", None, None, {"netdev": _text(fe.tunf.netdev)}
        if fe.HasField("ext"):
            return "external file", None, None, {}
        if fe.HasField("tty"):
            d = {"tty_info_id": int(fe.tty.tty_info_id)}
            return f"tty (tty-info {fe.tty.tty_info_id})", int(fe.tty.flags), None, d
        if fe.HasField("memfd"):
            path = self._path_of(fe) or ""
            inode = self._memfd_inode(fe)
            d = {"path": path, "size": int(inode.size) if inode is not None else None}
            return path, int(fe.memfd.flags), int(fe.memfd.pos), d
        if fe.HasField("bpf"):
            d = {"map_name": _text(fe.bpf.map_name)}
            return f"bpf map {_text(fe.bpf.map_name)}", int(fe.bpf.flags), int(fe.bpf.pos), d
        if fe.HasField("pidfd"):
            d = {"pid": int(fe.pidfd.nspid)}
            return f"pidfd of pid {fe.pidfd.nspid}", int(fe.pidfd.flags), None, d
        return _enum_name(fe, "type").lower(), None, None, {}

    # --- the summary and the report ------------------------------------------------------

    def summary(self) -> Dict[str, Any]:
        """The checkpoint's content as JSON-able data, without where it came from: its
        images, inventory, processes (each with its state, command line, memory,
        namespaces, cgroup and descriptors), namespaces, cgroups and counts of files.
        Reads no pages but the command lines'."""
        from pycpt.images import _report

        return _report.summary(self)

    def report(self, sections: Sequence[str] = REPORT_SECTIONS) -> Dict[str, Any]:
        """What `pycpt inspect --json` prints: "schema", "source" (path, size...), "dump"
        (container, creation, versions, signature), the summary() and the `sections` of
        REPORT_SECTIONS asked for. The keys are documented in the README."""
        from pycpt.images import _report

        return _report.report(self, sections)


def format_report(report: Dict[str, Any], views: Sequence[str] = ("summary",)) -> str:
    """A report as `pycpt inspect` prints it: each of `views` ("summary", "ps", "files",
    "mem", "sockets", "manifest"; the report must hold the sections they show), with every
    string from the images escaped for a terminal."""
    from pycpt.images import _render

    return _render.format_report(report, views)


def format_diff(diff: Dict[str, Any]) -> str:
    """A diff_reports() result as `pycpt inspect --diff` prints it."""
    from pycpt.images import _render

    return _render.format_diff(diff)


def diff_reports(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """What changed between two Images.report()s (with every section) of checkpoints of one
    container: processes, descriptors, sockets, memory sizes (`pycpt inspect --diff`)."""
    from pycpt.images import _report

    return _report.diff_reports(a, b)


# --- helpers -----------------------------------------------------------------------------


def _text(v: Any) -> str:
    # protobuf hands back bytes, not str, for a string field that is not valid UTF-8
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"a pid must be a non-negative int, not {v!r}")
    return v


_ZOMBIE_STATES = (TaskState.DEAD, TaskState.ZOMBIE)


def _state(value: int) -> TaskState:
    try:
        return TaskState(value)
    except ValueError:
        return TaskState.UNDEF


def _cg_set(core: Any) -> Optional[int]:
    # where CRIU's restore looks: the main thread's thread_core, else the older tc field
    if core.HasField("thread_core") and core.thread_core.HasField("cg_set"):
        return int(core.thread_core.cg_set)
    if core.HasField("tc") and core.tc.HasField("cg_set"):
        return int(core.tc.cg_set)
    return None


def _enum_name(message: Any, field_name: str) -> str:
    fd = message.DESCRIPTOR.fields_by_name[field_name]
    value = getattr(message, field_name)
    ev = fd.enum_type.values_by_number.get(value)
    return ev.name if ev is not None else str(value)


def _ns_ids(ids: Any) -> Dict[str, int]:
    return {
        k: int(getattr(ids, f"{k}_ns_id")) for k in NAMESPACE_KINDS if ids.HasField(f"{k}_ns_id")
    }


def _endpoint(words: Any, port: int) -> str:
    raw = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in list(words)[:4])
    if len(raw) == 16:
        addr = ipaddress.IPv6Address(raw)
        return f"{addr.ipv4_mapped}:{port}" if addr.ipv4_mapped else f"[{addr}]:{port}"
    if len(raw) == 4:
        return f"{ipaddress.IPv4Address(raw)}:{port}"
    return f"?:{port}"


def _unix_name(name: bytes) -> Optional[str]:
    if not name:
        return None
    if name[:1] == b"\0":
        return "@" + name[1:].decode(errors="replace")
    # a path name ends at its NUL (the kernel may count the terminator in the address)
    return name.split(b"\0", 1)[0].decode(errors="replace")


def _find_run(runs: List[PageRun], vaddr: int) -> Optional[PageRun]:
    # runs are in address order and do not overlap (checked when they were read)
    i = bisect.bisect_right(runs, vaddr, key=lambda r: r.vaddr) - 1
    if i >= 0 and vaddr < runs[i].vaddr + runs[i].nr_pages * PAGE_SIZE:
        return runs[i]
    return None


def _count_pages(vmas: List[Vma], runs: List[PageRun], base: Callable[[Vma], int]) -> None:
    """Add the pages of `runs` (in address order, not overlapping) that lie in each VMA to
    its dumped, lazy or in-parent count. `base` is where a VMA starts in the runs' address
    space: its start for a process's pagemap, its offset in the object for a shared
    object's (where VMAs may overlap). Prefix sums and a binary search per VMA end keep it
    O((VMAs + runs) log runs), whatever the images claim."""
    if not runs:
        return
    starts = [r.vaddr for r in runs]
    kinds = [0 if r.present else 1 if r.lazy else 2 if r.in_parent else 3 for r in runs]
    prefix = [[0] * (len(runs) + 1) for _ in range(3)]
    for i, (r, k) in enumerate(zip(runs, kinds, strict=True)):
        for c in range(3):
            prefix[c][i + 1] = prefix[c][i] + (r.nr_pages if k == c else 0)

    def below(x: int, c: int) -> int:
        """Pages of kind c below address x."""
        i = bisect.bisect_right(starts, x) - 1
        if i < 0:
            return 0
        inside = 0
        if kinds[i] == c:
            inside = min(x - runs[i].vaddr, runs[i].nr_pages * PAGE_SIZE) // PAGE_SIZE
        return prefix[c][i] + inside

    for v in vmas:
        lo, hi = base(v), base(v) + v.size
        v.pages_dumped += below(hi, 0) - below(lo, 0)
        v.pages_lazy += below(hi, 1) - below(lo, 1)
        v.pages_in_parent += below(hi, 2) - below(lo, 2)
