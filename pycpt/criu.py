"""`pycpt.Criu`: every request CRIU serves over RPC, with `criu dump/restore` options as
keyword arguments."""

from __future__ import annotations

import os
import select
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from pycpt import errors
from pycpt._criu import kdat, rpc_schema
from pycpt._criu import log as criu_log
from pycpt._criu import options as criu_options
from pycpt._criu.lazy_pages import require_pipe_size
from pycpt._criu.options import build_options, default_network_lock
from pycpt._criu.swrk import EXIT_GRACE_MS, Swrk
from pycpt._sys.procfs import start_time
from pycpt._sys.signals import held
from pycpt._typing import PathLike
from pycpt.engine import Engine, find_engine
from pycpt.freezer import Freezer
from pycpt.notify import Notify, NotifyDispatcher

# How long an interrupted DUMP or RESTORE gets to end by itself before CRIU is killed after
# all (a dump of many GiB takes minutes; killing it half-way can break the tree it dumps).
INTERRUPT_GRACE_MS = 600_000

RequestType = rpc_schema.RequestType
OPTION_NAMES = criu_options.OPTION_NAMES  # every option dump() and restore() take
OPTION_ALIASES = criu_options.ALIASES  # criu --help's names that differ -> the RPC names

# Requests CRIU's service loop accepts `keep_open` for; all others end the swrk.
# WAIT_PID is not among them, but it is only useful on the session that started the child.
KEEPABLE = frozenset(
    {
        RequestType.VERSION,
        RequestType.FEATURE_CHECK,
        RequestType.CPUINFO_DUMP,
        RequestType.CPUINFO_CHECK,
        RequestType.PAGE_SERVER,
        RequestType.PAGE_SERVER_CHLD,
    }
)


@dataclass(frozen=True, order=True)
class CriuVersion:
    """CRIU's version as its VERSION request reports it; compares like a tuple."""

    major: int
    minor: int
    sublevel: int = 0
    gitid: str = field(default="", compare=False)
    name: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"


@dataclass
class DumpResult:
    """What a DUMP (or PRE_DUMP) did: CRIU's statistics and where things are."""

    images_dir: Path
    log_path: Path
    elapsed: float  # seconds, request sent to reply received
    stats: Dict[str, int]  # CRIU's stats-dump: *_time in microseconds, pages_* counts
    restored: bool = False  # true on the restore side of a dump with a page server

    @property
    def frozen_time(self) -> float:
        """Seconds the tree was frozen, as CRIU measured it."""
        return self.stats.get("frozen_time", 0) / 1e6


@dataclass
class RestoreResult:
    """What a RESTORE did: the restored root's pid and CRIU's statistics."""

    pid: int
    images_dir: Path
    log_path: Path
    elapsed: float
    stats: Dict[str, int]


@dataclass
class PageServer:
    """A page server: its pid (0 when CRIU does not report a daemon's pid) and its port."""

    pid: int
    port: int
    address: str


class Criu:
    """A client for CRIU's RPC interface (`criu swrk`).

    `engine` picks the CRIU to run: an Engine, a path to a criu binary, a full command
    (list), or None to let pycpt find one (see pycpt.engine.find_engine).
    VERSION, FEATURE_CHECK, CPUINFO and PAGE_SERVER requests share one swrk kept open for
    the life of this object (a session); DUMP, PRE_DUMP, RESTORE and CHECK each get their
    own, because CRIU serves nothing after them on that connection. session=False gives
    every request a fresh swrk. close() (or leaving a `with` block) ends the session, the
    page servers it started and requests still running in other threads. One object may be
    shared by threads.

    Each CRIU dies with the thread that started it (PR_SET_PDEATHSIG), unless
    die_with_caller=False: then a CRIU whose caller was killed finishes or fails its request
    on its own, as it would end any failure. Containers need that for their dumps and
    restores: a CRIU killed half-way through a dump may leave its parasite code in a task
    it holds (the tree, thawed by CRIU meanwhile, runs on damaged).
    """

    def __init__(
        self,
        engine: Union[Engine, PathLike, Sequence[str], None] = None,
        *,
        session: bool = True,
        die_with_caller: bool = True,
    ) -> None:
        if engine is None:
            engine = find_engine()
        if isinstance(engine, Engine):
            self.argv: Tuple[str, ...] = tuple(engine.argv)
        elif isinstance(engine, (str, os.PathLike)):
            self.argv = (os.fspath(engine),)
        else:
            self.argv = tuple(os.fspath(a) for a in engine)
            if not self.argv:
                raise errors.InvalidArgumentError("engine: an empty command")
        self.engine = engine
        self.die_with_caller = die_with_caller
        kdat.ensure(self.argv)  # CRIU's kernel-probe cache, where CRIU cannot keep it itself
        self.session = session
        self._session: Optional[Swrk] = None
        self._inflight: "set[Swrk]" = set()  # one-shot swrks serving a request right now
        # PAGE_SERVER_CHLD (pid, start time) not yet waited for
        self._page_servers: List[Tuple[int, Optional[str]]] = []
        self._lock = threading.RLock()  # one request at a time on the kept session
        self._features: Optional[Dict[str, bool]] = None
        self._spare: Optional[Swrk] = None  # started by prepare() for the next request

    def prepare(self, pass_fd: Optional[int] = None) -> None:
        """Start the CRIU process for the next dump, pre-dump or restore now, so that the
        request itself does not wait for CRIU to start (a migration calls this before it
        freezes the container). `pass_fd`: the page-channel socket that request will name
        (ps={"fd": N}), which this CRIU inherits. Idempotent."""
        with self._lock:
            spare = self._spare
            if spare is not None and spare.alive and spare.pass_fd == pass_fd:
                return
            if spare is not None:
                spare.close()
            self._spare = self._spawn(pass_fd)

    @property
    def prepared_pid(self) -> Optional[int]:
        """The pid of the CRIU started by prepare() and not used yet, or None."""
        spare = self._spare
        return spare.pid if spare is not None and spare.alive else None

    # --- session plumbing -----------------------------------------------------------

    def close(self) -> None:
        """End the kept swrk, if any, and abort requests still in progress in other threads
        (their CRIU is killed; they raise CriuConnectionError). Idempotent."""
        for swrk in list(self._inflight):
            swrk.kill()
        with self._lock:
            while self._page_servers:
                _end_page_server(*self._page_servers.pop())
            if self._session is not None:
                self._session.close()
                self._session = None
            if self._spare is not None:
                self._spare.close()
                self._spare = None

    def __repr__(self) -> str:
        where = self.engine.path if isinstance(self.engine, Engine) else " ".join(self.argv)
        session = "off" if not self.session else "open" if self._session else "closed"
        return f"<Criu {where!r} session={session}>"

    def __enter__(self) -> "Criu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, pass_fd: Optional[int] = None) -> Swrk:
        try:
            return Swrk(self.argv, pass_fd, self.die_with_caller)
        except OSError as exc:
            raise _start_error(self.argv, exc, "CRIU") from exc

    def _request(
        self,
        rtype: RequestType,
        *,
        opts: Any = None,
        notify: Optional[NotifyDispatcher] = None,
        log_path: Optional[Path] = None,
        context: str = "",
        pass_fd: Optional[int] = None,
        **fields: Any,
    ) -> "rpc_schema.Response":
        """Send one request, on the session if it can stay open there, and check the reply.
        `pass_fd`: a descriptor the request names, which its CRIU must inherit."""
        request = rpc_schema.Request(type=rtype, **fields)
        if opts is not None:
            request.opts.CopyFrom(opts)
        if notify is not None:
            request.opts.notify_scripts = True
        keep = self.session and rtype in KEEPABLE and pass_fd is None
        if keep:
            request.keep_open = True
            with self._lock:
                return self._exchange(
                    self._session_swrk(), True, request, notify, log_path, context
                )
        with self._lock:
            swrk, self._spare = self._spare, None
        if swrk is not None and swrk.pass_fd != pass_fd:
            swrk.close()  # prepared for another descriptor
            swrk = None
        if swrk is None or not swrk.alive:
            swrk = self._spawn(pass_fd)
        self._inflight.add(swrk)
        return self._exchange(swrk, False, request, notify, log_path, context)

    def _session_swrk(self) -> Swrk:
        if self._session is None or not self._session.alive:
            self._session = self._spawn()
        return self._session

    def _exchange(
        self,
        swrk: Swrk,
        keep: bool,
        request: Any,
        notify: Optional[NotifyDispatcher],
        log_path: Optional[Path],
        context: str,
    ) -> "rpc_schema.Response":
        """One request on `swrk` and its final reply; errors become CriuError subclasses."""
        name = RequestType(request.type).name
        try:
            reply = swrk.call(request, notify.answer if notify else None)
        except OSError as exc:
            self._end(swrk, keep)
            lines = criu_log.error_lines(log_path) or criu_log.error_lines_of(
                swrk.stderr_text().splitlines()
            )
            if notify is not None and notify.error is not None:
                raise notify.error from exc
            raise errors.CriuConnectionError(
                f"CRIU {name}{context}: the connection to criu swrk failed ({exc.strerror}); "
                f"criu exited with {swrk.returncode}",
                request=name,
                errno=exc.errno,
                log_lines=lines or swrk_stderr_tail(swrk),
                log_path=str(log_path) if log_path else None,
            ) from exc
        except BaseException:
            # interrupted (Ctrl-C): never kill CRIU half-way (its parasite code may be inside
            # the tree, which a killed CRIU leaves broken). Its connection closes, so CRIU
            # finishes or fails on its own, cleaning up as it does; we wait for that with
            # further interrupts held back (a freeze_cgroup is thawed by _dump)
            with held():
                self._end(swrk, keep, grace_ms=INTERRUPT_GRACE_MS)
            raise
        if not keep:
            self._end(swrk, keep)
        if notify is not None and notify.error is not None:
            raise notify.error  # the caller's own exception, after CRIU cleaned up
        if not reply.success:
            raise self._failure(name, context, reply, log_path, swrk)
        return reply

    def _end(self, swrk: Swrk, kept: bool, grace_ms: int = EXIT_GRACE_MS) -> None:
        self._inflight.discard(swrk)
        swrk.close(grace_ms)
        if kept and self._session is swrk:
            self._session = None

    @staticmethod
    def _failure(
        name: str, context: str, reply: Any, log_path: Optional[Path], swrk: Swrk
    ) -> errors.CriuError:
        lines = criu_log.error_lines(log_path) or criu_log.error_lines_of(
            swrk.stderr_text().splitlines()
        )
        errmsg = reply.cr_errmsg if reply.HasField("cr_errmsg") else ""
        if criu_log.is_harmless(errmsg):
            errmsg = lines[0] if lines else ""
        cls = criu_log.classify([errmsg, *lines])
        cr_errno = reply.cr_errno if reply.HasField("cr_errno") else None
        detail = f": {os.strerror(cr_errno)}" if cr_errno else ""
        return cls(
            f"CRIU {name}{context} failed{detail}",
            request=name,
            errno=cr_errno,
            cr_errmsg=errmsg,
            log_lines=lines,
            log_path=str(log_path) if log_path else None,
        )

    # --- requests that keep the session ---------------------------------------------

    def version(self) -> CriuVersion:
        """CRIU's version (VERSION)."""
        v = self._request(RequestType.VERSION).version
        return CriuVersion(v.major_number, v.minor_number, v.sublevel, v.gitid, v.name)

    def features(self) -> Dict[str, bool]:
        """Which optional features work with this CRIU and kernel (FEATURE_CHECK):
        mem_track (soft-dirty tracking, needed by pre-dump), lazy_pages, pidfd_store."""
        if self._features is None:
            asked = rpc_schema.Request().features
            names = [f.name for f in asked.DESCRIPTOR.fields]
            reply = self._request(
                RequestType.FEATURE_CHECK, opts=build_options({}), features={n: True for n in names}
            )
            self._features = {n: getattr(reply.features, n) for n in names}
        return dict(self._features)

    def cpuinfo_dump(self, images_dir: PathLike, **opts: Any) -> None:
        """Record this host's CPU features in images_dir (CPUINFO_DUMP)."""
        options = build_options(opts)
        with _Dirs(images_dir, None, "cpuinfo.log", create=True) as d:
            self._request(RequestType.CPUINFO_DUMP, opts=d.options(options), log_path=d.log_path)

    def cpuinfo_check(self, images_dir: PathLike, **opts: Any) -> bool:
        """True when images_dir's recorded CPU is compatible with this host (CPUINFO_CHECK)."""
        options = build_options(opts)
        with _Dirs(images_dir, None, "cpuinfo.log", create=False) as d:
            try:
                self._request(
                    RequestType.CPUINFO_CHECK, opts=d.options(options), log_path=d.log_path
                )
            except errors.CriuConnectionError:
                raise
            except errors.CriuError:
                return False
        return True

    # --- one-shot requests ----------------------------------------------------------

    def check(self) -> None:
        """Run CRIU's own kernel check (CHECK); raises CriuError naming what is missing."""
        self._request(
            RequestType.CHECK,
            opts=build_options({"log_to_stderr": True}),
            context=": this kernel lacks something CRIU needs",
        )

    def dump(
        self,
        pid: int,
        images_dir: PathLike,
        *,
        work_dir: Optional[PathLike] = None,
        log_file: str = "dump.log",
        notify: Optional[Notify] = None,
        **opts: Any,
    ) -> DumpResult:
        """Checkpoint the tree rooted at `pid` into `images_dir` (DUMP).

        By default the tree is killed after a good dump, as `criu dump` does; pass
        leave_running=True (or leave_stopped=True) to keep it. Every `criu dump` option is a
        keyword (tcp_established=True, network_lock="nftables", freeze_cgroup=PATH, ...).
        Without an explicit network_lock, nftables is used where iptables is missing.
        On failure CRIU resumes the tree: it runs on exactly as before.
        """
        return self._dump(RequestType.DUMP, pid, images_dir, work_dir, log_file, notify, opts)

    def pre_dump(
        self,
        pid: int,
        images_dir: PathLike,
        *,
        work_dir: Optional[PathLike] = None,
        log_file: str = "pre-dump.log",
        notify: Optional[Notify] = None,
        single: bool = False,
        **opts: Any,
    ) -> DumpResult:
        """Copy the tree's memory ahead of a dump, leaving it running (PRE_DUMP, or
        SINGLE_PRE_DUMP when single=True). Needs soft-dirty tracking in the kernel."""
        rtype = RequestType.SINGLE_PRE_DUMP if single else RequestType.PRE_DUMP
        return self._dump(rtype, pid, images_dir, work_dir, log_file, notify, opts)

    def restore(
        self,
        images_dir: PathLike,
        *,
        work_dir: Optional[PathLike] = None,
        log_file: str = "restore.log",
        notify: Optional[Notify] = None,
        **opts: Any,
    ) -> RestoreResult:
        """Rebuild the tree saved in `images_dir` (RESTORE); returns the root's pid.

        Every `criu restore` option is a keyword (rst_sibling=True makes the root this
        process's child, leave_stopped=True keeps it stopped, root="/", ...).
        """
        options = build_options(opts)
        _check_restore_dir(images_dir)
        with _Dirs(images_dir, work_dir, log_file, create=False) as d:
            start = time.perf_counter()
            reply = self._request(
                RequestType.RESTORE,
                opts=d.options(options),
                notify=_dispatcher(notify, "RESTORE"),
                log_path=d.log_path,
            )
            elapsed = time.perf_counter() - start
            stats = read_stats(d.images_path / "stats-restore", "restore")
        return RestoreResult(reply.restore.pid, d.images_path, d.log_path, elapsed, stats)

    def page_server(
        self,
        images_dir: PathLike,
        *,
        address: str = "",
        port: int = 0,
        daemon: bool = False,
        work_dir: Optional[PathLike] = None,
        log_file: str = "page-server.log",
        **opts: Any,
    ) -> PageServer:
        """Start a page server that receives pages into images_dir from a dump given
        ps={"address": ..., "port": ...}, or, with lazy_pages=True, serves them.

        By default it is a child of this client's kept swrk (PAGE_SERVER_CHLD): wait for it
        with wait_pid(). daemon=True detaches it instead (PAGE_SERVER). Port 0 picks a free
        port; the result says which.
        """
        ps: Dict[str, Any] = {"port": port}
        if address:
            ps["address"] = address
        rtype = RequestType.PAGE_SERVER if daemon else RequestType.PAGE_SERVER_CHLD
        options = build_options({**opts, "ps": ps})
        with _Dirs(images_dir, work_dir, log_file, create=True) as d:
            reply = self._request(rtype, opts=d.options(options), log_path=d.log_path)
        if not daemon:
            self._page_servers.append((reply.ps.pid, start_time(reply.ps.pid)))
        return PageServer(reply.ps.pid, reply.ps.port, address)

    def wait_pid(self, pid: int) -> int:
        """Wait for a child of the kept swrk (a page server started by page_server()) to end
        and return its wait status (WAIT_PID); ends the session."""
        with self._lock:
            if self._session is None or not self._session.alive:
                raise errors.InvalidArgumentError(
                    "wait_pid needs the session that started the process"
                )
            reply = self._exchange(
                self._session,
                False,
                rpc_schema.Request(type=RequestType.WAIT_PID, pid=pid),
                None,
                None,
                f" {pid}",
            )
            self._session = None
            self._page_servers = [(p, t) for p, t in self._page_servers if p != pid]
        return int(reply.status)

    def lazy_pages(
        self,
        images_dir: PathLike,
        *,
        address: str = "",
        port: int = 0,
        fd: Optional[int] = None,
        log_file: str = "lazy-pages.log",
        timeout: float = 30.0,
    ) -> "LazyPagesDaemon":
        """Start `criu lazy-pages` for a restore with lazy_pages=True from images_dir: it
        fetches the pages the restored tree touches (and then all the others) from the page
        server a lazy dump runs at address:port, or on the other end of the connected socket
        `fd` (`--ps-socket`: the dump was given the other end as ps={"fd": N}). Returns once
        it is ready for the restore; the caller may close its copy of `fd` then."""
        if fd is not None:
            _check_socket(fd)
        return LazyPagesDaemon(self.argv, images_dir, address, port, log_file, timeout, fd)

    def page_server_process(
        self,
        images_dir: PathLike,
        *,
        fd: int,
        log_file: str = "page-server.log",
        timeout: float = 30.0,
    ) -> "PageServerProcess":
        """Start `criu page-server --ps-socket FD` writing into images_dir the pages a dump
        sends on the other end of the connected socket `fd` (given to that dump as
        ps={"fd": N}). It runs on the command line, as this process's child (CRIU's RPC
        reports no pid for it); wait() returns its exit status once the dump is done.
        Returns once it is ready; the caller may close its copy of `fd` then."""
        _check_socket(fd)
        return PageServerProcess(self.argv, images_dir, fd, log_file, timeout)

    def _dump(
        self,
        rtype: RequestType,
        pid: int,
        images_dir: PathLike,
        work_dir: Optional[PathLike],
        log_file: str,
        notify: Optional[Notify],
        opts: Dict[str, Any],
    ) -> DumpResult:
        _check_pid(pid)
        if rtype != RequestType.DUMP or opts.get("track_mem"):
            self._require_mem_track(rtype.name)
        if "network_lock" not in opts:
            lock = default_network_lock()
            if lock is not None:
                opts["network_lock"] = lock
        cgroup = opts.get("freeze_cgroup")
        # A CRIU killed half-way (Ctrl-C, close()) cannot thaw the cgroup it froze: we do.
        freezer = Freezer(cgroup) if cgroup is not None else None
        thaw_after_failure = freezer is not None and not freezer.requested
        options = build_options(opts)  # bad options fail before anything is touched
        _PageSocket.check(options)
        if options.lazy_pages:
            require_pipe_size(rtype.name)  # after the arguments: a wrong call is told so first
        options.pid = pid
        with _Dirs(images_dir, work_dir, log_file, create=True) as d, _PageSocket(options) as ps:
            d.options(options)
            start = time.perf_counter()
            try:
                reply = self._request(
                    rtype,
                    opts=options,
                    notify=_dispatcher(notify, rtype.name),
                    log_path=d.log_path,
                    context=f" of pid {pid}",
                    pass_fd=ps.fd,
                )
            except BaseException as exc:
                if freezer is not None and thaw_after_failure:
                    try:
                        freezer.thaw()
                    except Exception as thaw_error:  # CRIU's failure is what to report
                        exc.add_note(f"then thawing {cgroup} failed too: {thaw_error}")
                raise
            elapsed = time.perf_counter() - start
            stats = read_stats(d.images_path / "stats-dump", "dump")
        restored = reply.dump.restored if reply.HasField("dump") else False
        return DumpResult(d.images_path, d.log_path, elapsed, stats, restored)

    def _require_mem_track(self, request: str) -> None:
        if not self.features().get("mem_track"):
            raise errors.SoftDirtyUnsupportedError(
                f"CRIU {request} refused: this kernel cannot track dirty memory "
                "(CONFIG_MEM_SOFT_DIRTY is not set; FEATURE_CHECK reports mem_track: false)",
                request=request,
            )


class CriuProcess:
    """A `criu` command running on its own (not over RPC): started with `--status-fd` and
    returned once it says it is ready. Subclasses: LazyPagesDaemon, PageServerProcess.

    close() (or leaving a `with` block) ends it if it still runs; wait() waits for its end.
    """

    what = "criu"

    def __init__(
        self,
        argv: Sequence[str],
        args: Sequence[str],
        images_dir: PathLike,
        log_file: str,
        timeout: float,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.images_dir = Path(os.fspath(images_dir)).absolute()
        self.log_path = self.images_dir / log_file
        ready_r, ready_w = os.pipe()
        # its stderr: the only clue when it dies before opening its log
        stderr = tempfile.TemporaryFile(prefix="pycpt-criu-stderr-")
        try:
            self.proc = subprocess.Popen(
                [
                    *argv,
                    *args,
                    "-D",
                    str(self.images_dir),
                    "-o",
                    log_file,
                    "--status-fd",
                    str(ready_w),
                ],
                pass_fds=(ready_w, *pass_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(ready_r)
            stderr.close()
            raise _start_error(argv, exc, self.what) from exc
        finally:
            os.close(ready_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], timeout)
            if not ready or not os.read(ready_r, 1):  # EOF: it exited before being ready
                self.close()
                stderr.seek(0)
                lines = criu_log.error_lines(self.log_path) or criu_log.error_lines_of(
                    stderr.read().decode(errors="replace").splitlines()
                )
                why = (
                    f"not ready after {timeout:g} s"
                    if not ready
                    else f"exit status {self.proc.returncode}"
                )
                raise errors.CriuError(
                    f"{self.what} did not get ready ({why})",
                    request=self.what.split()[-1].upper().replace("-", "_"),
                    log_lines=lines,
                    log_path=str(self.log_path),
                )
        finally:
            os.close(ready_r)
            stderr.close()

    @property
    def pid(self) -> int:
        """Its pid."""
        return self.proc.pid

    def poll(self) -> Optional[int]:
        """Its exit status once it has ended (and been reaped), else None."""
        return self.proc.poll()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait until it has exited; returns its exit status."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        """End it if it still runs, and reap it. Idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "CriuProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _page_channel_args(address: str, port: int, fd: Optional[int]) -> List[str]:
    if fd is not None:
        if address or port:
            raise errors.InvalidArgumentError("give a page server's socket (fd) or its address")
        return ["--ps-socket", str(fd)]
    return ["--address", address, "--port", str(port)]


class LazyPagesDaemon(CriuProcess):
    """A running `criu lazy-pages` (CRIU serves this only on its command line, not over RPC).

    close() (or leaving a `with` block) ends it if it still runs; wait() waits until it has
    delivered every page and exited.
    """

    what = "criu lazy-pages"

    def __init__(
        self,
        argv: Sequence[str],
        images_dir: PathLike,
        address: str,
        port: int,
        log_file: str,
        timeout: float,
        fd: Optional[int] = None,
    ) -> None:
        _check_restore_dir(images_dir)
        super().__init__(
            argv,
            ["lazy-pages", "--page-server", *_page_channel_args(address, port, fd)],
            images_dir,
            log_file,
            timeout,
            pass_fds=() if fd is None else (fd,),
        )


class PageServerProcess(CriuProcess):
    """A running `criu page-server` on a connected socket, receiving the pages of one dump
    into its images directory; it exits (status 0) once that dump is done."""

    what = "criu page-server"

    def __init__(
        self, argv: Sequence[str], images_dir: PathLike, fd: int, log_file: str, timeout: float
    ) -> None:
        super().__init__(
            argv,
            ["page-server", "--ps-socket", str(fd)],
            images_dir,
            log_file,
            timeout,
            pass_fds=(fd,),
        )


# --- helpers -------------------------------------------------------------------------


class _Dirs:
    """The images and work directories, open for the length of one request.

    CRIU opens them through /proc/<our pid>/fd/<n>, so only their descriptors travel.
    """

    def __init__(
        self, images_dir: PathLike, work_dir: Optional[PathLike], log_file: str, *, create: bool
    ) -> None:
        if "/" in log_file or not log_file:
            raise errors.InvalidArgumentError(
                f"log_file must be a plain file name, not {log_file!r}"
            )
        self.images_path = Path(os.fspath(images_dir)).absolute()
        self.work_path = Path(os.fspath(work_dir)).absolute() if work_dir else self.images_path
        self.log_path = self.work_path / log_file
        self.log_file = log_file
        self._fds: List[int] = []
        self.images_fd = self._open(self.images_path, "images", create)
        self.work_fd = self._open(self.work_path, "work", True) if work_dir else self.images_fd

    def _open(self, path: Path, what: str, create: bool) -> int:
        # `create`: CRIU writes there. Like `criu dump -D`, a missing directory is refused,
        # never made: a typo must not leave a tree of directories (and a dump) behind.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            if isinstance(exc, NotADirectoryError):
                problem = "is not a directory"
            elif isinstance(exc, FileNotFoundError):
                problem = "does not exist"
            else:
                problem = f"cannot be opened: {exc.strerror}"
            raise errors.ImagesDirError(
                f"the {what} directory {path} {problem}",
                hint=f"create it first (mkdir -p {path})"
                if create and isinstance(exc, FileNotFoundError)
                else "give an existing directory",
            ) from exc
        self._fds.append(fd)
        if create and not os.access(path, os.W_OK):
            self.close()
            raise errors.ImagesDirError(
                f"the {what} directory {path} is not writable",
                hint="choose a directory on a writable file system with write permission",
            )
        return fd

    def options(self, opts: Any) -> Any:
        """`opts` (an Options message) pointed at these directories."""
        opts.images_dir_fd = self.images_fd
        opts.work_dir_fd = self.work_fd
        opts.log_file = self.log_file
        return opts

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "_Dirs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PageSocket:
    """A dump's connected page-channel socket (ps={"fd": N}): its CRIU must inherit N, and a
    lazy dump must get it through an RPC config file (`ps-socket N`), because CRIU's RPC
    takes ps.fd only for dumps that send pages, and a lazy dump without it listens on a TCP
    port of every address instead (its ps.address is ignored too). The file is a memfd of
    this process that CRIU opens by its /proc path: nothing on disk, so nothing left behind
    when this process is killed mid-request."""

    def __init__(self, options: Any) -> None:
        self.fd: Optional[int] = None
        self._conf: Optional[int] = None
        if not options.HasField("ps") or not options.ps.HasField("fd"):
            return
        fd = options.ps.fd  # checked by check(), which the caller runs first
        self.fd = fd
        if not options.lazy_pages:
            return
        options.ps.ClearField("fd")
        if not options.ps.ListFields():
            options.ClearField("ps")
        self._conf = os.memfd_create("pycpt-criu-rpc.conf", os.MFD_CLOEXEC)
        os.write(self._conf, f"ps-socket {fd}\n".encode())
        options.config_file = f"/proc/{os.getpid()}/fd/{self._conf}"

    @staticmethod
    def check(options: Any) -> None:
        """Refuse a page-channel fd that cannot work, before anything is touched."""
        if not options.HasField("ps") or not options.ps.HasField("fd"):
            return
        _check_socket(options.ps.fd)
        if options.lazy_pages and options.config_file:
            raise errors.InvalidArgumentError(
                "a lazy dump's ps fd goes to CRIU in a config file of pycpt's: "
                "config_file cannot be given too"
            )

    def close(self) -> None:
        if self._conf is not None:
            os.close(self._conf)
            self._conf = None

    def __enter__(self) -> "_PageSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dispatcher(notify: Optional[Notify], request: str) -> Optional[NotifyDispatcher]:
    return NotifyDispatcher(notify, request) if notify is not None else None


def _end_page_server(pid: int, started: Optional[str]) -> None:
    """Kill a page server this client started, if that pid still is it (not reused)."""
    if started is None or start_time(pid) != started:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # a child of CRIU's swrk, reaped by init once the swrk is gone


def _start_error(argv: Sequence[str], exc: OSError, what: str) -> errors.EngineError:
    """The error for a CRIU process that could not be started."""
    message = f"cannot start {what} ({' '.join(argv)}): {exc.strerror}"
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError)):
        return errors.CriuNotFoundError(message)
    # EMFILE, ENOMEM, EAGAIN...: the system, not the install
    return errors.EngineError(
        message, hint="the system is short of a resource (processes, memory, descriptors)"
    )


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise errors.InvalidArgumentError(f"pid must be a positive integer, not {pid!r}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError as exc:
        raise errors.ProcessNotFoundError(f"no process with pid {pid}", pid=pid) from exc
    except PermissionError as exc:
        raise errors.PrivilegeError(
            f"not allowed to checkpoint pid {pid}: {exc.strerror}",
            hint="run as root (CRIU needs CAP_SYS_ADMIN and CAP_SYS_PTRACE)",
        ) from exc


def _check_socket(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except (OSError, TypeError) as exc:
        raise errors.InvalidArgumentError(f"fd {fd!r} is not an open descriptor") from exc
    if not stat.S_ISSOCK(mode):
        raise errors.InvalidArgumentError(f"fd {fd} is not a socket")


def _check_restore_dir(images_dir: PathLike) -> None:
    path = Path(os.fspath(images_dir))
    if not path.is_dir():
        raise errors.ImagesDirError(
            f"the images directory {path} does not exist or is not a directory",
            hint="give the directory a dump wrote",
        )
    if not (path / "inventory.img").is_file():
        raise errors.ImagesDirError(
            f"{path} holds no CRIU images (no inventory.img)",
            hint="give the directory a dump wrote",
        )


def read_stats(path: Path, which: str) -> Dict[str, int]:
    """CRIU's statistics image (stats-dump or stats-restore) as a dict; {} if absent.

    The file is two 32-bit magics and one length-prefixed StatsEntry.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if len(data) < 12:
        return {}
    (size,) = struct.unpack_from("<I", data, 8)
    entry = rpc_schema.StatsEntry()
    try:
        entry.ParseFromString(data[12 : 12 + size])
    except Exception:  # a stats file is informative only; never fail a good dump on it
        return {}
    part = getattr(entry, which)
    return {f.name: v for f, v in part.ListFields()}


def swrk_stderr_tail(swrk: Swrk, n: int = 8) -> List[str]:
    """The last lines CRIU printed on stderr (start-up failures land there)."""
    return [ln for ln in swrk.stderr_text().splitlines() if ln.strip()][-n:]
