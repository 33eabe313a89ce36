"""The control channel between the two pycpt processes of a migration (the ssh session's
pipes): framed messages, each checked against pycpt._migration.messages, and heartbeats.

A message is a 4-byte big-endian length, a JSON object of that length, and, for "file", that
many raw bytes. Files travel with their SHA-256, computed while each chunk is still in the
CPU's cache, and are checked on arrival.

Dead peers are noticed within seconds, not when TCP gives up: each side sends a heartbeat
("hb") every HEARTBEAT seconds from a thread of its own, and a side that hears nothing at all
from the other for DEAD_AFTER seconds ($PYCPT_MIGRATE_DEAD_AFTER, default 8; any byte counts,
so a long file is its own heartbeat) raises PeerSilentError, whether it was reading or
writing. ssh's own keep-alives come on top (pycpt._migration.ssh).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from pycpt import errors
from pycpt._migration import messages
from pycpt.errors import ChannelClosed, MigrationProtocolError, PeerSilentError

CHUNK = 1 << 20
_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20
HEARTBEAT = 1.0
READ_AHEAD = 8 << 20  # bytes the reader thread takes ahead of the consumer


def dead_after() -> float:
    """Seconds of silence after which the other side counts as gone."""
    text = os.environ.get("PYCPT_MIGRATE_DEAD_AFTER")
    try:
        value = float(text) if text else 8.0
    except ValueError:
        value = 8.0
    return value if value >= 2 * HEARTBEAT else 2 * HEARTBEAT


FileLike = Union[int, IO[bytes]]


def _fd(f: FileLike) -> int:
    return f if isinstance(f, int) else f.fileno()


class Channel:
    """Both directions of one connection: read from `inp`, write to `out` (descriptors or
    file objects; only their descriptors are used, so nothing hides in a Python buffer).

    `accepts` and `sends` are the operation tables (messages.FROM_SOURCE / FROM_TARGET) of
    what may arrive and what may leave; `peer` names the other side in errors.
    """

    def __init__(
        self,
        inp: FileLike,
        out: FileLike,
        *,
        accepts: Mapping[str, messages.Op],
        sends: Mapping[str, messages.Op],
        peer: str = "the other side",
        silence: Optional[float] = None,
    ) -> None:
        self.inp = _fd(inp)
        self.out = _fd(out)
        self.accepts = accepts
        self.sends = sends
        self.peer = peer
        self.silence = silence if silence is not None else dead_after()
        flags = fcntl.fcntl(self.out, fcntl.F_GETFL)
        fcntl.fcntl(self.out, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # writes wait in poll()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_heard = time.monotonic()
        self.stage = ""  # sent along with each heartbeat
        self.beat_fields: Optional[Callable[[], Dict[str, Any]]] = None
        self.peer_beat: Dict[str, Any] = {}  # the other side's last heartbeat
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self._beats: Optional[threading.Thread] = None
        self._seq = 0
        # a thread reads all the time, so that silence is measured from what arrived, even
        # while this side is busy elsewhere (a dump, a restore)
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._error: Optional[BaseException] = None
        self._notify_r, self._notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._reader = threading.Thread(target=self._read_loop, name="pycpt-reader", daemon=True)
        self._reader.start()

    # --- heartbeats ----------------------------------------------------------------------

    def start_heartbeats(self, interval: float = HEARTBEAT) -> None:
        """Send "hb" every `interval` seconds until close() (or the connection breaks)."""
        if self._beats is not None:
            return

        def beat() -> None:
            while not self._stop.wait(interval):
                # a file being sent holds the lock: its bytes are liveness enough
                if not self._wlock.acquire(timeout=interval):
                    continue
                try:
                    fields = self.beat_fields() if self.beat_fields else {}
                    self._send_locked("hb", {"seq": self._seq, "stage": self.stage, **fields})
                    self._seq += 1
                except (errors.PycptError, OSError, ValueError):
                    return  # the main thread meets the same failure on its next call
                finally:
                    self._wlock.release()

        self._beats = threading.Thread(target=beat, name="pycpt-heartbeat", daemon=True)
        self._beats.start()

    def close(self) -> None:
        """Stop the heartbeats and the reader (the descriptors belong to the caller).
        Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in (self._beats, self._reader):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        self._beats = None
        if self._notify_r >= 0:
            os.close(self._notify_r)
            os.close(self._notify_w)
            self._notify_r = self._notify_w = -1

    # --- sending -------------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> None:
        """Send one message without payload."""
        with self._wlock:
            self._send_locked(op, fields)

    def _send_locked(self, op: str, fields: Dict[str, Any]) -> None:
        msg = {"op": op, **fields}
        messages.check(msg, self.sends, "this side")  # our own bug must not reach the peer
        self._write(self._frame(msg))

    @staticmethod
    def _frame(msg: Dict[str, Any]) -> bytes:
        data = json.dumps(msg, separators=(",", ":")).encode()
        return _LEN.pack(len(data)) + data

    def send_files(self, directory: Path, names: Iterable[str]) -> int:
        """Send each file of `directory` named in `names`, then an end marker; returns the
        bytes of file data sent."""
        total = 0
        for name in names:
            path = directory / name
            with open(path, "rb", buffering=0) as f, self._wlock:
                size = os.fstat(f.fileno()).st_size
                self._write(self._frame({"op": "file", "name": name, "size": size}))
                digest = hashlib.sha256()
                left = size
                while left:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        raise errors.MigrationError(f"{path} shrank while being sent")
                    digest.update(data)
                    self._write(data)
                    left -= len(data)
                self._write(self._frame({"op": "sha256", "name": name, "hex": digest.hexdigest()}))
            total += size
        self.send("files-end")
        return total

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        since = time.monotonic()  # the last time the other side took a byte
        while view:
            try:
                n = os.write(self.out, view)
            except BlockingIOError:
                left = since + self.silence - time.monotonic()
                if left <= 0:
                    raise PeerSilentError(
                        f"{self.peer} has taken nothing for {self.silence:.0f} s "
                        "(the link is cut, or that host hangs)",
                        stage=self.stage,
                    ) from None
                poller = select.poll()
                poller.register(self.out, select.POLLOUT)
                poller.poll(left * 1000)
                continue
            except (BrokenPipeError, ConnectionError) as exc:
                raise ChannelClosed(
                    f"the connection to {self.peer} broke while sending", stage=self.stage
                ) from exc
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    raise ChannelClosed(
                        f"the connection to {self.peer} is closed", stage=self.stage
                    ) from exc
                raise
            view = view[n:]
            self.bytes_sent += n
            since = time.monotonic()

    # --- receiving -----------------------------------------------------------------------

    def receive(
        self, timeout: Optional[float] = None, wake: Sequence[int] = ()
    ) -> Optional[Dict[str, Any]]:
        """The next message other than a heartbeat, checked against `accepts`. With a
        `timeout` (seconds), None when none is complete by then; None as well as soon as one
        of the descriptors in `wake` becomes readable (e.g. a pidfd: a process ended).
        Raises PeerSilentError after `silence` seconds without a byte, ChannelClosed at the
        end of the stream, MigrationProtocolError for a message that breaks the protocol."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._fill(_LEN.size, deadline, wake):
                return None
            with self._cond:
                (length,) = _LEN.unpack_from(self._buf)
            if length > MAX_HEADER:
                raise MigrationProtocolError(f"{self.peer} sent a {length}-byte message header")
            if not self._fill(_LEN.size + length, deadline, wake):
                return None
            with self._cond:
                raw = bytes(self._buf[_LEN.size : _LEN.size + length])
                del self._buf[: _LEN.size + length]
                self._cond.notify_all()
            msg = parse(raw, self.accepts, self.peer)
            if msg["op"] != "hb":
                return msg
            self.peer_beat = msg

    def expect(self, *ops: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The next message, which must be one of `ops`; an "error" message from the other
        side is raised as the MigrationError it describes. With a `timeout`, PeerSilentError
        if none came by then."""
        msg = self.receive(timeout)
        if msg is None:
            raise PeerSilentError(
                f"{self.peer} did not answer within {timeout:g} s", stage=self.stage
            )
        if msg["op"] == "error":
            raise remote_error(msg)
        if msg["op"] not in ops:
            raise MigrationProtocolError(
                f"{self.peer} sent {msg['op']!r} where {' or '.join(map(repr, ops))} belongs",
                stage=self.stage,
            )
        return msg

    def receive_files(self, directory: Path, space_left: Optional[int] = None) -> Tuple[int, int]:
        """Write the files that arrive into `directory` (until the end marker), checking each
        one's SHA-256 and that all of them fit in `space_left` bytes; returns (files, bytes)."""
        count = total = 0
        while True:
            msg = self.expect("file", "files-end")
            if msg["op"] == "files-end":
                return count, total
            name, size = msg["name"], msg["size"]
            if space_left is not None and total + size > space_left:
                raise errors.TargetIncompatibleError(
                    f"not enough space for the images: {name} ({size} bytes) would pass the "
                    f"{space_left} bytes free",
                    stage="transfer",
                    hint="free space on the target, then migrate again",
                )
            digest = hashlib.sha256()
            fd = os.open(
                directory / name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            try:
                left = size
                while left:
                    data = self._take(min(CHUNK, left))
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    left -= len(data)
            finally:
                os.close(fd)
            check = self.expect("sha256")
            if check["name"] != name or check["hex"] != digest.hexdigest():
                raise errors.MigrationError(
                    f"image {name} arrived damaged (SHA-256 differs)", stage="transfer"
                )
            count += 1
            total += size

    def _take(self, most: int) -> bytes:
        """Up to `most` bytes of payload (at least one), waiting as long as bytes come."""
        self._fill(1, None, ())
        with self._cond:
            data = bytes(self._buf[:most])
            del self._buf[: len(data)]
            self._cond.notify_all()  # the reader may wait for room
        return data

    def _fill(self, n: int, deadline: Optional[float], wake: Sequence[int]) -> bool:
        """Wait until `n` bytes are buffered; False at the deadline or when `wake` fires.
        The silence counts from the last byte the reader thread took, whether or not we
        were reading then."""
        poller = select.poll()
        poller.register(self._notify_r, select.POLLIN)
        for fd in wake:
            poller.register(fd, select.POLLIN)
        while True:
            with self._cond:
                if len(self._buf) >= n:
                    return True
                if self._error is not None:
                    raise ChannelClosed(
                        f"the connection to {self.peer} broke", stage=self.stage
                    ) from self._error
                if self._eof:
                    raise ChannelClosed(f"{self.peer} closed the connection", stage=self.stage)
                now = time.monotonic()
                left = self.last_heard + self.silence - now
                if left <= 0:
                    raise PeerSilentError(
                        f"nothing came from {self.peer} for {now - self.last_heard:.1f} s "
                        "(the link is cut, or that host or its pycpt hangs)",
                        stage=self.stage,
                    )
            if deadline is not None:
                if deadline <= now:
                    return False
                left = min(left, deadline - now)
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if ready.get(self._notify_r):
                try:
                    os.read(self._notify_r, 4096)
                except BlockingIOError:
                    pass
            if any(ready.get(fd) for fd in wake):
                return False

    def _read_loop(self) -> None:
        """The reader thread: takes whatever arrives into the buffer (up to READ_AHEAD
        bytes not yet consumed) and notes when it arrived."""
        poller = select.poll()
        poller.register(self.inp, select.POLLIN)
        while not self._stop.is_set():
            with self._cond:
                if len(self._buf) >= READ_AHEAD:
                    # bytes we have not consumed yet prove the other side was there
                    self.last_heard = time.monotonic()
                    self._cond.wait(0.2)
                    continue
            if not poller.poll(200):
                continue
            try:
                data = os.read(self.inp, CHUNK)
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                self._notify()
                return
            with self._cond:
                if data:
                    self._buf += data
                    self.bytes_received += len(data)
                    self.last_heard = time.monotonic()
                else:
                    self._eof = True
                self._cond.notify_all()
            self._notify()
            if not data:
                return

    def _notify(self) -> None:
        try:
            os.write(self._notify_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or we are closing)


def parse(raw: bytes, accepts: Mapping[str, messages.Op], peer: str) -> Dict[str, Any]:
    """One message's JSON text, decoded and checked; MigrationProtocolError if it is not
    a message `accepts` lists."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MigrationProtocolError(f"{peer} sent a message that is not JSON") from exc
    return messages.check(obj, accepts, peer)


def error_message(exc: BaseException) -> Dict[str, Any]:
    """An exception as an "error" message's fields (kind, message, hint, stage)."""
    kind = type(exc).__name__
    text = str(getattr(exc, "message", "") or exc)
    return {
        "kind": kind if kind in messages.KINDS else "MigrationError",
        "message": text[: messages.MAX_TEXT],
        "hint": str(getattr(exc, "hint", "") or "")[: messages.MAX_TEXT],
        "stage": str(getattr(exc, "stage", "") or "")[:64],
    }


def remote_error(msg: Dict[str, Any]) -> errors.MigrationError:
    """The MigrationError for an "error" message the other side sent."""
    kinds = {
        cls.__name__: cls
        for cls in (
            errors.TargetIncompatibleError,
            errors.TargetContainerExistsError,
            errors.MigrationProtocolError,
            errors.MigrationError,
        )
    }
    cls = kinds.get(msg["kind"], errors.MigrationError)
    return cls(
        f"on the target: {msg['message']}",
        stage=msg.get("stage", ""),
        hint=msg.get("hint", ""),
    )
