"""CRIU's image streamer: `criu dump --stream` straight into a dump file, and
`criu restore --stream` straight from one.

With --stream CRIU writes no image file. It connects to `streamer-capture.sock` in its
images directory and, for every image, sends the image's name (a length-prefixed
StreamerRequest, as in its image files: a little-endian u32, then the message) followed by
one byte carrying the read end of a pipe (SCM_RIGHTS); the image's bytes come down that pipe
until CRIU closes it. Several pipes can be open at once (a pagemap beside its pages).
pycpt plays the streamer: each pipe is read on a thread of its own into DumpFileWriter,
which hashes every chunk on the other core while it is still in cache and writes it into
the dump file. So the images pass through memory once, while CRIU is still dumping,
instead of being written by CRIU and read back.

On restore CRIU connects to `streamer-serve.sock` and asks for each image by name; the
streamer answers whether it has it (a length-prefixed StreamerReply) and, if so, receives
the write end of a pipe and writes the image into it. pycpt serves the small parts from
memory (read and checked before CRIU started) and each memory image chunk by chunk, every
chunk checked against its hash (on a pool thread, a few chunks ahead) before it enters the
pipe: CRIU never parses a byte that was not checked.

CRIU serves --stream on its command line only: its RPC service opens the images directory
without a streamer (criu/cr-service.c), so these run `criu dump` / `criu restore` as
commands.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from pycpt import errors
from pycpt._criu import kdat
from pycpt._criu import log as criu_log
from pycpt._criu.rpc_schema import StreamerReply, StreamerRequest
from pycpt._sys.signals import held as signals_held
from pycpt.dumpfile import DumpFile, DumpFileWriter
from pycpt.engine import Engine

CAPTURE_SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
_CHUNK = 1 << 20  # per read: as much as a pipe may hold here (fs.pipe-max-size)
_MAX_NAME_MESSAGE = 4096


class _Streamer(abc.ABC):
    """The listening socket, the connection's loop on a thread, one thread per image;
    finish() once CRIU has exited."""

    SOCKET = ""

    def __init__(self, work_dir: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # through the directory's descriptor: a socket path is limited to 107 bytes, and
        # CRIU, started in work_dir with -D ., connects to the short ./streamer-capture.sock
        dirfd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._sock.bind(f"/proc/self/fd/{dirfd}/{self.SOCKET}")
        finally:
            os.close(dirfd)
        self._sock.listen(1)
        self._lock = threading.Lock()
        self._readers: List[threading.Thread] = []
        self._errors: List[BaseException] = []
        self._closing = False
        self._criu_pid: Optional[int] = None
        self._criu_running = threading.Event()
        self._aborted = False
        self._conn: Optional[socket.socket] = None
        self._server = threading.Thread(target=self._serve, name="pycpt-streamer", daemon=True)
        self._server.start()

    def criu_started(self, pid: int) -> None:
        """Tell the streamer which process is the CRIU it serves."""
        self._criu_pid = pid
        self._criu_running.set()

    def criu_pid(self, timeout: float = 30.0) -> int:
        """The pid of the CRIU being served (waits for criu_started())."""
        if not self._criu_running.wait(timeout) or self._criu_pid is None:
            raise errors.ImagesDirError("the streamer was not told which CRIU it serves")
        return self._criu_pid

    def abort(self) -> None:
        """Stop serving now (an interrupt): the connection and every pipe are closed, so
        CRIU's next read or write fails and it ends its dump or restore the way it ends any
        failure (a dumped tree left as it was, a half-restored one killed)."""
        self._aborted = True
        with self._lock:
            conn = self._conn
        for sock in (conn, self._sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def finish(self) -> None:
        """Wait until every image CRIU sent is in the writer; raise the first failure."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() if CRIU never came
        except OSError:
            pass
        self._server.join()
        self._sock.close()
        with self._lock:
            readers = list(self._readers)
        for thread in readers:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError as exc:
            if not self._closing and not self._aborted:
                self._fail(exc)
            return
        with self._lock:
            self._conn = conn
        try:
            with conn:
                while True:
                    head = _recv_exact(conn, 4)
                    if not head:
                        return  # CRIU is done: it closed the connection
                    (size,) = struct.unpack("<I", head)
                    if size > _MAX_NAME_MESSAGE:
                        raise errors.ImagesDirError(f"CRIU's streamer request claims {size} bytes")
                    name = StreamerRequest.FromString(_recv_exact(conn, size)).filename
                    if not self._announce(conn, name):
                        continue
                    _, fds, _, _ = socket.recv_fds(conn, 1, 1)
                    if len(fds) != 1:
                        raise errors.ImagesDirError(f"CRIU sent image {name} without its pipe")
                    worker = threading.Thread(
                        target=self._transfer,
                        args=(name, fds[0]),
                        name=f"pycpt-image-{name}",
                        daemon=True,
                    )
                    with self._lock:
                        self._readers.append(worker)
                    worker.start()
        except BaseException as exc:  # handed to finish(), in the caller's thread
            self._fail(exc)

    @abc.abstractmethod
    def _announce(self, conn: socket.socket, name: str) -> bool:
        """Before the pipe: True to go on with image `name`."""

    @abc.abstractmethod
    def _transfer(self, name: str, fd: int) -> None:
        """Move image `name` through pipe `fd` (closed afterwards)."""


class ImageCapture(_Streamer):
    """Listens on `work_dir`/streamer-capture.sock and feeds every image CRIU sends into
    `writer`."""

    SOCKET = CAPTURE_SOCKET

    def __init__(self, work_dir: Path, writer: DumpFileWriter) -> None:
        self._writer = writer
        super().__init__(work_dir)

    def _announce(self, conn: socket.socket, name: str) -> bool:
        return True  # on dump CRIU sends its pipe right after the name

    def _transfer(self, name: str, fd: int) -> None:
        try:
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)  # fewer, bigger reads
            except OSError:
                pass
            if not name.endswith(".img"):
                _drain(fd)  # CRIU's stats-dump and the like: not part of a dump file
                return
            part = self._writer.open_part(name)
            # two buffers in turn: one is hashed while the next is read (see write())
            buffers = [memoryview(bytearray(_CHUNK)) for _ in range(2)]
            turn = 0
            while not self._aborted:
                n = _fill(fd, buffers[turn])
                if n:
                    self._writer.write(part, buffers[turn][:n])
                    turn ^= 1
                if n < _CHUNK:
                    break
            else:  # interrupted: the image is cut short and must never count as whole
                raise errors.ImagesDirError(f"image {name}: the dump was interrupted")
            self._writer.close_part(part)
        except BaseException as exc:
            self._fail(exc)
        finally:
            os.close(fd)  # on a failure CRIU's next write gets EPIPE and the dump fails


def dump(
    engine: Engine,
    pid: int,
    work_dir: Path,
    writer: DumpFileWriter,
    *,
    freeze_cgroup: str,
    leave_running: bool,
    network_lock: Optional[str],
    extra_args: Sequence[str] = (),
    started: Optional[Callable[[int], None]] = None,
) -> None:
    """`criu dump --stream` of the tree at `pid` into `writer`, with CRIU's log in
    `work_dir`/dump.log. `started(pid)` is told CRIU's pid once it runs. Raises a CriuError
    subclass when CRIU fails (the streamer's own failure chained as its cause), or the
    streamer's own error when that came first (a full disk is no CRIU problem)."""
    log_path = work_dir / "dump.log"
    kdat.ensure(engine.argv)
    argv = engine.command(
        "dump",
        "--stream",
        "-t",
        str(pid),
        "-D",
        ".",
        "-o",
        log_path.name,
        "--freeze-cgroup",
        freeze_cgroup,
        *(("--leave-running",) if leave_running else ()),
        *(("--network-lock", network_lock) if network_lock else ()),
        *extra_args,
    )
    _run_streamed(
        argv, work_dir, ImageCapture(work_dir, writer), log_path, "DUMP", f" of pid {pid}", started
    )


# Called with an image's name and CRIU's pid when CRIU asks for that image, before it is
# answered: a hook into a point of CRIU's restore (see pycpt.container's network hold).
BeforeImage = Callable[[str, int], None]


class ImageServer(_Streamer):
    """Listens on `work_dir`/streamer-serve.sock and serves every image CRIU asks for from
    the open dump file `dump`: the parts in `held` (read and checked already) from memory,
    every other part chunk by chunk, each chunk read into a private buffer and checked
    against its hash before it goes into CRIU's pipe. CRIU never reads an unchecked byte;
    a mismatch stops the serving, so CRIU's restore fails. `unread()` names the parts CRIU
    did not read to their end (to check once it is done). If given, `before_image` is
    called before each answer; what it raises fails the restore."""

    SOCKET = SERVE_SOCKET

    def __init__(
        self,
        work_dir: Path,
        dump: DumpFile,
        held: Dict[str, bytes],
        before_image: Optional[BeforeImage] = None,
    ) -> None:
        self._dump = dump
        self._held = held
        self._before_image = before_image
        self._read_whole: Set[str] = set()
        super().__init__(work_dir)

    def unread(self) -> List[str]:
        """The parts not served to their end (call after finish())."""
        return sorted(set(self._dump.offsets) - self._read_whole)

    def _announce(self, conn: socket.socket, name: str) -> bool:
        if self._before_image is not None:
            self._before_image(name, self.criu_pid())
        exists = name in self._dump.offsets  # CRIU asks for optional images too
        reply = StreamerReply(exists=exists).SerializeToString()
        conn.sendall(struct.pack("<I", len(reply)) + reply)
        return exists

    def _transfer(self, name: str, fd: int) -> None:
        try:
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)
            except OSError:
                pass
            data = self._held.get(name)
            pieces: Iterable[Any] = (
                (memoryview(data),) if data is not None else (self._dump.chunks(name))
            )
            try:
                for piece in pieces:
                    if self._aborted:
                        return  # interrupted: CRIU fails for want of the rest
                    _write_all(fd, piece)
            except BrokenPipeError:
                return  # CRIU read what it wanted and closed its end
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # stops the read-ahead of a generator left early
            with self._lock:
                self._read_whole.add(name)
        except BaseException as exc:
            self._fail(exc)
        finally:
            os.close(fd)


def restore(
    engine: Engine,
    work_dir: Path,
    dump: DumpFile,
    held: Dict[str, bytes],
    *,
    root: str,
    extra_args: Sequence[str] = (),
    before_image: Optional[BeforeImage] = None,
    started: Optional[Callable[[int], None]] = None,
) -> Tuple[int, List[str]]:
    """`criu restore --stream -d --leave-stopped` of the tree in the open dump file `dump`
    (uncompressed), the parts in `held` served from memory (ImageServer); returns the
    restored root's pid and the parts CRIU did not read to their end, which the caller
    must check before the tree runs. The tree is left stopped (state T): the caller resumes
    it. `before_image(name, criu_pid)` runs as CRIU asks for each image; `started(pid)` is
    told CRIU's pid once it runs. Raises a CriuError subclass when CRIU fails (a damaged
    part chained as its cause), with CRIU's log in `work_dir`/restore.log."""
    log_path = work_dir / "restore.log"
    kdat.ensure(engine.argv)
    pidfile = work_dir / "restore.pid"
    argv = engine.command(
        "restore",
        "--stream",
        "-D",
        ".",
        "-o",
        log_path.name,
        "-d",
        "--leave-stopped",
        "--root",
        root,
        "--pidfile",
        str(pidfile),
        *extra_args,
    )
    server = ImageServer(work_dir, dump, held, before_image)
    _run_streamed(argv, work_dir, server, log_path, "RESTORE", "", started)
    try:
        return int(pidfile.read_text().split()[0]), server.unread()
    except (OSError, ValueError, IndexError) as exc:
        raise errors.CriuError(
            f"CRIU restored but left no pid in {pidfile}", request="RESTORE", log_path=str(log_path)
        ) from exc


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes, or b"" at a clean end before the first; never more, so that
    the byte carrying the next pipe is not read without its descriptor."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            if data:
                raise errors.ImagesDirError("CRIU's streamer connection ended inside a request")
            return b""
        data += chunk
    return data


def _fill(fd: int, buf: memoryview) -> int:
    """Read from the pipe until `buf` is full or the pipe ends; returns the bytes read."""
    got = 0
    while got < len(buf):
        n = os.readv(fd, [buf[got:]])
        if n == 0:
            break
        got += n
    return got


def _drain(fd: int) -> None:
    while os.read(fd, _CHUNK):
        pass


def _run_streamed(
    argv: Sequence[str],
    work_dir: Path,
    streamer: Any,
    log_path: Path,
    request: str,
    context: str,
    started: Optional[Callable[[int], None]] = None,
) -> None:
    """Run CRIU's command line `argv` while `streamer` (an ImageCapture or ImageServer)
    serves it; raise a CriuError subclass when CRIU fails (the streamer's own failure
    chained as its cause, when there is one), or the streamer's failure alone.

    CRIU runs in a session of its own (a Ctrl-C meant for pycpt must not kill it half-way
    through a dump, with its parasite code inside the tree), with SIGPIPE ignored as here
    (a closed pipe is an error CRIU handles, not its death) and umask 077 (its logs may
    quote the tree's arguments). It is never killed: when pycpt is interrupted, the
    streamer stops, CRIU fails and cleans up as on any failure, and pycpt waits for that."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
            cwd=work_dir,
            start_new_session=True,
            restore_signals=False,
            umask=0o077,
        )
    except BaseException:
        streamer.abort()
        streamer.finish()
        raise
    streamer.criu_started(proc.pid)
    try:
        if started is not None:
            started(proc.pid)
        _, stderr = proc.communicate()
    except BaseException:
        with signals_held():
            streamer.abort()
            proc.communicate()
            with contextlib.suppress(BaseException):
                streamer.finish()
        raise
    try:
        streamer.finish()
        streamer_error: Optional[BaseException] = None
    except BaseException as exc:
        streamer_error = exc
    if proc.returncode != 0:
        lines = criu_log.error_lines(log_path) or criu_log.error_lines_of(
            stderr.decode(errors="replace").splitlines()
        )
        verb = request.lower()
        why = criu_log.failure_text(lines)
        failure = criu_log.classify(lines)(
            f"CRIU {request}{context} failed{': ' + why if why else ''} "
            f"(criu {verb} --stream exited with {proc.returncode})",
            request=request,
            log_lines=lines,
            log_path=str(log_path),
        )
        if isinstance(streamer_error, (errors.DumpFileError, errors.ImagesDirError)):
            # the file (a full disk, a bad image) broke first; CRIU only saw its pipe close
            streamer_error.add_note(f"then CRIU stopped: {lines[0] if lines else failure}")
            raise streamer_error from failure
        raise failure from streamer_error
    if streamer_error is not None:
        raise streamer_error
