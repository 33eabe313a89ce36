"""The target's half of a migration: `pycpt migrate-target CT`, started by the source over
ssh, speaking pycpt._migration.channel messages on its stdin and stdout.

It checks that the container can come here (preflight), receives the images, rebuilds the
container frozen, and runs it when told; see states.py for when it owns the container and
what it does when it loses the source. Everything it makes is written down in the
container's record (state["incoming"]) as it is made, so that another pycpt command can
finish or undo it should this process die: `migrate-target --abort TOKEN CT` (the source
asking), any command on the container, or the next migration of the same id.

Its commit is a tombstone, `<state dir>/migrations/<TOKEN>.json` saying "committed",
written durably before a stop-and-copy copy thaws and after a post-copy copy has every
page; it outlives the container's record, so that "this migration never committed here"
stays true and checkable.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional

from pycpt import errors, network
from pycpt._criu import log as criu_log
from pycpt._migration import messages, pages, states
from pycpt._migration.channel import Channel, error_message, remote_error
from pycpt._sys.cgroups import remove_cgroup
from pycpt._sys.process import USERFAULTFD, Fence, fds_of_kind, take_fd
from pycpt._sys.procfs import mounts_below, start_time
from pycpt._sys.state import Lock, read_json, write_json
from pycpt._version import __version__
from pycpt.container import Container, addresses_in_use, cgroup_root
from pycpt.criu import Criu, LazyPagesDaemon, PageServerProcess
from pycpt.engine import Engine, find_engine
from pycpt.errors import ChannelClosed, MigrationProtocolError
from pycpt.freezer import Freezer

PROTOCOL = messages.PROTOCOL
TOMBSTONE_DAYS = 30  # how long "committed"/"aborted" answers are kept
UFFD_RESCAN = 0.25  # seconds between looks at lazy-pages' userfaultfds
UFFD_SETTLE = 5.0  # how long lazy-pages may hold none before it exits or takes one


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


# --- tombstones ------------------------------------------------------------------------------


def _tombstone_path(root: Path, token: str) -> Path:
    messages.TOKEN.check(token, "token")  # it becomes a file name
    return root / "migrations" / f"{token}.json"


# How a migration ended here: "lost" is a committed copy that died before its source had
# ended its own (a crash of this host): the source's frozen tree takes the container back.
OUTCOMES = ("committed", "aborted", "lost")


def write_tombstone(root: Path, token: str, ct: str, outcome: str) -> None:
    """Record durably how migration `token` of `ct` ended here (one of OUTCOMES)."""
    path = _tombstone_path(root, token)
    write_json(path, {"ct": ct, "outcome": outcome, "time": time.time()}, durable=True)
    cutoff = time.time() - TOMBSTONE_DAYS * 86400
    for old in path.parent.glob("*.json"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def read_tombstone(root: Path, token: str, ct: str) -> Optional[str]:
    """How migration `token` of `ct` ended here, or None (it never got that far here)."""
    try:
        data = read_json(_tombstone_path(root, token))
    except errors.PycptError:
        return None
    if not data or data.get("ct") != ct or data.get("outcome") not in OUTCOMES:
        return None
    return str(data["outcome"])


# --- the agent -------------------------------------------------------------------------------


class _Aborted(Exception):
    """The copy here was removed on purpose and the source was told ("aborted")."""


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
        self.kept = False  # committed: the container is here for good
        self.resumed = False  # the copy was let run (post-copy: provisionally)
        self.claimed = False  # an incoming record of ours exists here
        self.incoming: Dict[str, Any] = {}  # that record (state["incoming"])
        self.hello: Dict[str, Any] = {}
        self.criu: Optional[Criu] = None
        self.engine: Optional[Engine] = None
        self.page_server: Optional[PageServerProcess] = None
        # the page channel's connection, until CRIU's end here (page server, lazy-pages)
        # takes it over
        self.page_socket: Optional[socket.socket] = None
        self.uffds: List[int] = []  # our copies of lazy-pages' userfaultfds
        # post-copy: holds those copies too, and kills the copy should we die before the
        # commit (lazy-pages alone would not keep a missing page from reading as zeros)
        self.fence: Optional[Fence] = None
        self.stage = "preflight"

    # --- the conversation --------------------------------------------------------------

    def serve(self) -> int:
        self.ch.start_heartbeats()
        try:
            self._serve()
            return 0
        except _Aborted:
            return 1
        except ChannelClosed:
            return 1  # the source went away: roll back (finally), nobody to tell
        except BaseException as exc:
            try:
                self.ch.send("error", **error_message(exc))
            except (errors.PycptError, OSError):
                pass
            if not isinstance(exc, (errors.PycptError, ValueError, OSError)):
                raise
            return 1
        finally:
            try:
                if not self.kept:
                    self.rollback()
            finally:
                self.close()

    def _serve(self) -> None:
        self.hello = hello = self.ch.expect("hello")
        if hello["ct"] != self.ct.id:
            raise MigrationProtocolError(
                f"hello names container {hello['ct']!r}, this agent was started for {self.ct.id!r}"
            )
        self.token = hello["token"]
        cpuinfo = Path(tempfile.mkdtemp(prefix=".pycpt-cpuinfo-"))
        try:
            self.ch.receive_files(cpuinfo, space_left=1 << 20)
            report = self.preflight(hello, cpuinfo)
        finally:
            shutil.rmtree(cpuinfo, ignore_errors=True)
        if not hello["dry_run"]:
            self.criu = Criu(self.engine)
            self.criu.prepare()  # CRIU for the restore, started before the source freezes
            if self.criu.prepared_pid:
                self._record_process("criu", self.criu.prepared_pid)
            if hello["mode"] == "postcopy":
                self.fence = Fence()  # now, before the source freezes (it costs a fork)
                self._record_process("fence", self.fence.pid)
        self.ch.send("ready", **report)
        while True:
            self.ch.stage = self.stage
            msg = self.ch.expect(
                "page-channel",
                "page-server",
                "page-server-result",
                "images",
                "restore",
                "resume",
                "bye",
                "abort",
            )
            op = msg["op"]
            if op == "page-channel":
                self._in_order(op, "preflight")
                self.open_page_channel()
            elif op == "page-server":
                self._in_order(op, "preflight")
                self.start_page_server(msg["expect"])
            elif op == "page-server-result":
                self.report_page_server()
            elif op == "images":
                self._in_order(op, "preflight")
                self.receive_images(msg["expect"])
            elif op == "restore":
                self._in_order(op, "transfer")
                self.restore(msg)
            elif op == "resume":
                self._in_order(op, "restore")
                if self.lazy is not None:
                    self.resume_postcopy()
                else:
                    self.resume_stopcopy()
                self._wait_bye()
                return
            elif op == "abort":
                self.ch.send("aborted", ran=False, reason=msg.get("reason", ""))
                return  # rolled back in serve()
            else:  # bye: a dry run, or the source gave up before the restore
                return

    def _in_order(self, op: str, stage: str) -> None:
        if self.stage != stage:
            raise MigrationProtocolError(f"{op!r} came in stage {self.stage}, not {stage}")

    def _wait_bye(self) -> None:
        """The container is ours now: wait for the source's goodbye, but a source that goes
        away instead changes nothing."""
        try:
            self.ch.expect("bye", "abort")
        except ChannelClosed:
            pass

    def preflight(self, hello: Dict[str, Any], cpuinfo: Path) -> Dict[str, Any]:
        """Every check that can fail before the source freezes; raises the first failure."""
        if hello["protocol"] != PROTOCOL:
            raise errors.TargetIncompatibleError(
                f"pycpt {__version__} here speaks migration protocol {PROTOCOL}, the source "
                f"speaks {hello['protocol']}",
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
        source_criu = tuple(hello["criu"])
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
            if hello["mode"] == "postcopy" and not criu.features().get("lazy_pages"):
                raise errors.TargetIncompatibleError(
                    "post-copy needs userfaultfd, which CRIU cannot use here",
                    stage="preflight",
                    hint="use --mode stopcopy",
                )
        self.claim()
        memory = hello["memory"]
        parent = images_parent(memory)
        need_disk = 0 if hello["mode"] == "postcopy" else memory
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
        if hello["root"]:
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
            "images_dir": os.path.abspath(parent),
            "free": free_bytes(parent),
            "mem_available": mem_available(),
            "root": self.root,
        }
        if hello.get("nics"):
            report["net"] = self.check_nics(hello["nics"])
        if hello["dry_run"]:
            self.release()
        elif self.root and not os.path.exists(self.root):
            os.makedirs(self.root)
            self.incoming["made_root"] = self.root  # removed again on a rollback
            self._save_incoming()
        return report

    def check_nics(self, records: List[Dict[str, Any]]) -> List[str]:
        """The container's NICs can come here: each bridge exists, is up and runs no STP, the
        outside ends' names are free, and no address is taken on the bridges' segments
        (the container's own MAC answering from the source does not count). Returns what
        was found, for the source's report (and --dry-run)."""
        try:
            nics = network.from_records(records, self.ct._nic_key())
            taken = addresses_in_use(self.ct.root, self.ct.id)
            found = network.preflight(nics, moving=True, taken=taken)
        except errors.NicError as exc:
            raise errors.TargetIncompatibleError(
                exc.message, stage="preflight", hint=exc.hint
            ) from exc
        network.preload()  # the restore reads the images for the kicks: not in the frozen window
        lines = [f"bridge {name} up" for name in found["bridges"]]
        lines += [f"{addr} free on {v['bridge']}" for addr, v in found["addresses"].items()]
        return lines

    def claim(self) -> None:
        """Take the id here: lock it and record an incoming container (or refuse if taken).
        A dry run only looks, leaving no trace."""
        if not self.hello["dry_run"]:
            self.lock = self.ct.lock()
        state = self.ct.state if self.ct.exists else {}
        if self.lock is not None and state.get("incoming"):
            # the remains of a migration whose agent died (we hold the lock: it is dead)
            clean_incoming(self.ct, state)
            state = self.ct.state if self.ct.exists else {}
        if self.ct.exists and (
            state.get("incoming") or state.get("phase") not in ("migrated", None)
        ):
            what = "arriving" if state.get("incoming") else self.ct.status.value
            raise errors.TargetContainerExistsError(
                f"container {self.ct.id} already exists on {socket.gethostname()} in "
                f"{self.ct.root} ({what})",
                stage="preflight",
            )
        if self.lock is None:
            return
        self.ct.dir.mkdir(parents=True, exist_ok=True)
        self.incoming = {
            "token": self.token,
            "stage": states.CLAIMED,
            "agent": [os.getpid(), start_time(os.getpid())],
            "memory": self.hello["memory"],
            "mode": self.hello["mode"],
        }
        write_json(
            self.ct.dir / "state.json",
            {
                "id": self.ct.id,
                "phase": "stopped",
                "cgroup": str(cgroup_root() / self.ct.id),
                "incoming": self.incoming,
            },
            durable=False,
        )
        self.claimed = True

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _save_incoming(self, **changes: Any) -> None:
        self.ct._save(incoming=self.incoming, **changes)

    def _record_process(self, what: str, pid: int) -> None:
        """Note a process of ours in the incoming record, for clean-up should we die."""
        self.incoming.setdefault("processes", []).append([what, pid, start_time(pid)])
        self._save_incoming()

    def _make_images_dir(self, expect: int) -> Path:
        if self.images is None:
            self.images = Path(
                tempfile.mkdtemp(prefix=f".pycpt-incoming-{self.ct.id}-", dir=images_parent(expect))
            )
            self.incoming["images"] = str(self.images)
            self.incoming["stage"] = states.RECEIVING
            self._save_incoming()  # what a clean-up removes, should this process die
        return self.images

    def open_page_channel(self) -> None:
        """Listen for the source's end of the page channel (pycpt/_migration/pages.py), tell
        the source where and with which key, and take the one connection; the listener and
        its directory are gone again before this returns."""
        if self.page_socket is not None:
            raise MigrationProtocolError("a second 'page-channel' came")
        listener = pages.PageListener()
        try:
            if self.claimed:  # a clean-up removes it, should this process die meanwhile
                self.incoming["pages_dir"] = str(listener.dir)
                self._save_incoming()
            self.ch.send("page-channel", **listener.fields())
            self.page_socket = self._accept_page_channel(listener)
        finally:
            listener.close()
            if self.incoming.pop("pages_dir", None) is not None and self.claimed:
                self._save_incoming()

    def _accept_page_channel(self, listener: pages.PageListener) -> socket.socket:
        """The connection on `listener`, while still hearing the source: it may give up
        (its ssh refused the forward) and say so."""
        deadline = time.monotonic() + pages.CONNECT_TIMEOUT
        while True:
            ready, _, _ = select.select([listener.fileno()], [], [], 0)
            if ready:
                return listener.accept()
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.PageChannelError(
                    f"no connection came on the page channel within {pages.CONNECT_TIMEOUT:g} s",
                    stage="preflight",
                    hint="this host's sshd must allow forwarding Unix sockets "
                    "(AllowStreamLocalForwarding yes or local)",
                )
            msg = self.ch.receive(timeout=left, wake=(listener.fileno(),))
            if msg is None:
                continue
            if msg["op"] == "abort":
                self.ch.send("aborted", ran=False, reason=msg.get("reason", ""))
                raise _Aborted("the source aborted")
            if msg["op"] == "error":
                raise remote_error(msg)
            if msg["op"] == "bye":
                raise _Aborted("the source ended")
            raise MigrationProtocolError(f"{msg['op']!r} came while the page channel was made")

    def _close_page_socket(self) -> None:
        if self.page_socket is not None:
            self.page_socket.close()
            self.page_socket = None

    def start_page_server(self, expect: int) -> None:
        """A CRIU page server writing the memory the source's dump sends straight into the
        images directory (through the page channel), so it is never copied twice."""
        assert self.criu is not None
        if self.page_socket is None:
            raise MigrationProtocolError("'page-server' came before the page channel")
        images = self._make_images_dir(expect)
        self.page_server = pages.stopcopy_target(self.criu, images, self.page_socket)
        self._close_page_socket()  # the page server's now: its end closes when it does
        self._record_process("page_server", self.page_server.pid)
        self.ch.send("page-server")

    def report_page_server(self, timeout: float = 3.0) -> None:
        """After the source's dump failed: did our page server fail, and why (a full disk
        here looks like a broken pipe there)?"""
        status: Optional[int] = None
        lines: List[str] = []
        server = self.page_server
        if server is not None and self.images is not None:
            try:
                status = server.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            else:
                self.page_server = None
                lines = criu_log.error_lines(self.images / "page-server.log")
        free = free_bytes(str(self.images)) if self.images is not None else None
        self.ch.send(
            "page-server-result",
            status=status,
            errors=[line[: messages.MAX_TEXT] for line in lines[-5:]],
            free=free,
            images_dir=str(self.images) if self.images is not None else None,
        )

    def receive_images(self, expect: int) -> None:
        images = self._make_images_dir(expect)
        start = time.perf_counter()
        space = max(0, free_bytes(str(images)) - (32 << 20))
        files, size = self.ch.receive_files(images, space_left=space)
        page_bytes = 0
        if self.page_server is not None:
            # the dump is over: its page server has written the last page and ends
            try:
                status = self.page_server.wait(60)
            except subprocess.TimeoutExpired:
                status = None
            if status != 0:
                how = "it still runs" if status is None else f"exit status {status}"
                raise errors.MigrationError(
                    f"the page server here failed ({how})", stage="transfer"
                )
            self.page_server = None
            page_bytes = sum(p.stat().st_size for p in images.glob("pages-*.img"))
        self.stage = "transfer"
        self.ch.send(
            "received",
            files=files,
            bytes=size,
            page_bytes=page_bytes,
            seconds=time.perf_counter() - start,
        )

    def restore(self, msg: Dict[str, Any]) -> None:
        if self.images is None or self.criu is None:
            raise MigrationProtocolError("'restore' came before the images")
        if msg["config"]["id"] != self.ct.id:
            raise MigrationProtocolError(
                f"restore.config.id is {msg['config']['id']!r}, not {self.ct.id!r}"
            )
        if self.hello["mode"] == "postcopy" and self.page_socket is None:
            raise MigrationProtocolError("'restore' of a post-copy came without a page channel")
        start = time.perf_counter()
        options: Dict[str, Any] = {}
        if self.hello["mode"] == "postcopy":
            assert self.page_socket is not None
            self.lazy = pages.postcopy_target(self.criu, self.images, self.page_socket)
            self._close_page_socket()  # lazy-pages' now
            self._record_process("lazy_pages", self.lazy.pid)
            options["lazy_pages"] = True
        daemon = time.perf_counter()
        self.incoming["stage"] = states.UNDUMPED
        timings = self.ct.restore_images(
            self.images,
            msg["config"],
            undump_only=True,
            root=self.root,
            criu=self.criu,
            criu_options=options,
            extra_state={"incoming": self.incoming},
        )
        if self.lazy is not None:
            # from now on a page that cannot come blocks the copy (never reads as zeros),
            # and our death kills it first
            if self.fence is not None:
                self._arm_fence()
            self._hold_uffds()
        self.stage = "restore"
        self.ch.send(
            "undumped", seconds=time.perf_counter() - start, lazy_daemon=daemon - start, **timings
        )

    # --- resume and commit -------------------------------------------------------------

    def resume_stopcopy(self) -> None:
        """Commit, then run: after the tombstone the container is ours, whatever happens."""
        start = time.perf_counter()
        self.stage = "resume"
        self._check_alive()
        self._commit()
        self.ct._start_network()
        Freezer(self.ct.cgroup).thaw()
        self._check_alive_committed()
        # said before the images go: it runs, and removing 512 MiB of images took ~0.2 s
        # that the source counted as frozen
        self.ch.send("running", seconds=time.perf_counter() - start, committed=True)
        self._settle()

    def resume_postcopy(self) -> None:
        """Run the copy provisionally while its pages arrive; commit once every page is in;
        kill it unrun-ahead if the pages stop coming."""
        assert self.lazy is not None
        start = time.perf_counter()
        self.stage = self.ch.stage = "pages"
        # lazy-pages closes each userfaultfd once its process has every page, and exits once
        # all have them: a small copy may be complete already (none held, exit coming), and
        # a userfaultfd still in flight on its socket is not held yet. So look again, for a
        # moment, until it holds one or has exited.
        deadline = time.monotonic() + UFFD_SETTLE
        while True:
            self._hold_uffds()  # current, and taken while lazy-pages still lives
            status = self.lazy.proc.poll()
            if self.uffds or status is not None:
                break
            if time.monotonic() > deadline:
                raise errors.MigrationError(
                    "lazy-pages holds no userfaultfd: nothing would stop the copy from "
                    "reading missing memory as zeros; it stays unrun",
                    stage="resume",
                )
            time.sleep(0.02)
        if status is not None and status != 0:
            raise errors.MigrationError(
                f"the lazy-pages daemon here failed before the copy ran (exit status "
                f"{status}); it stays unrun",
                stage="resume",
            )
        self.incoming["stage"] = states.PAGES
        self.ct._start_network()  # before the thaw: the first packet it sends goes out
        self.ct._save(phase="receiving", incoming=self.incoming, links_down=[])
        self.resumed = True
        Freezer(self.ct.cgroup).thaw()
        self.ch.send("running", seconds=time.perf_counter() - start, committed=False)
        self.ch.beat_fields = self._progress
        status = self._watch_pages()
        self.ch.beat_fields = None
        if status != 0:
            reason = (
                f"the lazy-pages daemon here failed (exit status {status}): the pages stopped "
                "coming; the copy here was killed"
            )
            self._kill_copy()
            write_tombstone(self.ct.root, self.token, self.ct.id, "aborted")
            try:
                self.ch.send("aborted", ran=True, reason=reason)
            except ChannelClosed:
                pass
            raise _Aborted(reason)
        self._check_alive()
        self._commit()
        self._check_alive_committed()
        self.ch.send("committed", seconds=time.perf_counter() - start, page_bytes=self._rss())
        self._settle()

    def _watch_pages(self) -> int:
        """Wait until lazy-pages exits (its status), keeping our userfaultfd copies current
        and answering the source; an "abort" or a lost source kills the copy."""
        assert self.lazy is not None
        status = self.lazy.proc.poll()
        if status is not None:  # done already (it pushes pages in the background) and reaped
            return status
        pidfd = os.pidfd_open(self.lazy.pid)  # only we reap it: alive or a zombie now
        try:
            next_scan = time.monotonic() + UFFD_RESCAN
            while True:
                status = self.lazy.proc.poll()
                if status is not None:
                    return status
                msg = self.ch.receive(timeout=max(0.0, next_scan - time.monotonic()), wake=(pidfd,))
                if msg is not None:
                    if msg["op"] == "error":
                        raise remote_error(msg)
                    if msg["op"] != "abort":
                        raise MigrationProtocolError(f"{msg['op']!r} came while pages arrive")
                    self._kill_copy()
                    write_tombstone(self.ct.root, self.token, self.ct.id, "aborted")
                    self.ch.send("aborted", ran=True, reason=msg.get("reason", ""))
                    raise _Aborted("the source aborted")
                if time.monotonic() >= next_scan:
                    self._hold_uffds()  # processes forked since have userfaultfds too
                    next_scan = time.monotonic() + UFFD_RESCAN
        finally:
            os.close(pidfd)

    def _arm_fence(self) -> None:
        assert self.fence is not None
        cgroup = self.ct.cgroup
        kill = cgroup / "cgroup.kill"
        path, data = (kill, b"1") if kill.exists() else (cgroup / "freezer.state", b"FROZEN")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.fence.on_our_death(fd, data)
        finally:
            os.close(fd)

    def _release_fence(self) -> None:
        if self.fence is not None:
            self.fence.release()

    def _check_alive(self) -> None:
        """Never commit a dead copy (killed here meanwhile, say by the OOM killer): the
        source would end the last one. Not committed yet: a rollback, the source resumes."""
        if self.ct.init_pid is None:
            raise errors.MigrationError(
                f"the copy of {self.ct.id} here died before the commit", stage="resume"
            )

    def _check_alive_committed(self) -> None:
        """The copy died between the check and the commit: ours, but gone. Forget it as a
        clean-up would ("lost"), so that the source's frozen tree takes the container back."""
        if self.ct.init_pid is not None:
            return
        self.images = None  # clean_incoming removes them, and what else the record names
        clean_incoming(self.ct, self.ct.state)
        self.claimed = False
        raise errors.MigrationError(
            f"the copy of {self.ct.id} here died as it was committed", stage="resume"
        )

    def _commit(self) -> None:
        """The commit point: a durable tombstone saying "committed". From here on the
        container is ours; a clean-up finishes starting it instead of removing it."""
        self._release_fence()  # every page is in (post-copy): nothing to guard any more
        self._release_uffds()  # and no process may wait on a fault nobody serves
        write_tombstone(self.ct.root, self.token, self.ct.id, "committed")
        self.kept = True

    def _settle(self) -> None:
        """The record of a container that runs here now, with nothing left of the migration."""
        if self.images is not None:
            # now, while the record still names them: should this process die before its
            # close(), nothing would know of them any more
            remove_tree(self.images)
            self.images = None
        state = self.ct.state
        state.pop("incoming", None)
        state.update(phase="running", migrated_by=self.token, links_down=[])
        self.ct._write(state, durable=False)

    def _kill_copy(self) -> None:
        """End the copy, first of all (our userfaultfd copies keep any page it lacks from
        reading as zeros meanwhile), then what fed it. Its NICs go first: nothing of a copy
        that is given up may reach the wire (a FIN, an RST) while it dies."""
        _remove_nics(self.ct)
        cgroup = self.ct.cgroup
        if cgroup.is_dir():
            Freezer(cgroup).kill(timeout=10)
        self._release_fence()
        if self.lazy is not None:
            self.lazy.close()
        self._release_uffds()

    def _hold_uffds(self) -> None:
        """Take copies of every userfaultfd lazy-pages holds now (and drop older ones): while
        we hold them, a page lazy-pages never delivered blocks the process that touches it,
        even after lazy-pages is gone, until we kill that process."""
        if self.lazy is None or self.lazy.proc.poll() is not None:
            return
        try:
            pidfd = os.pidfd_open(self.lazy.pid)
        except OSError:
            return
        taken: List[int] = []
        try:
            for fd in fds_of_kind(self.lazy.pid, USERFAULTFD):
                try:
                    taken.append(take_fd(pidfd, fd))
                except OSError:
                    continue  # closed meanwhile: that process has all its pages
        finally:
            os.close(pidfd)
        if self.lazy.proc.poll() is not None:
            self.uffds += taken  # it died while we looked: keep every copy we have
            if self.fence is not None and self.fence.sock is not None:
                self.fence.hold(self.uffds)
            return
        # the ones lazy-pages closed meanwhile (their process has every page) must go: a
        # copy held past that would make that process wait on a fault nobody serves
        old, self.uffds = self.uffds, taken
        if self.fence is not None and self.fence.sock is not None:
            self.fence.hold(self.uffds)
        for fd in old:
            os.close(fd)

    def _release_uffds(self) -> None:
        while self.uffds:
            os.close(self.uffds.pop())

    def _rss(self) -> int:
        cgroup = self.ct.cgroup
        return container_rss(cgroup) if cgroup.is_dir() else 0

    def _progress(self) -> Dict[str, Any]:
        rss = self._rss()
        memory = max(1, self.hello.get("memory") or 1)
        return {"pages": {"bytes": rss, "percent": min(100, rss * 100 // memory)}}

    # --- undoing -----------------------------------------------------------------------

    def rollback(self) -> None:
        """Remove everything of the incoming container here (a copy that ran: killed first,
        and a tombstone says "aborted"). Idempotent."""
        if self.resumed:
            self._kill_copy()
            if self.claimed:
                write_tombstone(self.ct.root, self.token, self.ct.id, "aborted")
        elif self.fence is not None and self.ct.cgroup.is_dir():
            Freezer(self.ct.cgroup).kill(timeout=10)  # unrun: before the fence lets go
        self._release_fence()
        if self.lazy is not None:
            self.lazy.close()
        self._release_uffds()
        if self.images is not None:  # before the record goes: it is how a clean-up finds them
            remove_tree(self.images)
            self.images = None
        if self.claimed:
            discard(self.ct)
            self.claimed = False
            made = self.incoming.pop("made_root", None)
            if made:
                shutil.rmtree(made, ignore_errors=True)

    def close(self) -> None:
        self.ch.close()
        self._release_fence()
        self._close_page_socket()
        if self.page_server is not None:
            self.page_server.close()
            self.page_server = None
        if self.criu is not None:
            self.criu.close()
        if self.lazy is not None:
            self.lazy.close()
            self.lazy = None
        self._release_uffds()
        if self.images is not None:
            shutil.rmtree(self.images, ignore_errors=True)
            self.images = None
        self.release()


def container_rss(cgroup: Path) -> int:
    """Resident memory of the processes in `cgroup` (shared pages count once per process)."""
    total = 0
    for pid in Freezer(cgroup).pids():
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def _alive(record: Any) -> bool:
    """True if `record` ([pid, start time]) names a process that still runs."""
    if not isinstance(record, list) or len(record) != 2:
        return False
    pid, started = record
    return isinstance(pid, int) and started is not None and start_time(pid) == started


def discard(ct: Container, timeout: float = 10.0) -> None:
    """Kill whatever runs in an incoming container's cgroup (a restore may still be adding
    tasks) and forget it."""
    _remove_nics(ct)
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


def _remove_nics(ct: Container) -> None:
    """Delete the outside ends of a copy's NICs (best effort: a record that does not read
    or a link already gone is no reason to keep the copy)."""
    try:
        network.remove(ct.nics)
    except (errors.PycptError, OSError):
        pass


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


def _under(path: Any, parent: str) -> Optional[Path]:
    """`path` if it is a directory pycpt made below `parent` (never anything else: the
    record may be old or damaged, and what it names gets removed)."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return None
    p = Path(os.path.normpath(path))
    base = Path(os.path.normpath(parent))
    return p if p != base and p.is_relative_to(base) else None


def clean_incoming(ct: Container, state: Dict[str, Any]) -> str:
    """Finish or undo an incoming container whose agent is dead (the caller holds the lock).
    The processes the agent left (CRIU restoring, a page server, lazy-pages; by pid and
    start time) are killed and the images removed in every case; then: committed (its
    tombstone says so) and its copy alive -> start it as the agent would have,
    "committed"; committed but its copy dead (this host crashed) -> forget it, "lost" (the
    source's frozen tree is all that is left of the container); not committed -> kill its
    copy first, remove a root directory it made, forget it: "removed"."""
    inc = state.get("incoming")
    if not isinstance(inc, dict):
        return states.ANSWER_ABSENT
    token = inc.get("token")
    committed = isinstance(token, str) and read_tombstone(ct.root, token, ct.id) == "committed"
    cgroup = Path(state.get("cgroup") or cgroup_root() / ct.id)
    if not committed and cgroup.is_dir():
        Freezer(cgroup).kill(timeout=10)  # the copy first: lazy-pages may be all it has
    for entry in inc.get("processes") or []:
        if isinstance(entry, list) and len(entry) == 3 and _alive(entry[1:]):
            try:
                os.kill(entry[1], signal.SIGKILL)
            except ProcessLookupError:
                pass
    images = inc.get("images")
    if (
        isinstance(images, str)
        and os.path.isabs(images)
        and Path(images).name.startswith(f".pycpt-incoming-{ct.id}-")
        and os.path.isdir(images)
        and not os.path.islink(images)
    ):
        remove_tree(Path(images))
    if committed and ct.init_pid is not None:
        roll_forward(ct, state)
        return states.ANSWER_COMMITTED
    discard(ct)
    made = _under(inc.get("made_root"), str(ct.root / "root"))
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    pages_dir = _under(inc.get("pages_dir"), tempfile.gettempdir())
    if pages_dir is not None and pages_dir.name.startswith(".pycpt-pages-"):
        shutil.rmtree(pages_dir, ignore_errors=True)
    if committed:
        assert isinstance(token, str)
        write_tombstone(ct.root, token, ct.id, "lost")
        return states.ANSWER_LOST
    if inc.get("stage") == states.PAGES and isinstance(token, str):
        write_tombstone(ct.root, token, ct.id, "aborted")
    return states.ANSWER_REMOVED


def roll_forward(ct: Container, state: Dict[str, Any]) -> None:
    """A committed container whose agent died before it had started it: start it."""
    inc = state.get("incoming") or {}
    if ct.init_pid is not None:
        ct._start_network()
        Freezer(ct.cgroup).thaw()
    state = ct.state
    state.pop("incoming", None)
    state.update(phase="running", migrated_by=inc.get("token"), links_down=[])
    ct._write(state, durable=True)


def abort(ct_id: str, token: str) -> str:
    """Settle migration `token` of `ct_id` here, as its source asks: a live agent of it is
    killed first (it cannot commit any more), then a committed container is started if it
    was not yet ("committed"), an uncommitted one removed ("removed"), a committed one whose
    copy died here before its source ended its own forgotten ("lost"); otherwise the
    tombstone answers ("aborted", "lost"), or nothing of it is here ("absent")."""
    messages.TOKEN.check(token, "token")
    ct = Container(ct_id)
    state = ct.state if ct.exists else {}
    inc = state.get("incoming")
    if isinstance(inc, dict) and inc.get("token") == token and _alive(inc.get("agent")):
        pid = inc["agent"][0]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(inc.get("agent")) and time.monotonic() < deadline:
            time.sleep(0.02)
    if ct.dir.exists():
        deadline = time.monotonic() + 15
        while True:
            try:
                lock = ct.lock()
                break
            except errors.ContainerBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # another command on it, or the dying agent's lock
        with lock:
            state = ct.state if ct.exists else {}
            inc = state.get("incoming")
            if isinstance(inc, dict) and inc.get("token") == token:
                return clean_incoming(ct, state)
            if (
                state.get("migrated_by") == token
                and state.get("phase") == "running"
                and ct.init_pid is None
                and read_tombstone(ct.root, token, ct_id) == "committed"
            ):
                # it arrived, and died behind pycpt's back (this host crashed) before its
                # source had ended its own copy: that frozen copy is all that is left
                discard(ct)
                write_tombstone(ct.root, token, ct_id, "lost")
                return states.ANSWER_LOST
            if not ct.exists:
                ct.forget()  # nothing but the lock file we just made
    outcome = read_tombstone(ct.root, token, ct_id)
    if outcome == "committed":
        return states.ANSWER_COMMITTED
    if outcome == "aborted":
        return states.ANSWER_ABORTED
    if outcome == "lost":
        return states.ANSWER_LOST
    return states.ANSWER_ABSENT


def main(ct: str, abort_token: Optional[str] = None) -> int:
    """The `pycpt migrate-target` verb."""
    if abort_token is not None:
        print(abort(ct, abort_token))
        return 0
    # our stdout is the protocol: anything printed by mistake goes to stderr instead
    proto_out: BinaryIO = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(
        sys.stdin.fileno(),
        proto_out,
        accepts=messages.FROM_SOURCE,
        sends=messages.FROM_TARGET,
        peer="the source",
    )
    try:
        return Agent(ct, channel).serve()
    finally:
        proto_out.close()
