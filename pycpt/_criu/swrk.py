"""One `criu swrk` process and its RPC connection (the transport under pycpt.Criu)."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from typing import Callable, Optional, Sequence

from google.protobuf.message import DecodeError

from pycpt._criu import rpc_schema
from pycpt._native import check, ffi, lib

# How long CRIU gets to exit by itself once its connection is closed.
EXIT_GRACE_MS = 5000


class Swrk:
    """A running `criu swrk`: send requests, receive replies, reap the process.

    `close()` is idempotent and always reaps the process (killing it if it lingers).
    `pass_fd`: a descriptor of ours that CRIU inherits under the same number (a connected
    page-channel socket a request will name); the caller keeps and closes its own copy.
    """

    def __init__(
        self, argv: Sequence[str], pass_fd: Optional[int] = None, die_with_caller: bool = True
    ) -> None:
        self.pass_fd = pass_fd
        self.sock = -1
        self.pid = -1
        self.returncode: Optional[int] = None
        self._stderr_text = ""
        # CRIU's stderr: empty when all is well, the only clue when it dies at start-up.
        self._stderr = tempfile.TemporaryFile(prefix="pycpt-criu-stderr-")
        keep = [ffi.new("char[]", os.fsencode(a)) for a in argv]
        c_argv = ffi.new("char *[]", keep + [ffi.NULL])
        sock = ffi.new("int *")
        pid = ffi.new("int *")
        flags = lib.PYCPT_RPC_DIE_WITH_CALLER if die_with_caller else 0
        try:
            check(
                lib.pycpt_rpc_spawn(
                    c_argv,
                    self._stderr.fileno(),
                    -1 if pass_fd is None else pass_fd,
                    flags,
                    sock,
                    pid,
                ),
                f"starting {argv[-1] if argv else 'criu'} swrk",
            )
        except OSError:
            self._stderr.close()
            raise
        self.sock, self.pid = sock[0], pid[0]

    @property
    def alive(self) -> bool:
        """True while the connection is open."""
        return self.sock >= 0

    def send(self, request: "rpc_schema.Request") -> None:
        """Send one request as one packet."""
        data = request.SerializeToString()
        check(lib.pycpt_rpc_send(self.sock, data, len(data)), "sending a request to criu swrk")

    def receive(self) -> "tuple[rpc_schema.Response, int]":
        """Wait for the next reply; returns it and the descriptor sent along (or -1)."""
        while True:
            size = lib.pycpt_rpc_next_size(self.sock, -1)
            if size != -errno.EINTR:
                break  # after EINTR Python has run its signal handlers; wait again
        check(size, "waiting for criu swrk")
        buf = ffi.new("char[]", size)
        fd = ffi.new("int *")
        n = check(lib.pycpt_rpc_recv(self.sock, buf, size, fd), "reading from criu swrk")
        reply = rpc_schema.Response()
        try:
            reply.ParseFromString(ffi.buffer(buf, n)[:])
        except DecodeError as exc:
            if fd[0] >= 0:
                os.close(fd[0])
            raise OSError(errno.EPROTO, f"criu swrk sent an unreadable reply ({exc})") from exc
        return reply, fd[0]

    def call(
        self,
        request: "rpc_schema.Request",
        on_notify: Optional[Callable[["rpc_schema.Response", int], "rpc_schema.Request"]] = None,
    ) -> "rpc_schema.Response":
        """Send `request` and return the final reply, answering notifications on the way."""
        self.send(request)
        while True:
            reply, fd = self.receive()
            if reply.type != rpc_schema.RequestType.NOTIFY:
                if fd >= 0:
                    os.close(fd)
                return reply
            try:
                answer = on_notify(reply, fd) if on_notify else notify_ack(True)
            finally:
                if fd >= 0:
                    os.close(fd)
            self.send(answer)

    def stderr_text(self) -> str:
        """What CRIU printed on stderr (up to close(), once closed)."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read().decode(errors="replace")
        return self._stderr_text

    def close(self, grace_ms: int = EXIT_GRACE_MS) -> None:
        """Close the connection and reap CRIU; kill it if it does not exit in `grace_ms`."""
        if self.sock >= 0:
            os.close(self.sock)
            self.sock = -1
        if self.pid > 0 and self.returncode is None:
            status = self._wait(grace_ms)
            if status is None:
                os.kill(self.pid, signal.SIGKILL)
                status = self._wait(-1)
            self.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
        if not self._stderr.closed:
            self.stderr_text()
            self._stderr.close()

    def kill(self) -> None:
        """Kill CRIU now (from any thread); the caller blocked on it sees the connection drop."""
        if self.pid > 0 and self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _wait(self, timeout_ms: int) -> Optional[int]:
        status = ffi.new("int *")
        while True:
            ret = lib.pycpt_rpc_wait(self.pid, timeout_ms, status)
            if ret != -errno.EINTR:
                break
        if ret == -errno.ETIMEDOUT:
            return None
        if ret == -errno.ECHILD:  # reaped elsewhere (e.g. a SIGCHLD handler)
            return 0
        check(ret, f"reaping criu swrk {self.pid}")
        return status[0]

    def __enter__(self) -> "Swrk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def notify_ack(success: bool) -> "rpc_schema.Request":
    """The reply CRIU expects after a notification."""
    return rpc_schema.Request(type=rpc_schema.RequestType.NOTIFY, notify_success=success)
