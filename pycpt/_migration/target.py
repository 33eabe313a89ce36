"""The target's half of a migration: `pycpt migrate-target CT`, started by the source over
ssh, speaking pycpt._migration.channel messages on its stdin and stdout.

It checks that the container can come here (preflight), receives the images, rebuilds the
container frozen, runs it when told, and keeps it only once the source says "commit". If the
source goes away before that, everything received or rebuilt here is removed again. A
container taken over from a dead agent is cleaned up by `migrate-target --abort TOKEN CT`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional

from pycpt import errors
from pycpt._criu import log as criu_log
from pycpt._migration.channel import Channel, error_message
from pycpt._sys.cgroups import remove_cgroup
from pycpt._sys.procfs import mounts_below, start_time
from pycpt._sys.state import Lock, write_json
from pycpt._version import __version__
from pycpt.container import Container, cgroup_root
from pycpt.criu import Criu, LazyPagesDaemon, PageServer
from pycpt.engine import Engine, find_engine
from pycpt.errors import ChannelClosed
from pycpt.freezer import Freezer

PROTOCOL = 1


def images_parent(need: int) -> str:
    """Where images go for a while: $PYCPT_IMAGES_DIR if set, else tmpfs (/dev/shm) when it
    has room, else $TMPDIR."""
    chosen = os.environ.get("PYCPT_IMAGES_DIR")
    if chosen:
        return chosen
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > need + (256 << 20):
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def free_bytes(path: str) -> int:
    """Free space of the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Agent:
    """One incoming container, from hello to commit (or rollback)."""

    def __init__(self, ct: str, channel: Channel) -> None:
        self.ct = Container(ct)
        self.ch = channel
        self.lock: Optional[Lock] = None
        self.images: Optional[Path] = None
        self.lazy: Optional[LazyPagesDaemon] = None
        self.token = ""
        self.root: Optional[str] = None
        self.final = False  # the container is here for good (committed, every page in)
        self.claimed = False  # an incoming record of ours exists here
        self.incoming: Dict[str, Any] = {}  # what that record says for --abort
        self.hello: Dict[str, Any] = {}
        self.criu: Optional[Criu] = None
        self.engine: Optional[Engine] = None
        self.page_server: Optional[PageServer] = None

    # --- the conversation --------------------------------------------------------------

    def serve(self) -> int:
        try:
            self._serve()
            return 0
        except ChannelClosed:
            return 1  # the source went away: roll back (finally), nobody to tell
        except BaseException as exc:
            try:
                self.ch.send("error", **error_message(exc))
            except errors.PycptError:
                pass
            if not isinstance(exc, (errors.PycptError, ValueError, OSError)):
                raise
            return 1
        finally:
            try:
                if not self.final:
                    self.rollback()
            finally:
                self.close()

    def _serve(self) -> None:
        self.hello = hello = self.ch.expect("hello")
        self.token = str(hello["token"])
        cpuinfo = Path(tempfile.mkdtemp(prefix=".pycpt-cpuinfo-"))
        try:
            self.ch.receive_files(cpuinfo, space_left=1 << 20)
            report = self.preflight(hello, cpuinfo)
        finally:
            shutil.rmtree(cpuinfo, ignore_errors=True)
        if not hello.get("dry_run"):
            self.criu = Criu(self.engine)
            self.criu.prepare()  # CRIU for the restore, started before the source freezes
            if self.criu.prepared_pid:
                self._record_process("criu", self.criu.prepared_pid)
        self.ch.send("ready", **report)
        while True:
            msg = self.ch.expect(
                "page-server",
                "page-server-result",
                "images",
                "restore",
                "resume",
                "commit",
                "bye",
                "abort",
            )
            op = msg["op"]
            if op == "page-server":
                self.start_page_server(int(msg.get("expect", 0)))
            elif op == "page-server-result":
                self.report_page_server()
            elif op == "images":
                self.receive_images(int(msg.get("expect", 0)))
            elif op == "restore":
                self.restore(msg)
            elif op == "resume":
                self.resume()
            elif op == "commit":
                self.commit()
            elif op == "abort":
                if self.final:  # it runs here for good: never undo that
                    self.ch.send("committed")
                    return
                self.rollback()
                self.ch.send("aborted")
                return
            else:  # bye
                return

    def preflight(self, hello: Dict[str, Any], cpuinfo: Path) -> Dict[str, Any]:
        """Every check that can fail before the source freezes; raises the first failure."""
        if hello.get("protocol") != PROTOCOL:
            raise errors.TargetIncompatibleError(
                f"pycpt {__version__} here speaks migration protocol {PROTOCOL}, the source "
                f"speaks {hello.get('protocol')}",
                stage="preflight",
                hint="install the same pycpt version on both hosts",
            )
        try:
            engine = self.engine = find_engine()
        except errors.EngineError as exc:
            raise errors.TargetIncompatibleError(
                f"no usable CRIU: {exc.message}",
                stage="preflight",
                hint="run `pycpt engine install` on the target",
            ) from exc
        source_criu = tuple(hello.get("criu") or ())
        if tuple(engine.version) < source_criu:
            raise errors.TargetIncompatibleError(
                f"CRIU {engine.version_string} here is older than the source's "
                f"{'.'.join(map(str, source_criu))}, which wrote the images",
                stage="preflight",
                hint="run `pycpt engine install` on the target to update its CRIU",
            )
        with Criu(engine) as criu:
            if not criu.cpuinfo_check(cpuinfo):
                why = criu_log.error_lines(cpuinfo / "cpuinfo.log")
                raise errors.TargetIncompatibleError(
                    "CRIU's cpuinfo check refused the source's CPU here"
                    + (f": {why[-1]}" if why else ""),
                    stage="preflight",
                    hint="migrate to a host with the same or a newer CPU",
                )
            if hello.get("mode") == "postcopy" and not criu.features().get("lazy_pages"):
                raise errors.TargetIncompatibleError(
                    "post-copy needs userfaultfd, which CRIU cannot use here",
                    stage="preflight",
                    hint="use --mode stopcopy",
                )
        self.claim()
        memory = int(hello.get("memory", 0))
        parent = images_parent(memory)
        need_disk = 0 if hello.get("mode") == "postcopy" else memory
        if free_bytes(parent) < need_disk + (64 << 20):
            raise errors.TargetIncompatibleError(
                f"not enough space for {memory >> 20} MiB of images in {parent} "
                f"({free_bytes(parent) >> 20} MiB free)",
                stage="preflight",
                hint="free space on the target",
            )
        if mem_available() < memory:
            raise errors.TargetIncompatibleError(
                f"not enough memory: the container uses {memory >> 20} MiB, "
                f"{mem_available() >> 20} MiB available here",
                stage="preflight",
                hint="free memory on the target or choose another host",
            )
        if hello.get("root"):
            if shutil.which("rsync") is None:
                raise errors.TargetIncompatibleError(
                    "rsync is missing (it copies the container's root directory)",
                    stage="preflight",
                    hint="apt-get install rsync on the target",
                )
            self.root = str(self.ct.root / "root" / self.ct.id)
        report = {
            "pycpt": __version__,
            "criu": list(engine.version),
            "images_dir": parent,
            "free": free_bytes(parent),
            "mem_available": mem_available(),
            "root": self.root,
        }
        if hello.get("dry_run"):
            self.release()
        elif self.root and not os.path.exists(self.root):
            os.makedirs(self.root)
            self.incoming["made_root"] = self.root  # removed again on a rollback
            self.ct._save(**self.incoming)
        return report

    def claim(self) -> None:
        """Take the id here: lock it and record an incoming container (or refuse if taken).
        A dry run only looks, leaving no trace."""
        if not self.hello.get("dry_run"):
            self.lock = self.ct.lock()
        if self.ct.exists and not self.ct.state.get("migration"):
            raise errors.TargetContainerExistsError(
                f"container {self.ct.id} already exists here ({self.ct.status.value})",
                stage="preflight",
            )
        if self.lock is None:
            return
        if self.ct.exists:
            clean_incoming(self.ct, self.ct.state)  # the remains of a migration whose agent died
        self.ct.dir.mkdir(parents=True, exist_ok=True)
        self.incoming = {"migration": self.token, "agent_pid": os.getpid()}
        write_json(
            self.ct.dir / "state.json",
            {
                "id": self.ct.id,
                "phase": "stopped",
                "cgroup": str(cgroup_root() / self.ct.id),
                **self.incoming,
            },
            durable=False,
        )
        self.claimed = True

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _record_process(self, what: str, pid: int) -> None:
        """Note a process of ours in the incoming record, for --abort should we die."""
        self.incoming.setdefault("processes", []).append([what, pid, start_time(pid)])
        self.ct._save(**self.incoming)

    def _make_images_dir(self, expect: int) -> Path:
        if self.images is None:
            self.images = Path(
                tempfile.mkdtemp(prefix=f".pycpt-incoming-{self.ct.id}-", dir=images_parent(expect))
            )
            self.incoming["images"] = str(self.images)
            self.ct._save(**self.incoming)  # what --abort cleans up, should this process die
        return self.images

    def start_page_server(self, expect: int) -> None:
        """A CRIU page server writing the memory the source's dump sends straight into the
        images directory (through the source's ssh tunnel), so it is never copied twice."""
        assert self.criu is not None
        images = self._make_images_dir(expect)
        self.page_server = self.criu.page_server(images, address="127.0.0.1", port=0)
        self._record_process("page_server", self.page_server.pid)
        self.ch.send("page-server", port=self.page_server.port)

    def report_page_server(self, timeout: float = 3.0) -> None:
        """After the source's dump failed: did our page server fail, and why (a full disk
        here looks like a broken pipe there)?"""
        status: Optional[int] = None
        lines: List[str] = []
        server = self.page_server
        if server is not None and self.criu is not None and self.images is not None:
            deadline = time.monotonic() + timeout
            while _running(server.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _running(server.pid):
                status = self.criu.wait_pid(server.pid)
                self.page_server = None
                lines = criu_log.error_lines(self.images / "page-server.log")
        free = free_bytes(str(self.images)) if self.images is not None else None
        self.ch.send(
            "page-server-result",
            status=status,
            errors=lines[-5:],
            free=free,
            images_dir=str(self.images),
        )

    def receive_images(self, expect: int) -> None:
        images = self._make_images_dir(expect)
        start = time.perf_counter()
        files, size = self.ch.receive_files(images, space_left=free_bytes(str(images)) - (32 << 20))
        pages = 0
        if self.page_server is not None and self.criu is not None:
            # the dump is over: its page server has written the last page and ends
            status = self.criu.wait_pid(self.page_server.pid)
            self.page_server = None
            if status != 0:
                raise errors.MigrationError(
                    f"the page server here failed (wait status {status})", stage="transfer"
                )
            pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
        self.ch.send(
            "received",
            files=files,
            bytes=size,
            page_bytes=pages,
            seconds=time.perf_counter() - start,
        )

    def restore(self, msg: Dict[str, Any]) -> None:
        if self.images is None or self.criu is None:
            raise errors.MigrationError("protocol error: restore before images")
        start = time.perf_counter()
        options: Dict[str, Any] = {}
        if msg.get("lazy_port"):
            self.lazy = self.criu.lazy_pages(
                self.images, address="127.0.0.1", port=int(msg["lazy_port"])
            )
            self._record_process("lazy_pages", self.lazy.pid)
            options["lazy_pages"] = True
        daemon = time.perf_counter()
        config = dict(msg.get("config") or {})
        timings = self.ct.restore_images(
            self.images,
            config,
            undump_only=True,
            root=self.root,
            criu=self.criu,
            criu_options=options,
            extra_state=self.incoming,
        )
        self.ch.send(
            "undumped", seconds=time.perf_counter() - start, lazy_daemon=daemon - start, **timings
        )

    def resume(self) -> None:
        start = time.perf_counter()
        self.ct._start_network()
        Freezer(self.ct.cgroup).thaw()
        self.ct._save(phase="running", links_down=[])
        self.ch.send("running", seconds=time.perf_counter() - start)

    def commit(self) -> None:
        """Keep the container: at once after stop-and-copy; after post-copy only once every
        page has arrived (until then a failure rolls back: the source still holds the
        memory, and --abort still finds the incoming record)."""
        if self.lazy is not None:
            self.ch.send("committed")
            start = time.perf_counter()
            status = self.lazy.wait()
            if status == 0:
                self._keep()
            self.ch.send("pages", status=status, seconds=time.perf_counter() - start)
            return
        self._keep()
        self.ch.send("committed")

    def _keep(self) -> None:
        state = self.ct.state
        for key in self.incoming:
            state.pop(key, None)
        state["migrated_by"] = self.token
        write_json(self.ct.dir / "state.json", state)
        self.final = True

    def rollback(self) -> None:
        """Remove everything of the incoming container here. Idempotent."""
        if self.lazy is not None:
            self.lazy.close()
        if self.images is not None:  # before the record goes: it is how --abort finds them
            remove_tree(self.images)
            self.images = None
        if self.claimed:
            discard(self.ct)
            self.claimed = False
            made = self.incoming.pop("made_root", None)
            if made:
                shutil.rmtree(made, ignore_errors=True)

    def close(self) -> None:
        if self.criu is not None:
            self.criu.close()
        if self.lazy is not None:
            self.lazy.close()
            self.lazy = None
        if self.images is not None:
            shutil.rmtree(self.images, ignore_errors=True)
            self.images = None
        self.release()


def _running(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def discard(ct: Container, timeout: float = 10.0) -> None:
    """Kill whatever runs in an incoming container's cgroup (a restore may still be adding
    tasks) and forget it."""
    cgroup = Path(ct.state.get("cgroup") or cgroup_root() / ct.id)
    deadline = time.monotonic() + timeout
    while cgroup.is_dir():
        Freezer(cgroup).kill(timeout=timeout)
        try:
            remove_cgroup(cgroup, timeout=0.5)
        except OSError:
            if time.monotonic() > deadline:
                raise
    ct.forget()


def remove_tree(path: Path, timeout: float = 10.0) -> None:
    """rmtree that outlasts a CRIU the dead agent left behind: it may still be writing its
    log and stats into the directory for a moment."""
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        # a CRIU killed while restoring leaves its cgroup yard mounted in there
        for mount in mounts_below(str(path)):
            subprocess.run(
                ["umount", "--lazy", mount], stdin=subprocess.DEVNULL, capture_output=True
            )
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            time.sleep(0.05)


def clean_incoming(ct: Container, state: Dict[str, Any]) -> None:
    """Remove an incoming container a dead agent left: its processes (CRIU restoring, a
    page server, a lazy-pages daemon; by recorded pid and start time), the container, the
    images and a root directory it made."""
    for _what, pid, started in state.get("processes") or []:
        if pid and started and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    discard(ct)
    if state.get("images"):
        remove_tree(Path(state["images"]))
    if state.get("made_root"):
        shutil.rmtree(state["made_root"], ignore_errors=True)


def abort(ct_id: str, token: str) -> str:
    """Clean up after an agent that died: remove container `ct_id` if it is still the
    incoming one of migration `token`. Returns what was found: "removed", "committed" (it
    runs here for good) or "absent"."""
    ct = Container(ct_id)
    if not ct.dir.exists():
        return "absent"
    deadline = time.monotonic() + 15
    while True:
        try:
            lock = ct.lock()
            break
        except errors.ContainerBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # the agent is still rolling back by itself
    with lock:
        state = ct.state if ct.exists else {}
        if state.get("migration") == token:
            clean_incoming(ct, state)
            return "removed"
        if ct.exists and state.get("phase") == "running" and not state.get("migration"):
            return "committed" if state.get("migrated_by") == token else "absent"
        if not ct.exists:
            ct.forget()  # nothing but the lock file we just made
        return "absent"


def main(ct: str, abort_token: Optional[str] = None) -> int:
    """The `pycpt migrate-target` verb."""
    if abort_token is not None:
        print(abort(ct, abort_token))
        return 0
    # our stdout is the protocol: anything printed by mistake goes to stderr instead
    proto_out: BinaryIO = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(sys.stdin.buffer, proto_out)
    return Agent(ct, channel).serve()
