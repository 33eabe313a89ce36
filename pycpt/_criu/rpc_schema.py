"""CRIU's RPC messages, declared as data and compiled by the protobuf runtime.

The wire format is CRIU's (criu/images/rpc.proto, proto2): field numbers, types and enum
values below follow it; the message names are ours. Declaring the schema here keeps the
build free of protoc while the protobuf library does all encoding and decoding.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Dict, List, Tuple, Type

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from pycpt._typing import NamedIntEnum

_F = descriptor_pb2.FieldDescriptorProto
OPT, REQ, REP = _F.LABEL_OPTIONAL, _F.LABEL_REQUIRED, _F.LABEL_REPEATED
_SCALARS = {
    "int32": _F.TYPE_INT32,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
}


class RequestType(NamedIntEnum):
    """The requests CRIU serves over RPC."""

    EMPTY = 0
    DUMP = 1
    RESTORE = 2
    CHECK = 3
    PRE_DUMP = 4
    PAGE_SERVER = 5
    NOTIFY = 6
    CPUINFO_DUMP = 7
    CPUINFO_CHECK = 8
    FEATURE_CHECK = 9
    VERSION = 10
    WAIT_PID = 11
    PAGE_SERVER_CHLD = 12
    SINGLE_PRE_DUMP = 13


class CgroupMode(NamedIntEnum):
    """How CRIU handles the tree's cgroups (manage_cgroups_mode)."""

    IGNORE = 0
    CG_NONE = 1
    PROPS = 2
    SOFT = 3
    FULL = 4
    STRICT = 5
    DEFAULT = 6


class NetworkLock(NamedIntEnum):
    """How CRIU locks the network while it works (network_lock)."""

    IPTABLES = 1
    NFTABLES = 2
    SKIP = 3


class PreDumpMode(NamedIntEnum):
    """How pre-dump reads memory (pre_dump_mode)."""

    SPLICE = 1
    VM_READ = 2


class FileValidation(NamedIntEnum):
    """How restore checks that files are the dumped ones (file_validation_method)."""

    FILE_SIZE = 1
    BUILD_ID = 2


ENUMS: Dict[str, Type[IntEnum]] = {
    e.__name__: e for e in (RequestType, CgroupMode, NetworkLock, PreDumpMode, FileValidation)
}

# message name -> [(field, number, label, type, default)]; a type naming another message
# or enum refers to it, "" default means none.
MESSAGES: Dict[str, List[Tuple[str, int, int, str, str]]] = {
    "PageServerInfo": [
        ("address", 1, OPT, "string", ""),
        ("port", 2, OPT, "int32", ""),
        ("pid", 3, OPT, "int32", ""),
        ("fd", 4, OPT, "int32", ""),
    ],
    "VethPair": [("if_in", 1, REQ, "string", ""), ("if_out", 2, REQ, "string", "")],
    "ExtMount": [("key", 1, REQ, "string", ""), ("val", 2, REQ, "string", "")],
    "JoinNamespace": [
        ("ns", 1, REQ, "string", ""),
        ("ns_file", 2, REQ, "string", ""),
        ("extra_opt", 3, OPT, "string", ""),
    ],
    "InheritFd": [("key", 1, REQ, "string", ""), ("fd", 2, REQ, "int32", "")],
    "CgroupRoot": [("ctrl", 1, OPT, "string", ""), ("path", 2, REQ, "string", "")],
    "UnixSocket": [("inode", 1, REQ, "uint32", "")],
    "Options": [
        ("images_dir_fd", 1, REQ, "int32", "-1"),
        ("pid", 2, OPT, "int32", ""),
        ("leave_running", 3, OPT, "bool", ""),
        ("ext_unix_sk", 4, OPT, "bool", ""),
        ("tcp_established", 5, OPT, "bool", ""),
        ("evasive_devices", 6, OPT, "bool", ""),
        ("shell_job", 7, OPT, "bool", ""),
        ("file_locks", 8, OPT, "bool", ""),
        ("log_level", 9, OPT, "int32", "2"),
        ("log_file", 10, OPT, "string", ""),
        ("ps", 11, OPT, "PageServerInfo", ""),
        ("notify_scripts", 12, OPT, "bool", ""),
        ("root", 13, OPT, "string", ""),
        ("parent_img", 14, OPT, "string", ""),
        ("track_mem", 15, OPT, "bool", ""),
        ("auto_dedup", 16, OPT, "bool", ""),
        ("work_dir_fd", 17, OPT, "int32", ""),
        ("link_remap", 18, OPT, "bool", ""),
        ("veths", 19, REP, "VethPair", ""),
        ("cpu_cap", 20, OPT, "uint32", "4294967295"),
        ("force_irmap", 21, OPT, "bool", ""),
        ("exec_cmd", 22, REP, "string", ""),
        ("ext_mnt", 23, REP, "ExtMount", ""),
        ("manage_cgroups", 24, OPT, "bool", ""),
        ("cg_root", 25, REP, "CgroupRoot", ""),
        ("rst_sibling", 26, OPT, "bool", ""),
        ("inherit_fd", 27, REP, "InheritFd", ""),
        ("auto_ext_mnt", 28, OPT, "bool", ""),
        ("ext_sharing", 29, OPT, "bool", ""),
        ("ext_masters", 30, OPT, "bool", ""),
        ("skip_mnt", 31, REP, "string", ""),
        ("enable_fs", 32, REP, "string", ""),
        ("unix_sk_ino", 33, REP, "UnixSocket", ""),
        ("manage_cgroups_mode", 34, OPT, "CgroupMode", ""),
        ("ghost_limit", 35, OPT, "uint32", "1048576"),
        ("irmap_scan_paths", 36, REP, "string", ""),
        ("external", 37, REP, "string", ""),
        ("empty_ns", 38, OPT, "uint32", ""),
        ("join_ns", 39, REP, "JoinNamespace", ""),
        ("cgroup_props", 41, OPT, "string", ""),
        ("cgroup_props_file", 42, OPT, "string", ""),
        ("cgroup_dump_controller", 43, REP, "string", ""),
        ("freeze_cgroup", 44, OPT, "string", ""),
        ("timeout", 45, OPT, "uint32", ""),
        ("tcp_skip_in_flight", 46, OPT, "bool", ""),
        ("weak_sysctls", 47, OPT, "bool", ""),
        ("lazy_pages", 48, OPT, "bool", ""),
        ("status_fd", 49, OPT, "int32", ""),
        ("orphan_pts_master", 50, OPT, "bool", ""),
        ("config_file", 51, OPT, "string", ""),
        ("tcp_close", 52, OPT, "bool", ""),
        ("lsm_profile", 53, OPT, "string", ""),
        ("tls_cacert", 54, OPT, "string", ""),
        ("tls_cacrl", 55, OPT, "string", ""),
        ("tls_cert", 56, OPT, "string", ""),
        ("tls_key", 57, OPT, "string", ""),
        ("tls", 58, OPT, "bool", ""),
        ("tls_no_cn_verify", 59, OPT, "bool", ""),
        ("cgroup_yard", 60, OPT, "string", ""),
        ("pre_dump_mode", 61, OPT, "PreDumpMode", "SPLICE"),
        ("pidfd_store_sk", 62, OPT, "int32", ""),
        ("lsm_mount_context", 63, OPT, "string", ""),
        ("network_lock", 64, OPT, "NetworkLock", "IPTABLES"),
        ("mntns_compat_mode", 65, OPT, "bool", ""),
        ("skip_file_rwx_check", 66, OPT, "bool", ""),
        ("unprivileged", 67, OPT, "bool", ""),
        ("images_dir", 68, OPT, "string", ""),
        ("leave_stopped", 69, OPT, "bool", ""),
        ("display_stats", 70, OPT, "bool", ""),
        ("log_to_stderr", 71, OPT, "bool", ""),
        ("allow_uprobes", 72, OPT, "bool", ""),
        ("ghost_fiemap", 73, OPT, "bool", ""),
        ("file_validation_method", 74, OPT, "FileValidation", "BUILD_ID"),
    ],
    "DumpReply": [("restored", 1, OPT, "bool", "")],
    "RestoreReply": [("pid", 1, REQ, "int32", "")],
    "Notification": [("script", 1, OPT, "string", ""), ("pid", 2, OPT, "int32", "")],
    "Features": [
        ("mem_track", 1, OPT, "bool", ""),
        ("lazy_pages", 2, OPT, "bool", ""),
        ("pidfd_store", 3, OPT, "bool", ""),
    ],
    "Request": [
        ("type", 1, REQ, "RequestType", ""),
        ("opts", 2, OPT, "Options", ""),
        ("notify_success", 3, OPT, "bool", ""),
        ("keep_open", 4, OPT, "bool", ""),
        ("features", 5, OPT, "Features", ""),
        ("pid", 6, OPT, "uint32", ""),
    ],
    "Response": [
        ("type", 1, REQ, "RequestType", ""),
        ("success", 2, REQ, "bool", ""),
        ("dump", 3, OPT, "DumpReply", ""),
        ("restore", 4, OPT, "RestoreReply", ""),
        ("notify", 5, OPT, "Notification", ""),
        ("ps", 6, OPT, "PageServerInfo", ""),
        ("cr_errno", 7, OPT, "int32", ""),
        ("features", 8, OPT, "Features", ""),
        ("cr_errmsg", 9, OPT, "string", ""),
        ("version", 10, OPT, "Version", ""),
        ("status", 11, OPT, "int32", ""),
    ],
    "Version": [
        ("major_number", 1, REQ, "int32", ""),
        ("minor_number", 2, REQ, "int32", ""),
        ("gitid", 3, OPT, "string", ""),
        ("sublevel", 4, OPT, "int32", ""),
        ("extra", 5, OPT, "int32", ""),
        ("name", 6, OPT, "string", ""),
    ],
    # CRIU's statistics images (stats-dump, stats-restore), times in microseconds; all
    # optional here so that a newer CRIU's extra or missing fields never break parsing.
    "DumpStats": [
        ("freezing_time", 1, OPT, "uint32", ""),
        ("frozen_time", 2, OPT, "uint32", ""),
        ("memdump_time", 3, OPT, "uint32", ""),
        ("memwrite_time", 4, OPT, "uint32", ""),
        ("pages_scanned", 5, OPT, "uint64", ""),
        ("pages_skipped_parent", 6, OPT, "uint64", ""),
        ("pages_written", 7, OPT, "uint64", ""),
        ("irmap_resolve", 8, OPT, "uint32", ""),
        ("pages_lazy", 9, OPT, "uint64", ""),
        ("page_pipes", 10, OPT, "uint64", ""),
        ("page_pipe_bufs", 11, OPT, "uint64", ""),
        ("shpages_scanned", 12, OPT, "uint64", ""),
        ("shpages_skipped_parent", 13, OPT, "uint64", ""),
        ("shpages_written", 14, OPT, "uint64", ""),
    ],
    "RestoreStats": [
        ("pages_compared", 1, OPT, "uint64", ""),
        ("pages_skipped_cow", 2, OPT, "uint64", ""),
        ("forking_time", 3, OPT, "uint32", ""),
        ("restore_time", 4, OPT, "uint32", ""),
        ("pages_restored", 5, OPT, "uint64", ""),
    ],
    "StatsEntry": [("dump", 1, OPT, "DumpStats", ""), ("restore", 2, OPT, "RestoreStats", "")],
    # CRIU's image streamer protocol (criu --stream, criu/img-streamer.c): the name of each
    # image CRIU sends (dump) or asks for (restore), and whether the streamer has it.
    "StreamerRequest": [("filename", 1, REQ, "string", "")],
    "StreamerReply": [("exists", 1, REQ, "bool", "")],
}

PACKAGE = "pycpt.criu_rpc"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="pycpt/criu_rpc.proto", package=PACKAGE, syntax="proto2"
    )
    for name, values in ENUMS.items():
        enum = fdp.enum_type.add(name=name)
        for member in values:
            enum.value.add(name=member.name, number=member.value)
    for name, fields in MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        for field_name, number, label, type_name, default in fields:
            field = msg.field.add(name=field_name, number=number, label=label)
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
            else:
                field.type = _F.TYPE_ENUM if type_name in ENUMS else _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{type_name}"
            if default:
                field.default_value = default
    return fdp


def _build() -> Dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in MESSAGES
    }


_CLASSES = _build()
# Message classes are made at run time; to a type checker they are Any.
Request: Any = _CLASSES["Request"]
Response: Any = _CLASSES["Response"]
Options: Any = _CLASSES["Options"]
StatsEntry: Any = _CLASSES["StatsEntry"]
StreamerRequest: Any = _CLASSES["StreamerRequest"]
StreamerReply: Any = _CLASSES["StreamerReply"]
