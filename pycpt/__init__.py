"""pycpt: checkpoint, restore and live-migrate Linux process trees and containers.

A Python face for the OpenVZ workflow (`vzctl chkpnt`, `vzctl restore`, `vzmigrate`) on
today's Linux, driving CRIU over its RPC protocol and the cgroup freezer from a small C layer.
"""

from typing import TYPE_CHECKING, Optional

from pycpt.criu import Criu, CriuVersion, DumpResult, PageServer, RestoreResult
from pycpt.engine import Engine, find_engine, install_engine
from pycpt.errors import (
    ContainerBusyError,
    ContainerError,
    ContainerNotFoundError,
    ContainerStateError,
    CriuBrokenError,
    CriuConnectionError,
    CriuError,
    CriuNotFoundError,
    CriuTooOldError,
    DumpFileCorruptError,
    DumpFileError,
    DumpFileForeignError,
    DumpFileNotFoundError,
    DumpFileTooNewError,
    EngineError,
    FreezeTimeoutError,
    FreezerError,
    ImagesDirError,
    InetSocketError,
    NetworkLockError,
    PidInUseError,
    PipeSizeError,
    PrivilegeError,
    ProcessNotFoundError,
    PycptError,
    SessionLeaderError,
    SoftDirtyUnsupportedError,
)
from pycpt.container import Container
from pycpt.freezer import Freezer, FreezerState
from pycpt.notify import Notify, NotifyEvent
from pycpt._criu.rpc_schema import CgroupMode, NetworkLock, RequestType

if TYPE_CHECKING:
    from pycpt.doctor import Report

__version__ = "0.1.0"

__all__ = [
    "CgroupMode", "Container", "ContainerBusyError", "ContainerError", "ContainerNotFoundError",
    "ContainerStateError", "Criu", "CriuBrokenError", "CriuConnectionError", "CriuError",
    "CriuNotFoundError", "CriuTooOldError", "CriuVersion", "DumpFileCorruptError",
    "DumpFileError", "DumpFileForeignError", "DumpFileNotFoundError", "DumpFileTooNewError",
    "DumpResult", "Engine", "EngineError", "FreezeTimeoutError", "Freezer", "FreezerError",
    "FreezerState", "ImagesDirError", "InetSocketError", "NetworkLock", "NetworkLockError",
    "Notify", "NotifyEvent", "PageServer", "PidInUseError", "PipeSizeError", "PrivilegeError",
    "ProcessNotFoundError", "PycptError", "RequestType", "RestoreResult", "SessionLeaderError",
    "SoftDirtyUnsupportedError", "check", "find_engine", "install_engine",
]


def check(*, engine: Optional[Engine] = None) -> "Report":
    """Can checkpointing work here? The doctor report (pycpt.doctor.run_checks)."""
    from pycpt.doctor import run_checks

    return run_checks(engine=engine)
