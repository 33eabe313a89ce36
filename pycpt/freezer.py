"""The cgroup freezer: stop and resume every task of a cgroup at once (v1 and v2).

    with Freezer("/sys/fs/cgroup/unified/ct1") as f:   # frozen here
        ...                                              # thawed again on the way out

The waiting is done in C (csrc/freezer.c): on cgroup v2 it sleeps in ppoll until
cgroup.events changes (re-reading it at least every millisecond, as the kernel rate-limits
that notification), on v1 (which sends none) it re-reads freezer.state with a short back-off.
"""

from __future__ import annotations

import errno
import math
import os
import threading
from typing import Any, List, Optional, Type

from pycpt._native import check, ffi, lib
from pycpt._typing import NamedIntEnum, PathLike
from pycpt.errors import FreezerError, FreezeTimeoutError, InvalidArgumentError

__all__ = ["Freezer", "FreezerState", "DEFAULT_TIMEOUT"]

#: Seconds freeze(), thaw() and kill() wait by default.
DEFAULT_TIMEOUT = 10.0


class FreezerState(NamedIntEnum):
    """State of a cgroup as the kernel reports it."""

    THAWED = lib.PYCPT_FREEZER_THAWED
    FREEZING = lib.PYCPT_FREEZER_FREEZING
    FROZEN = lib.PYCPT_FREEZER_FROZEN


_NOT_A_CGROUP_HINT = (
    "give a cgroup directory that has a freezer: a child of /sys/fs/cgroup/freezer (v1, "
    "with freezer.state) or a non-root cgroup v2 directory (with cgroup.freeze); "
    "create one with mkdir"
)


def _timeout_ms(timeout: Optional[float]) -> int:
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0 or math.isnan(timeout):
        raise InvalidArgumentError(
            f"timeout must be >= 0 seconds (or None to wait forever), not {timeout}"
        )
    return min(math.ceil(timeout * 1000), 2**31 - 1)


class Freezer:
    """The freezer of one cgroup (v1 or v2, detected from the files in `cgroup_path`).

    `freeze()` and `thaw()` return once the kernel reports the new state. `close()` (and
    leaving a `with` block) thaws the cgroup if this object froze it.
    """

    def __init__(self, cgroup_path: PathLike) -> None:
        """Open the freezer of `cgroup_path`; raise FreezerError if it is not a cgroup."""
        if not isinstance(cgroup_path, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"cgroup_path must be a str or path, not {type(cgroup_path).__name__}"
            )
        path = os.path.abspath(os.fspath(cgroup_path))
        if not isinstance(path, str):
            raise InvalidArgumentError("cgroup_path must be a text path, not bytes")
        if not os.path.isdir(path):
            raise FreezerError(
                f"{path}: no such cgroup directory", path=path, hint=_NOT_A_CGROUP_HINT
            )
        if os.path.exists(os.path.join(path, "cgroup.freeze")):
            version = 2
        elif os.path.exists(os.path.join(path, "freezer.state")):
            version = 1
        elif os.path.exists(os.path.join(path, "cgroup.procs")):
            raise FreezerError(
                f"{path}: this cgroup has no freezer (a root cgroup, or a v1 hierarchy "
                "without the freezer controller)",
                path=path,
                hint=_NOT_A_CGROUP_HINT,
            )
        else:
            raise FreezerError(
                f"{path}: not a cgroup directory", path=path, hint=_NOT_A_CGROUP_HINT
            )
        self._path = path
        self._cpath = path.encode()
        self._version = version
        self._froze = False
        # one C call at a time: the handle and the elapsed buffer are shared, and close()
        # must not free the handle under a call that released the GIL
        self._lock = threading.RLock()
        self._handle: Any = None
        self._elapsed = ffi.new("int64_t *")  # allocated once: freeze() is on the hot path
        self._handle = self._open()  # fail here, not at the first freeze, on a bad cgroup

    @property
    def path(self) -> str:
        """The cgroup directory."""
        return self._path

    @property
    def version(self) -> int:
        """The cgroup hierarchy version: 1 (freezer.state) or 2 (cgroup.freeze)."""
        return self._version

    @property
    def state(self) -> FreezerState:
        """The state the kernel reports now (on v1, reading it also completes a freeze)."""
        out = ffi.new("int *")
        with self._lock:
            self._call(lib.pycpt_freezer_state(self._live(), out), "read the state")
        return FreezerState(out[0])

    @property
    def requested(self) -> bool:
        """True when a freeze was asked for (by anyone), whether or not it completed."""
        was = ffi.new("int *")
        with self._lock:
            self._call(lib.pycpt_freezer_requested(self._live(), was), "read the request")
        return bool(was[0])

    def freeze(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> float:
        """Freeze every task and wait until the kernel says frozen; return the seconds taken.

        On timeout the cgroup is thawed again (unless it was already freezing before) and
        FreezeTimeoutError is raised. `timeout=None` waits without limit.
        """
        with self._lock:
            was = self.requested
            seconds = self._change(lib.pycpt_freezer_freeze, "freeze", timeout)
            # close() undoes only our own freeze: one asked for before us (a staged
            # suspend, say) stays
            self._froze = self._froze or not was
        return seconds

    def thaw(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> float:
        """Thaw the cgroup and wait until the kernel says thawed; return the seconds taken."""
        with self._lock:
            seconds = self._change(lib.pycpt_freezer_thaw, "thaw", timeout)
            self._froze = False
        return seconds

    def kill(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> float:
        """SIGKILL every task and wait until the cgroup is empty; return the seconds taken.

        v2 uses cgroup.kill. v1 freezes first so that no task can fork away, kills every pid,
        then thaws so that the kills land. The freeze setting is left as it was.
        """
        with self._lock:
            return self._change(lib.pycpt_freezer_kill, "kill", timeout)

    def pids(self) -> List[int]:
        """The processes (thread-group ids) in the cgroup, from cgroup.procs."""
        return self._read_ids("cgroup.procs")

    def tasks(self) -> List[int]:
        """The threads in the cgroup (v1 tasks, v2 cgroup.threads)."""
        return self._read_ids("tasks" if self._version == 1 else "cgroup.threads")

    def close(self) -> None:
        """Thaw the cgroup if this object froze it and close its files; again: does nothing.

        The object stays usable: a later call opens the cgroup's files again.
        """
        with self._lock:
            try:
                if self._froze:
                    self.thaw()
            finally:
                if self._handle is not None:
                    ffi.release(self._handle)  # runs pycpt_freezer_close now
                    self._handle = None

    def __enter__(self) -> "Freezer":
        """Freeze (default timeout) and return self."""
        self.freeze()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: object,
    ) -> None:
        """close(): thaw if frozen by us, also when the block raised."""
        self.close()

    def __repr__(self) -> str:
        return f"Freezer({self._path!r}, version={self._version})"

    # --- helpers -------------------------------------------------------------------------

    def _open(self) -> Any:
        out = ffi.new("pycpt_freezer_t **")
        self._call(lib.pycpt_freezer_open(self._cpath, self._version, out), "open")
        return ffi.gc(out[0], lib.pycpt_freezer_close)

    def _live(self) -> Any:
        if self._handle is None:
            self._handle = self._open()
        return self._handle

    def _change(self, fn: Any, operation: str, timeout: Optional[float]) -> float:
        ms = _timeout_ms(timeout)
        elapsed = self._elapsed
        ret = fn(self._live(), ms, elapsed)
        try:
            check(ret, f"{operation} {self._path}")
        except TimeoutError:  # -ETIMEDOUT: the kernel did not get there in time
            raise self._timed_out(operation, timeout) from None
        except OSError as exc:
            raise self._failure(exc, operation) from exc
        return elapsed[0] / 1e9

    def _timed_out(self, operation: str, timeout: Optional[float]) -> FreezeTimeoutError:
        try:
            state: Optional[FreezerState] = self.state
        except FreezerError:
            state = None
        return FreezeTimeoutError(
            f"{self._path}: {operation} did not complete within {timeout} s "
            f"(state now: {state.name if state is not None else 'unknown'})",
            path=self._path,
            operation=operation,
            timeout=timeout,
            state=state,
        )

    def _call(self, ret: int, what: str) -> int:
        try:
            return check(ret, f"{what} {self._path}")
        except OSError as exc:
            raise self._failure(exc, what) from exc

    def _failure(self, exc: OSError, what: str) -> FreezerError:
        hint = ""
        if isinstance(exc, PermissionError):
            hint = "the cgroup freezer needs root (or a delegated cgroup)"
        elif exc.errno in (errno.ENOENT, errno.ENODEV):
            hint = "the cgroup was removed"
        return FreezerError(
            f"{self._path}: cannot {what}: {exc.strerror}", path=self._path, hint=hint
        )

    def _read_ids(self, name: str) -> List[int]:
        try:
            with open(os.path.join(self._path, name), "rb") as f:
                return [int(line) for line in f.read().split()]
        except OSError as exc:
            raise FreezerError(
                f"{self._path}: cannot read {name}: {exc.strerror}", path=self._path
            ) from exc
