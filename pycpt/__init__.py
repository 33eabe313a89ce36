"""pycpt: checkpoint, restore and live-migrate Linux process trees and containers.

A Python face for the OpenVZ workflow (`vzctl chkpnt`, `vzctl restore`, `vzmigrate`) on
today's Linux, driving CRIU over its RPC protocol and the cgroup freezer from a small C layer.

The names below are loaded on first use (PEP 562), so that `import pycpt` and the `pycpt`
command stay light: `pycpt.Criu` imports pycpt.criu, `pycpt.check` pycpt.doctor, and so on.
Nothing inside pycpt imports this module.
"""

from pycpt._version import __version__ as __version__

# typing.TYPE_CHECKING without importing typing (type checkers go by the name); deleted below
TYPE_CHECKING = False

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        ["Criu", "CriuVersion", "DumpResult", "PageServer", "RestoreResult"], "pycpt.criu"
    ),
    **dict.fromkeys(["Engine", "find_engine", "install_engine"], "pycpt.engine"),
    **dict.fromkeys(["Container", "ContainerStatus", "list_containers"], "pycpt.container"),
    "NetSpec": "pycpt.network",
    **dict.fromkeys(["Freezer", "FreezerState"], "pycpt.freezer"),
    **dict.fromkeys(["Notify", "NotifyEvent"], "pycpt.notify"),
    **dict.fromkeys(["CgroupMode", "NetworkLock", "RequestType"], "pycpt._criu.rpc_schema"),
    "check": "pycpt.doctor",
    **dict.fromkeys(
        [
            "AddressInUseError",
            "BridgeError",
            "ChannelClosed",
            "ContainerBusyError",
            "ContainerError",
            "ContainerNotFoundError",
            "ContainerStateError",
            "CriuBrokenError",
            "CriuConnectionError",
            "CriuError",
            "CriuNotFoundError",
            "CriuOptionError",
            "CriuTooOldError",
            "DumpFileCorruptError",
            "DumpFileError",
            "DumpFileForeignError",
            "DumpFileLocationError",
            "DumpFileNotFoundError",
            "DumpFileTooNewError",
            "DumpFileUntrustedError",
            "DumpFileUnsignedError",
            "DumpFileRefusedError",
            "ConfigSchemaError",
            "HostKeyError",
            "KeyLineError",
            "EngineError",
            "FreezeTimeoutError",
            "FreezerError",
            "HostUnreachableError",
            "ImageError",
            "ImagesDirError",
            "InetSocketError",
            "InvalidArgumentError",
            "MigrationError",
            "MigrationInDoubtError",
            "MigrationProtocolError",
            "NetSpecError",
            "NetworkHoldError",
            "NetworkLockError",
            "NicError",
            "NoSpaceError",
            "PageChannelError",
            "PageChannelRefusedError",
            "PeerSilentError",
            "PidInUseError",
            "PipeSizeError",
            "PrivilegeError",
            "ProcessNotFoundError",
            "PycptError",
            "SessionLeaderError",
            "SoftDirtyUnsupportedError",
            "SshAuthError",
            "StateDirError",
            "StateTamperedError",
            "TargetContainerExistsError",
            "TargetIncompatibleError",
        ],
        "pycpt.errors",
    ),
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
    # the API only: not the submodules Python adds as attributes once they are imported
    return sorted([*(n for n in globals() if n.startswith("__")), *__all__])


if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ provides these
    from pycpt._criu.rpc_schema import CgroupMode as CgroupMode
    from pycpt._criu.rpc_schema import NetworkLock as NetworkLock
    from pycpt._criu.rpc_schema import RequestType as RequestType
    from pycpt.container import Container as Container
    from pycpt.container import ContainerStatus as ContainerStatus
    from pycpt.container import list_containers as list_containers
    from pycpt.criu import Criu as Criu
    from pycpt.criu import CriuVersion as CriuVersion
    from pycpt.criu import DumpResult as DumpResult
    from pycpt.criu import PageServer as PageServer
    from pycpt.criu import RestoreResult as RestoreResult
    from pycpt.doctor import check as check
    from pycpt.engine import Engine as Engine
    from pycpt.engine import find_engine as find_engine
    from pycpt.engine import install_engine as install_engine
    from pycpt.errors import (
        AddressInUseError as AddressInUseError,
    )
    from pycpt.errors import (
        BridgeError as BridgeError,
    )
    from pycpt.errors import (
        ChannelClosed as ChannelClosed,
    )
    from pycpt.errors import (
        ConfigSchemaError as ConfigSchemaError,
    )
    from pycpt.errors import (
        ContainerBusyError as ContainerBusyError,
    )
    from pycpt.errors import (
        ContainerError as ContainerError,
    )
    from pycpt.errors import (
        ContainerNotFoundError as ContainerNotFoundError,
    )
    from pycpt.errors import (
        ContainerStateError as ContainerStateError,
    )
    from pycpt.errors import (
        CriuBrokenError as CriuBrokenError,
    )
    from pycpt.errors import (
        CriuConnectionError as CriuConnectionError,
    )
    from pycpt.errors import (
        CriuError as CriuError,
    )
    from pycpt.errors import (
        CriuNotFoundError as CriuNotFoundError,
    )
    from pycpt.errors import (
        CriuOptionError as CriuOptionError,
    )
    from pycpt.errors import (
        CriuTooOldError as CriuTooOldError,
    )
    from pycpt.errors import (
        DumpFileCorruptError as DumpFileCorruptError,
    )
    from pycpt.errors import (
        DumpFileError as DumpFileError,
    )
    from pycpt.errors import (
        DumpFileForeignError as DumpFileForeignError,
    )
    from pycpt.errors import (
        DumpFileLocationError as DumpFileLocationError,
    )
    from pycpt.errors import (
        DumpFileNotFoundError as DumpFileNotFoundError,
    )
    from pycpt.errors import (
        DumpFileRefusedError as DumpFileRefusedError,
    )
    from pycpt.errors import (
        DumpFileTooNewError as DumpFileTooNewError,
    )
    from pycpt.errors import (
        DumpFileUnsignedError as DumpFileUnsignedError,
    )
    from pycpt.errors import (
        DumpFileUntrustedError as DumpFileUntrustedError,
    )
    from pycpt.errors import (
        EngineError as EngineError,
    )
    from pycpt.errors import (
        FreezerError as FreezerError,
    )
    from pycpt.errors import (
        FreezeTimeoutError as FreezeTimeoutError,
    )
    from pycpt.errors import (
        HostKeyError as HostKeyError,
    )
    from pycpt.errors import (
        HostUnreachableError as HostUnreachableError,
    )
    from pycpt.errors import (
        ImageError as ImageError,
    )
    from pycpt.errors import (
        ImagesDirError as ImagesDirError,
    )
    from pycpt.errors import (
        InetSocketError as InetSocketError,
    )
    from pycpt.errors import (
        InvalidArgumentError as InvalidArgumentError,
    )
    from pycpt.errors import (
        KeyLineError as KeyLineError,
    )
    from pycpt.errors import (
        MigrationError as MigrationError,
    )
    from pycpt.errors import (
        MigrationInDoubtError as MigrationInDoubtError,
    )
    from pycpt.errors import (
        MigrationProtocolError as MigrationProtocolError,
    )
    from pycpt.errors import (
        NetSpecError as NetSpecError,
    )
    from pycpt.errors import (
        NetworkHoldError as NetworkHoldError,
    )
    from pycpt.errors import (
        NetworkLockError as NetworkLockError,
    )
    from pycpt.errors import (
        NicError as NicError,
    )
    from pycpt.errors import (
        NoSpaceError as NoSpaceError,
    )
    from pycpt.errors import (
        PageChannelError as PageChannelError,
    )
    from pycpt.errors import (
        PageChannelRefusedError as PageChannelRefusedError,
    )
    from pycpt.errors import (
        PeerSilentError as PeerSilentError,
    )
    from pycpt.errors import (
        PidInUseError as PidInUseError,
    )
    from pycpt.errors import (
        PipeSizeError as PipeSizeError,
    )
    from pycpt.errors import (
        PrivilegeError as PrivilegeError,
    )
    from pycpt.errors import (
        ProcessNotFoundError as ProcessNotFoundError,
    )
    from pycpt.errors import (
        PycptError as PycptError,
    )
    from pycpt.errors import (
        SessionLeaderError as SessionLeaderError,
    )
    from pycpt.errors import (
        SoftDirtyUnsupportedError as SoftDirtyUnsupportedError,
    )
    from pycpt.errors import (
        SshAuthError as SshAuthError,
    )
    from pycpt.errors import (
        StateDirError as StateDirError,
    )
    from pycpt.errors import (
        StateTamperedError as StateTamperedError,
    )
    from pycpt.errors import (
        TargetContainerExistsError as TargetContainerExistsError,
    )
    from pycpt.errors import (
        TargetIncompatibleError as TargetIncompatibleError,
    )
    from pycpt.freezer import Freezer as Freezer
    from pycpt.freezer import FreezerState as FreezerState
    from pycpt.network import NetSpec as NetSpec
    from pycpt.notify import Notify as Notify
    from pycpt.notify import NotifyEvent as NotifyEvent

del TYPE_CHECKING
