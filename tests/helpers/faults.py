"""The fault-injection harness of tests/test_migrate_faults.py: one migration between two
pretend hosts, one fault at one moment, both hosts' copies of the container watched
throughout.

The container runs tests/step_counter.c. A Sampler reads its step counter in every task
of the container's cgroup on each host through /proc/PID/mem every SAMPLE seconds (a read
that blocks, e.g. on a post-copy page that is not there, counts as "not advancing" for that
sample); two copies computing at once shows as an interval in which both hosts' counters
advanced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pycpt.container import Container
from pycpt.testing.testhosts import Host, TestHosts

SAMPLE = 0.05
MAGIC = 0x7063707473746570
SOURCE = Path(__file__).parent.parent / "step_counter.c"


def build_step_counter(directory: Path) -> Path:
    """Compile tests/step_counter.c into `directory` (skips when gcc cannot)."""
    import pytest

    binary = directory / "step_counter"
    out = subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(SOURCE)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot build the step counter: {out.stderr.strip()[-300:]}")
    return binary


def cgroup_of(host: Host, ct: str) -> Path:
    with host.as_current():
        return Container(ct).cgroup if Container(ct).exists else _default_cgroup(ct)


def _default_cgroup(ct: str) -> Path:
    from pycpt.container import cgroup_root

    return cgroup_root() / ct


def tasks_of(cgroup: Path) -> List[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


@dataclass
class Info:
    """What the step counter published: its struct's and memory's addresses, its size."""

    st: int
    mem: int
    mib: int

    @classmethod
    def read(cls, path: Path) -> "Info":
        st, mem, mib = path.read_text().split()
        return cls(int(st, 16), int(mem, 16), int(mib))


def read_st(pid: int, info: Info) -> Optional[Tuple[int, int]]:
    """(step, bad) of the step counter with host pid `pid`, or None (gone)."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(info.st)
            step, bad, _first, magic = struct.unpack("<4Q", f.read(32))
    except (OSError, struct.error):
        return None
    return (step, bad) if magic == MAGIC else None


def memory_sha(pid: int, info: Info) -> str:
    h = hashlib.sha256()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(info.mem)
        left = info.mib << 20
        while left:
            data = f.read(min(4 << 20, left))
            if not data:
                raise OSError("short read")
            h.update(data)
            left -= len(data)
    return h.hexdigest()


class _Reader:
    """Reads of one host's counters on a thread of their own, so that a read blocked on a
    missing page stalls only that host's samples."""

    def __init__(self, cgroup: Path, info: Info) -> None:
        self.cgroup, self.info = cgroup, info
        self.busy = False
        self.result: Optional[Tuple[int, int]] = None

    def start(self) -> None:
        if self.busy:
            return
        self.busy = True
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        best: Optional[Tuple[int, int]] = None
        for pid in tasks_of(self.cgroup):
            got = read_st(pid, self.info)
            if got is not None and (best is None or got[0] > best[0]):
                best = got
        self.result = best
        self.busy = False


class Sampler:
    """Every SAMPLE seconds, the highest step (and its bad count) of the container on each
    host; a host whose read has not finished yet counts as unchanged."""

    def __init__(self, hosts: TestHosts, ct: str, info: Info, t0: float) -> None:
        self.hosts, self.ct, self.info, self.t0 = hosts, ct, info, t0
        self.samples: List[Tuple[float, Dict[str, Optional[Tuple[int, int]]]]] = []
        self._stop = threading.Event()
        self._readers = {h.name: _Reader(cgroup_of(h, ct), info) for h in hosts}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            row: Dict[str, Optional[Tuple[int, int]]] = {}
            for name, reader in self._readers.items():
                was_busy = reader.busy
                row[name] = None if was_busy else reader.result
                reader.start()
            self.samples.append((time.monotonic() - self.t0, row))
            self._stop.wait(SAMPLE)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def both_advancing(self) -> List[Tuple[float, float]]:
        """Intervals between two samples in which both hosts' counters went up."""
        found = []
        last: Dict[str, Optional[int]] = {}
        last_t = 0.0
        for t, row in self.samples:
            advanced = []
            for name, value in row.items():
                if value is None:
                    continue
                before = last.get(name)
                if before is not None and value[0] > before:
                    advanced.append(name)
                last[name] = value[0]
            if len(advanced) > 1:
                found.append((round(last_t, 2), round(t, 2)))
            last_t = t
        return found

    def max_bad(self) -> int:
        return max((v[1] for _, row in self.samples for v in row.values() if v), default=0)


def advancing(host: Host, ct: str, info: Info, seconds: float = 1.0) -> bool:
    """True if the container computes on `host` (its step counter goes up)."""
    cgroup = cgroup_of(host, ct)
    first = {pid: read_st(pid, info) for pid in tasks_of(cgroup)}
    time.sleep(seconds)
    for pid, before in first.items():
        after = read_st(pid, info)
        if before and after and after[0] > before[0]:
            return True
    return False


# --- moments and faults ---------------------------------------------------------------------


def record(host: Host, ct: str) -> Dict[str, Any]:
    try:
        return json.loads((host.state_dir / "ct" / ct / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def rss(cgroup: Path) -> int:
    total = 0
    for pid in tasks_of(cgroup):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def incoming_page_bytes(ct: str) -> int:
    total = 0
    for d in Path("/dev/shm").glob(f".pycpt-incoming-{ct}-*"):
        for f in d.glob("pages-*.img"):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    return total


def descendants(pid: int) -> List[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Run:
    """One migration under one fault; what happened, for the assertions and the report."""

    mode: str
    fault: str
    moment: str
    hosts: TestHosts
    ct: str
    info: Info
    t0: float
    log: List[str] = field(default_factory=list)
    fired_at: Optional[float] = None
    fired_note: str = ""
    returncode: Optional[int] = None
    stderr: str = ""
    cleared: bool = False
    shm_before: List[str] = field(default_factory=list)
    token: str = ""  # the migration's, once seen in the source's record

    def say(self, text: str) -> None:
        self.log.append(f"[{time.monotonic() - self.t0:7.2f}] {text}")

    # --- the moment --------------------------------------------------------------------

    def reached(self, migrate_pid: int) -> bool:
        """True once the migration is at this run's moment."""
        src, dst = self.hosts["src"], self.hosts["dst"]
        out = record(src, self.ct).get("outgoing") or {}
        inc = record(dst, self.ct).get("incoming") or {}
        self.token = self.token or out.get("token", "")
        if self.moment == "before-resume":
            # the target is restoring: the source waits for "undumped", resume is not sent
            return inc.get("stage") in ("receiving", "undumped") and bool(
                tasks_of(cgroup_of(dst, self.ct))
            )
        if self.moment == "pages":
            if self.mode == "postcopy":  # a third of the memory has arrived
                return (
                    out.get("stage") == "pages"
                    and rss(cgroup_of(dst, self.ct)) > (self.info.mib << 20) // 3
                )
            return incoming_page_bytes(self.ct) > (self.info.mib << 20) // 3  # during the dump
        # before-commit
        if self.mode == "postcopy":
            return (
                out.get("stage") == "pages"
                and rss(cgroup_of(dst, self.ct)) > (self.info.mib << 20) * 9 // 10
            )
        return out.get("stage") == "resume-sent"

    # --- the fault ---------------------------------------------------------------------

    def fire(self, migrate_pid: int) -> None:
        dst = self.hosts["dst"]
        inc = record(dst, self.ct).get("incoming") or {}
        self.fired_at = time.monotonic() - self.t0
        committed = (record(dst, self.ct).get("migrated_by") is not None) or bool(
            list((dst.state_dir / "migrations").glob("*.json"))
            if (dst.state_dir / "migrations").is_dir()
            else []
        )
        self.fired_note = f"target stage {inc.get('stage')}, committed {committed}"
        self.say(f"FAULT {self.fault} at {self.moment} ({self.fired_note})")
        if self.fault in ("cut", "blip"):
            dst.link_down()
            if self.fault == "blip":
                threading.Timer(3.0, self.clear).start()
        elif self.fault == "kill-src-cmd":
            os.kill(migrate_pid, signal.SIGKILL)
        elif self.fault == "kill-agent":
            agent = (inc.get("agent") or [None])[0]
            if agent:
                _kill(agent)
        elif self.fault == "kill-lazy":
            for what, pid, _start in inc.get("processes") or []:
                if what == "lazy_pages":
                    _kill(pid)
        elif self.fault == "kill-agent+lazy":
            for what, pid, _start in inc.get("processes") or []:
                if what == "lazy_pages":
                    _kill(pid)
            _kill((inc.get("agent") or [0])[0])
        elif self.fault == "kill-src-criu":
            family = {p: cmdline(p) for p in descendants(migrate_pid)}
            # CRIU names itself after its request ("criu: dump --rpc ...") once it has one
            crius = [p for p, cmd in family.items() if "criu" in cmd and "ssh" not in cmd]
            self.say(f"source CRIU: {crius} among {family}")
            for pid in crius:
                _kill(pid)
        elif self.fault == "crash-dst":
            dst.crash()
        else:
            raise AssertionError(f"unknown fault {self.fault}")

    def clear(self) -> None:
        if self.cleared:
            return
        self.cleared = True
        dst = self.hosts["dst"]
        if self.fault in ("cut", "blip"):
            dst.link_up()
            self.say("link up again")
        elif self.fault == "crash-dst":
            dst.start_sshd()
            self.say("dst rebooted (sshd started)")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def shm_entries() -> List[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir())


def leftovers(
    hosts: TestHosts, ct: str, before: Optional[List[str]] = None, token: str = ""
) -> Dict[str, Any]:
    """What a migration of `ct` (`token`, if known) may leave behind, on both hosts; empty
    when nothing. `before`: /dev/shm's entries before the run (others' runs may leave
    theirs)."""
    found: Dict[str, Any] = {}
    for host in hosts:
        procs = {
            pid: cmd
            for pid, cmd in host.processes().items()
            if not cmd.startswith("sshd: [listener]")
        }
        if procs:
            found[f"{host.name} processes"] = procs
    shm = [
        name
        for name in shm_entries()
        if name.startswith((f".pycpt-migrate-{ct}-", f".pycpt-incoming-{ct}-"))
        and name not in (before or ())
    ]
    if shm:
        found["/dev/shm"] = shm
    src_rec = record(hosts["src"], ct)
    if "outgoing" in src_rec:
        found["src record"] = src_rec["outgoing"]
    dst_rec = record(hosts["dst"], ct)
    if "incoming" in dst_rec:
        found["dst record"] = dst_rec["incoming"]
    if token and Path(f"/tmp/pycpt-ssh-{token[:16]}").exists():
        found["ssh control dir"] = f"/tmp/pycpt-ssh-{token[:16]}"
    return found


def status_text(host: Host, ct: str) -> str:
    out = host.run(["pycpt", "status", ct], capture_output=True, text=True, timeout=120)
    return (out.stdout + out.stderr).strip()


def suggested_command(ct: str, *texts: str) -> Optional[List[str]]:
    """The command pycpt told the user to run here next, if any."""
    for text in texts:
        for m in re.finditer(rf"`pycpt migrate --abort {re.escape(ct)}`( on (\w+))?", text):
            if not m.group(1):
                return ["pycpt", "migrate", "--abort", ct]
    return None


def suggested_elsewhere(ct: str, host: str, *texts: str) -> Optional[List[str]]:
    """The command pycpt told the user to run on `host`, if any."""
    for text in texts:
        if f"`pycpt migrate --abort {ct}` on {host}" in text:
            return ["pycpt", "migrate", "--abort", ct]
    return None


def python() -> str:
    return sys.executable


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
