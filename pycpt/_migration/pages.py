"""The page channel: how memory flows between CRIU's two ends during a migration, set up in
one place so that its transport can change here alone.

Today both ends are TCP ports on 127.0.0.1 joined by a port forward of the migration's ssh
connection (pycpt._migration.ssh): post-copy forwards a port of the target to the source's
lazy page server; stop-and-copy forwards a port of the source to the target's page server.
The source side returns the CRIU options its dump needs and the fields the target's side
gets in the "restore" (post-copy) message; the target side starts CRIU's end from them.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Dict, Tuple

from pycpt._migration.ssh import SshConnection
from pycpt.criu import Criu, LazyPagesDaemon, PageServer

LOCALHOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


class PostcopySource:
    """The source's end for post-copy: its lazy dump serves pages on a local port that the
    target reaches through a remote forward."""

    def __init__(self, conn: SshConnection) -> None:
        self.local_port = _free_port()
        self.remote_port = conn.forward_remote(self.local_port)

    def dump_options(self) -> Dict[str, Any]:
        """CRIU dump options for the lazy page server."""
        return {"ps": {"address": LOCALHOST, "port": self.local_port}}

    def restore_fields(self) -> Dict[str, Any]:
        """What the target needs to reach it (fields of the "restore" message)."""
        return {"lazy_port": self.remote_port}


def postcopy_target(criu: Criu, images: Path, restore_msg: Dict[str, Any]) -> LazyPagesDaemon:
    """The target's end for post-copy: a lazy-pages daemon fetching from the source."""
    return criu.lazy_pages(images, address=LOCALHOST, port=int(restore_msg["lazy_port"]))


def stopcopy_target(criu: Criu, images: Path) -> Tuple[PageServer, Dict[str, Any]]:
    """The target's end for stop-and-copy: a page server writing into `images`; returns it
    and the fields of the "page-server" reply."""
    server = criu.page_server(images, address=LOCALHOST, port=0)
    return server, {"port": server.port}


class StopcopySource:
    """The source's end for stop-and-copy: a local port forwarded to the target's page
    server (whose reply fields are `reply`)."""

    def __init__(self, conn: SshConnection, reply: Dict[str, Any]) -> None:
        self.local_port = _free_port()
        conn.forward_local(int(reply["port"]), self.local_port)

    def dump_options(self) -> Dict[str, Any]:
        """CRIU dump options that send the memory to the target's page server."""
        return {"ps": {"address": LOCALHOST, "port": self.local_port}}
