"""`pycpt migrate [--online] HOST CT`: move a container to another host over ssh; and
`pycpt migrate --abort CT`, which settles a migration that was interrupted.

The source drives; pycpt on the target (`pycpt migrate-target`, started over the same ssh
connection) answers. The stages:

    preflight   ssh, the target's pycpt and CRIU, CPU (CRIU's cpuinfo check), space,
                memory, the id free there; nothing is frozen yet (--dry-run stops here)
    sync        a private root directory is copied with rsync while the container runs
    freeze      the container is suspended (cgroup freezer, network held)
    dump        CRIU dumps it; it stays frozen here, never killed before the target owns it
    transfer    the images go over the ssh session (SHA-256 checked on arrival)
    restore     the target rebuilds it frozen
    resume      the target runs it: stop-and-copy commits first, post-copy runs it
                provisionally while its memory arrives (pages) and commits after
    cleanup     only now is the source's copy ended (--keep-src: kept, stopped)

Who owns the container at each instant, and what each side does when it loses the other, is
pycpt/_migration/states.py (and the README). The source writes down what it is doing in
the container's record (state["outgoing"]) before it does it, so that a command that dies
leaves a record the next pycpt command on the container settles first (`recover`).

Modes: "offline" freezes before the root directory is copied; "stopcopy" copies the root
directory first and freezes for dump, transfer and restore; "postcopy" (the default of
--online, see the README for the measurements) sends everything but memory, runs the
container on the target at once and lets CRIU's lazy-pages daemon pull the memory from the
source's page server through an ssh tunnel.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, TextIO

from pycpt import dumpfile, errors, network
from pycpt._criu.lazy_pages import require_pipe_size
from pycpt._migration import messages, pages, states
from pycpt._migration.channel import Channel, dead_after, remote_error
from pycpt._migration.ssh import SshConnection, SshTarget
from pycpt._migration.target import clean_incoming, container_rss, images_parent
from pycpt._sys.procfs import start_time
from pycpt._version import __version__
from pycpt.container import CRIU_OPTIONS, Container, ContainerStatus
from pycpt.criu import Criu
from pycpt.engine import Engine, find_engine
from pycpt.errors import ChannelClosed
from pycpt.freezer import Freezer

MODES = messages.MODES
ONLINE_DEFAULT = "postcopy"
# The container's own network hold (Container._suspend) keeps its network still from the
# freeze until it runs again, so CRIU's lock adds nothing; and a CRIU killed mid-dump would
# leave its lock table behind in the container's network namespace, cutting it off for good.
MIGRATION_DUMP: Dict[str, Any] = {"network_lock": "skip"}
PROTOCOL = messages.PROTOCOL


@dataclass
class MigrationStats:
    """What a migration did and how long each stage took (`pycpt migrate --json`)."""

    ct: str
    host: str
    mode: str
    # seconds per stage; "restore.*" split the target's restore, "frozen_window" runs from
    # the freeze here to the target's "running"
    stages: Dict[str, float] = field(default_factory=dict)
    frozen_window: float = 0.0
    total: float = 0.0
    bytes_sent: int = 0  # over pycpt's ssh session (post-copy memory goes through the tunnel)
    image_bytes: int = 0  # of the CRIU images sent
    memory_bytes: int = 0  # resident memory of the container's processes
    notes: List[str] = field(default_factory=list)
    dry_run: bool = False
    target: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Progress:
    """One line per stage on `stream` (a terminal, usually): stage, time, bytes and rate."""

    def __init__(self, stream: Optional[TextIO]) -> None:
        self.stream = stream
        self.start = time.perf_counter()

    def begin(self, stage: str, total: Optional[int] = None) -> None:
        """A stage starts (`total`: the bytes it will move, when known). Nothing here; the
        command's progress (pycpt/_cli/migrate.py) draws a live bar for the long ones."""

    def __call__(self, stage: str, seconds: float, nbytes: int = 0, note: str = "") -> None:
        if self.stream is None:
            return
        line = f"[{time.perf_counter() - self.start:7.2f} s] {stage:<17} {seconds * 1000:8.1f} ms"
        if nbytes:
            rate = nbytes / seconds / (1 << 20) if seconds > 0 else 0.0
            line += f"  {nbytes / (1 << 20):9.1f} MiB  {rate:8.1f} MiB/s"
        if note:
            line += f"  {note}"
        print(line, file=self.stream, flush=True)


def migrate(
    host: str,
    ct: str,
    *,
    online: bool = False,
    mode: Optional[str] = None,
    keep_src: bool = False,
    keep_images: bool = False,
    dry_run: bool = False,
    ssh_config: Optional[str] = None,
    remote_pycpt: Optional[Sequence[str]] = None,
    progress: "Optional[TextIO | Progress]" = None,
    connect_timeout: float = 10.0,
) -> MigrationStats:
    """Move container `ct` to `host` (`[user@]host[:port]`). See the module's docstring.

    `mode` is "offline", "stopcopy" or "postcopy"; without it, online=True means postcopy
    (or stopcopy, with a note, when this host's pipes are too small for CRIU's lazy pages)
    and online=False means offline. `remote_pycpt` is the command that runs pycpt on the
    target (default: `pycpt`). Raises a MigrationError (or another PycptError) on failure,
    after putting the source back as it was; MigrationInDoubtError when the target may run
    the container and cannot be asked (the source's copy stays frozen: `abort()` settles it).
    `progress`: a stream for one line per stage, or a Progress (which may draw more).
    """
    if mode is not None and mode not in MODES:
        raise errors.InvalidArgumentError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if keep_images and mode == "postcopy":
        raise errors.InvalidArgumentError(
            "--keep-images needs a full dump: post-copy never writes the memory"
        )
    target = SshTarget.parse(host)
    return Migration(
        target,
        Container(ct),
        online=online,
        mode=mode,
        keep_src=keep_src,
        keep_images=keep_images,
        dry_run=dry_run,
        ssh_config=ssh_config or os.environ.get("PYCPT_SSH_CONFIG") or None,
        remote_pycpt=list(remote_pycpt or _default_remote_pycpt()),
        progress=progress if isinstance(progress, Progress) else Progress(progress),
        connect_timeout=connect_timeout,
    ).run()


def _default_remote_pycpt() -> List[str]:
    text = os.environ.get("PYCPT_REMOTE_PYCPT")
    return shlex.split(text) if text else ["pycpt"]


class Migration:
    """One migration, source side. Use migrate()."""

    def __init__(
        self,
        target: SshTarget,
        ct: Container,
        *,
        online: bool,
        mode: Optional[str],
        keep_src: bool,
        keep_images: bool,
        dry_run: bool,
        ssh_config: Optional[str],
        remote_pycpt: List[str],
        progress: Progress,
        connect_timeout: float,
    ) -> None:
        self.target = target
        self.ct = ct
        self.mode = mode or (ONLINE_DEFAULT if online else "offline")
        self.mode_chosen = mode is not None
        self.keep_src = keep_src
        self.keep_images = keep_images
        self.dry_run = dry_run
        self.ssh_config = ssh_config
        self.remote_pycpt = remote_pycpt
        self.progress = progress
        self.connect_timeout = connect_timeout
        self.token = secrets.token_hex(16)
        self.stats = MigrationStats(ct=ct.id, host=str(target), mode=self.mode, dry_run=dry_run)
        self.conn: Optional[SshConnection] = None
        self.agent: Optional[subprocess.Popen[bytes]] = None
        self.agent_stderr: Optional[IO[bytes]] = None
        self.ch: Optional[Channel] = None
        self.images: Optional[Path] = None
        self.frozen_at: Optional[float] = None
        self.lazy: Optional[_LazySource] = None
        self.remote_root: Optional[str] = None
        self.resume_sent = False  # from then on only the target's answer lets us run it
        self.final = False  # the target keeps the container for good
        self.answer = ""  # what the target said about its copy after a failure
        self.channel_broken = False  # the control channel failed once: never trust it again
        self.criu: Optional[Criu] = None
        self.engine: Optional[Engine] = None
        # the page channel's connection (pycpt/_migration/pages.py), until the dump's CRIU
        # has its own copy
        self.page_socket: Optional[socket.socket] = None
        self.ps_options: Dict[str, Any] = {}
        self.pages_to_target = False
        self.outgoing: Dict[str, Any] = {}

    # --- the whole run -------------------------------------------------------------------

    def run(self) -> MigrationStats:
        start = time.perf_counter()
        with self.ct._locked():  # settles an older migration's record first
            try:
                self._run()
            except BaseException as exc:
                if not self._fail(exc):
                    raise
            finally:
                self._close()
        self.stats.total = time.perf_counter() - start
        return self.stats

    def _run(self) -> None:
        self._preflight()
        if self.dry_run:
            self._send("bye")
            self._forget_record()
            return
        root = self.ct.state.get("root")
        self._prepare_dump()
        if self.mode == "offline":
            self._freeze()
        if root:
            self._sync_root(root, "sync")
        if self.mode != "offline":
            self._freeze()
            if root:
                self._sync_root(root, "sync-final")
        if self.mode == "postcopy":
            self._dump_lazy()
        else:
            self._dump()
        self._transfer()
        self._restore()
        self._resume_target()
        if self.lazy is not None:
            self._wait_pages()
        self._finish_source()
        self._bye()

    # --- the record ----------------------------------------------------------------------

    def _record(self, stage: str, durable: bool = False) -> None:
        """Write down the stage we are entering, before entering it (see states.py)."""
        self.outgoing["stage"] = stage
        data = self.ct.state
        data["outgoing"] = dict(self.outgoing)
        self.ct._write(data, durable=durable)

    def _forget_record(self) -> None:
        data = self.ct.state
        if data.pop("outgoing", None) is not None:
            self.ct._write(data, durable=False)

    # --- stages --------------------------------------------------------------------------

    def _stage(self, name: str, started: float, nbytes: int = 0, note: str = "") -> None:
        seconds = time.perf_counter() - started
        self.stats.stages[name] = self.stats.stages.get(name, 0.0) + seconds
        self.progress(name, seconds, nbytes, note)

    def _preflight(self) -> None:
        started = time.perf_counter()
        if not self.ct.exists:
            raise errors.ContainerNotFoundError(f"no container {self.ct.id} here")
        if self.ct.status is not ContainerStatus.RUNNING:
            raise errors.ContainerStateError(
                f"cannot migrate container {self.ct.id}: it is {self.ct.status.value}",
                hint="only a running container migrates; `pycpt status` shows where it is",
            )
        if self.ct.state.get("share_net"):
            raise errors.MigrationError(
                f"container {self.ct.id} shares this host's network (--share-net): its "
                "sockets and addresses belong here and cannot move",
                stage="preflight",
                hint="start containers meant to migrate without --share-net; to be reachable "
                "from outside, give them their own address on a host bridge with "
                "`pycpt start CT --net bridge=BR,ip=ADDR/PREFIX` (see the README's Networking)",
            )
        if self.mode == "postcopy":
            try:
                require_pipe_size("DUMP")
            except errors.PipeSizeError as exc:
                if self.mode_chosen:
                    raise
                self.mode = self.stats.mode = "stopcopy"
                self.stats.notes.append(
                    f"post-copy impossible here ({exc.message}); "
                    + ("would use" if self.dry_run else "used")
                    + " stop-and-copy"
                )
        if self.ct.state.get("root") and shutil.which("rsync") is None:
            raise errors.MigrationError(
                "rsync is missing here (it copies the root directory)",
                stage="preflight",
                hint="apt-get install rsync",
            )
        engine = self.engine = find_engine()
        memory = _memory_of(self.ct)
        self.stats.memory_bytes = memory
        # every directory this run makes is named in the record before it exists, so that
        # whoever settles the record after a crash removes them
        control = Path(tempfile.gettempdir(), f"pycpt-ssh-{self.token[:16]}")
        need = memory if self.keep_images else 64 << 20
        self.images = Path(images_parent(need), f".pycpt-migrate-{self.ct.id}-{self.token[:16]}")
        self.outgoing = {
            "token": self.token,
            "host": str(self.target),
            "mode": self.mode,
            "pid": os.getpid(),
            "pid_start": start_time(os.getpid()),
            "ssh_config": self.ssh_config,
            "remote_pycpt": self.remote_pycpt,
            "connect_timeout": self.connect_timeout,
            "dirs": [str(control), str(self.images)],
            "started": time.time(),
        }
        self._record(states.PREFLIGHT)
        self.conn = SshConnection(
            self.target,
            config=self.ssh_config,
            connect_timeout=self.connect_timeout,
            control_dir=control,
        )
        # the agent's stderr goes to a file: a pipe nobody reads until the end could fill up
        self.agent_stderr = tempfile.TemporaryFile(prefix="pycpt-migrate-target-")
        self.agent = self.conn.popen(
            [*self.remote_pycpt, "migrate-target", self.ct.id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.agent_stderr,
            bufsize=0,
        )
        assert self.agent.stdin is not None and self.agent.stdout is not None
        self.ch = Channel(
            self.agent.stdout,
            self.agent.stdin,
            accepts=messages.FROM_TARGET,
            sends=messages.FROM_SOURCE,
            peer=f"pycpt on {self.target}",
        )
        self.ch.stage = "preflight"
        self.ch.start_heartbeats()
        cpuinfo = Path(tempfile.mkdtemp(prefix="pycpt-cpuinfo-"))
        try:
            with Criu(engine) as criu:
                criu.cpuinfo_dump(cpuinfo)
            self._send(
                "hello",
                protocol=PROTOCOL,
                pycpt=__version__,
                token=self.token,
                criu=list(engine.version),
                ct=self.ct.id,
                mode=self.mode,
                memory=memory,
                root=bool(self.ct.state.get("root")),
                dry_run=self.dry_run,
                # its NICs: the target checks their bridges and addresses before the freeze
                **({"nics": network.records(self.ct.nics)} if self.ct.nics else {}),
            )
            self._call(lambda ch: ch.send_files(cpuinfo, ["cpuinfo.img"]))
        finally:
            shutil.rmtree(cpuinfo, ignore_errors=True)
        ready = self._expect("ready")
        self.stats.target = {k: v for k, v in ready.items() if k != "op"}
        self.remote_root = ready["root"]
        net = "".join(f"; {line}" for line in ready.get("net") or [])
        # the memory goes to the target's page server as it is dumped, unless the dump
        # must be kept here whole (--keep-images); post-copy serves it from here
        self.pages_to_target = self.mode != "postcopy" and not self.keep_images
        channel = ""
        if self.pages_to_target or self.mode == "postcopy":
            self._open_page_channel()
            channel = "; page channel: Unix socket through ssh, key checked"
        self._stage(
            "preflight",
            started,
            note=f"target pycpt {ready['pycpt']}, CRIU "
            f"{'.'.join(map(str, ready['criu']))}, mode {self.mode}{net}{channel}",
        )

    def _open_page_channel(self) -> None:
        """Connect to the target's end of the page channel (pycpt/_migration/pages.py)
        before anything is frozen (a dry run too: it proves the target's sshd forwards it)."""
        assert self.conn is not None and self.ch is not None
        started = time.perf_counter()
        self._send("page-channel")
        reply = self._expect("page-channel")
        try:
            self.page_socket = pages.connect(self.conn, reply)
        except errors.PageChannelError as exc:
            exc.stage = "preflight"
            # the target may have closed it, and said why
            msg = self._call(lambda ch: ch.receive(timeout=1.0))
            if msg is not None and msg["op"] == "error":
                raise remote_error(msg) from exc
            raise
        self.stats.stages["preflight.page_channel"] = time.perf_counter() - started

    def _close_page_socket(self) -> None:
        """Our copy of the page channel's connection: once the dump's CRIU has its own, the
        channel must end when that CRIU does."""
        if self.page_socket is not None:
            self.page_socket.close()
            self.page_socket = None

    def _sync_root(self, root: str, stage: str) -> None:
        assert self.conn is not None
        if not self.remote_root:
            raise errors.MigrationProtocolError(
                "the target named no root directory for the container's", stage=stage
            )
        started = time.perf_counter()
        ssh = shlex.join(self.conn.command([])[:-2])  # ssh and its options, no host
        argv = [
            "rsync",
            "-aHAX",
            "--numeric-ids",
            "--delete",
            "--exclude",
            "/proc/*",
            "-e",
            ssh,
            f"{root.rstrip('/')}/",
            f"{_rsync_host(self.target.host)}:{self.remote_root}/",
        ]
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if out.returncode != 0:
            raise errors.MigrationError(
                f"copying the root directory failed: {out.stderr.decode(errors='replace').strip()}",
                stage=stage,
                hint="check the space and rsync on the target",
            )
        self._stage(stage, started)

    def _freeze(self) -> None:
        started = time.perf_counter()
        self.frozen_at = started
        self.ct._suspend(10.0)
        self.ct._let_vforks_finish()
        self._stage("freeze", started)

    def _prepare_dump(self) -> None:
        """What the dump needs that can be done while the container still runs: CRIU
        started, the images directory, the page channel."""
        assert self.images is not None and self.conn is not None
        started = time.perf_counter()
        self._set_stage("prepare")
        self.images.mkdir(mode=0o700)
        if self.pages_to_target:
            self._send("page-server", expect=self.stats.memory_bytes)
            self._expect("page-server")
        pass_fd = None
        if self.page_socket is not None:
            self.ps_options = pages.source_dump_options(self.page_socket)
            pass_fd = self.page_socket.fileno()
        self.criu = Criu(self.engine)
        self.criu.prepare(pass_fd=pass_fd)  # it inherits the page channel
        # from here on a crash leaves the container frozen: its record must outlive a crash
        self._record(states.PREPARE, durable=True)
        self._stage("prepare", started)

    def _set_stage(self, name: str, total: Optional[int] = None) -> None:
        if self.ch is not None:
            self.ch.stage = name
        self.progress.begin(name, total)

    def _dump(self) -> None:
        assert self.images is not None and self.criu is not None
        started = time.perf_counter()
        self._set_stage("dump")
        try:
            self.criu.dump(
                self.ct.init_pid or 0,
                self.images,
                freeze_cgroup=str(self.ct.cgroup),
                leave_running=True,
                **CRIU_OPTIONS,
                **MIGRATION_DUMP,
                **self.ps_options,
            )
        except errors.CriuError as exc:
            self._close_page_socket()  # the target's page server must see the end
            if self.pages_to_target and not isinstance(exc, errors.CriuConnectionError):
                self._blame_page_server(exc)  # (a CRIU that died is not the target's fault)
            raise
        finally:
            self._close_page_socket()
        note = "memory sent to the target's page server" if self.pages_to_target else ""
        self._stage(
            "dump",
            started,
            self.stats.memory_bytes
            if self.pages_to_target
            else sum(p.stat().st_size for p in self.images.iterdir()),
            note,
        )

    def _blame_page_server(self, exc: errors.CriuError) -> None:
        """Raise the target page server's failure, if that is what broke the dump."""
        self._send("page-server-result")
        result = self._expect("page-server-result")
        if result["status"] in (None, 0):
            return
        lines = list(result["errors"])
        text = lines[-1] if lines else f"wait status {result['status']}"
        free = result["free"]
        # a full disk may leave no room for the page server's log either
        full = any("No space left" in line for line in lines) or (
            free is not None and free < (1 << 20)
        )
        if full:
            text = f"no space left in {result['images_dir']} ({free} bytes free)"
        raise errors.TargetIncompatibleError(
            f"the target could not store the memory: {text}",
            stage="dump",
            host=str(self.target),
            hint="free space on the target (or point PYCPT_IMAGES_DIR there at a larger file "
            "system), then migrate again"
            if full
            else "",
        ) from exc

    def _dump_lazy(self) -> None:
        assert self.images is not None and self.criu is not None
        started = time.perf_counter()
        self._set_stage("dump")
        try:
            self.lazy = _LazySource(self.criu, self.ct, self.images, self.ps_options)
        finally:
            self._close_page_socket()  # CRIU serves on its copy; the channel ends with it
        self._stage("dump", started, note="memory stays here, served on demand")

    def _transfer(self) -> None:
        images = self.images
        assert images is not None
        started = time.perf_counter()
        self._set_stage("transfer")
        names = sorted(p.name for p in images.iterdir() if p.is_file())
        size = sum((images / n).stat().st_size for n in names)
        self._send("images", expect=size)
        sent = self._call(lambda ch: ch.send_files(images, names))
        self.stats.stages["transfer.send"] = time.perf_counter() - started
        received = self._expect("received")
        self.stats.stages["transfer.target"] = received["seconds"]
        self.stats.image_bytes = sent + received["page_bytes"]
        self._stage("transfer", started, sent)

    def _restore(self) -> None:
        started = time.perf_counter()
        self._set_stage("restore")
        self._send("restore", config=self.ct._config())
        reply = self._expect("undumped")
        self._stage("restore", started)
        for part in ("lazy_daemon", "criu_restore", "freeze"):
            if part in reply:
                self.stats.stages[f"restore.{part}"] = reply[part]

    def _resume_target(self) -> None:
        started = time.perf_counter()
        self._set_stage("resume")
        # written before the message goes: from here on the target may run it
        self._record(states.RESUME_SENT)
        self.resume_sent = True
        self._send("resume")
        running = self._expect("running")
        assert self.frozen_at is not None
        self.stats.frozen_window = time.perf_counter() - self.frozen_at
        self.final = running["committed"]  # stop-and-copy: the target committed first
        self._stage(
            "resume", started, note=f"frozen window {self.stats.frozen_window * 1000:.1f} ms"
        )

    def _wait_pages(self) -> None:
        assert self.lazy is not None and self.ch is not None
        started = time.perf_counter()
        self._set_stage("pages", self.stats.memory_bytes or None)
        self._record(states.PAGES)
        msg = self._expect("committed", "aborted")
        if msg["op"] == "aborted":
            self.answer = states.ANSWER_ABORTED
            raise errors.MigrationError(
                f"the target killed its copy: {msg.get('reason') or 'it gave up'}",
                stage="pages",
                host=str(self.target),
            )
        self.final = True
        self._stage("pages", started, msg.get("page_bytes") or self.stats.memory_bytes)
        started = time.perf_counter()
        error = self.lazy.join()  # CRIU here ends once its page server is done
        if error is not None:  # the target has every page: nothing depends on it any more
            self.stats.notes.append(f"CRIU's page server here ended with: {error}")
        self._stage("pages.source_done", started)

    def _finish_source(self) -> None:
        """The target owns the container: end the copy here."""
        started = time.perf_counter()
        self._set_stage("cleanup")
        self._record(states.COMMITTED)
        if self.keep_images and self.images is not None and self.engine is not None:
            self.ct.default_dumpfile().parent.mkdir(parents=True, exist_ok=True)
            dumpfile.write_dump_file(
                self.ct.default_dumpfile(),
                self.images,
                config=self.ct._config(),
                criu_version=self.engine.version_string,
                keys=dumpfile.Keys(self.ct.root),
            )
        self.ct._kill_all(10.0)
        if self.keep_src:
            data = self.ct.state
            data.pop("outgoing", None)
            data.update(phase="stopped", init_pid=None, dump_done=False)
            self.ct._write(data)
        else:
            self.ct.forget()
        self._stage("cleanup", started)

    def _bye(self) -> None:
        try:
            self._send("bye")
        except errors.MigrationError as exc:  # the target keeps it whether it hears this
            self.stats.notes.append(f"the target did not hear goodbye: {exc.message}")

    # --- failure -------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> bool:
        """Settle a failed run by the rules of states.py. Returns True when it turns out
        to be a success after all (the target committed), else the caller raises `exc`
        (or this raises what to say instead)."""
        if isinstance(exc, errors.MigrationError) and not exc.host:
            exc.host = str(self.target)
        if self.final:  # it runs there for good: only ending it here failed
            raise errors.MigrationError(
                f"container {self.ct.id} runs on {self.target} now, but ending it here "
                f"failed: {exc}",
                host=str(self.target),
                stage="cleanup",
                hint=f"its copy here is frozen, not running; any pycpt command on "
                f"{self.ct.id} here finishes ending it (e.g. `pycpt status {self.ct.id}`, "
                f"`pycpt migrate --abort {self.ct.id}`)",
            ) from exc
        if not self.resume_sent:
            # the target never ran it: the source owns it, and takes it back at once; the
            # target hears of it after (it removes everything by itself when we go anyway)
            self._end_criu()
            self._resume_source(exc)
            if not self._tell_target_to_abort() and self.agent is not None:
                exc.add_note(
                    f"{self.target} could not be told to remove what arrived there; its "
                    f"pycpt does so by itself within seconds, or, if that host went down, the "
                    f"next pycpt command on {self.ct.id} there does (e.g. `pycpt migrate "
                    f"--abort {self.ct.id}` on {self.target})"
                )
            return False
        answer = self.answer or self._ask_target()
        if answer in states.COPY_DEAD:
            self._end_criu()  # only now: the copy there may have needed its pages till now
            self._resume_source(exc)
            exc.add_note(f"container {self.ct.id} runs here again (the target's copy is gone)")
            if answer == states.ANSWER_LOST:
                exc.add_note(_lost_there(str(self.target)))
            elif self.mode == "postcopy":
                exc.add_note(_RAN_THERE)
            return False
        if answer == states.ANSWER_COMMITTED:
            self.final = True
            self._end_criu()
            self._finish_source()
            self.stats.notes.append(
                f"the target committed although this side failed ({exc}); the container runs "
                f"on {self.target} now"
            )
            return True
        raise errors.MigrationInDoubtError(
            f"the target was told to run container {self.ct.id} and cannot be asked whether "
            f"its copy runs ({answer}); the copy here stays frozen",
            host=str(self.target),
            stage="resume",
            hint=_in_doubt_hint(self.ct.id, str(self.target)),
            decides=f"pycpt migrate --abort {self.ct.id}",
        ) from exc

    def _end_criu(self) -> None:
        if self.lazy is not None:
            self.lazy.abort()
        if self.criu is not None:
            self.criu.close()

    def _tell_target_to_abort(self) -> bool:
        """Before "resume": a live agent removes everything by itself when we go, but hears
        it now; what a dead one left is removed with `migrate-target --abort TOKEN` while
        the ssh connection still works (else by the next pycpt command there). True if
        the target heard it."""
        if self._channel_usable():
            assert self.ch is not None
            try:
                self.ch.send("abort", reason="the source gave up")
                self.ch.expect("aborted", timeout=self.ch.silence)
                return True
            except (errors.PycptError, OSError):
                pass
        if self.conn is not None and self.conn.alive and self.outgoing:
            try:
                _ask(self.outgoing, self.ct.id, self.conn, timeout=dead_after())
                return True
            except (errors.PycptError, ValueError):
                pass
        return False

    def _channel_usable(self) -> bool:
        return (
            self.ch is not None
            and not self.channel_broken
            and self.agent is not None
            and self.agent.poll() is None
        )

    def _ask_target(self) -> str:
        """After "resume": what became of the target's copy. Over the channel while the
        agent lives, else `migrate-target --abort TOKEN` over ssh, retried for two
        heartbeat timeouts. Returns one of states.ANSWERS, or why there is no answer."""
        if self._channel_usable():
            assert self.ch is not None
            try:
                self.ch.send("abort", reason="the source gave up")
                msg = self.ch.expect("aborted", "committed", timeout=self.ch.silence)
                return states.ANSWER_ABORTED if msg["op"] == "aborted" else states.ANSWER_COMMITTED
            except (errors.PycptError, OSError):
                pass
        deadline = time.monotonic() + 2 * dead_after()
        why = "no answer"
        while True:
            left = deadline - time.monotonic()
            try:
                return _ask(self.outgoing, self.ct.id, self.conn, timeout=max(left, 2.0))
            except errors.MigrationError as exc:
                why = exc.message
            if time.monotonic() + 1.0 > deadline:
                return why
            time.sleep(1.0)

    def _resume_source(self, exc: BaseException) -> None:
        """Take the container back here: network, thaw, record (it never ran elsewhere, or
        its other copy is dead)."""
        if self.frozen_at is not None and self.ct.exists and self.ct.init_pid is not None:
            try:
                self.ct._start_network()
                Freezer(self.ct.cgroup).thaw()
            except Exception as again:
                exc.add_note(f"then resuming the container here failed too: {again}")
                return  # the record stays: the next command tries again
            data = self.ct.state
            data.pop("outgoing", None)
            data.update(phase="running", dump_done=False, links_down=[])
            self.ct._write(data, durable=False)
        else:
            self._forget_record()

    # --- talking to the agent ------------------------------------------------------------

    def _close(self) -> None:
        self._close_page_socket()
        if self.ch is not None:
            self.ch.close()
            self.stats.bytes_sent = self.ch.bytes_sent
        if self.lazy is not None:
            self.lazy.abort()  # the tree stays frozen: the cgroup holds it, not CRIU
        if self.agent is not None:
            for pipe in (self.agent.stdin, self.agent.stdout):
                if pipe:
                    pipe.close()
            try:
                self.agent.wait(5)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        if self.agent_stderr is not None:
            self.agent_stderr.close()
        if self.conn is not None:
            self.conn.close()
        if self.criu is not None:
            self.criu.close()
        if self.images is not None:
            shutil.rmtree(self.images, ignore_errors=True)

    def _send(self, op: str, **fields: Any) -> None:
        self._call(lambda ch: ch.send(op, **fields))

    def _expect(self, *ops: str) -> Dict[str, Any]:
        return self._call(lambda ch: ch.expect(*ops))

    def _call(self, action: Callable[[Channel], Any]) -> Any:
        assert self.ch is not None
        try:
            return action(self.ch)
        except ChannelClosed as exc:
            self.channel_broken = True
            if isinstance(exc, errors.PeerSilentError):
                raise
            why = self._agent_died(exc)
            # the agent may have said why before it went: while we were still sending
            try:
                msg = self.ch.receive(timeout=0)
            except errors.PycptError:
                raise why from exc
            raise (remote_error(msg) if msg and msg["op"] == "error" else why) from exc

    def _agent_died(self, exc: ChannelClosed) -> errors.MigrationError:
        """Why the target's side went away, from its exit status and stderr."""
        assert self.agent is not None
        try:
            self.agent.wait(5)
        except subprocess.TimeoutExpired:
            pass
        stderr = b""
        if self.agent_stderr is not None:
            self.agent_stderr.seek(0)
            stderr = self.agent_stderr.read()[-65536:]
        text = stderr.decode(errors="replace").strip()
        status = self.agent.returncode
        if status == 127 or "command not found" in text or "No such file" in text:
            return errors.TargetIncompatibleError(
                f"pycpt is not installed on {self.target} ({' '.join(self.remote_pycpt)}: "
                "command not found)",
                host=str(self.target),
                stage=exc.stage or "preflight",
                hint="install pycpt there (`make setup` in a checkout), or point "
                "--remote-pycpt / PYCPT_REMOTE_PYCPT at it",
            )
        if status == 255 and self.conn is not None and self.conn.alive:
            return errors.MigrationError(
                f"pycpt on {self.target} died (killed by a signal?){': ' + text if text else ''}",
                host=str(self.target),
                stage=exc.stage,
            )
        if status == 255:
            return errors.HostUnreachableError(
                f"the ssh connection to {self.target} broke: "
                f"{text.splitlines()[-1] if text else 'ssh exited'}",
                host=str(self.target),
                stage=exc.stage,
            )
        last = text.splitlines()[-1] if text else f"exit status {status}"
        return errors.MigrationError(
            f"pycpt on {self.target} stopped: {last}", host=str(self.target), stage=exc.stage
        )


class _LazySource:
    """CRIU's lazy dump of the container, running in a thread: it dumps everything but
    memory, then serves pages until the target has them all (or abort()).

    Once CRIU says it is ready, the container's cgroup is frozen again: during the dump
    CRIU holds the tasks with ptrace and thaws the cgroup, so a CRIU that died would let
    them run; frozen, they stay as they are (memory intact) whatever becomes of CRIU."""

    def __init__(self, criu: Criu, ct: Container, images: Path, ps: Dict[str, Any]) -> None:
        self.criu = criu
        self.outcome: Dict[str, Any] = {}
        ready_r, ready_w = os.pipe()

        def dump() -> None:
            try:
                self.criu.dump(
                    ct.init_pid or 0,
                    images,
                    lazy_pages=True,
                    leave_running=True,
                    freeze_cgroup=str(ct.cgroup),
                    status_fd=ready_w,
                    **CRIU_OPTIONS,
                    **MIGRATION_DUMP,
                    **ps,
                )
            except BaseException as exc:
                self.outcome["error"] = exc
            finally:
                os.close(ready_w)

        # CRIU was started by prepare() on the caller's thread (it dies with that thread,
        # not with this one)
        self.thread = threading.Thread(target=dump, name="pycpt-lazy-dump", daemon=True)
        self.thread.start()
        try:
            ready = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if not ready:
            self.thread.join()
            self.criu.close()
            error = self.outcome.get("error")
            if isinstance(error, BaseException):
                raise error
            raise errors.MigrationError("the lazy dump ended before it was ready", stage="dump")
        Freezer(ct.cgroup).freeze()

    def join(self) -> Optional[BaseException]:
        """Wait until CRIU has ended (its client, the target's lazy-pages, is done); the
        dump's error, if any. CRIU's success does not say every page was delivered: only
        the target's "committed" does."""
        self.thread.join()
        self.criu.close()
        error = self.outcome.get("error")
        return error if isinstance(error, BaseException) else None

    def abort(self) -> None:
        """Stop serving (kills CRIU); the container stays frozen. Idempotent."""
        self.criu.close()
        self.thread.join(30)


def _rsync_host(host: str) -> str:
    # rsync reads "a::b" as its daemon syntax: an IPv6 address goes in brackets
    return f"[{host}]" if ":" in host else host


def _memory_of(ct: Container) -> int:
    """Resident memory of the container's processes (an upper bound: shared pages count
    once per process)."""
    return container_rss(ct.cgroup)


def _in_doubt_hint(ct: str, host: str) -> str:
    return (
        f"once {host} can be reached, `pycpt migrate --abort {ct}` here asks it: if its copy "
        f"is gone, the container resumes here; if it runs there, the copy here is ended. If "
        f"{host} is gone for good, check that the container does not run there (`pycpt "
        f"status {ct}` on it), then `pycpt migrate --abort --force {ct}` here resumes it here"
    )


# --- settling a record: recovery and --abort --------------------------------------------------


def _ask(
    outgoing: Dict[str, Any],
    ct: str,
    conn: Optional[SshConnection] = None,
    timeout: float = 60.0,
) -> str:
    """`migrate-target --abort TOKEN CT` on the record's host (over `conn` while it lives,
    else a connection of its own), waiting at most about `timeout` seconds: one of
    states.ANSWERS, or MigrationError/HostUnreachableError saying why there is no answer."""
    target = SshTarget.parse(str(outgoing.get("host")))
    remote = outgoing.get("remote_pycpt") or _default_remote_pycpt()
    config = outgoing.get("ssh_config") or None
    if config is not None and not Path(config).is_file():
        config = None
    connect = min(float(outgoing.get("connect_timeout") or 10.0), max(timeout, 1.0))
    own = conn is None or not conn.alive
    if own:
        conn = SshConnection(target, config=config, connect_timeout=connect)
    assert conn is not None
    try:
        out = conn.run(
            [*remote, "migrate-target", "--abort", str(outgoing["token"]), ct],
            timeout=max(timeout, 30.0),  # the agent there may need a while to roll back
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.MigrationError(f"{target} did not answer in time") from exc
    finally:
        if own:
            conn.close()
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    if out.returncode == 0 and lines and lines[-1] in states.ANSWERS:
        return lines[-1]
    err = out.stderr.decode(errors="replace").strip().splitlines()
    if out.returncode == 255:
        raise errors.HostUnreachableError(
            f"cannot reach {target}: {err[-1] if err else 'ssh failed'}", host=str(target)
        )
    raise errors.MigrationError(
        f"pycpt on {target} could not tell: {err[-1] if err else f'exit status {out.returncode}'}",
        host=str(target),
    )


def _owner_alive(outgoing: Dict[str, Any]) -> bool:
    pid = outgoing.get("pid")
    return isinstance(pid, int) and start_time(pid) == outgoing.get("pid_start") is not None


def _remove_dirs(ct: Container, outgoing: Dict[str, Any]) -> None:
    """The temporary directories a dead migration named in its record (only ones it could
    have made: the record may be damaged, and these get removed)."""
    for entry in outgoing.get("dirs") or []:
        if not isinstance(entry, str) or not os.path.isabs(entry):
            continue
        name = os.path.basename(entry)
        if not (name.startswith("pycpt-ssh-") or name.startswith(f".pycpt-migrate-{ct.id}-")):
            continue
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)


_RAN_THERE = (
    "the target's copy may have run for a while before it was killed: what it did outside "
    "stays done, and TCP connections it used may break now (their peers saw that copy)"
)


def _lost_there(host: str) -> str:
    return (
        f"{host} had taken the container over, but its copy there died before the copy "
        f"here was ended (was {host} restarted?): it resumed here from the moment it froze, "
        f"and what it did on {host} since is lost"
    )


def _take_back(ct: Container, outgoing: Dict[str, Any]) -> str:
    """The source owns the container again: resume its frozen tree."""
    _remove_dirs(ct, outgoing)
    data = ct.state
    data.pop("outgoing", None)
    if ct.init_pid is None:
        data.update(phase="stopped", init_pid=None, dump_done=False)
        ct._write(data)
        return (
            f"{ct.id}: the migration to {outgoing.get('host')} was undone, but the container's "
            "processes here are gone (was this host restarted?)"
        )
    if data.get("phase") == "suspended":
        ct._start_network()
        Freezer(ct.cgroup).thaw()
        data.update(phase="running", dump_done=False, links_down=[])
    ct._write(data)
    text = f"{ct.id} runs here again (its migration to {outgoing.get('host')} was undone)"
    if outgoing.get("mode") == "postcopy" and states.target_may_own(outgoing):
        text += f"; {_RAN_THERE}"
    return text


def _hand_over(ct: Container, outgoing: Dict[str, Any]) -> str:
    """The target owns the container: end the copy here and say where it went."""
    ct._kill_all(10.0)
    _remove_dirs(ct, outgoing)
    data = ct.state
    data.pop("outgoing", None)
    data.update(
        phase="migrated",
        migrated_to=outgoing.get("host"),
        init_pid=None,
        dump_done=False,
        migrated_at=time.time(),
    )
    ct._write(data)
    return f"{ct.id} migrated to {outgoing.get('host')}; its copy here is ended"


def _settle(ct: Container, outgoing: Dict[str, Any], force: bool) -> str:
    """Settle the record of a migration whose command is gone, by the rules of states.py;
    returns what happened, or raises MigrationInDoubtError."""
    if _owner_alive(outgoing):
        raise errors.ContainerBusyError(
            f"container {ct.id} is being migrated by pycpt (pid {outgoing.get('pid')})",
            hint="wait for it, or interrupt it (Ctrl-C) and run this again",
        )
    host = str(outgoing.get("host"))
    if not states.target_may_own(outgoing):
        return _take_back(ct, outgoing)  # the target never ran it: nothing to ask
    if outgoing.get("stage") == states.COMMITTED:
        return _hand_over(ct, outgoing)
    try:
        answer = _ask(outgoing, ct.id)
    except (errors.MigrationError, ValueError) as exc:
        answer = f"no answer: {exc}"
    if answer == states.ANSWER_LOST:
        return f"{_take_back(ct, outgoing)}; {_lost_there(host)}"
    if answer in states.COPY_DEAD:
        return _take_back(ct, outgoing)
    if answer == states.ANSWER_COMMITTED:
        return _hand_over(ct, outgoing)
    if force:
        return _take_back(ct, outgoing) + f" (forced: {host} could not be asked: {answer})"
    raise errors.MigrationInDoubtError(
        f"container {ct.id} was migrating to {host}, which was told to run it, and {host} "
        f"cannot be asked whether its copy runs ({answer}); the copy here stays frozen",
        host=host,
        stage=str(outgoing.get("stage")),
        hint=_in_doubt_hint(ct.id, host),
        decides=f"pycpt migrate --abort {ct.id}",
    )


def recover(ct: Container) -> None:
    """Settle what an interrupted migration left in `ct`'s record before a command works
    on it (the caller holds the container's lock): on the source, resume it here or end
    it here as the target's answer says (MigrationInDoubtError when it cannot be asked);
    on the target, finish or remove an incoming copy whose agent died."""
    state = ct.state
    incoming = state.get("incoming")
    if isinstance(incoming, dict):
        agent = incoming.get("agent")
        if (
            isinstance(agent, list)
            and len(agent) == 2
            and isinstance(agent[0], int)
            and start_time(agent[0]) == agent[1] is not None
        ):
            raise errors.ContainerBusyError(
                f"container {ct.id} is arriving here (migration agent pid {agent[0]})",
                hint="wait for the migration to end",
            )
        clean_incoming(ct, state)
        return
    outgoing = state.get("outgoing")
    if isinstance(outgoing, dict):
        _settle(ct, outgoing, force=False)


def abort(ct: str, *, force: bool = False) -> str:
    """`pycpt migrate --abort CT`: settle an interrupted migration of container `ct`, here
    on the source (see pycpt/_migration/states.py): if the target was never told to run it,
    or its copy there is gone, the container resumes here; if the target committed, the copy
    here is ended and the record says "migrated to HOST". When the target cannot be asked,
    MigrationInDoubtError (the copy here stays frozen), unless `force`: then it resumes here
    anyway (only after checking that it does not run there: two copies would run). On a
    target, it removes an incoming copy whose agent died. Returns what happened."""
    c = Container(ct)
    if not c.exists:
        return f"no container {ct} here: nothing to settle"
    with c._locked(recover=False):
        state = c.state
        incoming = state.get("incoming")
        if isinstance(incoming, dict):
            recover(c)
            if c.exists and c.state.get("phase") == "running":
                return f"{ct} arrived here (its migration had committed); it runs here"
            return f"removed the incoming copy of {ct} (its migration agent had died)"
        outgoing = state.get("outgoing")
        if not isinstance(outgoing, dict):
            if state.get("phase") == "migrated":
                return f"{ct} already migrated to {state.get('migrated_to')}"
            raise errors.ContainerStateError(
                f"container {ct} is not migrating (it is {c.status.value})",
                hint=f"`pycpt status {ct}` shows where it is",
            )
        return _settle(c, outgoing, force=force)


def describe(ct: Container) -> str:
    """What `pycpt status` says about a container a migration left a mark on."""
    state = ct.state
    outgoing = state.get("outgoing")
    if isinstance(outgoing, dict):
        host, stage = outgoing.get("host"), outgoing.get("stage")
        if _owner_alive(outgoing):
            return f"migrating to {host} ({stage})"
        if states.target_may_own(outgoing):
            return (
                f"migrating to {host}, interrupted after {host} was told to run it; frozen "
                f"here until `pycpt migrate --abort {ct.id}` decides"
            )
        return (
            f"migrating to {host}, interrupted at {stage} (before {host} ran it): "
            f"`pycpt migrate --abort {ct.id}` (or any pycpt command on it) resumes it here"
        )
    if state.get("phase") == "migrated":
        return f"migrated to {state.get('migrated_to')}"
    incoming = state.get("incoming")
    if isinstance(incoming, dict):
        if incoming.get("stage") == states.PAGES and ct.init_pid is not None:
            memory = incoming.get("memory") if isinstance(incoming.get("memory"), int) else 0
            done = container_rss(ct.cgroup) * 100 // memory if memory else 0
            return f"receiving pages ({min(done, 100)}%)"
        return f"arriving ({incoming.get('stage')})"
    return ct.status.value
