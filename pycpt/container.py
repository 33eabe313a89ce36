"""Containers and the vzctl workflow: start, stop, exec, chkpnt (full and staged), restore.

A container is a process tree whose init is pid 1 of new pid, mount, uts, ipc and (unless
shared) network namespaces, inside its own cgroup. Between staged steps nothing of pycpt
runs: the state lives in the kernel (the frozen cgroup) and in the state directory.

    ct = Container.start("web", ["/usr/sbin/nginx", "-g", "daemon off;"])
    ct.chkpnt()                       # one dump file, container gone
    ct = Container.restore("web")     # running again
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from pycpt import dumpfile, errors, network
from pycpt._criu import streamer
from pycpt._criu.options import (
    REPLAYED,
    build_options,
    command_line_args,
    default_network_lock,
    option_name,
    parse_size,
    stage_of,
)
from pycpt._native import ffi, lib, os_error
from pycpt._sys.cgroups import remove_cgroup
from pycpt._sys.nethold import TABLE, HoldJob, HoldOp, hold
from pycpt._sys.procfs import (
    cap_eff,
    cgroup_mounts,
    cgroup_of,
    cgroup_yard,
    namespace_init_child,
    ns_pids,
    parent_pid,
    start_time,
    tree_pids,
)
from pycpt._sys.state import Lock, container_ids, read_json, state_dir, validate_ct_id, write_json
from pycpt.criu import Criu
from pycpt.engine import Engine, find_engine
from pycpt.freezer import Freezer
from pycpt.images import Images
from pycpt.notify import Notify, NotifyEvent

DEFAULT_CGROUP_PARENT = "pycpt"

ROOT_LOG = ".pycpt-console.log"
CAP_SYS_RESOURCE = 24
EXIT_RECORD = "exit-status"  # "PID WAITSTATUS" of init, written by its monitor

DEFAULT_GHOST_LIMIT = 256 << 20

# What pycpt asks of CRIU for every container (README, "Checkpoint options": each default and
# what it costs). chkpnt/dump change them with ghost_limit=, link_remap=, skip_in_flight=,
# tcp_close= and criu_opts= (any other CRIU option by its RPC name).
CRIU_OPTIONS: Dict[str, Any] = {
    "tcp_established": True,  # its TCP connections, as vzctl saved them
    "file_locks": True,  # POSIX and BSD file locks
    # a deleted file still held open (a rotated log) is saved whole, up to this size
    # (CRIU's own default, 1 MiB, fails the dump of any bigger one)
    "ghost_limit": DEFAULT_GHOST_LIMIT,
    # a connection a listener has not accepted yet is dropped (its client sees a reset at
    # restore) instead of failing the whole dump
    "tcp_skip_in_flight": True,
}

_STEPS = {
    lib.PYCPT_CT_STEP_SETUP: "creating the namespaces",
    lib.PYCPT_CT_STEP_CGROUP: "joining the container's cgroup",
    lib.PYCPT_CT_STEP_MOUNTS: "making the mounts private",
    lib.PYCPT_CT_STEP_PROC: "mounting /proc",
    lib.PYCPT_CT_STEP_LO: "bringing up loopback",
    lib.PYCPT_CT_STEP_HOSTNAME: "setting the hostname",
    lib.PYCPT_CT_STEP_ROOT: "entering the root directory",
    lib.PYCPT_CT_STEP_LOG: "opening the console log",
    lib.PYCPT_CT_STEP_EXEC: "executing the command",
    lib.PYCPT_CT_STEP_NET: "joining its network namespace",
}


class ContainerStatus(str, enum.Enum):
    """What a container is doing (`pycpt status`)."""

    RUNNING = "running"
    SUSPENDED = "suspended"  # frozen by `chkpnt --suspend` (maybe dumped too, see `dumped`)
    DUMPED = "dumped"  # saved in a dump file and no longer running
    STOPPED = "stopped"
    UNDUMPED = "undumped"  # rebuilt by `restore --undump`, frozen before running
    MIGRATING = "migrating"  # leaving for another host (or a migration left it in doubt)
    MIGRATED = "migrated"  # it runs on another host now (`pycpt status` says which)
    RECEIVING = "receiving pages"  # arrived by post-copy, running while its memory arrives
    FROZEN = "frozen"  # running, but frozen by `pycpt freeze CT` (until `pycpt thaw CT`)

    def __str__(self) -> str:
        return self.value


def cgroup_root() -> Path:
    """Where containers' cgroups go: cgroup v2 where it has a freezer, else the v1 freezer
    hierarchy; under $PYCPT_CGROUP_PARENT (default "pycpt")."""
    parent = os.environ.get("PYCPT_CGROUP_PARENT") or DEFAULT_CGROUP_PARENT
    if parent.startswith("/") or ".." in parent.split("/"):
        raise errors.InvalidArgumentError(
            f"PYCPT_CGROUP_PARENT must be a relative path, not {parent!r}"
        )
    mounts = cgroup_mounts()
    v2 = next((m for m, kind, _ in mounts if kind == "cgroup2"), None)
    v1 = next((m for m, kind, opts in mounts if kind == "cgroup" and "freezer" in opts), None)
    if v2 and os.path.exists(os.path.join(v2, "cgroup.subtree_control")) and _v2_freezes(v2):
        return Path(v2, parent)
    if v1:
        return Path(v1, parent)
    raise errors.ContainerError(
        "no cgroup freezer: neither cgroup v2 with cgroup.freeze "
        "nor the v1 freezer hierarchy is mounted",
        hint="run `pycpt check` for what to mount",
    )


def cgroup_root_option(cgroup: Path) -> List[Dict[str, str]]:
    """CRIU's cg_root for a restore into `cgroup`: the dump recorded the source's cgroup path,
    which differs on another host or under another PYCPT_CGROUP_PARENT. Only the freezer's
    hierarchy is remapped (CRIU names cgroup v2's "" and v1's by its controllers); the
    others keep their recorded paths."""
    for mount, kind, opts in cgroup_mounts():
        if cgroup.is_relative_to(mount) and (kind == "cgroup2" or "freezer" in opts):
            return [
                {
                    "ctrl": "" if kind == "cgroup2" else "freezer",
                    "path": "/" + str(cgroup.relative_to(mount)),
                }
            ]
    raise errors.ContainerError(f"{cgroup} is not in a cgroup freezer hierarchy")


def cgroup_root_args(cgroup: Path) -> List[str]:
    """cgroup_root_option() as `criu restore` command-line arguments."""
    return [f"--cgroup-root={o['ctrl']}:{o['path']}" for o in cgroup_root_option(cgroup)]


def _v2_freezes(mount: str) -> bool:
    # cgroup.freeze exists in every non-root v2 cgroup on Linux >= 5.2
    for entry in os.scandir(mount):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, "cgroup.freeze")):
            return True
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return release is not None and (int(release[1]), int(release[2])) >= (5, 2)


class Container:
    """One container, by id, in a state directory (default $PYCPT_STATE_DIR or
    /var/lib/pycpt). The methods are the vzctl verbs; each takes the container's lock."""

    def __init__(self, ct: str, *, state_dir_path: Optional[str] = None) -> None:
        self.id = validate_ct_id(ct)
        self.root = state_dir(state_dir_path)
        self.dir = self.root / "ct" / self.id
        self._state_path = self.dir / "state.json"
        self._held: Optional[Dict[str, Any]] = None  # the state while we hold the lock
        # CRIU's log level for dumps and restores (0-4; None: CRIU's default, 2). When set,
        # CRIU's whole log is kept beside the state (criu-dump.log, criu-restore.log) also
        # when it succeeds (`pycpt chkpnt -v`).
        self.criu_log_level: Optional[int] = None

    def __repr__(self) -> str:
        try:
            now = f"{self.status.value}, init_pid={self.init_pid}" if self.exists else "absent"
        except (OSError, errors.PycptError) as exc:  # a repr must never fail
            now = f"unreadable: {exc.__class__.__name__}"
        return f"<Container {self.id!r} {now} in {str(self.root)!r}>"

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> Dict[str, Any]:
        """The recorded state (empty if the container was never started here)."""
        if self._held is not None:
            return dict(self._held)
        return read_json(self._state_path) or {}

    def _save(self, **changes: Any) -> None:
        data = self.state
        data.update(changes)
        # Only a dump outlives a crash of the machine (a frozen cgroup or a running tree do
        # not), so only the record of one is worth an fsync on the suspend/resume path.
        self._write(data, durable="dumpfile" in changes or changes.get("phase") == "dumped")

    def _write(self, data: Dict[str, Any], durable: bool = True) -> None:
        write_json(self._state_path, data, durable=durable)
        if self._held is not None:
            self._held = dict(data)

    @contextlib.contextmanager
    def _locked(self, recover: bool = True) -> Iterator[None]:
        """Hold the container's lock; meanwhile the state is read from disk once, not at
        every look (nobody else may change it while we hold the lock). A migration that
        left its record here (a killed `pycpt migrate`, a dead target agent) is settled
        first, before the command does anything (pycpt.migrate.recover), unless
        recover=False."""
        with self.lock():
            self._held = read_json(self._state_path) or {}
            try:
                if recover and ("outgoing" in self._held or "incoming" in self._held):
                    from pycpt import migrate

                    migrate.recover(self)
                    self._held = read_json(self._state_path) or {}
                yield
            finally:
                self._held = None

    @property
    def exists(self) -> bool:
        """True once the container was started or restored here."""
        return self._state_path.is_file()

    @property
    def init_pid(self) -> Optional[int]:
        """The host pid of the container's init while it has one."""
        st = self.state
        pid, started = st.get("init_pid"), st.get("init_start")
        # no start time: it had ended (and was reaped) before it could be read
        if pid and started and start_time(pid) == started:
            return int(pid)
        return None

    @property
    def cgroup(self) -> Path:
        """The container's cgroup directory."""
        return Path(self.state.get("cgroup") or cgroup_root() / self.id)

    @property
    def status(self) -> ContainerStatus:
        """What the container is doing, checked against the kernel."""
        st = self.state
        phase = st.get("phase", "stopped")
        if st.get("outgoing"):
            return ContainerStatus.MIGRATING
        if phase in ("running", "suspended", "undumped", "receiving") and self.init_pid is None:
            return ContainerStatus.STOPPED  # it exited, or was killed behind our back
        if phase == "receiving":
            return ContainerStatus.RECEIVING
        if phase == "running" and _frozen(self.cgroup):
            return ContainerStatus.FROZEN
        return ContainerStatus(phase)

    def describe(self) -> str:
        """What `pycpt status` prints: the status, and what a migration says about it
        (where it went, how many of its pages arrived, which command settles it)."""
        st = self.state
        if st.get("outgoing") or st.get("incoming") or st.get("phase") == "migrated":
            from pycpt import migrate

            return migrate.describe(self)
        now, exit_status = self.status, self.exit_status
        if now is ContainerStatus.SUSPENDED and self.dumped:
            return now.value + " (dumped, still frozen)"
        if now is ContainerStatus.STOPPED and exit_status is not None:
            return f"{now.value} (exit status {exit_status})"
        return now.value

    @property
    def exit_status(self) -> Optional[int]:
        """How the container's program (its init) ended, as shells say it: its exit code,
        or 128+N when signal N ended it. None while it runs, and when pycpt cannot know:
        only a container started here has a monitor (its init's parent) that records it;
        a restored init is CRIU's child, handed to the host's init when CRIU exits."""
        st = self.state
        if st.get("phase") != "running" or not st.get("init_pid") or self.init_pid is not None:
            return None
        try:
            pid, status = (int(w) for w in (self.dir / EXIT_RECORD).read_text().split())
        except (OSError, ValueError):
            return None
        if pid != st.get("init_pid"):
            return None  # an earlier incarnation's
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def info(self) -> Dict[str, Any]:
        """What `pycpt status --json` and `pycpt list --json` say of the container (the
        schema is in the README: "JSON output")."""
        st = self.state
        dumpfile_path = st.get("dumpfile")
        size = None
        if dumpfile_path:
            try:
                size = os.stat(dumpfile_path).st_size
            except OSError:
                dumpfile_path = None  # gone (removed or moved): not reported
        return {
            "id": self.id,
            "status": self.status.value,
            "dumped": self.dumped,
            "init_pid": self.init_pid,
            "created": st.get("created"),
            "argv": st.get("argv") or [],
            "root": st.get("root"),
            "share_net": bool(st.get("share_net")),
            "cgroup": st.get("cgroup"),
            "dumpfile": dumpfile_path,
            "dumpfile_size": size,
            "exit_status": self.exit_status,
            "console_log": str(self.log_path),
            "nics": [
                {k: v for k, v in rec.items() if k != "host_mac"}
                for rec in network.records(self.nics)
            ],
        }

    @property
    def dumped(self) -> bool:
        """True when the current suspension already has a good dump (so --kill may run)."""
        return bool(self.state.get("dump_done"))

    @property
    def log_path(self) -> Path:
        """The container's console log (stdout and stderr of its init); inside its root
        directory when it has one, since nothing outside is visible to it."""
        root = self.state.get("root")
        return Path(root, ROOT_LOG) if root else self.dir / "console.log"

    def default_dumpfile(self) -> Path:
        """`<state dir>/dump/Dump.<CT>`, as vzctl's default."""
        return self.root / "dump" / f"Dump.{self.id}"

    def lock(self) -> Lock:
        """The container's lock (taken by every verb)."""
        return Lock(self.dir / "lock", self.id)

    def _require(self, *allowed: ContainerStatus, doing: str) -> ContainerStatus:
        now = self.status
        if now not in allowed:
            raise errors.ContainerStateError(
                f"cannot {doing} container {self.id}: it is {now.value}",
                hint="it must be "
                + " or ".join(s.value for s in allowed)
                + "; `pycpt status "
                + self.id
                + "` shows where it is",
            )
        return now

    # --- start, stop, exec -------------------------------------------------------------

    @classmethod
    def start(
        cls,
        ct: str,
        argv: Sequence[str],
        *,
        state_dir_path: Optional[str] = None,
        share_net: bool = False,
        root: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        net: Union[None, network.NetLike, Sequence[network.NetLike]] = None,
    ) -> "Container":
        """Start `argv` as the init of a new container `ct`. `net` gives it NICs on host
        bridges: NetSpecs or `--net` strings ("bridge=br0,ip=192.0.2.10/24,gw=192.0.2.1"),
        see pycpt.network; each is checked (bridge, free address) before anything starts."""
        self = cls(ct, state_dir_path=state_dir_path)
        _check_argv(argv, "start")
        specs = network.specs_from(net)
        if specs and share_net:
            raise errors.NetSpecError(
                "a container sharing the host's network (--share-net) has no NICs of its own"
            )
        with self._locked():
            if self.exists and self.status not in (
                ContainerStatus.STOPPED,
                ContainerStatus.MIGRATED,
            ):
                raise errors.ContainerStateError(
                    f"container {ct} already exists and is {self.status.value}",
                    hint="stop it first, or choose another id",
                )
            if root is not None:
                if not os.path.isdir(root):
                    raise errors.InvalidArgumentError(f"root directory {root!r} does not exist")
                root = os.path.abspath(root)
                os.makedirs(os.path.join(root, "proc"), exist_ok=True)  # its own /proc goes there
            environment = (
                env
                if env is not None
                else {
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": "/root",
                    "TERM": "dumb",
                    "container": "pycpt",
                }
            )
            program = _find_program(argv[0], root, environment.get("PATH", ""))
            nics = network.plan(specs, self._nic_key())
            network.preflight(nics, taken=addresses_in_use(self.root, self.id))
            cgroup = self._make_cgroup()
            self.dir.mkdir(parents=True, exist_ok=True)
            log = Path("/", ROOT_LOG) if root else self.dir / "console.log"
            # the monitor (init's parent, csrc/container.c) writes how init ended in here
            record = os.open(
                self.dir / EXIT_RECORD,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            nsfd = -1
            try:
                if nics:  # wired before any process of the container exists
                    nsfd = network.make_netns(nics)
                pid = _spawn(
                    [program, *argv[1:]],
                    environment,
                    cgroup,
                    log,
                    ct,
                    root,
                    share_net,
                    record,
                    nsfd,
                )
            except BaseException as exc:
                with _noted_on(exc, "removing the container's NICs"):
                    network.remove(nics)
                remove_cgroup(cgroup)
                raise
            finally:
                os.close(record)
                if nsfd >= 0:
                    os.close(nsfd)  # its monitor and init hold the namespace now
            self._write(
                {
                    "id": ct,
                    "argv": list(argv),
                    "share_net": share_net,
                    "root": root,
                    "env": environment,
                    "cgroup": str(cgroup),
                    "phase": "running",
                    "init_pid": pid,
                    "init_start": start_time(pid),
                    "monitor": _process(parent_pid(pid)),
                    "dump_done": False,
                    "created": time.time(),
                    "nics": network.records(nics),
                }
            )
            if nics:
                # peers that knew these addresses at another MAC learn the new one now
                with contextlib.suppress(errors.NicError, OSError):
                    network.announce(pid, nics)
        return self

    def _nic_key(self) -> str:
        """What names this container's outside veth ends on this host (network.host_name_for):
        the state directory and the id, so two state directories never collide."""
        return f"{self.root}\0{self.id}"

    @property
    def nics(self) -> List[network.Nic]:
        """The container's NICs (`start --net`), as recorded."""
        return network.nics_of(self.state)

    def _make_cgroup(self) -> Path:
        cgroup = cgroup_root() / self.id
        try:
            cgroup.parent.mkdir(exist_ok=True)
            cgroup.mkdir()
        except FileExistsError:
            if (cgroup / "cgroup.procs").read_text().split():
                raise errors.ContainerStateError(
                    f"cgroup {cgroup} already has processes: another container with id "
                    f"{self.id} runs on this host (another state directory?)",
                    hint="choose another id, or another PYCPT_CGROUP_PARENT",
                ) from None
        except OSError as exc:
            raise errors.ContainerError(
                f"cannot create the container's cgroup {cgroup}: {exc.strerror}",
                hint="check cgroup.max.descendants and cgroup.max.depth above it, and "
                "`pycpt check`",
            ) from exc
        return cgroup

    def stop(self, timeout: float = 10.0) -> None:
        """Kill every process of the container and remove its cgroup."""
        with self._locked():
            self._require(
                ContainerStatus.RUNNING,
                ContainerStatus.SUSPENDED,
                ContainerStatus.UNDUMPED,
                ContainerStatus.STOPPED,
                doing="stop",
            )
            self._kill_all(timeout)
            self._save(phase="stopped", dump_done=False, init_pid=None)

    def _kill_all(self, timeout: float) -> None:
        # the outside veth ends first: a frozen container's orphaned sockets would keep its
        # namespace, and so its NICs, alive for a minute after the kill
        network.remove(self.nics)
        _kill_cgroup(self.cgroup, timeout)
        # init's monitor removes the cgroup when init is gone: let it finish, so that it
        # cannot remove the next cgroup of this id (a restore's) instead
        monitor = self.state.get("monitor")
        deadline = time.monotonic() + timeout
        while monitor and start_time(monitor[0]) == monitor[1] and time.monotonic() < deadline:
            time.sleep(0.005)

    def exec(
        self, argv: Sequence[str], *, detach: bool = False, **popen: Any
    ) -> "subprocess.Popen[bytes]":
        """Run `argv` inside the running container's namespaces and cgroup; returns the
        Popen of the command (wait for it yourself).

        The command is a child of the caller, so it is not part of the container's process
        tree and a checkpoint leaves it out. detach=True makes it the container's own: it
        starts in a session of its own inside the pid namespace, its parent exits at once
        so that the container's init adopts it, its stdin is the container's /dev/null and
        its output goes to the console log; a checkpoint then saves it with the rest. The
        Popen returned ends as soon as it is started (`setsid` from inside the container
        starts it)."""
        return subprocess.Popen(self.exec_argv(argv, detach=detach), **popen)

    def exec_argv(self, argv: Sequence[str], *, detach: bool = False) -> List[str]:
        """The host command that runs `argv` inside the container (see exec())."""
        _check_argv(argv, "exec")
        self._require(ContainerStatus.RUNNING, doing="exec in")
        pid = self.init_pid
        ns = ["-p", "-m", "-u", "-i"] + ([] if self.state.get("share_net") else ["-n"])
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        command = list(argv)
        if detach:
            # opened inside the container's mount namespace: CRIU finds every descriptor
            log = f"/{ROOT_LOG}" if self.state.get("root") else str(self.log_path)
            background = 'exec setsid -f "$@" </dev/null >>"$0" 2>&1'
            command = ["/bin/sh", "-c", background, log, *command]
        target = ["nsenter", "-t", str(pid), *ns, "-r", "-w", "--", *command]
        return ["sh", "-c", join, str(self.cgroup), *target]

    # --- chkpnt ------------------------------------------------------------------------

    def suspend(self, timeout: float = 10.0) -> float:
        """Freeze every process of the running container (chkpnt --suspend)."""
        with self._locked():
            self._require(ContainerStatus.RUNNING, doing="suspend")
            return self._suspend(timeout)

    def _suspend(self, timeout: float) -> float:
        freezer = Freezer(self.cgroup)
        pid = self.init_pid or 0
        nics = self.nics
        # A NIC container is also held at its bridge ports: nothing reaches the wire either
        # way, ARP included, while its links stay up (see pycpt.network).
        network.hold(nics)
        # The network hold goes on on a C thread of its own while the tasks freeze: each
        # takes a few hundred microseconds, one after the other they would add up.
        # The host's network (share_net) is not the container's to hold.
        job = None if self.state.get("share_net") else HoldJob(pid, HoldOp.ON)
        try:
            seconds = freezer.freeze(timeout=timeout)
        except BaseException as exc:
            if job is not None:
                with _noted_on(exc, "releasing the network hold"):
                    job.join()
                    hold(pid, HoldOp.OFF)
            with _noted_on(exc, "releasing the NICs' hold"):
                network.release(nics)
            raise
        try:
            if job is not None:
                job.join()
        except BaseException:
            freezer.thaw()
            raise
        self._save(phase="suspended", dump_done=False)
        return seconds

    def _start_network(self) -> None:
        """Release the network hold (and bring up the interfaces an older pycpt took down at
        suspend, listed in links_down); the caller records links_down=[] with its own state
        change (one write, not two). NICs: after a restore their outside ends are attached
        to their bridges (else their ports forward again), the addresses announced and, for
        a rebuilt container, its TCP peers kicked (see pycpt.network); all before the thaw,
        since the kernel answers for the frozen container."""
        st = self.state
        pid = self.init_pid or 0
        _release_network(pid, st)
        nics = network.nics_of(st)
        if nics:
            network.bring_up(pid, nics, st.get("kicks") if st.get("phase") == "undumped" else None)

    def dump(
        self,
        dumpfile_path: Optional[str] = None,
        *,
        compress: Optional[str] = None,
        criu: Optional[Criu] = None,
        name: Optional[str] = None,
        overwrite: bool = False,
        ghost_limit: Union[int, str, None] = None,
        link_remap: Optional[bool] = None,
        skip_in_flight: Optional[bool] = None,
        tcp_close: Optional[bool] = None,
        criu_opts: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Save the suspended container into one dump file; it stays frozen (chkpnt --dump).
        See chkpnt() for `name`, `overwrite` and CRIU's options."""
        options = dump_options(
            ghost_limit=ghost_limit,
            link_remap=link_remap,
            skip_in_flight=skip_in_flight,
            tcp_close=tcp_close,
            criu_opts=criu_opts,
        )
        with self._locked():
            self._require(ContainerStatus.SUSPENDED, doing="dump")
            self._check_dumpable()
            target = self._dump_target(dumpfile_path, name, overwrite)
            return self._dump(str(target), compress, criu, options=options)

    def _check_dumpable(self) -> None:
        """Refuse, before anything is frozen, what CRIU would fail on half-way: without
        CAP_SYS_RESOURCE it cannot read the rlimits of a task whose uids are not root's
        ("Can't get rlimit 0: Operation not permitted")."""
        caps = cap_eff()
        if caps is None or caps & (1 << CAP_SYS_RESOURCE):
            return
        others = []
        for pid in Freezer(self.cgroup).pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            ids = {
                int(value)
                for line in status.splitlines()
                if line.startswith(("Uid:", "Gid:"))
                for value in line.split()[1:]
            }
            if ids - {0}:
                others.append(f"pid {pid} ({_comm(pid)}) ids {sorted(ids - {0})}")
        if others:
            raise errors.PrivilegeError(
                f"cannot checkpoint container {self.id}: it has tasks whose user or group ids "
                f"are not root's ({'; '.join(others[:3])}"
                + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                + "), and without CAP_SYS_RESOURCE, which pycpt lacks here, CRIU cannot read "
                "their rlimits; nothing was changed",
                hint="run its programs as root (nginx: `user root;` in nginx.conf), or run "
                "pycpt where it has CAP_SYS_RESOURCE; `pycpt check` shows the capabilities",
            )

    def _dump_target(
        self, dumpfile_path: Optional[str], name: Optional[str], overwrite: bool
    ) -> Path:
        """Where a dump goes, checked before anything is frozen: pycpt's own places are made
        as needed; a path the caller gave must have its directory already (never made
        silently) and may replace only a pycpt dump file, unless overwrite=True."""
        if dumpfile_path and name:
            raise errors.InvalidArgumentError(
                "give a dump file path or a checkpoint name, not both"
            )
        if not dumpfile_path:
            target = self.checkpoint_path(name) if name else self.default_dumpfile()
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return target
        target = Path(dumpfile_path)
        if not target.parent.is_dir():
            what = "is not a directory" if target.parent.exists() else "does not exist"
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: {target.parent} {what}",
                path=str(target),
                hint=f"create it first (mkdir -p {target.parent}), or choose another path",
            )
        if target.is_dir():
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: it is a directory",
                path=str(target),
                hint="give the path of a file",
            )
        if target.exists() and not overwrite and not _is_dump_file(target):
            raise errors.DumpFileError(
                f"{target} exists and is not a pycpt dump file: writing the dump there would "
                "destroy it",
                path=str(target),
                hint="choose another path, or pass --overwrite (overwrite=True) to replace it",
            )
        return target

    def _dump(
        self,
        dumpfile_path: Optional[str],
        compress: Optional[str],
        criu: Optional[Criu],
        kill: bool = False,
        options: Optional[Dict[str, Any]] = None,
    ) -> Path:
        options = dict(CRIU_OPTIONS) if options is None else options
        target = Path(dumpfile_path) if dumpfile_path else self.default_dumpfile()
        try:
            images = Path(tempfile.mkdtemp(prefix=f".pycpt-images-{self.id}-", dir=target.parent))
        except OSError as exc:
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: {exc.strerror}", path=str(target)
            ) from exc
        client = criu or Criu()
        try:
            engine = client.engine
            streamed = compress is None and isinstance(engine, Engine)
            if isinstance(engine, Engine) and streamed:
                self._dump_streamed(target, images, engine, kill, options)
            else:
                self._dump_via_images(target, images, client, compress, kill, options)
            remaps = []
            if options.get("link_remap") and not kill:
                # CRIU removes its link_remap.N links after a dump that leaves the tree
                # running; the dump needs them until it is restored
                remaps = _link_remaps_back(self.cgroup, target if streamed else images)
        except errors.CriuError as exc:
            self._keep_criu_log(exc, "criu-dump.log")
            raise
        finally:
            shutil.rmtree(images, ignore_errors=True)
            if criu is None:
                client.close()
        self._save(dump_done=True, dumpfile=str(target), link_remaps=remaps)
        return target

    def _dump_streamed(
        self, target: Path, work: Path, engine: Engine, kill: bool, options: Dict[str, Any]
    ) -> None:
        """CRIU streams its images straight into the dump file (criu dump --stream, see
        pycpt/_criu/streamer.py): no images directory is written and read back."""
        writer = dumpfile.DumpFileWriter(
            target,
            config=self._config(options),
            criu_version=engine.version_string,
            keys=dumpfile.Keys(self.root),
        )
        options = dict(options)
        lock = options.pop("network_lock", None) or default_network_lock()
        try:
            # the cgroup is frozen already: CRIU leaves it so after the dump; kill=True: CRIU
            # ends the tree itself while the network is still locked, so no peer sees its
            # connections close (vzctl's chkpnt does the same)
            streamer.dump(
                engine,
                self.init_pid or 0,
                work,
                writer,
                freeze_cgroup=str(self.cgroup),
                leave_running=not kill,
                network_lock=lock,
                extra_args=[*command_line_args(options), *self._log_args()],
            )
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self._keep_log(work / "dump.log", "criu-dump.log")

    def _log_args(self) -> List[str]:
        return [] if self.criu_log_level is None else [f"-v{int(self.criu_log_level)}"]

    def _keep_log(self, log: Path, name: str) -> None:
        """With criu_log_level set, keep CRIU's log of a good run beside the state."""
        if self.criu_log_level is not None and log.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, self.dir / name)

    def _dump_via_images(
        self,
        target: Path,
        images: Path,
        client: Criu,
        compress: Optional[str],
        kill: bool,
        options: Dict[str, Any],
    ) -> None:
        """CRIU dumps into an images directory over RPC, which is then packed (compressed)."""
        client.dump(
            self.init_pid or 0,
            images,
            freeze_cgroup=str(self.cgroup),
            leave_running=not kill,
            log_level=self.criu_log_level,
            **options,
        )
        self._keep_log(images / "dump.log", "criu-dump.log")
        dumpfile.write_dump_file(
            target,
            images,
            config=self._config(options),
            criu_version=_criu_version(client),
            compress=compress,
            keys=dumpfile.Keys(self.root),
        )

    def _keep_criu_log(self, exc: errors.CriuError, name: str) -> None:
        """CRIU's log lies in a temporary directory that goes: keep it beside the state, where
        the error then points (if CRIU got as far as writing one)."""
        if exc.log_path and os.path.isfile(exc.log_path):
            self.dir.mkdir(parents=True, exist_ok=True)
            kept = self.dir / name
            shutil.copyfile(exc.log_path, kept)
            exc.log_path = str(kept)

    def _config(self, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """What the dump file's manifest (and a migration's hello) carries of the state:
        the keys of dumpfile.SCHEMA that are set, nothing pycpt keeps for itself; and the
        CRIU `options` of the dump its restore must be given again (REPLAYED: CRIU refuses
        a --tcp-close dump without --tcp-close)."""
        st = self.state
        config = {k: st[k] for k in dumpfile.SCHEMA if st.get(k) is not None}
        replayed = {k: v for k, v in (options or {}).items() if k in REPLAYED}
        if replayed:
            config["criu_options"] = replayed
        return config

    def kill(self, timeout: float = 10.0) -> None:
        """After a good dump, end the suspended container (chkpnt --kill); or end a container
        rebuilt by restore --undump (restore --kill)."""
        with self._locked():
            now = self._require(ContainerStatus.SUSPENDED, ContainerStatus.UNDUMPED, doing="kill")
            if now is ContainerStatus.SUSPENDED and not self.dumped:
                raise errors.ContainerStateError(
                    f"container {self.id} has no dump yet: killing it would lose it",
                    hint=f"run `pycpt chkpnt {self.id} --dump` first, or --resume",
                )
            self._kill_all(timeout)
            self._save(
                phase="dumped" if now is ContainerStatus.SUSPENDED else "stopped",
                init_pid=None,
                dump_done=False,
            )

    def resume(self, timeout: float = 10.0) -> float:
        """Thaw a suspended container (chkpnt --resume) or start an undumped one running
        (restore --resume)."""
        with self._locked():
            self._require(ContainerStatus.SUSPENDED, ContainerStatus.UNDUMPED, doing="resume")
            self._start_network()  # before the thaw: the first packet it sends goes out
            seconds = Freezer(self.cgroup).thaw(timeout=timeout)
            # the dump is not going to be restored: its links go, as CRIU would have it
            _remove_link_remaps(self.init_pid or 0, self.state.get("link_remaps"))
            self._save(phase="running", dump_done=False, links_down=[], link_remaps=[])
        return seconds

    def chkpnt(
        self,
        dumpfile_path: Optional[str] = None,
        *,
        compress: Optional[str] = None,
        leave_running: bool = False,
        name: Optional[str] = None,
        overwrite: bool = False,
        ghost_limit: Union[int, str, None] = None,
        link_remap: Optional[bool] = None,
        skip_in_flight: Optional[bool] = None,
        tcp_close: Optional[bool] = None,
        criu_opts: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Suspend, dump and kill in one go; if the dump fails the container runs on.

        leave_running=True: resume it after the dump instead (podman checkpoint -R).
        name: a named checkpoint (`<state dir>/checkpoints/<CT>/<name>`, see checkpoints())
        instead of the default dump file. A dumpfile_path whose directory is missing is
        refused, and so is one that exists and is not a pycpt dump file (overwrite=True
        replaces it anyway).

        CRIU's options (see CRIU_OPTIONS for the defaults): `ghost_limit` the biggest
        deleted-but-open file saved (bytes, or "64M", "1G"); `link_remap` lets CRIU link a
        file whose open name was removed (while other names remain) back into its
        directory as link_remap.N until the restore; `skip_in_flight` drops connections
        not yet accepted (False: such a listener fails the dump); `tcp_close` restores
        TCP connections closed instead of established; `criu_opts` any other CRIU option
        by its name ({"external": ["..."]}, ...). Bad values raise InvalidArgumentError
        before anything is frozen."""
        options = dump_options(
            ghost_limit=ghost_limit,
            link_remap=link_remap,
            skip_in_flight=skip_in_flight,
            tcp_close=tcp_close,
            criu_opts=criu_opts,
        )
        with self._locked():
            self._require(ContainerStatus.RUNNING, doing="checkpoint")
            self._check_dumpable()
            destination = str(self._dump_target(dumpfile_path, name, overwrite))
            # found and checked before the freeze: in a new process that costs ~40 ms
            with Criu() as client:
                self._suspend(10.0)
                try:
                    target = self._dump(destination, compress, client, not leave_running, options)
                except BaseException as exc:
                    with _noted_on(exc, "resuming the container"):
                        self._start_network()
                        Freezer(self.cgroup).thaw()
                        self._save(phase="running", dump_done=False, links_down=[])
                    raise
            if leave_running:
                self._start_network()
                Freezer(self.cgroup).thaw()
                # link_remap.N links stay for that dump file (until it is restored)
                self._save(phase="running", dump_done=False, links_down=[], link_remaps=[])
                return target
            self._kill_all(10.0)
            self._save(phase="dumped", init_pid=None, dump_done=False)
        return target

    def checkpoints(self) -> List[Dict[str, Any]]:
        """The named checkpoints of this container (`pycpt checkpoints CT`), oldest first:
        name, path, size, created (ISO 8601, from the manifest), pycpt and CRIU versions."""
        found = []
        folder = self.checkpoints_dir()
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            entry: Dict[str, Any] = {"name": path.name, "path": str(path)}
            try:
                entry["size"] = path.stat().st_size
                manifest = dumpfile.read_manifest(path)
                entry.update(
                    created=manifest.created,
                    pycpt_version=manifest.pycpt_version,
                    criu_version=manifest.criu_version,
                    error=None,
                )
            except (OSError, errors.PycptError) as exc:
                entry.update(created=None, pycpt_version=None, criu_version=None)
                entry["error"] = str(exc).splitlines()[0]
            found.append(entry)
        return sorted(found, key=lambda e: (e["created"] or "", e["name"]))

    # --- restore -----------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        ct: str,
        dumpfile_path: Optional[str] = None,
        *,
        state_dir_path: Optional[str] = None,
        undump_only: bool = False,
        name: Optional[str] = None,
        replace: bool = False,
        log_level: Optional[int] = None,
        trust_dumpfile: bool = False,
        tcp_close: Optional[bool] = None,
        criu_opts: Optional[Mapping[str, Any]] = None,
    ) -> "Container":
        """Rebuild container `ct` from its dump file and run it; with undump_only=True leave
        it frozen before it runs one instruction (restore --undump).

        name: restore the named checkpoint `name` (chkpnt(name=...)). The dump file may be
        another container's: `ct` is then a new container running that program (podman's
        restore --import --name). If `ct` exists already and ran another program (another
        argv, root or network), its record would be replaced: that needs replace=True.
        log_level: CRIU's, kept as criu-restore.log beside the state (see criu_log_level).

        The file must be signed by this host's key or a trusted one (`pycpt key trust`);
        trust_dumpfile=True takes the caller's word for it instead (DANGEROUS: the file's
        processes run as root, whatever it holds; needed for format 1 files). Either way the
        images must describe a container (its own namespaces and cgroup, a config pycpt
        knows): DumpFileRefusedError otherwise, before anything runs.
        CRIU's options are the defaults, what the dump file recorded (tcp_close, ...), then
        `tcp_close` and `criu_opts` (restore options by name, e.g. {"veths": [...]})."""
        explicit = _user_options("restore", criu_opts, tcp_close=tcp_close)
        self = cls(ct, state_dir_path=state_dir_path)
        self.criu_log_level = log_level
        with self._locked():
            if self.exists and self.status not in (
                ContainerStatus.DUMPED,
                ContainerStatus.STOPPED,
                ContainerStatus.MIGRATED,
            ):
                raise errors.ContainerStateError(
                    f"cannot restore container {ct}: it is {self.status.value}",
                    hint="stop it, or restore under another id",
                )
            if dumpfile_path and name:
                raise errors.InvalidArgumentError(
                    "give a dump file path or a checkpoint name, not both"
                )
            if name:
                source = self.checkpoint_path(name)
                if not source.exists():
                    raise errors.DumpFileNotFoundError(
                        f"container {ct} has no checkpoint {name!r}",
                        path=str(source),
                        hint=f"`pycpt checkpoints {ct}` lists them",
                    )
            else:
                source = Path(dumpfile_path) if dumpfile_path else self.default_dumpfile()
            keys = dumpfile.Keys(self.root)
            with dumpfile.DumpFile.open(source, trust_dumpfile=trust_dumpfile, keys=keys) as df:
                if self.exists and not replace:
                    self._check_same_program(source, df.config)
                pid, cgroup, nics, kicks = self._restore_from(df, source, undump_only, explicit)
            created = self.state.get("created") or time.time()
            state = dict(df.config)
            state.update(
                id=ct,
                created=created,
                cgroup=str(cgroup),
                phase="undumped" if undump_only else "running",
                init_pid=pid,
                init_start=start_time(pid),
                dump_done=False,
                dumpfile=str(source),
                nics=network.records(nics),
                kicks=kicks if undump_only else [],
            )
            if not undump_only:
                state["links_down"] = []
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write(state)
        return self

    def _check_same_program(self, source: Path, config: Dict[str, Any]) -> None:
        """Refuse to turn this existing container into another program (restore replace=);
        `config` is the (checked) config of the dump file at `source`."""
        mine = self.state
        differs = [
            key
            for key in ("argv", "root", "share_net")
            if (config.get(key) or None) != (mine.get(key) or None)
        ]
        if differs:
            raise errors.ContainerStateError(
                f"the dump file {source} holds another program than container {self.id} "
                f"(container {config.get('id')!r}: {' '.join(config.get('argv') or [])!r}; "
                f"{self.id} ran {' '.join(mine.get('argv') or [])!r}): restoring it would "
                f"replace {self.id}'s record",
                hint=f"restore it under a new id (pycpt restore NEWID --dumpfile {source}), "
                "or pass --replace to turn this container into it",
            )

    def _restore_from(
        self,
        df: dumpfile.DumpFile,
        source: Path,
        undump_only: bool,
        explicit: Optional[Dict[str, Any]] = None,
    ) -> Tuple[int, Path, List[network.Nic], List[network.Kick]]:
        """Check what `df` would restore, rebuild it stopped, check where it landed, then
        let it run (or freeze it first, for undump_only). Returns its pid, cgroup, NICs and
        the peers to kick once its NICs are up.

        An uncompressed file is served to CRIU straight from its place (criu restore
        --stream, pycpt/_criu/streamer.py): its small parts are read and checked first (the
        checks of the images run on them), its memory chunk by chunk, each chunk checked
        before CRIU reads it. A compressed or format 1 file is extracted first, each chunk
        checked as it is written. Either way CRIU leaves the tree stopped, and nothing of it
        runs before every byte is checked and every task is found in the container's
        cgroup: otherwise it is killed unrun."""
        config = df.config
        share_net = bool(config.get("share_net"))
        planned = cgroup_root() / self.id
        controller = cgroup_root_option(planned)[0]["ctrl"]
        images = Path(tempfile.mkdtemp(prefix=f".pycpt-restore-{self.id}-"))
        cgroup: Optional[Path] = None
        pid = 0
        nics: List[network.Nic] = []
        try:
            # its NICs come back here: the bridges, the outside ends' names and the
            # addresses are checked before CRIU runs
            nics = network.from_records(config.get("nics"), self._nic_key())
            held: Dict[str, bytes] = {}
            in_place = bool(df.offsets)
            if in_place:
                held = df.read_small_parts()
                if _own_nftables(held):
                    # `criu restore --stream` would drop the container's own nftables
                    # ruleset (it does not replay that image): rebuild it from a directory
                    in_place = False
            if in_place:
                facts = Images.from_files(dict(held))
            else:
                df.extract(images)
                facts = Images.open(images)
            with facts:
                dumpfile.check_restorable(facts, config, path=str(source), controller=controller)
                run_states = _task_states(facts)
                kicks = _kicks(facts, nics) if nics else []
            root = config.get("root") or "/"  # CRIU rebuilds the mounts on it
            network.preflight(nics, taken=addresses_in_use(self.root, self.id))
            if nics:
                network.preload()  # for the kicks, read once the tree is rebuilt
            options = restore_options(config, explicit or {})
            cgroup = self._make_cgroup()
            freezer = Freezer(cgroup)
            if in_place:
                try:
                    pid, unread = streamer.restore(
                        find_engine(),
                        images,
                        df,
                        held,
                        root=root,
                        extra_args=[
                            *command_line_args(options),
                            *cgroup_root_args(cgroup),
                            *self._log_args(),
                            *network.criu_args(nics),
                        ],
                        before_image=None if share_net else _hold_at_nftables_image,
                    )
                except errors.CriuError as exc:
                    # a damaged part stopped the serving: say so, not what CRIU made of it
                    if isinstance(exc.__cause__, errors.DumpFileError):
                        raise exc.__cause__ from exc
                    raise
                for name in unread:  # parts CRIU did not read to their end
                    for _ in df.chunks(name):
                        pass
            else:
                with Criu() as criu:
                    pid = criu.restore(
                        images,
                        root=root,
                        leave_stopped=True,
                        cg_root=cgroup_root_option(cgroup),
                        notify=None if share_net else _HoldAtSetup(),
                        log_level=self.criu_log_level,
                        **options,
                        **_veths(nics),
                    ).pid
            self._keep_log(images / "restore.log", "criu-restore.log")
            _check_landed(pid, cgroup, str(source))
            if undump_only:
                freezer.freeze()  # frozen before SIGCONT, so not one instruction runs
                if not share_net:
                    hold(pid, HoldOp.ON)  # held until --resume (the hooks put it on)
            else:
                # released before the tasks run: the first packet they send goes out
                _release_network(pid, config)
                network.bring_up(pid, nics, kicks)  # see _start_network
            _let_run(freezer, run_states, frozen=undump_only)
        except BaseException as exc:
            with _noted_on(exc, "removing the half-restored container"):
                network.remove(nics)
                if pid:
                    _kill_tree(pid)
                if cgroup is not None and cgroup.is_dir():
                    Freezer(cgroup).kill()
                    remove_cgroup(cgroup)
            if isinstance(exc, errors.CriuError):
                self._keep_criu_log(exc, "criu-restore.log")
            raise
        finally:
            shutil.rmtree(images, ignore_errors=True)
        return pid, cgroup, nics, kicks

    def restore_images(
        self,
        images: Path,
        config: Dict[str, Any],
        *,
        undump_only: bool,
        root: Optional[str] = None,
        criu: Optional[Criu] = None,
        criu_options: Optional[Dict[str, Any]] = None,
        extra_state: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, float]:
        """Rebuild the container from CRIU images already checked (the caller holds the
        lock): running, or frozen before its first instruction with undump_only=True.
        `root` replaces the root directory recorded in `config` (it moved with the
        container to another host); `criu` is the client to use (maybe prepared). On
        failure nothing of it is left running. Returns the seconds CRIU's restore and the
        freeze took."""
        cgroup: Optional[Path] = None
        root = root or config.get("root")
        timings = {}
        # the outside ends are named for this host; checked by the caller's preflight
        nics = network.from_records(config.get("nics"), self._nic_key())
        kicks: List[network.Kick] = []
        try:
            cgroup = self._make_cgroup()
            freezer = Freezer(cgroup)
            client = criu or Criu()
            try:
                started = time.perf_counter()
                # CRIU rebuilds the mount namespace on top of the container's root
                options = dict(restore_options(config, {}), **_veths(nics), **(criu_options or {}))
                if not config.get("share_net"):
                    options.setdefault("notify", _HoldAtSetup())
                restored = client.restore(
                    images,
                    root=root or "/",
                    leave_stopped=undump_only,
                    cg_root=cgroup_root_option(cgroup),
                    **options,
                )
                timings["criu_restore"] = time.perf_counter() - started
            finally:
                if criu is None:
                    client.close()
            started = time.perf_counter()
            if nics:
                kicks = _kicks(images, nics)
            if undump_only:
                with Images.open(images) as facts:
                    run_states = _task_states(facts)
                # stopped by CRIU; frozen before SIGCONT, so not one instruction runs
                freezer.freeze()
                if not config.get("share_net"):
                    hold(restored.pid, HoldOp.ON)  # held until resume (the hook put it on)
                _let_run(freezer, run_states, frozen=True)
            else:
                _release_network(restored.pid, config)
                network.bring_up(restored.pid, nics, kicks)
            timings["freeze"] = time.perf_counter() - started
        except BaseException:
            with contextlib.suppress(errors.NicError, OSError):
                network.remove(nics)
            if cgroup is not None and cgroup.is_dir():
                Freezer(cgroup).kill()
                remove_cgroup(cgroup)
            raise
        state = dumpfile.check_config(config)  # never an internal key from a peer
        state.update(
            id=self.id,
            root=root,
            cgroup=str(cgroup),
            phase="undumped" if undump_only else "running",
            init_pid=restored.pid,
            init_start=start_time(restored.pid),
            dump_done=False,
            nics=network.records(nics),
            kicks=kicks if undump_only else [],
            **(extra_state or {}),
        )
        if not undump_only:
            state["links_down"] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write(state)
        return timings

    def checkpoints_dir(self) -> Path:
        """Where named checkpoints (`chkpnt --name N`) go: `<state dir>/checkpoints/<CT>/`."""
        return self.root / "checkpoints" / self.id

    def checkpoint_path(self, name: str) -> Path:
        """The dump file of the named checkpoint `name`."""
        try:
            validate_ct_id(name)
        except errors.InvalidArgumentError as exc:
            raise errors.InvalidArgumentError(
                f"invalid checkpoint name {name!r}", hint=exc.hint.replace("an id", "a name")
            ) from None
        return self.checkpoints_dir() / name

    def dump_files(self) -> List[Path]:
        """This container's own dump files that exist: the last one written (if its manifest
        names this container: a dump of another container it was restored from is not its
        own), the default one, and every named checkpoint."""
        found: List[Path] = []
        for path in (self.state.get("dumpfile"), self.default_dumpfile()):
            if path and Path(path) not in found and _is_dump_of(Path(path), self.id):
                found.append(Path(path))
        folder = self.checkpoints_dir()
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.is_file() and p not in found)
        return found

    def remove(self, *, force: bool = False, keep_dumpfile: bool = False) -> List[Path]:
        """Remove the container (`pycpt rm`, vzctl destroy, podman rm): its processes, its
        cgroup, its state and console log, and its dump files (see dump_files()) unless
        keep_dumpfile=True. Nothing is lost silently: a container with processes, or with
        a dump file that would go, needs force=True. Returns the dump files removed."""
        with self._locked():
            if not self.exists:
                raise errors.ContainerNotFoundError(f"no container {self.id}")
            now = self.status
            files = [] if keep_dumpfile else self.dump_files()
            if (
                not force
                and now is not ContainerStatus.STOPPED
                and now is not (ContainerStatus.DUMPED)
            ):
                raise errors.ContainerStateError(
                    f"container {self.id} is {now.value}: removing it would kill its processes",
                    hint=f"stop it first (pycpt stop {self.id}), or pycpt rm --force {self.id}",
                )
            if not force and files:
                raise errors.ContainerStateError(
                    f"container {self.id} has a dump file ({files[0]}"
                    + (f" and {len(files) - 1} more" if len(files) > 1 else "")
                    + "): removing the container would delete it",
                    hint=f"pycpt rm --force {self.id} deletes it too; "
                    f"pycpt rm --keep-dumpfile {self.id} keeps it",
                )
            self._kill_all(10.0)
            for path in files:
                path.unlink(missing_ok=True)
            folder = self.checkpoints_dir()
            if not keep_dumpfile and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            if keep_dumpfile:
                # a dump holds its program's stdout and stderr open on the console log:
                # CRIU reopens it on restore, so it stays (alone in the directory)
                self.forget(keep=("console.log", "lock"))
            else:
                root = self.state.get("root")
                if root:
                    Path(root, ROOT_LOG).unlink(missing_ok=True)
                self.forget()
        return files

    def forget(self, keep: Sequence[str] = ()) -> None:
        """Remove the container's state directory (the lock file last); its processes must
        be gone already. Files named in `keep` stay, and so does the directory then."""
        for entry in self.dir.iterdir() if self.dir.is_dir() else ():
            if entry.name != "lock" and entry.name not in keep:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._held is not None:
            self._held = {}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _process(pid: Optional[int]) -> Optional[List[Any]]:
    """[pid, start time] naming one process (None if there is none)."""
    started = start_time(pid) if pid else None
    return [pid, started] if started else None


def _kill_cgroup(cgroup: Path, timeout: float) -> None:
    """Kill every task of a container's cgroup and remove it. Its init's monitor removes it
    as soon as init is gone, maybe meanwhile: a cgroup that vanished is done."""
    try:
        if cgroup.is_dir():
            Freezer(cgroup).kill(timeout=timeout)
            remove_cgroup(cgroup)
    except (errors.FreezerError, OSError):
        if cgroup.is_dir():
            raise


def _is_dump_file(path: Path) -> bool:
    """True when `path` is a pycpt dump file (of any container, any format)."""
    try:
        dumpfile.read_manifest(path)
    except errors.DumpFileForeignError:
        return False
    except (OSError, errors.PycptError):
        return True  # a damaged or newer pycpt dump file is still one of ours to replace
    return True


def _is_dump_of(path: Path, ct: str) -> bool:
    """True when `path` is a pycpt dump file whose manifest names container `ct`."""
    try:
        return bool(dumpfile.read_manifest(path).config.get("id") == ct)
    except (OSError, errors.PycptError):
        return False


def _frozen(cgroup: Path) -> bool:
    """True when the cgroup is frozen, or asked to be (v2 cgroup.freeze, v1 freezer.state)."""
    try:
        return (cgroup / "cgroup.freeze").read_text().strip() == "1"
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        return (cgroup / "freezer.state").read_text().strip() in ("FROZEN", "FREEZING")
    except OSError:
        return False


def dump_options(
    *,
    ghost_limit: Union[int, str, None] = None,
    link_remap: Optional[bool] = None,
    skip_in_flight: Optional[bool] = None,
    tcp_close: Optional[bool] = None,
    criu_opts: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The CRIU options of a container's dump: CRIU_OPTIONS, then `criu_opts` (RPC names;
    dump or dump-and-restore options only), then the named keywords. Raises
    CriuOptionError for anything CRIU would not take, before anything happens."""
    if ghost_limit is not None:
        try:
            ghost_limit = parse_size(ghost_limit, "--ghost-limit")
        except ValueError as exc:
            raise _option_error(exc) from None
        if ghost_limit > 0xFFFFFFFF:  # CRIU's RPC field is 32 bits
            raise errors.CriuOptionError(
                f"--ghost-limit {ghost_limit} is above CRIU's limit of 4 GiB - 1 byte"
            )
    return {
        **CRIU_OPTIONS,
        **_user_options(
            "dump",
            criu_opts,
            ghost_limit=ghost_limit,
            link_remap=link_remap,
            tcp_skip_in_flight=skip_in_flight,
            tcp_close=tcp_close,
        ),
    }


def restore_options(config: Mapping[str, Any], explicit: Mapping[str, Any]) -> Dict[str, Any]:
    """The CRIU options of a restore: the defaults that matter at restore, what the dump file
    recorded (only those in REPLAYED: the file is not trusted with more), then `explicit`
    (from _user_options)."""
    recorded = config.get("criu_options")
    replayed = (
        {k: v for k, v in recorded.items() if k in REPLAYED} if isinstance(recorded, dict) else {}
    )
    options = {k: v for k, v in CRIU_OPTIONS.items() if stage_of(k) in ("restore", "both")}
    # the host's own hierarchies as CRIU's cgroup yard, where their layout allows: else CRIU
    # mounts a yard of its own in the host's mount namespace (see cgroup_yard)
    yard = cgroup_yard()
    if yard:
        options["cgroup_yard"] = yard
    options.update(replayed)
    options.update(explicit)
    try:
        build_options(options)
    except ValueError as exc:  # a recorded value of the wrong type: the file is bad
        raise _option_error(exc, "the dump file's CRIU options: ") from None
    return options


def _option_error(exc: ValueError, prefix: str = "") -> errors.CriuOptionError:
    """`exc` (from the option table) as a CriuOptionError, keeping its hint."""
    message = getattr(exc, "message", str(exc))
    return errors.CriuOptionError(prefix + message, hint=getattr(exc, "hint", ""))


def _user_options(
    stage: str, criu_opts: Optional[Mapping[str, Any]], **named: Any
) -> Dict[str, Any]:
    """`criu_opts` and the named options that are not None, checked: known to CRIU, not set
    by pycpt itself, meant for `stage` ("dump" or "restore"; or both), of the right type."""
    given: Dict[str, Any] = {}
    for name, value in (criu_opts or {}).items():
        try:
            key = option_name(name)
        except ValueError as exc:
            raise _option_error(exc) from None
        given[key] = value
    given.update({k: v for k, v in named.items() if v is not None})
    for key in given:
        where = stage_of(key)
        if where == "pycpt":
            raise errors.CriuOptionError(
                f"CRIU option {key!r} is set by pycpt for containers, not by its callers"
            )
        if where not in (stage, "both"):
            raise errors.CriuOptionError(
                f"CRIU option {key!r} is a {where} option: give it to "
                + ("`pycpt restore`" if where == "restore" else "`pycpt chkpnt`"),
            )
    try:
        build_options(given)
    except ValueError as exc:
        raise _option_error(exc) from None
    return given


@contextlib.contextmanager
def _noted_on(error: BaseException, doing: str) -> Iterator[None]:
    """Clean-up after `error`: should it fail too, say so on `error` instead of replacing it
    (the user must see what went wrong first)."""
    try:
        yield
    except Exception as exc:
        error.add_note(f"then {doing} failed too: {exc}")


def remove_all(state_dir_path: Optional[str] = None, timeout: float = 30.0) -> None:
    """Kill every container of the state directory and remove its cgroup, then the parent
    cgroup once empty (the teardown of tests and benchmarks)."""
    for ct in list_containers(state_dir_path):
        _kill_cgroup(ct.cgroup, timeout)
    parent = cgroup_root()
    if parent.is_dir() and not any(entry.is_dir() for entry in parent.iterdir()):
        remove_cgroup(parent)


def _veths(nics: Sequence[network.Nic]) -> Dict[str, Any]:
    """CRIU's `veths` option for a restore of these NICs (none: no option at all)."""
    return {"veths": network.criu_veths(nics)} if nics else {}


def _kicks(images: Union[Path, Images], nics: Sequence[network.Nic]) -> List[network.Kick]:
    """The peers to kick once the restored container's NICs are up (network.kicks_from), read
    from the (checked) images; best effort: without them a peer only waits longer."""
    try:
        if isinstance(images, Images):
            return network.kicks_from(images, nics)
        with Images.open(images) as found:
            return network.kicks_from(found, nics)
    except (errors.ImageError, OSError):
        return []


def addresses_in_use(root: Path, me: str) -> Dict[str, str]:
    """{address: "container CT"} for the NIC addresses of the containers of the state
    directory `root` other than `me` that are alive (a suspended one answers no probe: its
    ports are held)."""
    taken = {}
    for ct in list_containers(str(root)):
        gone = (ContainerStatus.STOPPED, ContainerStatus.DUMPED, ContainerStatus.MIGRATED)
        if ct.id != me and ct.status not in gone:
            for address in network.addresses_of(ct.state):
                taken[address.partition("/")[0]] = f"container {ct.id}"
    return taken


def list_containers(state_dir_path: Optional[str] = None) -> List[Container]:
    """Every container with state in the state directory."""
    root = state_dir(state_dir_path)
    return [Container(ct, state_dir_path=str(root)) for ct in container_ids(root)]


def _criu_version(client: Criu) -> str:
    # the engine already knows it: asking CRIU would start one more swrk on chkpnt's path
    engine = client.engine
    return engine.version_string if isinstance(engine, Engine) else str(client.version())


def _find_program(name: str, root: Optional[str], path: str) -> str:
    """The absolute path of `name` as the container sees it (inside `root`, if given)."""
    inside = root or "/"
    candidates = [name] if "/" in name else [os.path.join(d, name) for d in path.split(":") if d]
    for candidate in candidates:
        absolute = candidate if candidate.startswith("/") else os.path.abspath(candidate)
        if root is not None and not candidate.startswith("/"):
            raise errors.InvalidArgumentError(
                f"with a root directory, give {name!r} as an absolute path inside it"
            )
        on_host = os.path.join(inside, absolute.lstrip("/"))
        if os.path.isfile(on_host) and os.access(on_host, os.X_OK):
            return absolute
    where = f" in {root}" if root else ""
    raise errors.InvalidArgumentError(
        f"no executable {name!r}{where} (PATH={path})",
        hint="give the program's absolute path, or one found in PATH"
        + (" inside the root directory" if root else ""),
    )


def _check_argv(argv: Sequence[str], verb: str) -> None:
    """A command is a list of words: a string would be taken letter by letter."""
    if isinstance(argv, (str, bytes)):
        raise errors.InvalidArgumentError(
            f"{verb} takes the command as a list of words, not the string {argv!r}",
            hint="pass a list such as ['sleep', '100'] (shlex.split() splits a shell line)",
        )
    if not argv or not all(isinstance(w, (str, bytes, os.PathLike)) for w in argv):
        raise errors.InvalidArgumentError(
            f"{verb} needs a command: a non-empty list of words, not {argv!r}"
        )


def _spawn(
    argv: Sequence[str],
    env: Dict[str, str],
    cgroup: Path,
    log: Path,
    hostname: str,
    root: Optional[str],
    share_net: bool,
    exit_record: int = -1,
    netns_fd: int = -1,
) -> int:
    keep = [ffi.new("char[]", os.fsencode(a)) for a in argv]
    envs = [ffi.new("char[]", f"{k}={v}".encode()) for k, v in env.items()]
    c_argv = ffi.new("char *[]", keep + [ffi.NULL])
    c_env = ffi.new("char *[]", envs + [ffi.NULL])
    pid, step = ffi.new("int *"), ffi.new("int *")
    ret = lib.pycpt_container_spawn(
        c_argv,
        c_env,
        os.fsencode(cgroup / "cgroup.procs"),
        os.fsencode(log),
        hostname.encode(),
        os.fsencode(root) if root else ffi.NULL,
        lib.PYCPT_CT_SHARE_NET if share_net else 0,
        exit_record,
        netns_fd,
        pid,
        step,
    )
    if ret < 0:
        what = _STEPS.get(step[0], "starting")
        cause = os_error(ret)
        raise errors.ContainerError(
            f"container {hostname} failed while {what}: {cause.strerror}",
            hint="see `pycpt check`; the console log may say more",
        ) from cause
    return int(pid[0])


def _check_landed(pid: int, cgroup: Path, source: str) -> None:
    """Every task of the tree CRIU restored at `pid` (stopped) is in `cgroup`: where the
    images put a task is checked before the restore, where it landed here, after."""
    option = cgroup_root_option(cgroup)[0]
    for task in tree_pids(pid):
        where = cgroup_of(task, option["ctrl"])
        if where != option["path"]:
            raise errors.DumpFileRefusedError(
                f"dump file {source} is refused: its task {task} was restored into cgroup "
                f"{where!r}, not the container's {option['path']!r}",
                path=source,
                rule="cgroup",
            )


def _kill_tree(pid: int) -> None:
    """SIGKILL a restored tree, wherever its tasks landed (they are stopped: none ran)."""
    for task in reversed(tree_pids(pid)):
        try:
            os.kill(task, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _release_network(pid: int, state: Dict[str, Any]) -> None:
    """Let the network of pid's namespace go: the hold dormant again, and the interfaces
    that `state` lists as taken down (links_down: suspends and dump files of pycpt before
    the hold) up."""
    if state.get("share_net"):
        return
    hold(pid, HoldOp.OFF)
    links = state.get("links_down") or []
    if links:
        _links_up(pid, links)


def _links_up(pid: int, names: Sequence[str]) -> None:
    """Bring up the named interfaces of pid's network namespace."""
    buf = ffi.new("char[]", 4096)
    data = "".join(f"{n}\n" for n in names).encode()[:4095]
    ffi.memmove(buf, data, len(data))
    length = ffi.new("int *")
    ret = lib.pycpt_container_links(pid, 1, buf, 4096, length)
    if ret < 0:
        cause = os_error(ret)
        raise errors.ContainerError(
            f"cannot start the network of pid {pid}: {cause.strerror}"
        ) from cause


# CRIU asks for a network namespace's nftables image while it rebuilds that namespace,
# before any socket exists (criu/net.c, prepare_net_ns_second_stage)
_NFTABLES_IMAGE = re.compile(r"nftables-\d+\.img")
# a table in that image (the text of `nft list ruleset`)
_NFT_TABLE = re.compile(r"^table (\S+) (\S+) \{", re.M)


def _own_nftables(held: Dict[str, bytes]) -> List[str]:
    """The nftables tables of the container's own (neither the hold nor CRIU's network lock)
    recorded in the dump file's nftables images (among `held`, its checked small parts),
    as "family name"."""
    found: List[str] = []
    for name, data in held.items():
        if not _NFTABLES_IMAGE.fullmatch(name):
            continue
        for family, table in _NFT_TABLE.findall(data.decode(errors="replace")):
            if table != TABLE and not table.startswith("CRIU-"):
                found.append(f"{family} {table}")
    return found


def _hold_at_nftables_image(name: str, criu_pid: int) -> None:
    """The streamed restore's hook (streamer.restore's before_image): hold the network of the
    namespace being rebuilt before its first socket is restored. `criu restore --stream`
    does not replay the nftables image (it reads an image's size from fstat(), 0 on a pipe),
    so neither CRIU's network lock nor the hold recorded in it would come back; without a
    hold, restoring a send queue sends a probe that meets a socket not yet restored and
    comes back as RST (\"Can't restore not-sent send queue data: Broken pipe\")."""
    if not _NFTABLES_IMAGE.fullmatch(name):
        return
    root = namespace_init_child(criu_pid)
    if root is None:
        raise errors.NetworkHoldError(
            f"CRIU (pid {criu_pid}) asked for {name} but its restored root was not found",
            hint="this is a bug in pycpt or an unexpected CRIU; the restore was stopped",
        )
    hold(root, HoldOp.ON)


class _HoldAtSetup(Notify):
    """The RPC restore's hook: CRIU replays the nftables image (the hold recorded on), and
    at post-setup-namespaces, after the namespaces are rebuilt and before any task forks or
    socket exists, the hold is switched on (made if the image had none)."""

    def __init__(self) -> None:
        self.root: Optional[int] = None

    def setup_namespaces(self, event: NotifyEvent) -> None:
        self.root = event.pid  # CRIU names the restored root only here

    def post_setup_namespaces(self, event: NotifyEvent) -> None:
        if not self.root:
            raise errors.NetworkHoldError("CRIU did not name the restored root")
        hold(self.root, HoldOp.ON)


def _task_states(images: Images) -> Dict[int, Tuple[int, int]]:
    """The run state of every process at the dump, from its (checked) images: core-PID.img's
    task_state and stop_signo; {pid in the container's pid namespace: (state, stop signal)}."""
    found: Dict[int, Tuple[int, int]] = {}
    for pid, state in images.task_states().items():
        found[pid] = (int(state), int(images.core(pid).tc.stop_signo))
    return found


_LINK_REMAP = re.compile(r"link_remap\.\d+")


def _link_remaps_back(cgroup: Path, source: Path) -> List[str]:
    """Link every file CRIU dumped through a link remap (images at `source`) back under the
    link_remap.N name the images restore it from, from the frozen process that holds it
    open (/proc/PID/fd/N, inside its root). Returns those names (container paths)."""
    made: List[str] = []
    with Images.open(source) as images:
        remaps = images.get("remap-fpath.img")
        if remaps is None:
            return made
        files = images.file_entries()
        hosts = {ns_pids(t)[-1]: t for t in Freezer(cgroup).pids() if ns_pids(t)}
        holders: Dict[int, Tuple[int, int]] = {}
        for task in images.pstree():
            for fd in images.fdinfo(task.pid):
                holders.setdefault(int(fd.id), (int(task.pid), int(fd.fd)))
        for remap in remaps.entries():
            if remap.remap_type != 0:  # LINKED; ghosts are in the images themselves
                continue
            name = files[remap.remap_id].reg.name
            pid, fd = holders.get(remap.orig_id, (0, -1))
            host = hosts.get(pid)
            if not _LINK_REMAP.fullmatch(os.path.basename(name)) or host is None:
                raise errors.ContainerError(
                    f"cannot keep CRIU's link remap {name}: no process of the container "
                    "holds its file",
                    hint="dump it with chkpnt (which ends the container) instead of --dump",
                )
            # the directory through a descriptor: linkat() of a path through /proc/PID/root
            # answers EXDEV, one opened there is on the file's own mount
            where = os.open(
                f"/proc/{host}/root/{os.path.dirname(name).lstrip('/')}",
                os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
            )
            try:
                os.link(
                    f"/proc/{host}/fd/{fd}",
                    os.path.basename(name),
                    dst_dir_fd=where,
                    follow_symlinks=True,
                )
            finally:
                os.close(where)
            made.append(name)
    return made


def _remove_link_remaps(pid: int, names: Any) -> None:
    """Remove the link_remap.N names of a dump that will not be restored (inside pid's root);
    only names of that form are touched, whatever the state file says."""
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and _LINK_REMAP.fullmatch(os.path.basename(name)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/proc/{pid}/root/{name.lstrip('/')}")


# task_state values of CRIU's images (compel's, pycpt.images.TaskState)
_ALIVE, _STOPPED = 0x01, 0x03
# the stop signals a task can be stopped by; SIGSTOP is what CRIU's leave_stopped sends
_STOP_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _let_run(freezer: Freezer, states: Dict[int, Tuple[int, int]], *, frozen: bool) -> None:
    """Put every process CRIU restored stopped (leave_stopped) back in the run state it had
    at the dump: SIGCONT to those that ran (and to any the images do not know: none must
    hang); those stopped by a signal stay stopped (state T); dead ones (zombies) get
    nothing. A process stopped by SIGTSTP/SIGTTIN/SIGTTOU is stopped by that signal again
    (its parent's wait() tells which): SIGCONT, then the signal, while the cgroup is frozen,
    so that it runs no instruction in between. `frozen`: the cgroup is frozen already
    (restore --undump) and stays so."""
    run: List[int] = []
    restop: List[Tuple[int, int]] = []
    for task in freezer.pids():
        nspid = ns_pids(task)
        state, signo = states.get(nspid[-1], (_ALIVE, 0)) if nspid else (_ALIVE, 0)
        if state == _ALIVE:
            run.append(task)
        elif state == _STOPPED and signo in _STOP_SIGNALS and _stops_on(task, signo):
            restop.append((task, signo))
    if restop and not frozen:
        freezer.freeze()
    try:
        for task, signo in restop:
            os.kill(task, signal.SIGCONT)
            os.kill(task, signo)
        for task in run:
            os.kill(task, signal.SIGCONT)
    finally:
        if restop and not frozen:
            freezer.thaw()


def _stops_on(pid: int, signo: int) -> bool:
    """Whether `signo` would stop process `pid` and SIGCONT runs none of its code: neither is
    caught, `signo` not ignored (else it stays stopped by CRIU's SIGSTOP, as good as)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        caught, ignored = int(fields["SigCgt"], 16), int(fields["SigIgn"], 16)
    except (OSError, KeyError, ValueError):
        return False
    bit = 1 << (signo - 1)
    return not (caught | ignored) & bit and not caught & (1 << (signal.SIGCONT - 1))
