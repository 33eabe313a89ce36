"""What /proc tells pycpt: which process a pid names, and where the cgroup hierarchies are."""

from __future__ import annotations

import os
import re
import select
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot), or None if there is no such process.
    Together with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def running(pid: int, started: Optional[str]) -> bool:
    """True while the process named by pid and start time has not exited. A zombie has: all
    it will ever do is done, and only its parent's wait is left, which for an orphan is
    the host's init, whenever that one gets to it (about a second later on some hosts)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and fields[19] == started and fields[0] not in ("Z", "X")


def parent_pid(pid: int) -> Optional[int]:
    """The process's parent pid, or None if there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# Where a task sleeps while it waits for its vfork() child to exec or exit: the kernel's
# wait_for_vfork_done, inlined into kernel_clone on current kernels (_do_fork before 5.10)
_VFORK_WAITS = frozenset({"kernel_clone", "wait_for_vfork_done", "_do_fork", "do_fork"})


def waits_for_vfork(tid: int) -> bool:
    """True when thread `tid` waits in vfork() for its child (/proc/TID/wchan)."""
    try:
        return Path(f"/proc/{tid}/wchan").read_text() in _VFORK_WAITS
    except OSError:
        return False


CgroupMount = Tuple[str, str, List[str]]


class _MountTable:
    """The cgroup mounts of /proc/self/mountinfo, parsed again only once the kernel says
    the mount table changed: the open file polls POLLPRI after every mount or unmount
    (proc(5)). Every container operation asks several times where the cgroups are; read
    each time, that was most of a suspend (~0.2 ms a read here, the freeze ~0.3 ms)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0  # the process that opened it: a child reads its own
        self._found: List[CgroupMount] = []
        # a fork while another thread held the lock must not leave the child locked out
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()

    def cgroup_mounts(self) -> List[CgroupMount]:
        with self._lock:
            if self._pid != os.getpid() or self._changed():
                self._reload()
            return [(m, kind, list(opts)) for m, kind, opts in self._found]

    def _changed(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLPRI)
        return bool(poller.poll(0))

    def _reload(self) -> None:
        if self._pid != os.getpid():
            self._fd = -1  # a parent's (inherited): left to it
        try:
            if self._fd < 0:
                self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                self._pid = os.getpid()
            chunks = []
            os.lseek(self._fd, 0, os.SEEK_SET)
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
        except OSError:
            self._found, self._pid = [], 0  # looked for again next time
            return
        self._found = _parse_cgroup_mounts(b"".join(chunks).decode(errors="surrogateescape"))


def _parse_cgroup_mounts(text: str) -> List[CgroupMount]:
    found = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            opts = tail[2].split(",") if len(tail) > 2 else []
            found.append((_unescape(fields[4]), tail[0], opts))
    return found


_MOUNTS = _MountTable()


def cgroup_mounts() -> List[CgroupMount]:
    """(mount point, file system type, super options) of each cgroup/cgroup2 mount we see."""
    return _MOUNTS.cgroup_mounts()


def cgroup_yard(base: str = "/sys/fs/cgroup") -> Optional[str]:
    """`base` if CRIU can take it as its cgroup yard (`--cgroup-yard`), else None: every
    hierarchy of /proc/self/cgroup must be mounted from its root at base/NAME, NAME being
    what CRIU looks for there (a named hierarchy "name=X": X; cgroup2: "unified"; else its
    controllers as listed, "cpu,cpuacct").

    Without a yard, CRIU's restore mounts a tmpfs with every hierarchy under its work
    directory, in the host's mount namespace, for as long as it runs: a container started
    meanwhile (without --root) copies those mounts, and its own dump then saves them (or
    fails on them, once CRIU removed them)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    mounted: Dict[str, Tuple[str, str, List[str]]] = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            opts = tail[2].split(",") if len(tail) > 2 else []
            mounted[_unescape(fields[4])] = (_unescape(fields[3]), tail[0], opts)
    if not lines:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            return None
        controllers = parts[1]
        if controllers == "":
            name, fstype, wanted = "unified", "cgroup2", []
        elif controllers.startswith("name="):
            name, fstype, wanted = controllers[5:], "cgroup", [controllers]
        else:
            name, fstype, wanted = controllers, "cgroup", controllers.split(",")
        found = mounted.get(f"{base}/{name}")
        if found is None or found[0] != "/" or found[1] != fstype:
            return None
        if not set(wanted) <= set(found[2]):
            return None
    return base


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts_below(path: str) -> List[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    prefix = path.rstrip("/") + "/"
    found = [_unescape(line.split()[4]) for line in text.splitlines() if len(line.split()) > 4]
    return sorted(
        {m for m in found if m == path or m.startswith(prefix)},
        key=lambda m: m.count("/"),
        reverse=True,
    )


def cap_eff() -> Optional[int]:
    """This process's effective capabilities (CapEff in /proc/self/status) as a bit mask, or
    None when they cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def children(pid: int) -> List[int]:
    """The children of process `pid` (of every thread of it); [] if it is gone."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def ns_pids(pid: int) -> List[int]:
    """NSpid of process `pid`: its pid in each pid namespace it is in, outermost first ([] if
    it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        return []
    return []


def namespace_init_child(pid: int) -> Optional[int]:
    """The child of `pid` that is pid 1 of a pid namespace of its own (what CRIU forks as the
    root of a restored container), or None."""
    for child in children(pid):
        nspid = ns_pids(child)
        if len(nspid) >= 2 and nspid[-1] == 1:
            return child
    return None


def tree_pids(root: int) -> List[int]:
    """`root` and every process below it (through each thread's /proc children list), parents
    before their children; [] when `root` is gone."""
    found: List[int] = []
    todo = [root]
    seen = set()
    while todo:
        pid = todo.pop(0)
        if pid in seen or not os.path.isdir(f"/proc/{pid}/task"):
            continue
        seen.add(pid)
        found.append(pid)
        todo.extend(children(pid))
    return found


def cgroup_of(pid: int, controller: str) -> Optional[str]:
    """The cgroup path of `pid` in the hierarchy of `controller` ("" for cgroup v2), from
    /proc/PID/cgroup; None when the process is gone or not in that hierarchy."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controller == "" and number == "0" and controllers == "":
            return path
        if controller and controller in controllers.split(","):
            return path
    return None


def in_cgroup(pid: int, cgroup: Path) -> bool:
    """True if process `pid` is in `cgroup` (or below it), in the hierarchy `cgroup` lies in
    (cgroup v2, or the v1 freezer)."""
    where = os.path.normpath(cgroup)
    for mount, kind, opts in cgroup_mounts():
        base = mount.rstrip("/")
        if (where == base or where.startswith(base + "/")) and (
            kind == "cgroup2" or "freezer" in opts
        ):
            relative = where[len(base) :] or "/"
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    lines = f.read().splitlines()
            except OSError:
                return False
            for line in lines:
                _, controllers, path = line.split(":", 2)
                v2 = controllers == ""
                if v2 if kind == "cgroup2" else "freezer" in controllers.split(","):
                    return path == relative or path.startswith(relative.rstrip("/") + "/")
            return False
    return False


def cgroup_pids(cgroup: Path) -> List[int]:
    """The processes in `cgroup` (cgroup.procs); none if it cannot be read."""
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def namespace_init_in(cgroup: Path) -> Optional[int]:
    """The process of `cgroup` that is pid 1 of a pid namespace below ours (a container's
    init, as CRIU rebuilds it), or None."""
    for pid in cgroup_pids(cgroup):
        nspid = ns_pids(pid)
        if len(nspid) > 1 and nspid[-1] == 1:
            return pid
    return None


def memory_of(pids: List[int]) -> int:
    """The anonymous and shared memory of these processes (what CRIU writes as pages), in
    bytes: a dump's size, roughly."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total
