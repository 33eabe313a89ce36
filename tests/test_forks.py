"""A container caught between a vfork() and its child's exec checkpoints: CRIU cannot seize
a task that waits for its vfork child (state D, "Unseizable non-zombie"), so pycpt lets the
container run a moment and freezes it again (pycpt/_sys/forks.py). A shell runs most
commands that way; before, about one chkpnt in ten of a shell loop failed after CRIU's 10 s
timeout (30 rounds of `while :; do sleep 0.01; done`: 3 failures)."""

from __future__ import annotations

import subprocess
import time

import pytest

from pycpt import errors
from pycpt._sys.forks import TRIES, let_vforks_finish, vfork_waiters
from pycpt.container import Container, ContainerStatus
from pycpt.freezer import Freezer

LOOP = "while :; do /bin/true; done"  # dash: vfork, then exec, for every /bin/true


def suspended_in_vfork(ct: Container) -> None:
    """Suspend `ct` at a moment when one of its tasks waits for its vfork child."""
    for _ in range(2000):
        ct.suspend()
        if vfork_waiters(Freezer(ct.cgroup)):
            return
        ct.resume()
    pytest.fail("no suspend met a task in vfork")


def test_a_container_caught_in_vfork_checkpoints(ctenv):
    ct = Container.start("vf", ["/bin/sh", "-c", LOOP])
    suspended_in_vfork(ct)
    started = time.monotonic()
    dump = ct.dump(str(ctenv / "vf.dump"))
    assert time.monotonic() - started < 8, "CRIU waited for its seize timeout"
    assert ct.status is ContainerStatus.SUSPENDED
    assert vfork_waiters(Freezer(ct.cgroup)) == []
    ct.kill()
    ct = Container.restore("vf", str(dump))
    assert ct.status is ContainerStatus.RUNNING
    ct.stop()


def test_a_shell_loop_checkpoints_every_time(ctenv):
    ct = Container.start("sl", ["/bin/sh", "-c", "while :; do sleep 0.01; done"])
    for _ in range(10):
        time.sleep(0.05)
        ct = Container.restore("sl", str(ct.chkpnt(str(ctenv / "sl.dump"))))
    ct.stop()


def test_a_child_that_never_execs_is_a_clear_error(ctenv, tmp_path):
    """A vfork child that never execs or exits is stuck, not unlucky: after TRIES freezes
    the error names the waiting task, and chkpnt leaves the container running."""
    if subprocess.run(["sh", "-c", "command -v gcc"], capture_output=True).returncode:
        pytest.skip("gcc is needed to build the stuck vfork child")
    source = tmp_path / "stuck.c"
    source.write_text(
        "#include <unistd.h>\n"
        "int main(void) { if (vfork() == 0) { for (;;) pause(); } return 0; }\n"
    )
    subprocess.run(["gcc", "-O0", "-o", str(tmp_path / "stuck"), str(source)], check=True)
    ct = Container.start("st", [str(tmp_path / "stuck")])
    deadline = time.monotonic() + 10
    while len(Freezer(ct.cgroup).pids()) < 2:
        assert time.monotonic() < deadline, "the vfork child did not start"
        time.sleep(0.01)
    with pytest.raises(errors.ContainerError, match=f"after {TRIES} tries") as info:
        ct.chkpnt(str(ctenv / "st.dump"))
    assert "waits in vfork()" in str(info.value) and info.value.hint
    assert ct.status is ContainerStatus.RUNNING
    assert not Freezer(ct.cgroup).requested
    assert not (ctenv / "st.dump").exists()
    freezer = Freezer(ct.cgroup)
    freezer.freeze()
    with pytest.raises(errors.ContainerError):
        let_vforks_finish(freezer, 5.0)
    assert Freezer(ct.cgroup).requested  # left frozen, as it was
    freezer.thaw()
    ct.stop()
