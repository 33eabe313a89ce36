"""pycpt's declaration of CRIU's RPC and stats messages against the one CRIU ships.

Debian's python3-pycriu package of the same CRIU version carries protoc's output for
rpc.proto and stats.proto; its serialized descriptors are read (not imported) and every
field CRIU declares must exist in ours with the same number, name, type and (for RPC) label.
Ours may have more fields than an older CRIU, never fewer.
"""

from __future__ import annotations

from typing import Dict

import pytest
from google.protobuf import descriptor_pb2

from pycpt._criu import rpc_schema
from pycpt.testing import pycriu

MESSAGES = {
    "criu_page_server_info": "PageServerInfo",
    "criu_veth_pair": "VethPair",
    "ext_mount_map": "ExtMount",
    "join_namespace": "JoinNamespace",
    "inherit_fd": "InheritFd",
    "cgroup_root": "CgroupRoot",
    "unix_sk": "UnixSocket",
    "criu_opts": "Options",
    "criu_dump_resp": "DumpReply",
    "criu_restore_resp": "RestoreReply",
    "criu_notify": "Notification",
    "criu_features": "Features",
    "criu_req": "Request",
    "criu_resp": "Response",
    "criu_version": "Version",
    "dump_stats_entry": "DumpStats",
    "restore_stats_entry": "RestoreStats",
    "stats_entry": "StatsEntry",
}
ENUMS = {
    "criu_req_type": "RequestType",
    "criu_cg_mode": "CgroupMode",
    "criu_network_lock_method": "NetworkLock",
    "criu_pre_dump_mode": "PreDumpMode",
    "criu_file_validation_method": "FileValidation",
}


@pytest.fixture(scope="module")
def criu_protos(tmp_path_factory) -> Dict[str, descriptor_pb2.FileDescriptorProto]:
    """rpc and stats descriptors from python3-pycriu, fetched like the managed engine."""
    try:
        root = pycriu.fetch(tmp_path_factory.mktemp("pycriu"))
    except pycriu.PycriuUnavailable as exc:
        pytest.skip(str(exc))
    found = {p.name: p for p in root.rglob("*_pb2.py")}
    return {
        name: pycriu.serialized_descriptor(found[f"{name}_pb2.py"]) for name in ("rpc", "stats")
    }


def _ours(name: str) -> descriptor_pb2.DescriptorProto:
    fdp = rpc_schema._file_descriptor()
    return next(m for m in fdp.message_type if m.name == name)


@pytest.mark.parametrize("proto", ["rpc", "stats"])
def test_every_criu_field_is_ours_too(criu_protos, proto):
    theirs = criu_protos[proto]
    for message in theirs.message_type:
        ours = {f.number: f for f in _ours(MESSAGES[message.name]).field}
        for field in message.field:
            mine = ours.get(field.number)
            where = f"{message.name}.{field.name} = {field.number}"
            assert mine is not None, f"{where}: missing from pycpt's schema"
            assert (mine.name, mine.type) == (field.name, field.type), where
            if proto == "rpc":  # stats fields are all optional on purpose
                assert mine.label == field.label, where
            if field.type_name:
                kind = MESSAGES if field.type == field.TYPE_MESSAGE else ENUMS
                assert mine.type_name.rsplit(".", 1)[1] == kind[field.type_name.lstrip(".")], where
        newest = max(f.number for f in message.field)
        extra = [
            f.name
            for n, f in ours.items()
            if n <= newest and n not in {f.number for f in message.field}
        ]
        assert not extra, f"{message.name}: pycpt declares fields CRIU does not: {extra}"


def test_enums_match(criu_protos):
    for enum in criu_protos["rpc"].enum_type:
        ours = rpc_schema.ENUMS[ENUMS[enum.name]]
        assert {v.name: v.number for v in enum.value}.items() <= {
            m.name: m.value for m in ours
        }.items(), enum.name
