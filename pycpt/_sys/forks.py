"""Freezing a container between a vfork() and its child's exec.

A task that called vfork() sleeps until its child execs or exits. Both freezers count it
as frozen, but CRIU cannot seize it: it finds the task in state D and gives up after its
own timeout (10 s), "Unseizable non-zombie ... state D". A shell runs most commands that
way (dash: vfork, then exec), so a container running a shell loop is caught like this in
about one freeze in ten. While a task waits so, the container runs for a moment and is
frozen again: its child execs within microseconds.
"""

from __future__ import annotations

import time
from typing import List

from pycpt import errors
from pycpt._sys.procfs import waits_for_vfork
from pycpt.freezer import Freezer

TRIES = 50
"""Freezes tried before giving up: a vfork child that never execs is stuck, not unlucky."""


def vfork_waiters(freezer: Freezer) -> List[int]:
    """The threads of the (frozen) cgroup that wait for a vfork child."""
    return [tid for tid in freezer.tasks() if waits_for_vfork(tid)]


def let_vforks_finish(freezer: Freezer, timeout: float) -> int:
    """Leave the cgroup frozen with no task waiting in vfork(): while one does, thaw, let
    it run a moment, freeze again (each freeze within `timeout` s). Returns the number of
    thaws it took. Raises ContainerError if one still waits after TRIES freezes (the
    cgroup is frozen then, as it was), FreezeTimeoutError if a freeze fails (it is thawed
    then, as Freezer.freeze leaves it)."""
    waiting = vfork_waiters(freezer)
    for thaws in range(TRIES):
        if not waiting:
            return thaws
        freezer.thaw(timeout)
        time.sleep(0.0005 * (thaws + 1))
        freezer.freeze(timeout)
        waiting = vfork_waiters(freezer)
    if not waiting:
        return TRIES
    raise errors.ContainerError(
        f"cannot checkpoint the tasks of {freezer.path}: thread {waiting[0]} waits in vfork() "
        f"for a child that has neither run another program nor exited after {TRIES} tries; "
        "CRIU cannot seize a task that waits so",
        hint="see what that child is doing (ps -o pid,stat,wchan:20,cmd --ppid "
        f"{waiting[0]}), then try again",
    )
