"""pycpt: checkpoint, restore and live-migrate Linux process trees and containers.

A Python face for the OpenVZ workflow (`vzctl chkpnt`, `vzctl restore`, `vzmigrate`) on
today's Linux, driving CRIU over its RPC protocol and the cgroup freezer from a small C layer.

The names below are loaded on first use (PEP 562), so that `import pycpt` and the `pycpt`
command stay light: `pycpt.Criu` imports pycpt.criu, `pycpt.check` pycpt.doctor, and so on.
Nothing inside pycpt imports this module.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from pycpt._version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["Criu", "CriuVersion", "DumpResult", "PageServer", "RestoreResult"],
                    "pycpt.criu"),
    **dict.fromkeys(["Engine", "find_engine", "install_engine"], "pycpt.engine"),
    **dict.fromkeys(["Container", "ContainerStatus"], "pycpt.container"),
    **dict.fromkeys(["Freezer", "FreezerState"], "pycpt.freezer"),
    **dict.fromkeys(["Notify", "NotifyEvent"], "pycpt.notify"),
    **dict.fromkeys(["CgroupMode", "NetworkLock", "RequestType"], "pycpt._criu.rpc_schema"),
    "check": "pycpt.doctor",
    **dict.fromkeys([
        "ChannelClosed", "ContainerBusyError", "ContainerError", "ContainerNotFoundError",
        "ContainerStateError", "CriuBrokenError", "CriuConnectionError", "CriuError",
        "CriuNotFoundError", "CriuTooOldError", "DumpFileCorruptError", "DumpFileError",
        "DumpFileForeignError", "DumpFileNotFoundError", "DumpFileTooNewError", "EngineError",
        "FreezeTimeoutError", "FreezerError", "HostUnreachableError", "ImagesDirError",
        "InetSocketError", "MigrationError", "MigrationInDoubtError", "NetworkLockError",
        "PidInUseError", "PipeSizeError", "PrivilegeError", "ProcessNotFoundError",
        "PycptError", "SessionLeaderError", "SoftDirtyUnsupportedError", "SshAuthError",
        "TargetContainerExistsError", "TargetIncompatibleError",
    ], "pycpt.errors"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pycpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next look-up does not come here
    return value


def __dir__() -> list:
    return sorted([*globals(), *__all__])


if _TYPE_CHECKING:  # what type checkers see; at run time __getattr__ provides these
    from pycpt._criu.rpc_schema import CgroupMode as CgroupMode, NetworkLock as NetworkLock, RequestType as RequestType
    from pycpt.container import Container as Container, ContainerStatus as ContainerStatus
    from pycpt.criu import Criu as Criu, CriuVersion as CriuVersion, DumpResult as DumpResult, PageServer as PageServer, RestoreResult as RestoreResult
    from pycpt.doctor import check as check
    from pycpt.engine import Engine as Engine, find_engine as find_engine, install_engine as install_engine
    from pycpt.errors import (
        ChannelClosed as ChannelClosed,
        ContainerBusyError as ContainerBusyError,
        ContainerError as ContainerError,
        ContainerNotFoundError as ContainerNotFoundError,
        ContainerStateError as ContainerStateError,
        CriuBrokenError as CriuBrokenError,
        CriuConnectionError as CriuConnectionError,
        CriuError as CriuError,
        CriuNotFoundError as CriuNotFoundError,
        CriuTooOldError as CriuTooOldError,
        DumpFileCorruptError as DumpFileCorruptError,
        DumpFileError as DumpFileError,
        DumpFileForeignError as DumpFileForeignError,
        DumpFileNotFoundError as DumpFileNotFoundError,
        DumpFileTooNewError as DumpFileTooNewError,
        EngineError as EngineError,
        FreezeTimeoutError as FreezeTimeoutError,
        FreezerError as FreezerError,
        HostUnreachableError as HostUnreachableError,
        ImagesDirError as ImagesDirError,
        InetSocketError as InetSocketError,
        MigrationError as MigrationError,
        MigrationInDoubtError as MigrationInDoubtError,
        NetworkLockError as NetworkLockError,
        PidInUseError as PidInUseError,
        PipeSizeError as PipeSizeError,
        PrivilegeError as PrivilegeError,
        ProcessNotFoundError as ProcessNotFoundError,
        PycptError as PycptError,
        SessionLeaderError as SessionLeaderError,
        SoftDirtyUnsupportedError as SoftDirtyUnsupportedError,
        SshAuthError as SshAuthError,
        TargetContainerExistsError as TargetContainerExistsError,
        TargetIncompatibleError as TargetIncompatibleError,
    )
    from pycpt.freezer import Freezer as Freezer, FreezerState as FreezerState
    from pycpt.notify import Notify as Notify, NotifyEvent as NotifyEvent
