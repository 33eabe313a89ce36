"""`pycpt migrate [--online] HOST CT`: move a container to another host over ssh.

The source drives; pycpt on the target (`pycpt migrate-target`, started over the same ssh
connection) answers. The stages:

    preflight   ssh, the target's pycpt and CRIU, CPU (CRIU's cpuinfo check), space,
                memory, the id free there; nothing is frozen yet (--dry-run stops here)
    sync        a private root directory is copied with rsync while the container runs
    freeze      the container is suspended (cgroup freezer, network down)
    dump        CRIU dumps it; it stays frozen here, never killed before the target runs
    transfer    the images go over the ssh session (SHA-256 checked on arrival)
    restore     the target rebuilds it frozen, then runs it when told: "running"
    commit      only now is the source killed and removed (--keep-src: kept, stopped)

Modes: "offline" freezes before the root directory is copied; "stopcopy" copies the root
directory first and freezes for dump, transfer and restore; "postcopy" (the default of
--online, see the README for the measurements) sends everything but memory, runs the
container on the target at once and lets CRIU's lazy-pages daemon pull the memory from the
source's page server through an ssh tunnel. The source ends only after the last page has
arrived. Any failure before the target runs the container removes it there and resumes the
source as it was.
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

from pycpt import dumpfile, errors
from pycpt._criu.lazy_pages import require_pipe_size
from pycpt._migration.channel import Channel, remote_error
from pycpt._migration.ssh import SshConnection, SshTarget
from pycpt._migration.target import PROTOCOL, images_parent
from pycpt._version import __version__
from pycpt.container import CRIU_OPTIONS, Container, ContainerStatus
from pycpt.criu import Criu
from pycpt.engine import Engine, find_engine
from pycpt.errors import ChannelClosed
from pycpt.freezer import Freezer

MODES = ("offline", "stopcopy", "postcopy")
ONLINE_DEFAULT = "postcopy"


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
    progress: Optional[TextIO] = None,
    connect_timeout: float = 10.0,
) -> MigrationStats:
    """Move container `ct` to `host` (`[user@]host[:port]`). See the module's docstring.

    `mode` is "offline", "stopcopy" or "postcopy"; without it, online=True means postcopy
    (or stopcopy, with a note, when this host's pipes are too small for CRIU's lazy pages)
    and online=False means offline. `remote_pycpt` is the command that runs pycpt on the
    target (default: `pycpt`). Raises a MigrationError (or another PycptError) on failure,
    after putting the source back as it was.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if keep_images and mode == "postcopy":
        raise ValueError("--keep-images needs a full dump: post-copy never writes the memory")
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
        progress=Progress(progress),
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
        self.token = secrets.token_hex(8)
        self.stats = MigrationStats(ct=ct.id, host=str(target), mode=self.mode, dry_run=dry_run)
        self.conn: Optional[SshConnection] = None
        self.agent: Optional[subprocess.Popen[bytes]] = None
        self.agent_stderr: Optional[IO[bytes]] = None
        self.ch: Optional[Channel] = None
        self.images: Optional[Path] = None
        self.frozen_at: Optional[float] = None
        self.lazy: Optional[_LazySource] = None
        self.remote_root: Optional[str] = None
        self.resume_sent = False
        self.final = False  # the target keeps the container for good
        self.criu: Optional[Criu] = None
        self.engine: Optional[Engine] = None
        self.page_port = self.remote_page_port = 0
        self.pages_to_target = False

    # --- the whole run -------------------------------------------------------------------

    def run(self) -> MigrationStats:
        start = time.perf_counter()
        with self.ct._locked():  # the state is read once, not at every look
            try:
                self._run()
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                self._close()
        self.stats.total = time.perf_counter() - start
        return self.stats

    def _run(self) -> None:
        self._preflight()
        if self.dry_run:
            self._send("bye")
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
        self._commit()
        if self.lazy is not None:
            self._wait_pages()
        self._finish_source()
        self._send("bye")

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
                hint="start containers meant to migrate without --share-net",
            )
        if self.mode == "postcopy":
            try:
                require_pipe_size("DUMP")
            except errors.PipeSizeError as exc:
                if self.mode_chosen:
                    raise
                self.mode = self.stats.mode = "stopcopy"
                self.stats.notes.append(
                    f"post-copy impossible here ({exc.message}); used stop-and-copy"
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
        self.conn = SshConnection(
            self.target, config=self.ssh_config, connect_timeout=self.connect_timeout
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
        self.ch = Channel(self.agent.stdout, self.agent.stdin)
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
            )
            self._call(lambda ch: ch.send_files(cpuinfo, ["cpuinfo.img"]))
        finally:
            shutil.rmtree(cpuinfo, ignore_errors=True)
        ready = self._expect("ready")
        self.stats.target = {k: v for k, v in ready.items() if k != "op"}
        self.remote_root = ready.get("root")
        self._stage(
            "preflight",
            started,
            note=f"target pycpt {ready.get('pycpt')}, CRIU "
            f"{'.'.join(map(str, ready.get('criu', [])))}, mode {self.mode}",
        )

    def _sync_root(self, root: str, stage: str) -> None:
        assert self.conn is not None and self.remote_root
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
        self._stage("freeze", started)

    def _prepare_dump(self) -> None:
        """What the dump needs that can be done while the container still runs: CRIU
        started, the images directory, and for post-copy the tunnel for the pages."""
        started = time.perf_counter()
        # the memory goes to the target's page server as it is dumped, unless the dump
        # must be kept here whole (--keep-images)
        self.pages_to_target = self.mode != "postcopy" and not self.keep_images
        need = self.stats.memory_bytes if self.keep_images else 64 << 20
        self.images = Path(
            tempfile.mkdtemp(prefix=f".pycpt-migrate-{self.ct.id}-", dir=images_parent(need))
        )
        self.criu = Criu(self.engine)
        self.criu.prepare()
        assert self.conn is not None
        if self.mode == "postcopy":
            self.page_port = _free_port()
            self.remote_page_port = self.conn.forward_remote(self.page_port)
        elif self.pages_to_target:
            self._send("page-server", expect=self.stats.memory_bytes)
            remote = int(self._expect("page-server")["port"])
            self.page_port = _free_port()
            self.conn.forward_local(remote, self.page_port)
        self._stage("prepare", started)

    def _dump(self) -> None:
        assert self.images is not None and self.criu is not None
        started = time.perf_counter()
        extra: Dict[str, Any] = (
            {"ps": {"address": "127.0.0.1", "port": self.page_port}} if self.pages_to_target else {}
        )
        try:
            self.criu.dump(
                self.ct.init_pid or 0,
                self.images,
                freeze_cgroup=str(self.ct.cgroup),
                leave_running=True,
                **CRIU_OPTIONS,
                **extra,
            )
        except errors.CriuError as exc:
            if self.pages_to_target:
                self._blame_page_server(exc)
            raise
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
        if result.get("status") in (None, 0):
            return
        lines = [str(line) for line in result.get("errors") or []]
        text = lines[-1] if lines else f"wait status {result.get('status')}"
        free = result.get("free")
        # a full disk may leave no room for the page server's log either
        full = any("No space left" in line for line in lines) or (
            isinstance(free, int) and free < (1 << 20)
        )
        if full:
            text = f"no space left in {result.get('images_dir')} ({free} bytes free)"
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
        self.lazy = _LazySource(self.criu, self.ct, self.images, self.page_port)
        self.lazy.remote_port = self.remote_page_port
        self._stage("dump", started, note="memory stays here, served on demand")

    def _transfer(self) -> None:
        images = self.images
        assert images is not None
        started = time.perf_counter()
        names = sorted(p.name for p in images.iterdir() if p.is_file())
        size = sum((images / n).stat().st_size for n in names)
        self._send("images", expect=size)
        sent = self._call(lambda ch: ch.send_files(images, names))
        self.stats.stages["transfer.send"] = time.perf_counter() - started
        received = self._expect("received")
        self.stats.stages["transfer.target"] = float(received.get("seconds", 0.0))
        self.stats.image_bytes = sent + int(received.get("page_bytes", 0))
        self._stage("transfer", started, sent)

    def _restore(self) -> None:
        started = time.perf_counter()
        fields: Dict[str, Any] = {"config": self.ct._config()}
        if self.lazy is not None:
            fields["lazy_port"] = self.lazy.remote_port
        self._send("restore", **fields)
        reply = self._expect("undumped")
        self._stage("restore", started)
        for part in ("lazy_daemon", "criu_restore", "freeze"):
            if part in reply:
                self.stats.stages[f"restore.{part}"] = float(reply[part])

    def _resume_target(self) -> None:
        started = time.perf_counter()
        self._send("resume")
        self.resume_sent = True  # from here the target may run: no quiet rollback
        self._expect("running")
        assert self.frozen_at is not None
        self.stats.frozen_window = time.perf_counter() - self.frozen_at
        self._stage(
            "resume", started, note=f"frozen window {self.stats.frozen_window * 1000:.1f} ms"
        )

    def _commit(self) -> None:
        started = time.perf_counter()
        self._send("commit")
        self._expect("committed")
        self.final = self.lazy is None  # post-copy: once every page has arrived
        self._stage("commit", started)

    def _wait_pages(self) -> None:
        assert self.lazy is not None
        started = time.perf_counter()
        pages = self._expect("pages")
        if pages.get("status") != 0:
            raise errors.MigrationError(
                f"the target's lazy-pages daemon failed (exit status {pages.get('status')})",
                stage="pages",
            )
        self.final = True
        self._stage("pages", started, self.stats.memory_bytes)
        started = time.perf_counter()
        self.lazy.join()  # CRIU on this side ends once its page server is done
        self._stage("pages.source_done", started)

    def _finish_source(self) -> None:
        started = time.perf_counter()
        if self.keep_images and self.images is not None and self.engine is not None:
            self.ct.default_dumpfile().parent.mkdir(parents=True, exist_ok=True)
            dumpfile.write_dump_file(
                self.ct.default_dumpfile(),
                self.images,
                config=self.ct._config(),
                criu_version=self.engine.version_string,
            )
        self.ct._kill_all(10.0)
        if self.keep_src:
            self.ct._save(phase="stopped", init_pid=None, dump_done=False)
        else:
            self.ct.forget()
        self._stage("cleanup", started)

    # --- failure -------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Put the source back as it was and clean the target (or, when the target may
        already run the container, find out which copy lives)."""
        if isinstance(exc, errors.MigrationError) and not exc.host:
            exc.host = str(self.target)
        if self.final:  # it runs there for good: only the removal here failed
            raise errors.MigrationError(
                f"container {self.ct.id} runs on {self.target} now, but removing it here "
                f"failed: {exc}",
                host=str(self.target),
                stage="cleanup",
                hint=f"its copy here is frozen, not running: `pycpt stop {self.ct.id}` once "
                "the cause is fixed",
            ) from exc
        if self.lazy is not None:
            self.lazy.abort()
        answer = self._abort_target()
        if self.resume_sent and answer == "committed":
            raise errors.MigrationError(
                f"container {self.ct.id} runs on {self.target} now; the copy here stays frozen",
                host=str(self.target),
                stage="commit",
                hint=f"`pycpt stop {self.ct.id}` here",
            ) from exc
        if self.resume_sent and answer not in ("removed", "absent"):
            raise errors.MigrationInDoubtError(
                f"the connection to {self.target} broke after the target was told to run "
                f"container {self.ct.id}; the source stays frozen",
                host=str(self.target),
                stage="resume",
            ) from exc
        if self.frozen_at is not None and self.ct.exists:
            self.ct._start_network()
            Freezer(self.ct.cgroup).thaw()
            self.ct._save(phase="running", dump_done=False, links_down=[])

    def _abort_target(self) -> str:
        """Tell the agent to roll back, or clean up after it; returns what the target says
        ("removed", "absent", "committed") or "unknown"."""
        if self.ch is not None and self.agent is not None and self.agent.poll() is None:
            try:
                self.ch.send("abort")
                answer = self.ch.expect("aborted", "committed")["op"]
                self.agent.wait(15)
                return "removed" if answer == "aborted" else "committed"
            except (errors.PycptError, subprocess.TimeoutExpired, OSError):
                pass
        if self.conn is None or not self.conn.alive:
            return "unknown"
        try:
            out = self.conn.run(
                [*self.remote_pycpt, "migrate-target", "--abort", self.token, self.ct.id],
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            return "unknown"
        text = out.stdout.decode().strip().splitlines()
        return text[-1] if out.returncode == 0 and text else "unknown"

    def _close(self) -> None:
        if self.ch is not None:
            self.stats.bytes_sent = self.ch.bytes_sent
        if self.lazy is not None:
            self.lazy.abort()
        if self.agent is not None:
            for pipe in (self.agent.stdin, self.agent.stdout):
                if pipe:
                    pipe.close()
            try:
                self.agent.wait(15)
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

    # --- talking to the agent ------------------------------------------------------------

    def _send(self, op: str, **fields: Any) -> None:
        self._call(lambda ch: ch.send(op, **fields))

    def _expect(self, op: str) -> Dict[str, Any]:
        return self._call(lambda ch: ch.expect(op))

    def _call(self, action: Callable[[Channel], Any]) -> Any:
        assert self.ch is not None
        try:
            return action(self.ch)
        except ChannelClosed as exc:
            why = self._agent_died(exc)
            # the agent may have said why before it went: while we were still sending
            try:
                msg = self.ch.receive()
            except errors.PycptError:
                raise why from exc
            raise (remote_error(msg) if msg["op"] == "error" else why) from exc

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
    memory, then serves pages on `port` until the target has them all (or abort())."""

    def __init__(self, criu: Criu, ct: Container, images: Path, port: int) -> None:
        self.criu = criu
        self.outcome: Dict[str, Any] = {}
        self.remote_port = 0
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
                    ps={"address": "127.0.0.1", "port": port},
                    **CRIU_OPTIONS,
                )
            except BaseException as exc:
                self.outcome["error"] = exc
            finally:
                os.close(ready_w)

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

    def join(self) -> None:
        """Wait until every page was served; raise the dump's error if it failed."""
        self.thread.join()
        self.criu.close()
        error = self.outcome.get("error")
        if isinstance(error, BaseException):
            raise errors.MigrationError(
                f"serving memory to the target failed: {error}", stage="pages"
            ) from error

    def abort(self) -> None:
        """Stop serving (kills CRIU); the container stays frozen. Idempotent."""
        self.criu.close()
        self.thread.join(30)


def _rsync_host(host: str) -> str:
    # rsync reads "a::b" as its daemon syntax: an IPv6 address goes in brackets
    return f"[{host}]" if ":" in host else host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_of(ct: Container) -> int:
    """Resident memory of the container's processes (an upper bound: shared pages count
    once per process)."""
    total = 0
    for pid in Freezer(ct.cgroup).pids():
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total
