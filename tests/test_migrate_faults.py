"""Migration under faults (issue 11): each fault at each of three moments, post-copy and
stop-and-copy, between two pretend hosts on a shaped link.

Faults: the link cut for good, the link cut for 3 s, SIGKILL of the source's `pycpt migrate`,
of the target's agent, of the target's lazy-pages daemon, of the source's CRIU, and a crash
of the target host (every process in its network namespace and its containers killed; its
"reboot" starts its sshd again). Moments: before "resume" (the target is restoring),
during the pages stage (post-copy: a third of the memory arrived; stop-and-copy: a third
of it reached the target's page server during the dump), just before the commit
(post-copy: nine tenths arrived; stop-and-copy: the source recorded "resume" as sent).

Each run checks, with both hosts' copies sampled every 50 ms throughout:
- never two copies computing at once;
- after the fault is cleared and the command pycpt named (if any) has run, exactly one copy
  computes, its memory is intact (SHA-256 as before, no page read wrong);
- while no copy computes, pycpt named the command that decides;
- nothing is left behind: no process of the migration on either host (ssh master, sshd
  session, agent, CRIU, lazy-pages), no temporary directory, no migration record.

Every run appends a line to $PYCPT_FAULTS_REPORT (JSON) when that is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from pycpt.container import Container
from tests.helpers.faults import (
    Info,
    Run,
    Sampler,
    advancing,
    build_step_counter,
    cgroup_of,
    leftovers,
    memory_sha,
    shm_entries,
    status_text,
    suggested_command,
    suggested_elsewhere,
    tasks_of,
    wait_until,
)

pytestmark = pytest.mark.slow

MIB = 32
RATE = "40mbit"  # 32 MiB take about 7 s: time for a fault in the middle
CT = "tx"
FAULTS = [
    "cut",
    "blip",
    "kill-src-cmd",
    "kill-agent",
    "kill-lazy",
    "kill-src-criu",
    "crash-dst",
]
MOMENTS = ["before-resume", "pages", "before-commit"]


@pytest.fixture(scope="module")
def step_counter(tmp_path_factory):
    return build_step_counter(tmp_path_factory.mktemp("step-counter"))


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("mode", ["postcopy", "stopcopy"])
def test_fault(testhosts, step_counter, tmp_path, lazy_pipe_size, mode, fault, moment):
    fault_case(testhosts, step_counter, tmp_path, mode, fault, moment)


@pytest.mark.parametrize("moment", ["pages", "before-commit"])
def test_agent_and_lazy_pages_killed_together(
    testhosts, step_counter, tmp_path, lazy_pipe_size, moment
):
    """Nothing on the target serves the copy's pages any more, nor watches it: the fence
    (a process of the agent's, holding the userfaultfds) kills it before any missing page
    could read as zeros."""
    fault_case(testhosts, step_counter, tmp_path, "postcopy", "kill-agent+lazy", moment)


def fault_case(testhosts, step_counter, tmp_path, mode, fault, moment) -> None:
    src, dst = testhosts["src"], testhosts["dst"]
    info_path = tmp_path / "info"
    with src.as_current():
        Container.start(CT, [str(step_counter), str(MIB), str(info_path)])
    assert wait_until(info_path.exists, 60), "the step counter did not start"
    info = Info.read(info_path)
    (pid,) = tasks_of(cgroup_of(src, CT))
    sha = memory_sha(pid, info)
    dst.limit_rate(RATE)
    t0 = time.monotonic()
    run = Run(mode, fault, moment, testhosts, CT, info, t0)
    run.shm_before = shm_entries()
    sampler = Sampler(testhosts, CT, info, t0)
    try:
        _run(run, src, dst, sampler, sha)
    finally:
        sampler.close()
        run.clear()
        _report(run, sampler)


def _run(run: Run, src, dst, sampler: Sampler, sha: str) -> None:
    proc = src.popen(
        ["pycpt", "migrate", "--mode", run.mode, "dst", CT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run.say(f"pycpt migrate pid {proc.pid}")

    def watch() -> None:
        while proc.poll() is None:
            if run.reached(proc.pid):
                run.fire(proc.pid)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    watcher.join(10)
    run.returncode, run.stderr = proc.returncode, err
    run.say(f"pycpt migrate exited {proc.returncode}: {err.strip()[-600:]}")
    if run.fired_at is None:
        run.say("the moment never came (nothing to inject at it)")

    # until the fault is cleared: never two copies (checked at the end from the samples);
    # when none computes, pycpt named the command that decides
    status = status_text(src, CT)
    run.say(f"src status: {status}")
    if not advancing(src, CT, run.info, 0.5) and not advancing(dst, CT, run.info, 0.5):
        command = suggested_command(CT, err, status)
        assert command or proc.returncode == 0, (
            f"no copy computes and pycpt named no command:\n{err}\nstatus: {status}\n"
            + "\n".join(run.log)
        )

    run.clear()
    if run.fault == "crash-dst" or run.fault == "cut":
        time.sleep(1.0)  # the link or the host is back; let sshd settle
    command = suggested_command(CT, err, status)
    if command is None and "migrating" in status:
        pytest.fail(f"the source is still migrating but pycpt named no command: {status}")
    if command is not None:
        done = src.run(command, capture_output=True, text=True, timeout=300)
        run.say(f"{' '.join(command)} -> {done.returncode}: {(done.stdout + done.stderr).strip()}")
        assert done.returncode == 0, done.stderr
    there = suggested_elsewhere(CT, "dst", err, status)
    if there is not None and run.fault == "crash-dst":  # else its pycpt did it by itself
        done = dst.run(there, capture_output=True, text=True, timeout=300)
        run.say(f"on dst: {' '.join(there)} -> {done.returncode}: {done.stdout.strip()}")
        assert done.returncode == 0, done.stderr

    # exactly one copy computes, with its memory intact
    src_runs = advancing(src, CT, run.info)
    dst_runs = advancing(dst, CT, run.info)
    run.say(f"after: src computes {src_runs}, dst computes {dst_runs}")
    assert src_runs != dst_runs, f"src {src_runs}, dst {dst_runs}\n" + "\n".join(run.log)
    where = src if src_runs else dst
    (pid,) = tasks_of(cgroup_of(where, CT))
    assert memory_sha(pid, run.info) == sha, "the running copy's memory changed"
    assert sampler.max_bad() == 0, "a copy read a page that was not its own"
    if run.returncode == 0:
        assert where is dst, "pycpt said it migrated, but the container runs on the source"
    both = sampler.both_advancing()
    assert both == [], f"two copies computed at once: {both}\n" + "\n".join(run.log)

    # nothing left behind (sshd sessions whose client is gone end within seconds)
    left = {}
    settled = wait_until(lambda: not leftovers(run.hosts, CT, run.shm_before, run.token), 60, 0.5)
    if not settled:
        left = leftovers(run.hosts, CT, run.shm_before, run.token)
    assert settled, f"left behind: {left}\n" + "\n".join(run.log)
    with where.as_current():
        assert Container(CT).status.value == "running"


def _report(run: Run, sampler: Sampler) -> None:
    path = os.environ.get("PYCPT_FAULTS_REPORT")
    if not path:
        return
    line = {
        "mode": run.mode,
        "fault": run.fault,
        "moment": run.moment,
        "fired_at": run.fired_at,
        "fired": run.fired_note,
        "returncode": run.returncode,
        "error": next((ln for ln in run.stderr.splitlines() if ln.startswith("pycpt: error:")), ""),
        "both_advancing": sampler.both_advancing(),
        "log": run.log,
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
