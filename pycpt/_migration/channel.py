"""Messages between the two pycpt processes of a migration, over the ssh session's pipes.

A message is a 4-byte big-endian length, a JSON object of that length, and, when the object
has "size", that many raw bytes (an image file). Files travel with their SHA-256, computed
while each chunk is still in the CPU's cache, and are checked on arrival.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Optional, Tuple

from pycpt import errors
from pycpt.errors import ChannelClosed

CHUNK = 1 << 20
_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20


class Channel:
    """Both directions of one connection: `inp` to read from, `out` to write to."""

    def __init__(self, inp: IO[bytes], out: IO[bytes]) -> None:
        self.inp = inp
        self.out = out
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- sending -------------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> None:
        """Send one message without payload."""
        self._header({"op": op, **fields})
        self._flush()

    def send_files(self, directory: Path, names: Iterable[str]) -> int:
        """Send each file of `directory` named in `names`, then an end marker; returns the
        bytes of file data sent."""
        total = 0
        for name in names:
            path = directory / name
            size = path.stat().st_size
            self._header({"op": "file", "name": name, "size": size})
            digest = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                left = size
                while left:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        raise errors.MigrationError(f"{path} shrank while being sent")
                    digest.update(data)
                    self._write(data)
                    left -= len(data)
            self._header({"op": "sha256", "name": name, "hex": digest.hexdigest()})
            total += size
        self._header({"op": "files-end"})
        self._flush()
        return total

    def _header(self, obj: Dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self._write(_LEN.pack(len(data)) + data)

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
        except (BrokenPipeError, ConnectionError, ValueError) as exc:
            raise ChannelClosed(
                "the connection to the other host broke while sending", stage="transfer"
            ) from exc
        self.bytes_sent += len(data)

    def _flush(self) -> None:
        try:
            self.out.flush()
        except (BrokenPipeError, ConnectionError, ValueError) as exc:
            raise ChannelClosed(
                "the connection to the other host broke while sending", stage="transfer"
            ) from exc

    # --- receiving -----------------------------------------------------------------------

    def receive(self) -> Dict[str, Any]:
        """The next message's header (a dict with "op")."""
        (length,) = _LEN.unpack(self._read(_LEN.size))
        if length > MAX_HEADER:
            raise errors.MigrationError(f"protocol error: a {length}-byte header")
        obj = json.loads(self._read(length))
        if not isinstance(obj, dict) or "op" not in obj:
            raise errors.MigrationError(f"protocol error: {obj!r}")
        return obj

    def expect(self, *ops: str) -> Dict[str, Any]:
        """The next message, which must be one of `ops`; an "error" message from the other
        side is raised as the MigrationError it describes."""
        msg = self.receive()
        if msg["op"] == "error":
            raise remote_error(msg)
        if msg["op"] not in ops:
            raise errors.MigrationError(
                f"protocol error: expected {'/'.join(ops)}, got {msg['op']}"
            )
        return msg

    def receive_files(self, directory: Path, space_left: Optional[int] = None) -> Tuple[int, int]:
        """Write the files that arrive into `directory` (until the end marker), checking each
        one's SHA-256; returns (files, bytes)."""
        count = total = 0
        while True:
            msg = self.expect("file", "files-end")
            if msg["op"] == "files-end":
                return count, total
            name, size = str(msg["name"]), int(msg["size"])
            if "/" in name or name in ("", ".", ".."):
                raise errors.MigrationError(f"protocol error: file name {name!r}")
            if space_left is not None and total + size > space_left:
                raise errors.TargetIncompatibleError(
                    f"not enough space for the images: {name} would pass {space_left} bytes",
                    stage="transfer",
                    hint="free space on the target, then migrate again",
                )
            digest = hashlib.sha256()
            fd = os.open(
                directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            try:
                left = size
                while left:
                    data = self._read(min(CHUNK, left))
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    left -= len(data)
            finally:
                os.close(fd)
            check = self.expect("sha256")
            if check.get("name") != name or check.get("hex") != digest.hexdigest():
                raise errors.MigrationError(
                    f"image {name} arrived damaged (SHA-256 differs)", stage="transfer"
                )
            count += 1
            total += size

    def _read(self, n: int) -> bytes:
        chunks = []
        left = n
        while left:
            try:
                data = self.inp.read(left)
            except (ConnectionError, ValueError, OSError) as exc:
                raise ChannelClosed(
                    "the connection to the other host broke", stage="transfer"
                ) from exc
            if not data:
                raise ChannelClosed("the other host closed the connection", stage="transfer")
            chunks.append(data)
            left -= len(data)
        self.bytes_received += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_message(exc: BaseException) -> Dict[str, Any]:
    """An exception as an "error" message's fields (kind, message, hint, stage)."""
    return {
        "kind": type(exc).__name__,
        "message": getattr(exc, "message", str(exc)),
        "hint": getattr(exc, "hint", ""),
        "stage": getattr(exc, "stage", ""),
    }


def remote_error(msg: Dict[str, Any]) -> errors.MigrationError:
    """The MigrationError for an "error" message the other side sent."""
    kinds = {
        cls.__name__: cls
        for cls in (
            errors.TargetIncompatibleError,
            errors.TargetContainerExistsError,
            errors.MigrationError,
        )
    }
    cls = kinds.get(str(msg.get("kind")), errors.MigrationError)
    return cls(
        f"on the target: {msg.get('message')}",
        stage=str(msg.get("stage", "")),
        hint=str(msg.get("hint") or ""),
    )
