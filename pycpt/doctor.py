"""`pycpt check`: can this machine checkpoint, and if not, what to do about it.

Every item is measured, not assumed: the kernel is asked (syscalls, ioctls, /proc, a probe
cgroup that is removed again), and CRIU is run (RPC CHECK and FEATURE_CHECK, `criu check
--feature`). An item is OK, WARN (something optional is missing: say what stops working),
FAIL (checkpointing cannot work) or SKIP (cannot be told, e.g. no usable CRIU).

How CONFIG_CHECKPOINT_RESTORE is recognised without trusting a namespace file: the kernel
config (/proc/config.gz or /boot/config-RELEASE) when there is one; otherwise two features
that exist only with it: the sysctl /proc/sys/kernel/ns_last_pid (registered in
kernel/pid_namespace.c under #ifdef CONFIG_CHECKPOINT_RESTORE) and
prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE), which reads a size and changes nothing (-EINVAL or
-EPERM without it). kcmp is no proof: since 5.12 CONFIG_KCMP can come from DRM too.

PAGEMAP_SCAN (Linux >= 6.7) is probed with an empty-range ioctl on /proc/self/pagemap:
0 where it exists, ENOTTY where pagemap has no ioctl.

The kernel probes are C shims (csrc/probe.c, through pycpt._native) built with the kernel
headers' constants; the freezer probes use pycpt.freezer.Freezer on a probe cgroup.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pycpt._criu import kdat
from pycpt._criu.lazy_pages import LAZY_PIPE_SIZE
from pycpt._native import ffi, lib
from pycpt._sys import nethold
from pycpt._sys.cgroups import remove_cgroup
from pycpt._sys.procfs import cap_eff, cgroup_mounts
from pycpt._typing import NamedIntEnum
from pycpt.engine import MIN_VERSION, Engine, engine_status, find_engine
from pycpt.errors import CriuError, EngineError, FreezerError, InvalidArgumentError
from pycpt.freezer import Freezer

__all__ = ["Verdict", "Item", "Report", "check", "run_checks", "PROBE_PREFIX"]

#: Name prefix of the probe cgroups (the full name adds the pid); they are always removed.
PROBE_PREFIX = "pycpt-doctor-"

_ENGINE_FIX = "run `pycpt engine install` for a CRIU that works here"


class Verdict(NamedIntEnum):
    """Verdict of one item, ordered by severity."""

    OK = 0
    SKIP = 1
    WARN = 2
    FAIL = 3


@dataclass(frozen=True)
class Item:
    """One line of the report: what was checked, its verdict, what was seen, what to do."""

    name: str
    status: Verdict
    detail: str
    fix: str = ""
    category: str = ""

    def to_dict(self) -> Dict[str, str]:
        """The item as plain JSON types."""
        return {
            "name": self.name,
            "category": self.category,
            "status": self.status.name,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass
class Report:
    """The result of run_checks(): the items, and what they mean together."""

    items: List[Item]
    system: Dict[str, str] = field(default_factory=dict)
    engine: Optional[Dict[str, Any]] = None  # pycpt.engine.engine_status(), when it was run

    @property
    def ok(self) -> bool:
        """False when checkpointing cannot work here (some item is FAIL)."""
        return all(i.status != Verdict.FAIL for i in self.items)

    @property
    def status(self) -> Verdict:
        """The worst verdict of all items."""
        return max((i.status for i in self.items), default=Verdict.OK)

    def __getitem__(self, name: str) -> Item:
        """The item called `name` (KeyError if there is none)."""
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(name)

    def count(self, status: Verdict) -> int:
        """How many items have `status`."""
        return sum(1 for i in self.items if i.status == status)

    def verdict(self) -> str:
        """One sentence on the whole report."""
        fails, warns = self.count(Verdict.FAIL), self.count(Verdict.WARN)
        if fails:
            return (
                f"FAIL: checkpointing cannot work here ({_n(fails, 'failure')}, "
                f"{_n(warns, 'warning')}); fix the FAIL items first"
            )
        if warns:
            return f"OK: checkpointing works here, with {_n(warns, 'warning')} (see above)"
        return "OK: everything pycpt uses works here"

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain JSON types (for `pycpt check --json`)."""
        return {
            "ok": self.ok,
            "status": self.status.name,
            "verdict": self.verdict(),
            "system": dict(self.system),
            "items": [i.to_dict() for i in self.items],
            "engine": self.engine,
        }

    def format(self, width: int = 100) -> str:
        """A table for people: verdict, item and what was seen, and what to do when not OK."""
        name_w = max((len(i.name) for i in self.items), default=10) + 2
        indent = " " * (6 + name_w)
        lines = ["pycpt check: " + ", ".join(f"{k} {v}" for k, v in self.system.items()), ""]
        lines.append(f"{'':6}{'CHECK':{name_w}}RESULT")
        category = None
        for item in self.items:
            if item.category != category:
                category = item.category
                lines.append(f"[{category}]")
            lines.append(
                textwrap.fill(
                    item.detail,
                    width,
                    initial_indent=f"{item.status.name:6}{item.name:{name_w}}",
                    subsequent_indent=indent,
                    break_on_hyphens=False,
                )
            )
            if item.fix and item.status != Verdict.OK:
                lines.append(
                    textwrap.fill(
                        item.fix,
                        width,
                        initial_indent=indent + "-> ",
                        subsequent_indent=indent + "   ",
                        break_on_hyphens=False,
                    )
                )
        lines += ["", self.verdict()]
        return "\n".join(lines)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# --- small readers --------------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _kernel_version(release: str) -> Tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


def _kernel_config() -> Tuple[Optional[Dict[str, str]], str]:
    """The running kernel's config as {CONFIG_X: value} and where it came from, or (None, "")."""
    sources = [("/proc/config.gz", True), (f"/boot/config-{os.uname().release}", False)]
    for path, zipped in sources:
        try:
            with gzip.open(path, "rt") if zipped else open(path) as f:
                text = f.read()
        except (OSError, EOFError):
            continue
        config: Dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_"):
                key, _, value = line.partition("=")
                config[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                config[line[2 : -len(" is not set")]] = "n"
        return config, path
    return None, ""


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# --- kernel ---------------------------------------------------------------------------------


def _check_kernel_version(release: str) -> Item:
    v = _kernel_version(release)
    if v < (3, 11):
        return Item(
            "kernel version",
            Verdict.FAIL,
            f"Linux {release}: CRIU needs >= 3.11",
            "boot a current kernel (>= 5.9)",
        )
    if v < (5, 9):
        return Item(
            "kernel version",
            Verdict.WARN,
            f"Linux {release}: older than 5.9 (no CAP_CHECKPOINT_RESTORE; no "
            "PAGEMAP_SCAN, which needs 6.7)",
            "boot Linux >= 6.7 to use every feature",
        )
    return Item("kernel version", Verdict.OK, f"Linux {release}")


def _check_checkpoint_restore(config: Optional[Dict[str, str]], config_path: str) -> Item:
    name = "CONFIG_CHECKPOINT_RESTORE"
    evidence = []
    ns_last_pid = os.path.exists("/proc/sys/kernel/ns_last_pid")
    evidence.append(f"/proc/sys/kernel/ns_last_pid {'exists' if ns_last_pid else 'is missing'}")
    prctl_ok = None
    if lib.PYCPT_HAS_MM_MAP_SIZE:
        size = ffi.new("unsigned int *")
        rc = lib.pycpt_probe_mm_map_size(size)  # reads sizeof(struct prctl_mm_map) only
        prctl_ok = rc == 0
        evidence.append(
            "prctl(PR_SET_MM_MAP_SIZE) "
            + (f"works (size {size[0]})" if prctl_ok else f"fails ({_errname(-rc)})")
        )
    else:
        evidence.append(
            "prctl(PR_SET_MM_MAP_SIZE) not probed (pycpt was built with <sys/prctl.h> lacking it)"
        )
    if config is not None and name in config:
        enabled = config[name] == "y"
        evidence.insert(0, f"{config_path}: {name}={config[name]}")
    else:
        enabled = ns_last_pid or bool(prctl_ok)
        evidence.insert(0, "no kernel config to read")
    detail = ("enabled" if enabled else "NOT enabled") + ": " + "; ".join(evidence)
    if enabled:
        return Item(name, Verdict.OK, detail)
    return Item(
        name,
        Verdict.FAIL,
        detail,
        "boot a kernel built with CONFIG_CHECKPOINT_RESTORE=y (every distribution "
        "kernel is); CRIU cannot work without it",
    )


_NEEDED_NS = ("pid", "mnt", "net", "uts", "ipc")  # a container needs all of these
_WANTED_NS = ("user", "cgroup", "time")


def _check_namespaces() -> Item:
    # /proc/self/ns/X exists only for namespace types the kernel was built with
    have = {ns: os.path.lexists(f"/proc/self/ns/{ns}") for ns in _NEEDED_NS + _WANTED_NS}
    missing_needed = [ns for ns in _NEEDED_NS if not have[ns]]
    missing_wanted = [ns for ns in _WANTED_NS if not have[ns]]
    present = " ".join(ns for ns, ok in have.items() if ok)
    if missing_needed:
        return Item(
            "namespaces",
            Verdict.FAIL,
            f"missing: {' '.join(missing_needed + missing_wanted)} (present: {present})",
            "boot a kernel with CONFIG_PID_NS, NET_NS, UTS_NS, IPC_NS (and USER_NS, "
            "CGROUPS, TIME_NS); containers cannot be made without them",
        )
    if missing_wanted:
        return Item(
            "namespaces",
            Verdict.WARN,
            f"missing: {' '.join(missing_wanted)} (present: {present})",
            "containers using these namespaces cannot be checkpointed; boot a kernel "
            "built with them",
        )
    return Item("namespaces", Verdict.OK, f"all present: {present}")


def _check_userfaultfd() -> Item:
    name = "userfaultfd"
    if not lib.PYCPT_HAS_USERFAULTFD:
        return Item(
            name,
            Verdict.SKIP,
            "not probed: pycpt was built with headers that have "
            "neither __NR_userfaultfd nor USERFAULTFD_IOC_NEW",
            "reinstall pycpt on a machine with current kernel headers (linux-libc-dev)",
        )
    how_p, made_p = ffi.new("int *"), ffi.new("int *")
    features_p = ffi.new("uint64_t *")
    rc = lib.pycpt_probe_userfaultfd(how_p, made_p, features_p)
    how = {
        lib.PYCPT_PROBE_UFFD_SYSCALL: "userfaultfd()",
        lib.PYCPT_PROBE_UFFD_DEV: "/dev/userfaultfd",
    }.get(how_p[0], "userfaultfd")
    if rc < 0 and not made_p[0]:
        fix = (
            "boot a kernel with CONFIG_USERFAULTFD=y"
            if -rc == errno.ENOSYS
            else "run as root, or sysctl -w vm.unprivileged_userfaultfd=1"
        )
        return Item(
            name,
            Verdict.WARN,
            f"cannot create a userfaultfd ({how}: {_errname(-rc)}): "
            "lazy pages (post-copy migration) cannot work; full dumps can",
            fix,
        )
    if rc < 0:
        return Item(
            name,
            Verdict.WARN,
            f"{how} made an fd but UFFDIO_API failed: {os.strerror(-rc)}",
            "lazy pages may not work; boot a current kernel",
        )
    features = int(features_p[0])
    wp = "yes" if features & lib.PYCPT_PROBE_UFFD_FEATURE_WP_ASYNC else "no"
    return Item(
        name, Verdict.OK, f"{how} works; features {features:#x} (asynchronous write-protect: {wp})"
    )


def _soft_dirty_probe() -> Optional[bool]:
    """Does the kernel set the soft-dirty bit (pagemap bit 55) on a page written after
    clearing the bits? None when it cannot be told."""
    soft_dirty = ffi.new("int *")
    if lib.pycpt_probe_soft_dirty(soft_dirty) < 0:
        return None
    return bool(soft_dirty[0])


def _check_soft_dirty(
    features: Optional[Dict[str, bool]], config: Optional[Dict[str, str]]
) -> Item:
    name = "soft-dirty"
    probe = _soft_dirty_probe()
    seen = {None: "cannot be told", True: "set", False: "not set"}[probe]
    parts = [f"kernel: a page written after clear_refs has its soft-dirty bit {seen}"]
    if config is not None and "CONFIG_MEM_SOFT_DIRTY" in config:
        parts.append(f"CONFIG_MEM_SOFT_DIRTY={config['CONFIG_MEM_SOFT_DIRTY']}")
    if features is not None:
        parts.append(f"CRIU FEATURE_CHECK mem_track: {str(features.get('mem_track')).lower()}")
        works = bool(features.get("mem_track"))
    else:
        parts.append("CRIU FEATURE_CHECK not run (no usable CRIU)")
        works = bool(probe)
    detail = "; ".join(parts)
    if works:
        return Item(name, Verdict.OK, f"pre-dump and track-mem work ({detail})")
    return Item(
        name,
        Verdict.WARN,
        f"pre-dump and track-mem cannot work; full dumps can ({detail})",
        "use full dumps (pycpt refuses pre-dump here), or boot a kernel with "
        "CONFIG_MEM_SOFT_DIRTY=y",
    )


def _check_pagemap_scan(release: str) -> Item:
    name = "PAGEMAP_SCAN"
    if not lib.PYCPT_HAS_PAGEMAP_SCAN:
        return Item(
            name,
            Verdict.SKIP,
            "not probed: pycpt was built without PAGEMAP_SCAN",
            "reinstall pycpt with Linux >= 6.7 headers (linux-libc-dev)",
        )
    built = (
        ""
        if lib.PYCPT_PAGEMAP_SCAN_FROM_HEADERS
        else "; probe built from pycpt's copy of the Linux 6.7 uapi definitions, as this "
        "build's <linux/fs.h> predates PAGEMAP_SCAN"
    )
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return Item(name, Verdict.SKIP, f"cannot open /proc/self/pagemap: {exc.strerror}")
    try:
        rc = lib.pycpt_probe_pagemap_scan(fd)
    finally:
        os.close(fd)
    if rc < 0:
        why = (
            "pagemap has no ioctl (Linux < 6.7)"
            if -rc == errno.ENOTTY
            else f"the ioctl fails ({os.strerror(-rc)})"
        )
        return Item(
            name,
            Verdict.WARN,
            f"Linux {release}: {why}; dirty-page tracking without soft-dirty "
            f"(userfaultfd write-protect + PAGEMAP_SCAN, planned for pycpt's "
            f"pre-copy migration) will not work here; full dumps do{built}",
            "boot Linux >= 6.7 for incremental copies without soft-dirty",
        )
    return Item(
        name,
        Verdict.OK,
        "ioctl(/proc/self/pagemap, PAGEMAP_SCAN) works "
        f"(dirty-page tracking without soft-dirty is possible){built}",
    )


# --- privileges ----------------------------------------------------------------------------

CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_CHECKPOINT_RESTORE = 19, 21, 24, 40


def _check_privileges() -> List[Item]:
    eff = cap_eff() or 0
    last = int(_read("/proc/sys/kernel/cap_last_cap") or "40")
    has = {
        cap: bool(eff >> cap & 1)
        for cap in (CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_CHECKPOINT_RESTORE)
    }
    capeff = f"CapEff {eff:016x}"
    items = []
    euid = os.geteuid()
    if euid == 0:
        items.append(Item("root", Verdict.OK, "running as root (euid 0)"))
    else:
        items.append(
            Item(
                "root",
                Verdict.WARN,
                f"euid {euid}: CRIU without root works only in its --unprivileged "
                "mode, with limits",
                "run pycpt as root",
            )
        )

    if has[CAP_SYS_ADMIN]:
        items.append(Item("CAP_SYS_ADMIN", Verdict.OK, f"in {capeff}"))
    elif has[CAP_CHECKPOINT_RESTORE]:
        items.append(
            Item(
                "CAP_SYS_ADMIN",
                Verdict.WARN,
                f"not in {capeff}; CAP_CHECKPOINT_RESTORE is: only unprivileged "
                "CRIU (no namespaces to create, no network lock)",
                "run as root",
            )
        )
    else:
        items.append(
            Item(
                "CAP_SYS_ADMIN",
                Verdict.FAIL,
                f"not in {capeff}, nor CAP_CHECKPOINT_RESTORE: CRIU cannot run",
                "run as root",
            )
        )

    if has[CAP_SYS_PTRACE]:
        items.append(Item("CAP_SYS_PTRACE", Verdict.OK, f"in {capeff}"))
    else:
        items.append(
            Item(
                "CAP_SYS_PTRACE",
                Verdict.FAIL,
                f"not in {capeff}: CRIU cannot seize the processes it dumps",
                "run as root (with CAP_SYS_PTRACE)",
            )
        )

    if CAP_CHECKPOINT_RESTORE > last:
        items.append(
            Item(
                "CAP_CHECKPOINT_RESTORE",
                Verdict.OK if has[CAP_SYS_ADMIN] else Verdict.FAIL,
                f"unknown to this kernel (cap_last_cap {last}, Linux < 5.9)"
                + ("; CAP_SYS_ADMIN covers it" if has[CAP_SYS_ADMIN] else ""),
                "run as root",
            )
        )
    elif has[CAP_CHECKPOINT_RESTORE]:
        items.append(Item("CAP_CHECKPOINT_RESTORE", Verdict.OK, f"in {capeff}"))
    else:
        items.append(
            Item(
                "CAP_CHECKPOINT_RESTORE",
                Verdict.OK if has[CAP_SYS_ADMIN] else Verdict.FAIL,
                f"not in {capeff}"
                + (
                    "; not needed: CAP_SYS_ADMIN covers it"
                    if has[CAP_SYS_ADMIN]
                    else ": CRIU cannot set pids or read map_files"
                ),
                "run as root",
            )
        )

    if has[CAP_SYS_RESOURCE]:
        items.append(Item("CAP_SYS_RESOURCE", Verdict.OK, f"in {capeff}"))
    else:
        items.append(
            Item(
                "CAP_SYS_RESOURCE",
                Verdict.WARN,
                f"not in {capeff}: CRIU cannot read the rlimits of a task whose uids are "
                "not root's, so a container with such tasks (nginx's www-data workers, any "
                "service that drops privileges) cannot be checkpointed: pycpt refuses it up "
                'front. Also: CRIU logs "Can\'t setup RLIMIT_NOFILE for self" on every run '
                "(harmless), and fs.pipe-max-size limits its pipes",
                "run the programs you checkpoint as root (nginx: `user root;`), or run pycpt "
                "where it has CAP_SYS_RESOURCE; raise fs.pipe-max-size for lazy pages (below)",
            )
        )
    return items


# --- CRIU ------------------------------------------------------------------------------------


def _engine_item(engine: Optional[Engine], error: Optional[EngineError]) -> Item:
    name = "CRIU engine"
    if engine is not None:
        how = " (through its own loader)" if len(engine.argv) > 1 else ""
        return Item(
            name,
            Verdict.OK,
            f"CRIU {engine.version_string} from {engine.source}: {engine.path}{how}",
        )
    assert error is not None
    fix = error.hint or ""
    if "pycpt engine install" not in fix:
        fix = (
            f"{fix}; to get a CRIU that works here, run `pycpt engine install`"
            if fix
            else _ENGINE_FIX
        )
    min_v = ".".join(map(str, MIN_VERSION))
    return Item(
        name,
        Verdict.FAIL,
        f"{type(error).__name__}: {error.message} (pycpt needs CRIU >= {min_v})",
        fix,
    )


def _criu_items(engine: Optional[Engine]) -> Tuple[List[Item], Optional[Dict[str, bool]]]:
    """CRIU's CHECK and FEATURE_CHECK over RPC; also returns the features (None if unknown)."""
    if engine is None:
        skip = "no usable CRIU engine (see above)"
        return [
            Item("CRIU check", Verdict.SKIP, skip, _ENGINE_FIX),
            Item("CRIU features", Verdict.SKIP, skip, _ENGINE_FIX),
        ], None
    from pycpt.criu import Criu  # the RPC layer needs the compiled extension

    items = []
    features = None
    with Criu(engine) as criu:
        try:
            criu.check()
            items.append(
                Item(
                    "CRIU check",
                    Verdict.OK,
                    "RPC CHECK passed: the kernel has everything every dump needs",
                )
            )
        except (CriuError, EngineError) as exc:  # EngineError: criu swrk did not start
            said = "; ".join(
                filter(None, [getattr(exc, "cr_errmsg", ""), *getattr(exc, "log_lines", [])[-3:]])
            )
            items.append(
                Item(
                    "CRIU check",
                    Verdict.FAIL,
                    f"{exc.message}: {said or 'no details'}",
                    _ENGINE_FIX
                    if not exc.hint or "pycpt check" in exc.hint
                    else f"{exc.hint}; {_ENGINE_FIX}",
                )
            )
        try:
            features = criu.features()
            version = criu.version()
        except (CriuError, EngineError) as exc:
            items.append(
                Item(
                    "CRIU features",
                    Verdict.FAIL,
                    f"RPC FEATURE_CHECK failed: {exc.message}",
                    _ENGINE_FIX,
                )
            )
            return items, None
    listed = ", ".join(f"{k} {str(v).lower()}" for k, v in sorted(features.items()))
    detail = f"FEATURE_CHECK of CRIU {version} over RPC: {listed}"
    missing = [k for k in ("lazy_pages", "pidfd_store") if not features.get(k)]
    if missing:
        lost = {
            "lazy_pages": "lazy pages (post-copy migration)",
            "pidfd_store": "pid reuse detection between pre-dumps",
        }
        return items + [
            Item(
                "CRIU features",
                Verdict.WARN,
                detail + ": " + ", ".join(lost[k] for k in missing) + " cannot work",
                "see the userfaultfd item; or boot a newer kernel",
            )
        ], features
    return items + [
        Item("CRIU features", Verdict.OK, detail + " (mem_track: see soft-dirty)")
    ], features


# --- cgroups ---------------------------------------------------------------------------------


def _rmdir(path: str) -> Optional[str]:
    """Remove a probe cgroup (retrying briefly); the error text if it stays."""
    try:
        remove_cgroup(Path(path), timeout=1.0)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return f"cannot remove the probe cgroup {path}: still busy"
        return f"cannot remove the probe cgroup {path}: {exc.strerror}"
    return None


def _probe_dir(mount: str) -> str:
    path = os.path.join(mount, f"{PROBE_PREFIX}{os.getpid()}")
    if os.path.isdir(path):
        _rmdir(path)  # a stale probe of a process that had our pid
    os.mkdir(path)
    return path


# Seconds the probe lets an empty cgroup take to freeze or thaw.
_PROBE_TIMEOUT = 2.0


def _freeze_cycle(path: str, version: int) -> Tuple[str, str, str]:
    """Freeze and thaw the cgroup at `path` with pycpt's Freezer; the states seen before,
    frozen and after. Raises FreezerError (or OSError) when it does not work as it should."""
    freezer = Freezer(path)
    try:
        if freezer.version != version:
            raise FreezerError(
                f"{path}: is a cgroup v{freezer.version} freezer, not v{version}", path=path
            )
        first = freezer.state
        if freezer.requested:
            raise FreezerError(f"{path}: a new cgroup reports a freeze request", path=path)
        freezer.freeze(timeout=_PROBE_TIMEOUT)
        frozen = freezer.state
        if not freezer.requested:
            raise FreezerError(f"{path}: frozen, but no freeze request reported", path=path)
        freezer.thaw(timeout=_PROBE_TIMEOUT)
        after = freezer.state
        if freezer.requested:
            raise FreezerError(f"{path}: thawed, but the freeze request stays", path=path)
    finally:
        freezer.close()  # thaws too if the freeze succeeded and something after it failed
    return first.name, frozen.name, after.name


def _freeze_v1(path: str) -> str:
    if not os.path.exists(os.path.join(path, "freezer.state")):
        raise OSError(errno.ENOENT, "no freezer.state in a new cgroup", path)
    first, frozen, after = _freeze_cycle(path, 1)
    return f"freezer.state {first} -> {frozen} -> {after}"


def _freeze_v2(path: str) -> str:
    missing = [
        f
        for f in ("cgroup.freeze", "cgroup.events", "cgroup.kill")
        if not os.path.exists(os.path.join(path, f))
    ]
    if "cgroup.freeze" in missing or "cgroup.events" in missing:
        raise OSError(errno.ENOENT, f"no {' '.join(missing)} in a new cgroup (Linux < 5.2)")
    _freeze_cycle(path, 2)
    if missing:
        return "cgroup.freeze works; no cgroup.kill (Linux < 5.14)"
    return "cgroup.freeze 1 -> frozen -> 0 works; cgroup.kill exists"


def _probe_cgroup(mount: str, action: Callable[[str], str]) -> Tuple[bool, str]:
    """Create a probe cgroup under `mount`, run `action` on it, remove it."""
    try:
        path = _probe_dir(mount)
    except OSError as exc:
        return False, f"cannot create a cgroup in {mount}: {exc.strerror}"
    try:
        ok, said = True, f"probe {path}: {action(path)}"
    except OSError as exc:
        ok, said = False, f"probe {path}: {exc.strerror}"
    except FreezerError as exc:
        message = exc.message
        if message.startswith(f"{path}: "):  # said once already
            message = message[len(path) + 2 :]
        ok, said = False, f"probe {path}: {message}"
    problem = _rmdir(path)
    if problem:
        return False, f"{said}; {problem}"
    return ok, said + "; removed"


def _check_cgroups() -> List[Item]:
    mounts = cgroup_mounts()
    v1 = next((m for m, t, opts in mounts if t == "cgroup" and "freezer" in opts), None)
    v2 = next((m for m, t, _ in mounts if t == "cgroup2"), None)
    results: Dict[str, Tuple[Optional[bool], str]] = {}
    for version, mount, action in (("v1", v1, _freeze_v1), ("v2", v2, _freeze_v2)):
        if mount is None:
            results[version] = (
                None,
                "no cgroup "
                + ("v1 hierarchy with the freezer controller" if version == "v1" else "v2")
                + " mounted (per /proc/self/mountinfo)",
            )
        else:
            probed, said = _probe_cgroup(mount, action)
            results[version] = (probed, f"{mount}: {said}")
    any_ok = any(ok for ok, _ in results.values())
    items = []
    for version, (ok, said) in results.items():
        name = f"freezer {version}"
        if ok:
            items.append(Item(name, Verdict.OK, said))
        elif not any_ok:
            items.append(
                Item(
                    name,
                    Verdict.FAIL,
                    said + "; no cgroup freezer works",
                    "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) or the v1 "
                    "freezer, and run as root: suspend and freeze_cgroup need one",
                )
            )
        elif ok is None:
            items.append(Item(name, Verdict.SKIP, said, "not needed: the other freezer works"))
        else:
            items.append(Item(name, Verdict.WARN, said, "use the other cgroup version"))
    return items


# --- network lock ----------------------------------------------------------------------------


def _check_network_lock(engine: Optional[Engine]) -> Item:
    name = "network lock"
    iptables = shutil.which("iptables-restore")
    nft = shutil.which("nft")
    nft_ok: Optional[bool] = None
    nft_said = "CRIU's nftables lock: not checked (no usable CRIU)"
    if engine is not None:
        try:
            proc = subprocess.run(
                engine.command("check", "--feature", "network_lock_nftables"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
            nft_ok = proc.returncode == 0
            out = proc.stdout.decode("utf-8", "replace").strip().splitlines()
            nft_said = "`criu check --feature network_lock_nftables`: " + (
                out[-1] if out else f"exit status {proc.returncode}"
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            nft_ok, nft_said = False, f"`criu check --feature network_lock_nftables` failed: {exc}"
    tools = (
        f"iptables-restore {'at ' + iptables if iptables else 'not on PATH'}; "
        f"nft {'at ' + nft if nft else 'not on PATH'} (CRIU uses libnftables, not nft)"
    )
    detail = f"{tools}; {nft_said}"
    if iptables:
        return Item(name, Verdict.OK, "CRIU's default iptables lock is used; " + detail)
    if nft_ok:
        return Item(
            name,
            Verdict.WARN,
            "iptables missing: pycpt uses network_lock=nftables, which works (the `criu` "
            "command line's default lock is iptables and fails here: give it "
            "--network-lock nftables); " + detail,
            "nothing needed: pycpt picks nftables by itself (pass network_lock="
            "'nftables' when running CRIU yourself), or install iptables",
        )
    if nft_ok is None:
        return Item(name, Verdict.SKIP, "iptables missing; " + detail, _ENGINE_FIX)
    return Item(
        name,
        Verdict.WARN,
        "no network lock works: trees with a net namespace or TCP connections cannot "
        "be dumped; " + detail,
        "install iptables (apt-get install iptables), or `pycpt engine install` for a "
        "CRIU with libnftables",
    )


def _check_network_hold() -> Item:
    """The container network hold (pycpt._sys.nethold): an nf_tables table made and woken in
    a network namespace of the probe's own, which goes with it."""
    name = "network hold"
    ret = nethold.probe()
    if ret == 0:
        return Item(
            name,
            Verdict.OK,
            f"nf_tables works: table inet {nethold.TABLE} made dormant and woken in a "
            "probe network namespace",
        )
    return Item(
        name,
        Verdict.WARN,
        f"nf_tables does not work here ({_errname(-ret)}): containers start, but their "
        "network cannot be held, so chkpnt, --suspend and migration of a container with "
        "its own network fail",
        "use a kernel with nf_tables (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET), or start "
        "containers with --share-net",
    )


# --- sysctls ---------------------------------------------------------------------------------


def _check_pipe_size() -> Item:
    name = "fs.pipe-max-size"
    value = int(_read("/proc/sys/fs/pipe-max-size") or "0")
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), LAZY_PIPE_SIZE)
        got, why = True, ""
    except OSError as exc:
        got, why = False, exc.strerror or str(exc)
    finally:
        os.close(r)
        os.close(w)
    mib = f"{value} ({value / (1 << 20):g} MiB)"
    if got:
        lifted = ", CAP_SYS_RESOURCE lifts the limit" if value < LAZY_PIPE_SIZE else ""
        return Item(name, Verdict.OK, f"{mib}; a 4 MiB pipe can be made{lifted}: lazy pages work")
    return Item(
        name,
        Verdict.WARN,
        f"{mib}: a 4 MiB pipe cannot be made ({why}); CRIU lazy pages need ~3.2 MiB "
        'pipes and fail with "page-pipe: splice: Bad file descriptor"',
        f"sysctl -w fs.pipe-max-size={LAZY_PIPE_SIZE} (keep it in /etc/sysctl.d/ "
        "to survive a reboot)",
    )


def _check_kdat_cache(run: str = "/run") -> Item:
    """CRIU caches its kernel probe in /run/criu.kdat, but only when /run is a tmpfs (so that
    a reboot clears it); elsewhere it probes the kernel again on every run."""
    name = "CRIU kernel-probe cache"
    try:
        tmpfs = kdat.is_tmpfs(run)
    except OSError as exc:
        return Item(name, Verdict.SKIP, f"cannot statfs {run}: {exc.strerror}")
    if tmpfs:
        return Item(name, Verdict.OK, f"{run} is a tmpfs: CRIU keeps {run}/criu.kdat")
    if run == str(kdat.RUN) and kdat.fresh():
        return Item(
            name,
            Verdict.OK,
            f"{run} is not a tmpfs, so CRIU would probe the kernel on every run; pycpt "
            f"made {run}/criu.kdat for this boot (remade after a reboot) and CRIU "
            "loads it",
        )
    return Item(
        name,
        Verdict.WARN,
        f"{run} is not a tmpfs: CRIU will not keep its kernel probe in "
        f"{run}/criu.kdat and redoes it on every run (20-40 ms per dump, restore and "
        "lazy-pages daemon here, all inside a migration's frozen window); it also "
        f"leaves {run}/criu.kdat.tmp behind",
        "any pycpt command that runs CRIU as root makes the cache (pycpt.kdat); or "
        f"mount a tmpfs on {run} at boot, as systemd does",
    )


def _check_ns_last_pid() -> Item:
    name = "kernel.ns_last_pid"
    pid_max = _read("/proc/sys/kernel/pid_max") or "?"
    path = "/proc/sys/kernel/ns_last_pid"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))  # opened only, nothing written
    except OSError as exc:
        return Item(
            name,
            Verdict.WARN,
            f"{path} is not writable ({exc.strerror}); pid_max {pid_max}: CRIU restores "
            "pids with clone3(set_tid) on Linux >= 5.5, this is its fallback",
            "run as root in the initial pid namespace",
        )
    return Item(name, Verdict.OK, f"writable; pid_max {pid_max}")


# --- all of it -------------------------------------------------------------------------------


def _system() -> Dict[str, str]:
    info = {"kernel": os.uname().release, "machine": platform.machine()}
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            info["os"] = line.split("=", 1)[1].strip('"')
    debian = _read("/etc/debian_version")
    if debian:
        info["debian"] = debian
    info["python"] = platform.python_version()
    return info


def _categorised(category: str, items: Sequence[Item]) -> List[Item]:
    return [Item(i.name, i.status, i.detail, i.fix, category) for i in items]


def run_checks(*, engine: Optional[Engine] = None) -> Report:
    """Check everything pycpt needs on this machine and return a Report.

    `engine` is the CRIU to test; by default the one pycpt would use (find_engine()), and
    then the report also lists every engine candidate (`report.engine`). Probe cgroups named
    ``pycpt-doctor-<pid>`` are created and removed again. `report.ok` is False when some item
    is FAIL, i.e. checkpointing cannot work here.
    """
    if engine is not None and not isinstance(engine, Engine):
        raise InvalidArgumentError(f"engine must be a pycpt.Engine or None, not {engine!r}")
    status = None
    error: Optional[EngineError] = None
    if engine is None:
        status = engine_status()
        try:
            engine = find_engine(verify=True)
        except EngineError as exc:
            error = exc

    release = os.uname().release
    config, config_path = _kernel_config()
    criu_items, features = _criu_items(engine)
    items = _categorised(
        "kernel",
        [
            _check_kernel_version(release),
            _check_checkpoint_restore(config, config_path),
            _check_namespaces(),
            _check_userfaultfd(),
            _check_soft_dirty(features, config),
            _check_pagemap_scan(release),
        ],
    )
    items += _categorised("privileges", _check_privileges())
    items += _categorised("CRIU", [_engine_item(engine, error), *criu_items, _check_kdat_cache()])
    items += _categorised("cgroup freezer", _check_cgroups())
    items += _categorised("network", [_check_network_lock(engine), _check_network_hold()])
    items += _categorised("sysctl", [_check_pipe_size(), _check_ns_last_pid()])
    return Report(items, _system(), status)


def check(*, engine: Optional[Engine] = None) -> Report:
    """Can checkpointing work here? The doctor report (`pycpt.check()`; see run_checks)."""
    return run_checks(engine=engine)


def main() -> int:
    """`python -m pycpt.doctor [--json]`: print the report; exit status 1 when not ok."""
    report = run_checks()
    if "--json" in sys.argv[1:]:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
