"""Containers and the vzctl workflow against the real kernel and CRIU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pycpt
from pycpt import demo_workload, errors
from conftest import Hasher, continued
from pycpt.container import Container, Status, list_containers


def test_start_status_exec_stop(ctenv):
    h = Hasher(ctenv)
    ct = h.ct
    assert ct.status is Status.RUNNING
    pid = ct.init_pid
    assert Path(f"/proc/{pid}/ns/pid").resolve() != Path("/proc/self/ns/pid").resolve()
    assert str(pid) in (ct.cgroup / "cgroup.procs").read_text().split()
    out = ct.exec(["sh", "-c", "echo $$; hostname; cat /proc/1/comm"],
                  stdout=subprocess.PIPE).communicate(timeout=30)[0].decode().split()
    assert out[1] == "ct1"
    assert [c.id for c in list_containers()] == ["ct1"]
    ct.stop()
    assert ct.status is Status.STOPPED and not ct.cgroup.exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_full_chkpnt_and_restore(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    dump = h.ct.chkpnt()
    assert dump == ctenv / "state" / "dump" / "Dump.ct1"
    assert dump.stat().st_mode & 0o777 == 0o600
    assert h.ct.status is Status.DUMPED and h.ct.init_pid is None
    ct = Container.restore("ct1")
    assert ct.status is Status.RUNNING
    assert continued(before, h.sample())


def test_staged_chkpnt_and_restore(ctenv):
    h = Hasher(ctenv)
    ct = h.ct
    before = h.sample()
    ct.suspend()
    assert ct.status is Status.SUSPENDED
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    with pytest.raises(errors.ContainerStateError, match="no dump yet"):
        ct.kill()
    ct.dump(str(ctenv / "staged.dump"))
    assert ct.status is Status.SUSPENDED and ct.dumped
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    ct.kill()
    assert ct.status is Status.DUMPED
    ct = Container.restore("ct1", str(ctenv / "staged.dump"), undump_only=True)
    assert ct.status is Status.UNDUMPED
    assert pycpt.Freezer(ct.cgroup).state is pycpt.FreezerState.FROZEN
    ct.resume()
    assert ct.status is Status.RUNNING
    assert continued(before, h.sample())


def test_suspend_resume_loses_nothing(ctenv):
    h = Hasher(ctenv)
    before = h.sample()
    h.ct.suspend()
    h.ct.resume()
    assert h.ct.status is Status.RUNNING and continued(before, h.sample())


@pytest.mark.parametrize("step", ["dump", "kill", "resume"])
def test_steps_out_of_order_change_nothing(ctenv, step):
    h = Hasher(ctenv)
    before = h.sample()
    with pytest.raises(errors.ContainerStateError, match="it is running"):
        getattr(h.ct, step)()
    assert h.ct.status is Status.RUNNING and continued(before, h.sample())


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "x" * 65, "-x"])
def test_bad_ids(ctenv, bad):
    with pytest.raises(ValueError):
        Container(bad)
