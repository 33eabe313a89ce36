"""The page channel: how memory flows between CRIU's two ends during a migration, set up in
one place so that its transport can change here alone.

One connection per migration, made before anything is frozen, and no port anywhere:

- the target listens on a Unix socket in a fresh 0700 directory of its own (PageListener),
  so only root there can reach it, and names it, with a fresh 64-byte key, over the
  migration's control channel;
- the source asks the migration's ssh master connection for a local forward from a socket
  in its own 0700 directory (ssh binds it 0600) to that path (`ssh -S CTL -O forward -L`),
  and connects (connect());
- before either CRIU sees the connection, the source sends the key's first half and the
  target answers with the second: each side knows the other is the one the control channel
  spoke for (defence in depth: only root could have connected anyway);
- then the forward is cancelled, the listener closed and both paths unlinked: nothing is
  left that anyone could connect to, and the connected socket is what CRIU gets: the
  target's `criu page-server --ps-socket` (stop-and-copy) or `criu lazy-pages --ps-socket`
  (post-copy), the source's dump with ps={"fd": N} (pycpt.criu hands it to CRIU).
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from pycpt import errors
from pycpt._migration.ssh import SshConnection
from pycpt.criu import Criu, LazyPagesDaemon, PageServerProcess

KEY_BYTES = 64  # each side proves half of it
SOCKET_NAME = "pages.sock"
CONNECT_TIMEOUT = 30.0  # seconds for the connection and the key exchange through ssh
# ssh's -L spec is LOCAL:REMOTE, and sun_path holds 107 bytes: plain, short paths only
SOCKET_PATH = re.compile(r"/[A-Za-z0-9._/-]{1,106}")
_HINT_FORWARDING = (
    "the target's sshd must allow forwarding Unix sockets: `AllowStreamLocalForwarding yes` "
    "(or `local`) in its sshd_config, then reload sshd (`pycpt migrate --dry-run` checks it)"
)


def check_socket_path(path: str, where: str) -> str:
    """`path` if it can name a page channel's socket (ssh's forward spec and sun_path)."""
    if not SOCKET_PATH.fullmatch(path) or "/../" in f"{path}/":
        raise errors.PageChannelError(
            f"the page channel's socket path {path!r} ({where}) is unusable: at most 107 "
            "bytes of letters, digits and . _ - /",
            hint="point TMPDIR at a short plain directory (e.g. /tmp)",
        )
    return path


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Up to `n` bytes: fewer if the other end closed or reset the connection (ssh resets
    the local end of a forward the target's sshd refused)."""
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
    return data


class PageListener:
    """The target's end while it waits for the source: a listening Unix socket in a fresh
    0700 directory, and the key. accept() takes the one connection and checks it; close()
    removes the socket and its directory (idempotent)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=".pycpt-pages-"))
        self.path = self.dir / SOCKET_NAME
        self.key = secrets.token_bytes(KEY_BYTES)
        self.sock: Optional[socket.socket] = None
        try:
            check_socket_path(str(self.path), "on the target")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.bind(str(self.path))
            self.sock.listen(1)
        except BaseException:
            self.close()
            raise

    def fields(self) -> Dict[str, Any]:
        """What the source needs (the target's "page-channel" message)."""
        return {"path": str(self.path), "key": self.key.hex()}

    def fileno(self) -> int:
        """The listening socket (readable once a connection waits)."""
        assert self.sock is not None
        return self.sock.fileno()

    def accept(self, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        """The connection that waits, once it proved the key's first half (it gets the
        second); the listener is gone before the key is read: a second one cannot come."""
        assert self.sock is not None
        conn, _ = self.sock.accept()
        self.close()
        try:
            conn.settimeout(timeout)
            half = KEY_BYTES // 2
            got = _recv_exact(conn, half)
            if not hmac.compare_digest(got, self.key[:half]):
                raise errors.PageChannelError(
                    "the connection on the page channel did not prove the migration's key "
                    f"({len(got)} of {half} bytes, wrong or missing); nothing was served",
                    hint="something else on this host connected to it (only root could): "
                    "check what runs here as root, then migrate again",
                )
            conn.sendall(self.key[half:])
            conn.settimeout(None)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        shutil.rmtree(self.dir, ignore_errors=True)


def connect(
    conn: SshConnection, fields: Dict[str, Any], timeout: float = CONNECT_TIMEOUT
) -> socket.socket:
    """The source's end: reach the target's listener named in `fields` (its "page-channel"
    message) through a local forward of the ssh master connection, and prove the key.
    PageChannelRefusedError if the connection closes before the key came back (the target's
    sshd refused to forward it)."""
    remote = check_socket_path(fields["path"], "named by the target")
    key = bytes.fromhex(fields["key"])
    half = len(key) // 2
    local = conn.directory / SOCKET_NAME
    check_socket_path(str(local), "here")
    conn.forward_socket(str(local), remote)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(local))  # ssh's listener; ssh connects to the target's now
        try:
            sock.sendall(key[:half])
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused at once: nothing comes back, said below
        got = _recv_exact(sock, half)
        if not got:
            raise errors.PageChannelRefusedError(
                f"the ssh connection to {conn.target} would not carry the page channel: it "
                "closed it at once (the target's sshd refused to forward a Unix socket)",
                host=str(conn.target),
                hint=_HINT_FORWARDING,
            )
        if not hmac.compare_digest(got, key[half:]):
            raise errors.PageChannelError(
                "the page channel's other end did not prove the migration's key",
                host=str(conn.target),
            )
        sock.settimeout(None)
    except socket.timeout as exc:
        sock.close()
        raise errors.PageChannelError(
            f"the page channel to {conn.target} did not answer within {timeout:g} s",
            host=str(conn.target),
            hint=_HINT_FORWARDING,
        ) from exc
    except BaseException:
        sock.close()
        raise
    finally:
        # connected (or failed): nothing may connect there any more
        conn.cancel_socket_forward(str(local), remote)
        try:
            os.unlink(local)
        except FileNotFoundError:
            pass
    return sock


def source_dump_options(sock: socket.socket) -> Dict[str, Any]:
    """CRIU dump options that send (stop-and-copy) or serve (post-copy) the memory on the
    connected page channel."""
    return {"ps": {"fd": sock.fileno()}}


def postcopy_target(criu: Criu, images: Path, sock: socket.socket) -> LazyPagesDaemon:
    """The target's end for post-copy: a lazy-pages daemon fetching over the page channel."""
    return criu.lazy_pages(images, fd=sock.fileno())


def stopcopy_target(criu: Criu, images: Path, sock: socket.socket) -> PageServerProcess:
    """The target's end for stop-and-copy: a page server writing what comes on the page
    channel into `images`."""
    return criu.page_server_process(images, fd=sock.fileno())
