"""A container's network hold: the nf_tables table `inet pycpt-hold` in its network namespace
(csrc/nethold.c).

Made dormant by the container's init at start (its hooks are not registered: it costs
nothing while the container runs); `on` while the container is suspended, dumped or being
restored, `off` (dormant again) once it runs. Two base chains, input and output, drop every
packet but CRIU's repair packets (mark 0xc114, as CRIU's own network lock), so peers see no
FIN or RST from a frozen or killed container, while the links, addresses and routes CRIU
records stay exactly as the container had them.

    job = HoldJob(pid, ON)   # on a C thread: the caller freezes the cgroup meanwhile
    job.join()
    hold(pid, OFF)
"""

from __future__ import annotations

import enum
import errno as _errno
from typing import Any, Optional

from pycpt import errors
from pycpt._native import ffi, lib, os_error

TABLE = "pycpt-hold"  # `nft delete table inet pycpt-hold` ends a hold by hand


class HoldOp(enum.IntEnum):
    """What to do with the hold."""

    MAKE = lib.PYCPT_NETHOLD_MAKE  # create it dormant (the container's init does this)
    ON = lib.PYCPT_NETHOLD_ON  # wake it; made active if missing
    OFF = lib.PYCPT_NETHOLD_OFF  # dormant again; a missing table is fine
    DELETE = lib.PYCPT_NETHOLD_DELETE  # remove it; a missing table is fine


_DOING = {
    HoldOp.MAKE: "make",
    HoldOp.ON: "switch on",
    HoldOp.OFF: "switch off",
    HoldOp.DELETE: "remove",
}


# what a kernel without nf_tables (or without its inet family) answers
_NO_NFTABLES = (_errno.EPROTONOSUPPORT, _errno.EAFNOSUPPORT, _errno.EOPNOTSUPP)


def _error(pid: int, op: HoldOp, ret: int) -> errors.NetworkHoldError:
    cause = os_error(ret)
    hint = ""
    if -ret in _NO_NFTABLES:
        hint = "this kernel seems to lack nf_tables (CONFIG_NF_TABLES_INET); `pycpt check`"
    error = errors.NetworkHoldError(
        f"cannot {_DOING[op]} the network hold of pid {pid}: {cause.strerror}",
        pid=pid,
        errno=-ret,
        hint=hint,
    )
    error.__cause__ = cause
    return error


class HoldJob:
    """`op` on the hold of pid's network namespace, running on a C thread from the moment
    the object is made; join() waits (once) and raises NetworkHoldError on failure."""

    def __init__(self, pid: int, op: HoldOp) -> None:
        self.pid, self.op = pid, op
        out = ffi.new("pycpt_nethold_t **")
        ret = lib.pycpt_nethold_start(pid, int(op), out)
        if ret < 0:
            raise _error(pid, op, ret)
        self._job: Any = out[0]

    def join(self) -> bool:
        """Wait for the thread. Returns True when ON had to make the table (there was none)
        or OFF/DELETE found none."""
        job, self._job = self._job, None
        if job is None:
            raise RuntimeError("HoldJob.join() called twice")
        ret = lib.pycpt_nethold_join(job)
        if ret < 0:
            raise _error(self.pid, self.op, ret)
        return ret == 1


def hold(pid: int, op: HoldOp) -> bool:
    """`op` on the hold of pid's network namespace, waiting for it (see HoldJob.join)."""
    return HoldJob(pid, op).join()


def held(pid: int) -> Optional[bool]:
    """Whether pid's network namespace is held now: True (on), False (dormant), None (no
    hold table there)."""
    out = ffi.new("pycpt_nethold_t **")
    ret = lib.pycpt_nethold_start(pid, lib.PYCPT_NETHOLD_QUERY, out)
    if ret >= 0:
        ret = lib.pycpt_nethold_join(out[0])
    if ret == -_errno.ENOENT:
        return None
    if ret < 0:
        raise errors.NetworkHoldError(
            f"cannot read the network hold of pid {pid}: {os_error(ret).strerror}",
            pid=pid,
            errno=-ret,
        )
    return ret == 1


def probe() -> int:
    """0 when the hold works on this kernel (tried in a network namespace of its own, which
    goes with the probe), else -errno of the step that failed."""
    return int(lib.pycpt_nethold_probe())
