"""The kill sweep: `pycpt chkpnt` and `pycpt restore` of a 512 MiB container (plain and
--compress gz), stopped by SIGKILL, and by SIGINT, at evenly spaced instants across a run
of each; after each stop, the recovery a user does (`pycpt status`, which recovers, and
the one command it prints, if any) and the check: the container runs with its memory
checksum unchanged and its computation gone on exactly (restored from its dump file first,
if the stop left it dumped), and nothing of the interrupted command is left (temporary
files and directories, an intent record, an empty cgroup, a lock-only directory).

    python -m tests.killsweep [--mib 512] [--instants 20] [--state DIR]   (as root, from the
                                                                         repository)

prints the table; tests/test_killsweep.py runs the same sweep and requires 100%. The
instants are chosen from a run of each operation measured first (the whole run, from the
start of the `pycpt` process to its exit), so the sweep covers it evenly whatever the
machine's speed: instant i of n is at (i + 1/2)/n of it (the shorter of two measured runs:
the first one pays for cold caches). An instant past the end of a run (runs vary) finds the
command done, which is checked all the same.

Each chkpnt trial samples the workload just before it (the check recomputes the hash chain
from that sample: its cost stays the length of one trial instead of growing with the
sweep). The stopped `pycpt` gets SIGINT with its default disposition even when this
script runs where SIGINT is ignored (a background job of a non-interactive shell), and the
table shows its exit status: 130 or -2 is an interrupt that took effect.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pycpt.container import Container, ContainerStatus, cgroup_root, remove_all
from pycpt.testing import demo_workload
from pycpt.testing.demo_workload import chain_after

Sample = Tuple[int, str, str]
OPERATIONS = ("chkpnt", "restore")
MODES = ("plain", "gz")
SIGNALS = (signal.SIGKILL, signal.SIGINT)


@dataclass
class Trial:
    """One stop: where, what pycpt said, and what was found."""

    operation: str
    mode: str
    signum: int
    at: float  # seconds after the start of the pycpt process
    exit_status: Optional[int] = None  # None: it had ended before the signal
    found: str = ""  # the status after `pycpt status`
    command: str = ""  # the recovery command pycpt printed
    ok: bool = False
    problem: str = ""
    after: Optional[Sample] = None

    def cell(self) -> str:
        what = self.command.replace(f"pycpt {self.operation} ", "").replace("pycpt ", "") or "-"
        ended = "done" if self.exit_status is None else f"rc {self.exit_status}"
        return f"{'ok' if self.ok else 'FAIL'} {ended} {self.found} {what}".strip()


@dataclass
class Sweep:
    """A sweep in a state directory and cgroup parent of its own (removed by close())."""

    mib: int = 512
    instants: int = 20
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pycpt-killsweep-")))
    trials: List[Trial] = field(default_factory=list)
    lengths: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base.chmod(0o700)
        self.state = self.base / "state"
        self.state.mkdir(mode=0o700, exist_ok=True)
        self.tmp = self.base / "tmp"
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        self.report = self.base / "report"
        self.env = dict(
            os.environ,
            PYCPT_STATE_DIR=str(self.state),
            PYCPT_CGROUP_PARENT=f"pycpt-killsweep-{os.getpid()}",
            TMPDIR=str(self.tmp),
        )
        self._saved = {
            k: os.environ.get(k) for k in ("PYCPT_STATE_DIR", "PYCPT_CGROUP_PARENT", "TMPDIR")
        }
        os.environ.update({k: self.env[k] for k in self._saved})
        tempfile.tempdir = str(self.tmp)

    def close(self) -> None:
        """Kill every container of the sweep, remove its cgroups and files."""
        try:
            remove_all()
        finally:
            parent = cgroup_root()  # and whatever a stop at a bad moment left in our parent
            if parent.is_dir():
                for child in parent.iterdir():
                    if child.is_dir():
                        if (child / "cgroup.kill").exists():
                            (child / "cgroup.kill").write_text("1")
                        for _ in range(500):
                            try:
                                child.rmdir()
                                break
                            except OSError:
                                time.sleep(0.01)
                parent.rmdir()
            for key, value in self._saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            tempfile.tempdir = None
            shutil.rmtree(self.base, ignore_errors=True)

    # --- the container ------------------------------------------------------------------

    def pycpt(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pycpt", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=self.env,
        )

    def start(self, ct: str) -> None:
        argv = [sys.executable, demo_workload.__file__, str(self.mib), str(self.report), "stamped"]
        Container.start(ct, argv)
        ready = Path(f"{self.report}.ready")
        deadline = time.monotonic() + 600
        while not ready.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the workload did not start")
            time.sleep(0.05)

    def sample(self, ct: str) -> Sample:
        """(step, chain, memory sha256) as the workload reports them now."""
        pid = Container(ct).init_pid
        if pid is None:
            raise RuntimeError(f"{ct} does not run")
        self.report.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 300
        while not self.report.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no report from the workload")
            time.sleep(0.01)
        step, chain, mem = self.report.read_text().split()
        return int(step), chain, mem

    def leftovers(self, ct: str) -> List[str]:
        found = []
        for directory in (self.state / "dump", self.tmp):
            if directory.is_dir():
                found += [
                    n
                    for n in os.listdir(directory)
                    if n.startswith(
                        (f".Dump.{ct}.", f".pycpt-images-{ct}-", f".pycpt-restore-{ct}-")
                    )
                ]
        ct_dir = self.state / "ct" / ct
        if (ct_dir / "intent.json").exists():
            found.append("intent.json")
        if ct_dir.is_dir() and not (ct_dir / "state.json").exists():
            found.append(f"{ct_dir} with no record")
        cgroup = cgroup_root() / ct
        running = Container(ct).status in (
            ContainerStatus.RUNNING,
            ContainerStatus.SUSPENDED,
            ContainerStatus.UNDUMPED,
        )
        if cgroup.is_dir() and not running:
            found.append(f"cgroup {cgroup} of a container that does not run")
        return found

    # --- one trial ----------------------------------------------------------------------

    def timed(self, *args: str) -> float:
        """Run `pycpt ARGS` whole; its length in seconds (it must succeed)."""
        started = time.monotonic()
        r = self.pycpt(*args)
        if r.returncode != 0:
            raise RuntimeError(f"pycpt {' '.join(args)}: {r.stderr}")
        return time.monotonic() - started

    def stop_at(self, args: List[str], at: float, signum: int) -> Optional[int]:
        """Start `pycpt ARGS`, send it `signum` `at` seconds later; its exit status, or None
        when it had ended by then."""
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pycpt", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # a signal for pycpt only, as `kill PID` sends it
            preexec_fn=_default_stop_signals,
        )
        delay = started + at - time.monotonic()
        if delay > 0:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        ended_before = proc.poll() is not None
        if not ended_before:
            proc.send_signal(signum)
        proc.communicate(timeout=600)
        return None if ended_before else proc.returncode

    def trial(
        self, operation: str, mode: str, signum: int, at: float, before: Optional[Sample]
    ) -> Trial:
        """One stop; `before`: the workload's sample the check starts from (None: take one
        now, the container running)."""
        ct = "sw"
        t = Trial(operation, mode, signum, at)
        if before is None:
            before = self.sample(ct)
        args = [operation, ct] + (
            ["--compress", "gz"] if operation == "chkpnt" and mode == "gz" else []
        )
        if operation == "restore" and mode == "gz":
            args += ["--dumpfile", str(self.state / "dump" / "Dump.gz")]
        t.exit_status = self.stop_at(args, at, signum)
        try:
            seen = self.pycpt("status", ct)  # recovers, and prints the command to go on with
            t.found = seen.stdout.strip()
            commands = re.findall(r"^\s+next: (pycpt .+)$", seen.stderr, re.M)
            if seen.returncode != 0 or len(commands) > 1:
                raise RuntimeError(f"status: {seen.stdout} {seen.stderr}")
            if commands:
                t.command = commands[0]
                r = self.pycpt(*t.command.split()[1:])
                if r.returncode != 0:
                    raise RuntimeError(f"{t.command}: {r.stderr}")
            left = self.leftovers(ct)
            if left:
                raise RuntimeError(f"left behind: {left}")
            now = Container(ct).status
            if now is ContainerStatus.DUMPED or now is ContainerStatus.STOPPED:
                source = Container(ct).state.get("dumpfile")
                r = self.pycpt("restore", ct, *(["--dumpfile", source] if source else []))
                if r.returncode != 0:
                    raise RuntimeError(f"restorable? {r.stderr}")
            elif now is not ContainerStatus.RUNNING:
                raise RuntimeError(f"it is {now.value}, neither running nor restorable")
            after = self.sample(ct)
            if after[2] != before[2]:
                raise RuntimeError("its memory changed")
            if not (
                after[0] > before[0] and chain_after(before[1], after[0] - before[0]) == after[1]
            ):
                raise RuntimeError("its computation did not go on exactly")
            t.ok, t.after = True, after
        except Exception as exc:  # recorded in the table; the sweep goes on from a fresh start
            t.problem = str(exc)
            self._fresh(ct)
        self.trials.append(t)
        return t

    def _fresh(self, ct: str) -> None:
        """After a failed trial: a new container, so that the next trial starts clean."""
        remove_all()
        shutil.rmtree(self.state / "ct" / ct, ignore_errors=True)
        self.start(ct)

    # --- the sweep ----------------------------------------------------------------------

    def run(self, operations=OPERATIONS, modes=MODES, signals=SIGNALS, log=None) -> List[Trial]:
        ct = "sw"
        self.start(ct)
        for mode in modes:
            extra = ["--compress", "gz"] if mode == "gz" else []
            dumpfile = str(self.state / "dump" / ("Dump.gz" if mode == "gz" else f"Dump.{ct}"))
            for operation in operations:
                # the whole run, measured twice: chkpnt (the container then restored), restore
                runs = []
                for _ in range(2):
                    if operation == "chkpnt":
                        runs.append(self.timed("chkpnt", ct, *extra))
                        self.timed("restore", ct, "--dumpfile", Container(ct).state["dumpfile"])
                    else:
                        self.timed("chkpnt", ct, *extra, "--dumpfile", dumpfile)
                        runs.append(self.timed("restore", ct, "--dumpfile", dumpfile))
                length = min(runs)
                self.lengths[f"{operation} {mode}"] = length
                # restore trials all start from one dump file: one sample before it serves them
                before: Optional[Sample] = None
                if operation == "restore":
                    before = self.sample(ct)
                    self.timed("chkpnt", ct, *extra, "--dumpfile", dumpfile)
                for i in range(self.instants):
                    at = (i + 0.5) * length / self.instants
                    for signum in signals:
                        if (
                            operation == "restore"
                            and Container(ct).status is ContainerStatus.RUNNING
                        ):
                            self.timed("stop", ct)
                        t = self.trial(operation, mode, signum, at, before)
                        if log is not None:
                            log(t)
                        if not t.ok and operation == "restore":
                            before = self.sample(ct)
                            self.timed("chkpnt", ct, *extra, "--dumpfile", dumpfile)
        return self.trials

    def table(self) -> str:
        """The trials as a table: one row per instant, a column per operation, mode, signal."""
        columns = sorted(
            {(t.operation, t.mode, t.signum) for t in self.trials},
            key=lambda c: (OPERATIONS.index(c[0]), MODES.index(c[1]), SIGNALS.index(c[2])),
        )
        width = 30
        lines = [
            "runs measured: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.lengths.items()),
            f"{'instant':>8}  "
            + "  ".join(f"{f'{o} {m} {signal.Signals(s).name}':<{width}}" for o, m, s in columns),
        ]
        for i in range(self.instants):
            row = [f"{i + 1:>2}/{self.instants:<5}"]
            for column in columns:
                found = [t for t in self.trials if (t.operation, t.mode, t.signum) == column]
                cell = found[i] if i < len(found) else None
                row.append(f"{(f'{cell.at:.2f}s ' + cell.cell()) if cell else '':<{width}}")
            lines.append("  ".join(row))
        ok = sum(t.ok for t in self.trials)
        lines.append(f"{ok}/{len(self.trials)} ok")
        for t in self.trials:
            if not t.ok:
                lines.append(
                    f"FAIL {t.operation} {t.mode} {signal.Signals(t.signum).name} at {t.at:.2f} s: "
                    f"{t.problem}"
                )
        return "\n".join(lines)


def _default_stop_signals() -> None:
    """In the child before exec: SIGINT and SIGHUP as a terminal would deliver them (an
    ignored disposition is inherited through exec, and Python then keeps it ignored)."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--instants", type=int, default=20)
    parser.add_argument("--operation", choices=OPERATIONS, action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on `kill` too
    sweep = Sweep(mib=args.mib, instants=args.instants)
    started = time.monotonic()
    try:
        sweep.run(
            operations=args.operation or OPERATIONS,
            modes=args.mode or MODES,
            log=lambda t: print(
                f"  {t.operation} {t.mode} {signal.Signals(t.signum).name} at {t.at:.2f} s: "
                f"{t.cell()} {t.problem}",
                file=sys.stderr,
                flush=True,
            ),
        )
        print(sweep.table())
        print(f"sweep took {time.monotonic() - started:.0f} s")
    finally:
        sweep.close()
    return 0 if all(t.ok for t in sweep.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
