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
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

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
from pycpt._sys import signals as _signals
from pycpt._sys.cgroups import remove_cgroup
from pycpt._sys.forks import let_vforks_finish
from pycpt._sys.leftovers import (
    committed,
    fsync_parent,
    identity,
    remove_dump_temps,
    remove_temp,
    wait_gone,
)
from pycpt._sys.nethold import TABLE, HoldJob, HoldOp, hold
from pycpt._sys.procfs import (
    cap_eff,
    cgroup_mounts,
    cgroup_of,
    cgroup_pids,
    cgroup_yard,
    in_cgroup,
    memory_of,
    namespace_init_child,
    namespace_init_in,
    ns_pids,
    parent_pid,
    running,
    start_time,
    tree_pids,
)
from pycpt._sys.space import describe_failure, free_bytes, fs_errno
from pycpt._sys.state import (
    FILE_MODE,
    Lock,
    container_ids,
    dump_file_problem,
    is_file_at,
    list_dir,
    open_file,
    open_subdir,
    open_trusted_dir,
    read_json_at,
    remove_tree_at,
    state_dir,
    unlink_at,
    validate_ct_id,
    write_json_at,
)
from pycpt.criu import Criu
from pycpt.engine import Engine, find_engine
from pycpt.freezer import Freezer, FreezerState
from pycpt.images import Images
from pycpt.notify import Notify, NotifyEvent

DEFAULT_CGROUP_PARENT = "pycpt"

ROOT_LOG = ".pycpt-console.log"
CAP_SYS_RESOURCE = 24
EXIT_RECORD = "exit-status"  # "PID WAITSTATUS" of init, written by its monitor
INTENT = "intent.json"  # what a command is about to do (Container._intend)

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


@functools.lru_cache(maxsize=None)  # the kernel's answer: it does not change
def _v2_freezes(mount: str) -> bool:
    # cgroup.freeze exists in every non-root v2 cgroup on Linux >= 5.2
    for entry in os.scandir(mount):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, "cgroup.freeze")):
            return True
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return release is not None and (int(release[1]), int(release[2])) >= (5, 2)


class Recovery(NamedTuple):
    """What the recovery of an interrupted command found and did (`note`), and the command
    that takes the container on from there (`command`, empty when none is needed)."""

    note: str
    command: str = ""


class Container:
    """One container, by id, in a state directory (default $PYCPT_STATE_DIR or
    /var/lib/pycpt). The methods are the vzctl verbs; each takes the container's lock.

    **Never neither.** At every instant there is a running or suspended container, or a
    complete, fsynced dump file of it, and never neither: nothing ends a container before
    its dump file is written, fsynced, renamed into place and its directory fsynced (CRIU
    dumps with leave_running; the tree stays frozen, its network held, until pycpt kills
    it after that commit). Each verb that changes more than one thing first writes an
    intent record (intent.json, fsynced) beside the state; should the command die (a
    crash, SIGKILL, an error in its clean-up), the next command on the container reads the
    record, finds the truth in the kernel and the files, and finishes or undoes the step
    (`recover()`; `pycpt status`, `list` and `gc` do it too). What it did is in `notes`.
    """

    def __init__(self, ct: str, *, state_dir_path: Optional[str] = None) -> None:
        self.id = validate_ct_id(ct)
        self.root = state_dir(state_dir_path)
        self.dir = self.root / "ct" / self.id
        self._state_path = self.dir / "state.json"
        self._held: Optional[Dict[str, Any]] = None  # the state while we hold the lock
        self._fd = -1  # the container's directory while we hold the lock
        self._intent: Optional[Dict[str, Any]] = None  # what this command is doing
        self.notes: List[Recovery] = []  # what recovering an interrupted command did
        # recovery undid the command that made this container's directory (a start or a
        # restore of a new id): what is left there is that command's, and goes with it
        self._undone_new = False
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

    # --- the state directory ---------------------------------------------------------

    def _open_dir(self, create: bool = False) -> int:
        """The container's directory, reached from / through checked directories with
        O_NOFOLLOW (see pycpt/_sys/state.py); FileNotFoundError when it does not exist."""
        root = open_trusted_dir(self.root, create=create)
        try:
            cts = open_subdir(root, "ct", self.root, create=create)
            try:
                return open_subdir(cts, self.id, self.root / "ct", create=create)
            finally:
                os.close(cts)
        finally:
            os.close(root)

    @contextlib.contextmanager
    def _dirfd(self, create: bool = False) -> Iterator[int]:
        """The container's directory: the one held with the lock, else opened for the block."""
        if self._fd >= 0:
            yield self._fd
            return
        fd = self._open_dir(create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _read(self, name: str) -> Optional[Dict[str, Any]]:
        try:
            with self._dirfd() as fd:
                return read_json_at(fd, name, self.dir)
        except FileNotFoundError:
            return None

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> Dict[str, Any]:
        """The recorded state (empty if the container was never started here)."""
        if self._held is not None:
            return dict(self._held)
        return self._read("state.json") or {}

    def _save(self, **changes: Any) -> None:
        data = self.state
        data.update(changes)
        # Only a dump outlives a crash of the machine (a frozen cgroup or a running tree do
        # not), so only the record of one is worth an fsync on the suspend/resume path.
        self._write(data, durable="dumpfile" in changes or changes.get("phase") == "dumped")

    def _write(self, data: Dict[str, Any], durable: bool = True) -> None:
        with self._dirfd(create=True) as fd:
            write_json_at(fd, "state.json", data, self.dir, durable=durable)
        if self._held is not None:
            self._held = dict(data)

    def write_state(self, data: Dict[str, Any], durable: bool = True) -> None:
        """Replace the recorded state with `data` (the caller holds the lock)."""
        self._write(data, durable)

    @contextlib.contextmanager
    def _locked(self, *, create: bool = False, recover: bool = True) -> Iterator[None]:
        """Hold the container's lock; meanwhile the state is read from disk once, not at
        every look (nobody else may change it while we hold the lock). First finish or undo
        what an interrupted command left (recover=False: the caller does it). Without
        `create`, a container that does not exist here is ContainerNotFoundError and
        nothing is written; with it, a directory that ends up holding no record is removed
        again on the way out (no lock-only remains)."""
        made = False  # this command made the container's directory
        for attempt in range(3):
            try:
                fd = self._open_dir()
            except FileNotFoundError:
                if not create:
                    raise errors.ContainerNotFoundError(f"no container {self.id}") from None
                fd = self._open_dir(create=True)
                made = True
            try:
                lock = Lock(fd, self.dir, self.id)
                break
            except FileNotFoundError:  # its directory was removed meanwhile: start again
                os.close(fd)
                if attempt == 2:
                    raise
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        tampered = False
        try:
            self._held = read_json_at(fd, "state.json", self.dir) or {}
            if not create and not self._held and not is_file_at(fd, INTENT):
                raise errors.ContainerNotFoundError(f"no container {self.id}")
            if recover:
                if "outgoing" in self._held or "incoming" in self._held:
                    # a migration's record (a killed `pycpt migrate`, a dead target agent)
                    # is settled first, by pycpt.migrate
                    from pycpt import migrate

                    migrate.recover(self)
                    self._held = read_json_at(fd, "state.json", self.dir) or {}
                self._recover()
            yield
        except BaseException as exc:
            for found in self.notes:
                exc.add_note(found.note + (f" (next: {found.command})" if found.command else ""))
            tampered = isinstance(exc, errors.StateDirError)
            raise
        finally:
            self._held = None
            self._intent = None
            try:
                # a directory left with no record goes if this command made it, or if it
                # holds nothing else of use (a lock, an exit status): not one that keeps a
                # console log on purpose (rm --keep-dumpfile: a restore reopens it), nor one
                # found tampered with (nothing is removed on the word of what cannot be
                # trusted)
                if (
                    not tampered
                    and not any(is_file_at(fd, n) for n in (INTENT, "state.json"))
                    and (made or self._undone_new or set(list_dir(fd)) <= {"lock", EXIT_RECORD})
                ):
                    self._remove_dir()
            finally:
                self._fd = -1
                self._undone_new = False
                lock.release()
                os.close(fd)

    @property
    def exists(self) -> bool:
        """True once the container was started or restored here."""
        if self._held is not None:
            return bool(self._held)
        try:
            with self._dirfd() as fd:
                return is_file_at(fd, "state.json")
        except FileNotFoundError:
            return False

    @property
    def init_pid(self) -> Optional[int]:
        """The host pid of the container's init while it has one: the recorded pid, if its
        start time matches and it lies in the container's cgroup (a pid taken from a state
        file on its word alone might be anybody's)."""
        st = self.state
        pid = st.get("init_pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        started = st.get("init_start")
        # no start time: it had ended (and was reaped) before it could be read
        if not started or start_time(pid) != started:
            return None
        if not in_cgroup(pid, self.cgroup):
            if start_time(pid) != st.get("init_start"):  # it ended while we looked
                return None
            raise errors.StateTamperedError(
                f"{self._state_path} names pid {pid} as the init of container {self.id}, "
                f"but that process is not in {self.cgroup}",
                path=str(self._state_path),
            )
        return int(pid)

    @property
    def cgroup(self) -> Path:
        """The container's cgroup directory: <cgroup root>/<PYCPT_CGROUP_PARENT>/<id>. A
        state file naming another one is tampered with (pycpt never kills or removes a
        cgroup on a state file's word)."""
        expected = cgroup_root() / self.id
        recorded = self.state.get("cgroup")
        if recorded is not None and (
            not isinstance(recorded, str)
            or os.path.normpath(recorded) != str(expected)
            or recorded != str(expected)
        ):
            raise errors.StateTamperedError(
                f"{self._state_path} names cgroup {recorded!r} for container {self.id}, "
                f"not {expected} (this host's, under PYCPT_CGROUP_PARENT)",
                path=str(self._state_path),
            )
        return expected

    @property
    def status(self) -> ContainerStatus:
        """What the container is doing, checked against the kernel."""
        st = self.state
        phase = st.get("phase", "stopped")
        if st.get("outgoing"):
            return ContainerStatus.MIGRATING
        if phase == "receiving":
            now = ContainerStatus.RECEIVING
        else:
            try:
                now = ContainerStatus(phase)
            except ValueError:
                raise errors.StateTamperedError(
                    f"{self._state_path} holds an unknown phase {phase!r}",
                    path=str(self._state_path),
                ) from None
        alive = (
            ContainerStatus.RUNNING,
            ContainerStatus.SUSPENDED,
            ContainerStatus.UNDUMPED,
            ContainerStatus.RECEIVING,
        )
        if now in alive and self.init_pid is None:
            return ContainerStatus.STOPPED  # it exited, or was killed behind our back
        if now is ContainerStatus.RUNNING and _frozen(self.cgroup):
            return ContainerStatus.FROZEN
        return now

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
            with self._dirfd() as dirfd:
                fd = open_file(dirfd, EXIT_RECORD, self.dir, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                pid, status = (int(w) for w in f.read(64).split())
        except (OSError, ValueError, errors.StateDirError):
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
        """The container's lock (taken by every verb); makes its directory if needed."""
        fd = self._open_dir(create=True)
        try:
            return Lock(fd, self.dir, self.id)
        finally:
            os.close(fd)

    def _require(self, *allowed: ContainerStatus, doing: str) -> ContainerStatus:
        if not self.exists:
            raise errors.ContainerNotFoundError(f"no container {self.id}")
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

    # --- intent records and recovery -------------------------------------------------

    def _has_intent(self) -> bool:
        with self._dirfd() as fd:
            return is_file_at(fd, INTENT)

    def _intend(self, op: str, **details: Any) -> None:
        """Record, fsynced, what this command is about to do: should it die half-way, the
        next command finishes or undoes it from this record (see _recover)."""
        self._intent = {
            "op": op,
            "pid": os.getpid(),
            "pid_start": start_time(os.getpid()),
            "since": time.time(),
            **details,
        }
        with self._dirfd(create=True) as fd:
            write_json_at(fd, INTENT, self._intent, self.dir, durable=True)

    def _intent_update(self, **details: Any) -> None:
        """Add to the intent record. Not fsynced: what it adds (a CRIU pid, a step reached)
        matters only while processes live, and none outlives a crash of the machine."""
        assert self._intent is not None
        self._intent.update(details)
        with self._dirfd() as fd:
            write_json_at(fd, INTENT, self._intent, self.dir, durable=False)

    def _note_process(self, pid: Optional[int]) -> None:
        """Record a process this command started (CRIU): the next command waits for it."""
        if pid:
            procs = list((self._intent or {}).get("processes") or [])
            procs.append([pid, start_time(pid)])
            self._intent_update(processes=procs)

    def _done(self) -> None:
        """The step is complete (or undone): drop the intent record. Not fsynced: should a
        crash bring it back, recovery finds the step already finished."""
        self._intent = None
        with self._dirfd() as fd:
            unlink_at(fd, INTENT)

    def recover(self) -> List[Recovery]:
        """If a command on this container was interrupted (its intent record is there and
        no live pycpt holds the lock), finish or undo its step now; returns what was done
        (also in `notes`). A container another command is working on is left alone."""
        try:
            needed = self._has_intent() or self._resume_interrupted()
        except FileNotFoundError:
            return []
        if needed:
            try:
                with self._locked():
                    pass
            except errors.ContainerBusyError:
                pass
        return list(self.notes)

    def _resume_interrupted(self) -> bool:
        """True when the record says suspended but the cgroup is thawed: a resume was
        interrupted after the thaw."""
        if self.state.get("phase") != ContainerStatus.SUSPENDED.value or self.init_pid is None:
            return False
        try:
            return Freezer(self.cgroup).state is FreezerState.THAWED
        except errors.FreezerError:
            return False

    def _recover(self) -> None:
        """Finish or undo what an interrupted command left (the lock is held: no pycpt is
        working on the container; a CRIU it started is waited for first)."""
        intent = read_json_at(self._fd, INTENT, self.dir)
        if intent is None:
            if self._resume_interrupted():
                self._start_network()
                self._save(phase="running", dump_done=False, links_down=[])
                self.notes.append(Recovery(f"an interrupted resume of {self.id} was finished"))
            return
        self._intent = intent
        op = intent.get("op")
        still = wait_gone(intent.get("processes") or [], 120.0)
        if still is not None:
            raise errors.ContainerBusyError(
                f"CRIU (pid {still}) of an interrupted `{op}` of {self.id} still runs",
                hint="retry once it has exited",
            )
        with _signals.held():
            handler = {
                "start": self._recover_start,
                "chkpnt": self._recover_dump,
                "dump": self._recover_dump,
                "kill": self._recover_kill,
                "stop": self._recover_kill,
                "restore": self._recover_restore,
            }.get(str(op))
            if handler is None:
                raise errors.StateTamperedError(
                    f"{self.dir / INTENT} records an unknown step {op!r}",
                    path=str(self.dir / INTENT),
                )
            handler(intent)
            self._remove_temps(intent)
            self._done()

    def _recover_start(self, intent: Dict[str, Any]) -> None:
        if self._held and self._held.get("phase") == "running" and self.init_pid is not None:
            return  # it had started: only the record of the intent was left
        # its init's monitor removes the cgroup as init dies, maybe before we do
        _kill_cgroup(self.cgroup, 10.0)
        network.remove(self._nics_in(intent, self.dir / INTENT))
        self._undone_new = not self._held
        self.notes.append(Recovery(f"an interrupted start of {self.id} was undone"))

    def _recover_kill(self, intent: Dict[str, Any]) -> None:
        """An interrupted kill or stop: finish it (the dump, if any, was already there)."""
        self._kill_all(10.0)
        before = intent.get("phase_after") or "stopped"
        if self.state.get("phase") != before or self.state.get("init_pid") is not None:
            self._save(phase=before, init_pid=None, dump_done=False)
        self.notes.append(Recovery(f"an interrupted `{intent['op']}` of {self.id} was finished"))

    def _recover_dump(self, intent: Dict[str, Any]) -> None:
        """An interrupted chkpnt or chkpnt --dump: if its dump file was committed, finish
        (chkpnt ends the tree); if not, the container stays as the dump found it: frozen,
        resumable, its memory intact."""
        target = Path(str(intent.get("dumpfile")))
        pid = self.init_pid
        if committed(target, intent.get("previous")):
            fsync_parent(target)  # the kill may have come between the rename and this
            if intent["op"] == "chkpnt" and intent.get("leave_running") and pid is not None:
                self._start_network()
                Freezer(self.cgroup).thaw()
                self._save(phase="running", dump_done=False, links_down=[], dumpfile=str(target))
                self.notes.append(
                    Recovery(
                        f"an interrupted `chkpnt --leave-running` of {self.id} had committed "
                        f"its dump file {target}: the container runs on, as it asked"
                    )
                )
            elif intent["op"] == "chkpnt":
                self._kill_all(10.0)
                self._save(phase="dumped", init_pid=None, dump_done=False, dumpfile=str(target))
                self.notes.append(
                    Recovery(
                        f"an interrupted chkpnt of {self.id} had committed its dump file "
                        f"{target}: the container was ended, as chkpnt does",
                        f"pycpt restore {self.id}" + _dumpfile_arg(self, target),
                    )
                )
            else:
                self._save(dump_done=True, dumpfile=str(target))
                self.notes.append(
                    Recovery(
                        f"an interrupted `chkpnt --dump` of {self.id} had committed its dump "
                        f"file {target}; the container is still frozen",
                        f"pycpt chkpnt {self.id} --kill",
                    )
                )
            return
        if pid is None:
            self.notes.append(Recovery(f"an interrupted chkpnt of {self.id} was cleaned up"))
            return
        freezer = Freezer(self.cgroup)
        suspended = self.state.get("phase") == ContainerStatus.SUSPENDED.value
        if not suspended and not freezer.requested:
            self.notes.append(
                Recovery(f"an interrupted chkpnt of {self.id} had not frozen it: it runs on")
            )
            return
        # frozen, or recorded suspended (a CRIU that died in the middle leaves the cgroup
        # thawed): frozen again, as the record says and the user expects
        if freezer.state is not FreezerState.FROZEN:
            freezer.freeze()
        if self.state.get("phase") != ContainerStatus.SUSPENDED.value:
            # it died between the freeze and the record of it: the hold may not be on yet
            if not self.state.get("share_net"):
                hold(pid, HoldOp.ON)
            self._save(phase="suspended", dump_done=False)
        self.notes.append(
            Recovery(
                f"an interrupted chkpnt of {self.id} had not committed its dump file: the "
                "container is frozen as it was, its memory intact",
                f"pycpt chkpnt {self.id} --resume",
            )
        )

    def _recover_restore(self, intent: Dict[str, Any]) -> None:
        """An interrupted restore: a tree CRIU rebuilt in full is kept frozen (resumable
        once the dump file is checked again, or killable); anything less is removed and
        the container is as before the restore."""
        st = self._held or {}
        if st.get("phase") in ("running", "undumped") and self.init_pid is not None:
            return  # it had finished: only the record of the intent was left
        cgroup = self.cgroup
        init = namespace_init_in(cgroup) if cgroup.is_dir() else None
        source = Path(str(intent.get("dumpfile")))
        if init is None:
            _kill_cgroup(cgroup, 10.0)
            network.remove(self._nics_in(intent, self.dir / INTENT))
            self._undone_new = not st
            again = f"pycpt restore {self.id}" + _dumpfile_arg(self, source) if st else ""
            self.notes.append(Recovery(f"an interrupted restore of {self.id} was undone", again))
            return
        freezer = Freezer(cgroup)
        undump = bool(intent.get("undump"))
        share_net = bool(self._dump_config(source, intent).get("share_net"))
        if intent.get("waking"):
            # it was checked and being woken: finish that
            states = self._run_states_of(source, bool(intent.get("trust_dumpfile")))
            if undump:
                freezer.freeze()
                if not share_net:
                    hold(init, HoldOp.ON)
            else:
                _release_network(init, {"share_net": share_net})
            _let_run(freezer, states, frozen=undump)
            self._record_restored(intent, init, undump, cgroup)
            self.notes.append(Recovery(f"an interrupted restore of {self.id} was finished"))
            return
        freezer.freeze()  # stopped by CRIU, and now frozen too: not one instruction runs
        if not share_net:
            hold(init, HoldOp.ON)  # held until --resume
        self._record_restored(intent, init, True, cgroup, pending=True)
        self.notes.append(
            Recovery(
                f"an interrupted restore of {self.id} left it rebuilt but not run: it is "
                "frozen (`restore --resume` checks the dump file again, then runs it; "
                "`restore --kill` ends it)",
                f"pycpt restore {self.id} --resume",
            )
        )

    def _record_restored(
        self,
        intent: Dict[str, Any],
        pid: int,
        undump: bool,
        cgroup: Path,
        pending: bool = False,
    ) -> None:
        source = str(intent.get("dumpfile"))
        state = dict(self._dump_config(Path(source), intent))
        state.update(
            id=self.id,
            cgroup=str(cgroup),
            phase="undumped" if undump else "running",
            init_pid=pid,
            init_start=start_time(pid),
            dump_done=False,
            dumpfile=source,
        )
        if pending:
            state.update(
                verify_pending=not intent.get("verified"),
                wake_pending=True,
                trust_dumpfile=bool(intent.get("trust_dumpfile")),
            )
        if not undump:
            state["links_down"] = []
        self._write(state, durable=False)

    def _dump_config(self, source: Path, intent: Dict[str, Any]) -> Dict[str, Any]:
        """The config of the dump file an interrupted restore used (trusted as it was)."""
        keys = dumpfile.Keys(self.root)
        trust = bool(intent.get("trust_dumpfile"))
        return dict(dumpfile.read_manifest(source, trust_dumpfile=trust, keys=keys).config)

    def _run_states_of(self, source: Path, trust: bool) -> Dict[int, Tuple[int, int]]:
        """The run state of each task at the dump (_task_states), from dump file `source`:
        its small parts read and checked, or (compressed) the whole file extracted."""
        keys = dumpfile.Keys(self.root)
        with dumpfile.DumpFile.open(source, trust_dumpfile=trust, keys=keys) as df:
            if df.offsets:
                with Images.from_files(dict(df.read_small_parts())) as facts:
                    return _task_states(facts)
            with tempfile.TemporaryDirectory(prefix=f".pycpt-restore-{self.id}-") as tmp:
                df.extract(tmp)
                with Images.open(tmp) as facts:
                    return _task_states(facts)

    def _remove_temps(self, intent: Dict[str, Any]) -> None:
        """Remove the temporary files and directories an interrupted command made; each
        only if it is what pycpt makes (its name, a directory or file of root's, no
        symlink)."""
        for path in intent.get("temps") or []:
            remove_temp(Path(str(path)), self.id)
        target = intent.get("dumpfile")
        if intent.get("op") in ("chkpnt", "dump") and target:
            remove_dump_temps(Path(str(target)))

    def _remove_dir(self) -> None:
        """Remove the container's directory (held, with the lock: the lock file last)."""
        fd = self._fd
        for name in list_dir(fd):
            if name != "lock":
                remove_tree_at(fd, name)
        unlink_at(fd, "lock")
        with contextlib.suppress(OSError):
            rootfd = open_trusted_dir(self.root)
            try:
                cts = open_subdir(rootfd, "ct", self.root)
                try:
                    os.rmdir(self.id, dir_fd=cts)
                finally:
                    os.close(cts)
            finally:
                os.close(rootfd)

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
        with self._locked(create=True):
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
            if root:
                log = Path("/", ROOT_LOG)
            else:
                log = self.dir / "console.log"
                # made (0600) or checked here, so that the container's output never goes
                # through a symlink or into a file somebody else can read
                fd = open_file(self._fd, log.name, self.dir, os.O_WRONLY | os.O_CREAT)
                os.fchmod(fd, FILE_MODE)
                os.close(fd)
            # its NICs are in the record: a start killed half-way leaves no veth behind
            self._intend("start", nics=network.records(nics))
            cgroup = self._make_cgroup()
            # the monitor (init's parent, csrc/container.c) writes how init ended in here
            record = open_file(
                self._fd, EXIT_RECORD, self.dir, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
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
                self._done()
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
                },
                durable=False,  # a running tree does not outlive a crash of the machine
            )
            self._done()
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
        return self._nics_in(self.state, self._state_path)

    def _nics_in(self, record: Dict[str, Any], path: Path) -> List[network.Nic]:
        """The NICs a record of this container names; one naming an outside end other than
        this container's own (network.host_name_for) is tampered with: nothing is held or
        deleted on its word."""
        recorded = network.nics_of(record)
        key = self._nic_key()
        for i, nic in enumerate(recorded):
            expected = network.host_name_for(key, i)
            if nic.host_name != expected:
                raise errors.StateTamperedError(
                    f"{path} names {nic.host_name!r} as the outside end of NIC {nic.name} "
                    f"of container {self.id}, not {expected} (its name on this host)",
                    path=str(path),
                )
        return recorded

    def _make_cgroup(self) -> Path:
        cgroup = cgroup_root() / self.id
        try:
            cgroup.parent.mkdir(exist_ok=True)
            cgroup.mkdir()
        except FileExistsError:
            if not cgroup.is_dir() or cgroup.is_symlink():
                raise errors.ContainerError(
                    f"cannot create the container's cgroup {cgroup}: a file of that name is there",
                    hint="choose another id",
                ) from None
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
            self._intend("stop", phase_after="stopped")
            with _signals.held():
                self._kill_all(timeout)
                self._save(phase="stopped", dump_done=False, init_pid=None)
                self._done()

    def _kill_all(self, timeout: float) -> None:
        # the outside veth ends first: a frozen container's orphaned sockets would keep its
        # namespace, and so its NICs, alive for a minute after the kill
        network.remove(self.nics)
        _kill_cgroup(self.cgroup, timeout)
        # init's monitor removes the cgroup when init is gone: let it finish, so that it
        # cannot remove the next cgroup of this id (a restore's) instead
        monitor = self.state.get("monitor")
        deadline = time.monotonic() + timeout
        while monitor and running(monitor[0], monitor[1]) and time.monotonic() < deadline:
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
        nics = self._nics_in(st, self._state_path)
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
            self._intend("dump", dumpfile=str(target), previous=identity(target))
            try:
                remaps = self._dump(target, compress, criu, options)
            except BaseException:
                with _signals.held():
                    self._remove_temps(self._intent or {})
                    self._done()
                raise
            with _signals.held():
                self._save(dump_done=True, dumpfile=str(target), link_remaps=remaps)
                self._done()
            return target

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
        silently) and may replace only a pycpt dump file, unless overwrite=True. Nobody but
        root may be able to replace or remove a file in that directory (a sticky one, as
        /tmp, is fine), or the only copy of the container could be taken away."""
        if dumpfile_path and name:
            raise errors.InvalidArgumentError(
                "give a dump file path or a checkpoint name, not both"
            )
        own = not dumpfile_path
        if own:
            target = self.checkpoint_path(name) if name else self.default_dumpfile()
        else:
            target = Path(dumpfile_path or "").absolute()
        try:
            fd = open_trusted_dir(target.parent, create=own, sticky_ok=not own)
        except FileNotFoundError as exc:
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: {target.parent} does not exist",
                path=str(target),
                hint=f"create it first (mkdir -p {target.parent}), or choose another path",
            ) from exc
        except errors.StateDirError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and not isinstance(exc, errors.StateTamperedError):
                where = exc.path or target.parent
                why = "is not a directory" if cause.errno == errno.ENOTDIR else cause.strerror
                raise errors.DumpFileError(
                    f"cannot write a dump file at {target}: {where} {why}",
                    path=str(target),
                    hint=f"create {target.parent} first, or choose another path",
                ) from cause
            raise errors.DumpFileLocationError(
                f"refusing to write a dump file at {target}: {exc.message.split(': ', 1)[-1]}",
                path=str(target),
            ) from exc
        os.close(fd)
        if target.is_dir():
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: it is a directory",
                path=str(target),
                hint="give the path of a file",
            )
        if not own and target.exists() and not overwrite and not _is_dump_file(target):
            raise errors.DumpFileError(
                f"{target} exists and is not a pycpt dump file: writing the dump there would "
                "destroy it",
                path=str(target),
                hint="choose another path, or pass --overwrite (overwrite=True) to replace it",
            )
        return target

    def _dump(
        self,
        target: Path,
        compress: Optional[str],
        criu: Optional[Criu],
        options: Optional[Dict[str, Any]] = None,
    ) -> List[str]:
        """CRIU saves the frozen container into the dump file `target`, committed (written,
        fsynced, renamed into place, its directory fsynced) before this returns. The tree
        stays frozen, whatever happens (leave_running: CRIU never ends it; the caller does,
        after the commit). Returns the link_remap.N names linked back for this dump."""
        options = dict(CRIU_OPTIONS) if options is None else options
        self._let_vforks_finish()
        name = f".pycpt-images-{self.id}-{secrets.token_hex(4)}"
        images = target.parent / name
        self._intent_update(temps=[str(images)])
        try:
            images.mkdir(mode=0o700)
        except OSError as exc:
            raise errors.DumpFileError(
                f"cannot write a dump file at {target}: {exc.strerror}", path=str(target)
            ) from exc
        client = criu or Criu(die_with_caller=False)
        failure: Optional[errors.PycptError] = None
        remaps: List[str] = []
        try:
            engine = client.engine
            streamed = compress is None and isinstance(engine, Engine)
            if isinstance(engine, Engine) and streamed:
                self._dump_streamed(target, images, engine, options)
            else:
                self._dump_via_images(target, images, client, compress, options)
            if options.get("link_remap"):
                # CRIU removes its link_remap.N links after a dump that leaves the tree
                # running (as every dump does now); the dump needs them until it is restored
                remaps = _link_remaps_back(self.cgroup, target if streamed else images)
        except (errors.CriuError, errors.DumpFileError, errors.ImagesDirError) as exc:
            if isinstance(exc, errors.CriuError):
                self._keep_criu_log(exc, "criu-dump.log")
            failure = exc
        finally:
            shutil.rmtree(images, ignore_errors=True)
            if criu is None:
                client.close()
        if failure is not None:
            # said once the temporary files are gone: the free space is what there is
            space = self._space_error(failure, target, compress)
            if space is not None:
                raise space from failure
            raise failure
        return remaps

    def _let_vforks_finish(self) -> None:
        """The frozen container with no task caught in vfork(), which CRIU cannot seize
        (pycpt/_sys/forks.py)."""
        let_vforks_finish(Freezer(self.cgroup), 10.0)

    def _space_error(
        self, exc: BaseException, target: Path, compress: Optional[str]
    ) -> Optional[errors.DumpFileError]:
        """The file system's own failure (no space, quota, read-only, I/O error) behind
        `exc`, said in its terms (the file system, the room needed and the room there is),
        or None. A CRIU that failed where there is not room for the dump (it may not even
        have been able to write its log there) counts as no space too."""
        needed = (memory_of(cgroup_pids(self.cgroup)) + (1 << 20)) * (2 if compress else 1)
        number = fs_errno(exc)
        if number is None:
            try:
                if free_bytes(str(target.parent)) >= needed:
                    return None
            except OSError:
                return None
            number = errno.ENOSPC
        what = describe_failure(number, target.parent, needed)
        cls = (
            errors.NoSpaceError if number in (errno.ENOSPC, errno.EDQUOT) else errors.DumpFileError
        )
        error = cls(
            f"cannot write dump file {target}: {what}",
            path=str(target),
            hint="free some space there, or give --dumpfile on a file system with room"
            + ("; with --compress CRIU's images go beside the file first" if compress else ""),
        )
        error.errno = number
        return error

    def _dump_streamed(
        self, target: Path, work: Path, engine: Engine, options: Dict[str, Any]
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
            # the cgroup is frozen already: CRIU leaves it so after the dump (leave_running:
            # it never ends the tree; chkpnt does, once the dump file is committed)
            streamer.dump(
                engine,
                self.init_pid or 0,
                work,
                writer,
                freeze_cgroup=str(self.cgroup),
                leave_running=True,
                network_lock=lock,
                extra_args=[*command_line_args(options), *self._log_args()],
                started=self._note_process,
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
            self._copy_private(log, name)

    def _dump_via_images(
        self,
        target: Path,
        images: Path,
        client: Criu,
        compress: Optional[str],
        options: Dict[str, Any],
    ) -> None:
        """CRIU dumps into an images directory over RPC, which is then packed (compressed)."""
        client.prepare()
        self._note_process(client.prepared_pid)
        client.dump(
            self.init_pid or 0,
            images,
            freeze_cgroup=str(self.cgroup),
            leave_running=True,
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
            if self._copy_private(Path(exc.log_path), name):
                exc.log_path = str(self.dir / name)

    def _copy_private(self, source: Path, name: str) -> bool:
        """Copy `source` to `name` beside the state, mode 0600 (a CRIU log quotes the
        container's command line), never through a symlink. False if it could not be."""
        try:
            with open(source, "rb") as src, self._dirfd(create=True) as dirfd:
                fd = open_file(dirfd, name, self.dir, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                with os.fdopen(fd, "wb") as dst:
                    os.fchmod(dst.fileno(), FILE_MODE)
                    shutil.copyfileobj(src, dst)
        except (OSError, errors.StateDirError):
            return False
        return True

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
            after = "dumped" if now is ContainerStatus.SUSPENDED else "stopped"
            self._intend("kill", phase_after=after)
            with _signals.held():
                self._kill_all(timeout)
                self._save(phase=after, init_pid=None, dump_done=False)
                self._done()

    def resume(self, timeout: float = 10.0) -> float:
        """Thaw a suspended container (chkpnt --resume) or start an undumped one running
        (restore --resume). A tree an interrupted restore left gets its dump file checked
        again first (nothing of it ran before every hash matched)."""
        with self._locked():
            self._require(ContainerStatus.SUSPENDED, ContainerStatus.UNDUMPED, doing="resume")
            st = self.state
            freezer = Freezer(self.cgroup)
            source = str(st.get("dumpfile"))
            trust = bool(st.get("trust_dumpfile"))
            if st.get("verify_pending"):
                # the interrupted restore had not checked it all: every byte of the file,
                # and where each task landed, before one instruction of it runs
                try:
                    dumpfile.verify_dump_file(
                        source, trust_dumpfile=trust, keys=dumpfile.Keys(self.root)
                    )
                    _check_landed(self.init_pid or 0, self.cgroup, source)
                except errors.DumpFileError:
                    with _signals.held():
                        self._kill_all(timeout)
                        self._save(phase="dumped", init_pid=None, verify_pending=False)
                    raise
                self._save(verify_pending=False)
            if st.get("wake_pending"):
                # still as CRIU left them (stopped) and frozen: each gets the run state it
                # had at the dump, and runs at the thaw
                states = self._run_states_of(Path(source), trust)
                _let_run(freezer, states, frozen=True)
            self._start_network()  # before the thaw: the first packet it sends goes out
            seconds = freezer.thaw(timeout=timeout)
            # the dump is not going to be restored: its links go, as CRIU would have it
            _remove_link_remaps(self.init_pid or 0, self.state.get("link_remaps"))
            self._save(
                phase="running", dump_done=False, links_down=[], link_remaps=[], wake_pending=False
            )
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
        """Suspend, dump and kill in one go; the kill comes only once the dump file is
        committed. If anything fails before that (the dump, the file system, an interrupt)
        the container runs on as before.

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
            target = self._dump_target(dumpfile_path, name, overwrite)
            # found and checked before the freeze: in a new process that costs ~40 ms
            with Criu(die_with_caller=False) as client:
                self._intend(
                    "chkpnt",
                    dumpfile=str(target),
                    previous=identity(target),
                    leave_running=leave_running,
                )
                try:
                    self._suspend(10.0)
                    remaps = self._dump(target, compress, client, options)
                except BaseException as exc:
                    with _signals.held(), _noted_on(exc, "resuming the container"):
                        self._remove_temps(self._intent or {})
                        if Freezer(self.cgroup).requested:
                            self._start_network()
                            Freezer(self.cgroup).thaw()
                            self._save(phase="running", dump_done=False, links_down=[])
                        self._done()
                    raise
            # Committed: only now may the tree end (still frozen, its network held, so no
            # peer sees a connection close), or run on. Nothing interrupts the rest.
            with _signals.held():
                if leave_running:
                    self._start_network()
                    Freezer(self.cgroup).thaw()
                    # link_remap.N links stay for that dump file (until it is restored)
                    self._save(
                        phase="running",
                        dump_done=False,
                        links_down=[],
                        link_remaps=[],
                        dumpfile=str(target),
                    )
                else:
                    self._kill_all(10.0)
                    self._save(
                        phase="dumped",
                        init_pid=None,
                        dump_done=False,
                        dumpfile=str(target),
                        link_remaps=remaps,
                    )
                self._done()
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
        with self._locked(create=True):
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
                source = self._dump_source(str(self.checkpoint_path(name)))
                if not source.exists():
                    raise errors.DumpFileNotFoundError(
                        f"container {ct} has no checkpoint {name!r}",
                        path=str(source),
                        hint=f"`pycpt checkpoints {ct}` lists them",
                    )
            else:
                source = self._dump_source(dumpfile_path)
            keys = dumpfile.Keys(self.root)
            with dumpfile.DumpFile.open(source, trust_dumpfile=trust_dumpfile, keys=keys) as df:
                if self.exists and not replace:
                    self._check_same_program(source, df.config)
                images = Path(tempfile.gettempdir(), f".pycpt-restore-{ct}-{self._tag()}-")
                images = images.with_name(images.name + secrets.token_hex(4))
                self._intend(
                    "restore",
                    dumpfile=str(source),
                    temps=[str(images)],
                    undump=undump_only,
                    trust_dumpfile=trust_dumpfile,
                )
                try:
                    pid, cgroup, nics, kicks = self._restore_from(
                        df, source, images, undump_only, explicit
                    )
                except BaseException:
                    with _signals.held():
                        remove_temp(images, self.id)
                        self._done()
                    raise
            with _signals.held():  # the record of it is not interrupted
                remove_temp(images, self.id)
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
                # not fsynced: after a crash the dumped record (and the file) is the truth
                self._write(state, durable=False)
                self._done()
        return self

    def _dump_source(self, dumpfile_path: Optional[str]) -> Path:
        """The dump file to restore, refused when someone other than root could have
        replaced or changed it (its owner, its mode, a directory above it)."""
        source = Path(dumpfile_path).absolute() if dumpfile_path else self.default_dumpfile()
        try:
            fd = open_trusted_dir(source.parent, sticky_ok=True)
        except FileNotFoundError:
            return source  # reading it says what is missing
        except errors.StateDirError as exc:
            if isinstance(exc.__cause__, OSError) and not isinstance(
                exc, errors.StateTamperedError
            ):
                return source  # reading it says what is wrong
            raise errors.DumpFileLocationError(
                f"refusing dump file {source}: {exc.message.split(': ', 1)[-1]}",
                path=str(source),
            ) from exc
        try:
            st = os.stat(source.name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return source
        finally:
            os.close(fd)
        problem = dump_file_problem(st)
        if problem:
            raise errors.DumpFileLocationError(
                f"refusing dump file {source}: it {problem}", path=str(source)
            )
        return source

    def _tag(self) -> str:
        """A short tag of this state directory in temporary names, so that `pycpt gc` of one
        state directory never takes another's."""
        return hashlib.sha256(os.fsencode(self.root)).hexdigest()[:8]

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
        images: Path,
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
        cgroup: Optional[Path] = None
        pid = 0
        nics: List[network.Nic] = []
        try:
            images.mkdir(mode=0o700)  # `images` (a temporary name) is in the intent record
            # its NICs come back here: the bridges, the outside ends' names and the
            # addresses are checked before CRIU runs
            nics = network.from_records(config.get("nics"), self._nic_key())
            if nics:  # what CRIU makes of them goes too, should this command die
                self._intent_update(nics=network.records(nics))
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
                        started=self._note_process,
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
                # CRIU must not die with us (see Criu): a killed restore is recovered
                with Criu(die_with_caller=False) as criu:
                    criu.prepare()
                    self._note_process(criu.prepared_pid)
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
            # every byte checked, every task where it belongs: should this command die
            # now, the next one finishes the wake (see _recover_restore)
            self._intent_update(verified=True, waking=True)
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
            with _signals.held(), _noted_on(exc, "removing the half-restored container"):
                network.remove(nics)
                if pid:
                    _kill_tree(pid)
                if cgroup is not None and cgroup.is_dir():
                    Freezer(cgroup).kill()
                    remove_cgroup(cgroup)
            if isinstance(exc, errors.CriuError):
                self._keep_criu_log(exc, "criu-restore.log")
            raise
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
        be gone already. Files named in `keep` stay, and so does the directory then. Never
        through a symlink: a directory that is not the container's own is refused as
        tampered with, and nothing is removed."""
        try:
            with self._dirfd() as fd:
                for name in list_dir(fd):
                    if name != "lock" and name not in keep:
                        remove_tree_at(fd, name)
                if not keep:
                    unlink_at(fd, "lock")
        except FileNotFoundError:
            return
        if not keep:
            rootfd = open_trusted_dir(self.root)
            try:
                cts = open_subdir(rootfd, "ct", self.root)
                try:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.id, dir_fd=cts)
                finally:
                    os.close(cts)
            finally:
                os.close(rootfd)
        if self._held is not None:
            self._held = {}


def _dumpfile_arg(ct: Container, path: Path) -> str:
    return "" if path == ct.default_dumpfile() else f" --dumpfile {path}"


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
        # a cgroup being removed answers ENODEV a moment before its directory goes
        deadline = time.monotonic() + 1.0
        while cgroup.is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
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
        _kill_cgroup(cgroup_root() / ct.id, timeout)  # its own, whatever its record says
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


def collect_garbage(state_dir_path: Optional[str] = None) -> List[str]:
    """`pycpt gc`: for every container of the state directory that no live pycpt holds,
    finish or undo an interrupted command, remove the empty cgroup of a container that
    no longer runs, the directory of one that has no record (only a lock), and the
    temporary files and directories pycpt left for it. A container whose lock is held is
    left alone (a lock held means a live pycpt), so is one whose record is tampered with.
    Returns a line per thing done or left."""
    root = state_dir(state_dir_path)
    said: List[str] = []
    try:
        rootfd = open_trusted_dir(root)
    except FileNotFoundError:
        return said
    try:
        try:
            cts = open_subdir(rootfd, "ct", root)
        except FileNotFoundError:
            names: List[str] = []
        else:
            try:
                names = list_dir(cts)
            finally:
                os.close(cts)
    finally:
        os.close(rootfd)
    for name in names:
        try:
            ct = Container(name, state_dir_path=str(root))
        except ValueError:
            said.append(f"{name}: not a container id: left alone")
            continue
        said.extend(_collect(ct))
    for directory, pattern in (
        (
            root / "dump",
            re.compile(r"\.(?:Dump\.(?P<a>.+)\.[0-9a-f]+\.tmp|pycpt-images-(?P<b>.+)-[0-9a-f]{8})"),
        ),
        (
            Path(tempfile.gettempdir()),
            re.compile(
                r"\.pycpt-restore-(?P<a>.+)-"
                + Container("x", state_dir_path=str(root))._tag()
                + r"-[0-9a-f]{8}"
            ),
        ),
    ):
        said.extend(_collect_temps(root, directory, pattern))
    return said


def _collect(ct: Container) -> List[str]:
    said: List[str] = []
    try:
        with ct._locked(create=True):
            said += [f"{ct.id}: {r.note}" for r in ct.notes]
            if ct.exists and ct.status in (ContainerStatus.DUMPED, ContainerStatus.STOPPED):
                cgroup = ct.cgroup
                if cgroup.is_dir() and not Freezer(cgroup).pids():
                    remove_cgroup(cgroup)
                    said.append(f"{ct.id}: removed its empty cgroup {cgroup}")
            elif not ct.exists:
                said.append(f"{ct.id}: removed a directory that held no record")
    except errors.ContainerBusyError:
        said.append(f"{ct.id}: a live pycpt holds it: left alone")
    except errors.StateDirError as exc:
        said.append(f"{ct.id}: {exc.message}: left alone")
    return said


def _collect_temps(root: Path, directory: Path, pattern: "re.Pattern[str]") -> List[str]:
    """Temporary files and directories of the containers of `root` in `directory`, each
    removed under its container's lock (never while a live pycpt holds it)."""
    said: List[str] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return said
    for name in names:
        found = pattern.fullmatch(name)
        if not found:
            continue
        ct_id = found.group("a") or found.groupdict().get("b") or ""
        try:
            ct = Container(ct_id, state_dir_path=str(root))
        except ValueError:
            continue
        path = directory / name
        try:
            with ct._locked(create=True, recover=False):
                if name.endswith(".tmp"):
                    remove_dump_temps(path.parent / path.name.split(".")[1])
                else:
                    remove_temp(path, ct_id)
        except errors.ContainerBusyError:
            said.append(f"{ct_id}: a live pycpt holds it: {path} left alone")
            continue
        except errors.StateDirError:
            continue
        if not os.path.lexists(path):
            said.append(f"{ct_id}: removed {path}")
    return said


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
