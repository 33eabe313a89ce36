"""Pure logic: reading CRIU's log lines, naming known failures, building RPC options."""

from __future__ import annotations

import pytest

from pycpt import errors
from pycpt._criu import log as criu_log
from pycpt._criu import rpc_schema
from pycpt._criu.options import OPTION_NAMES, build_options

RLIMIT = (
    "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: "
    "Operation not permitted"
)


@pytest.mark.parametrize(
    "line, cls",
    [
        ("Error (criu/cr-restore.c:1237): Can't fork for 21746: File exists", errors.PidInUseError),
        (
            "Error (criu/sockets.c:200): sockets: Can't get 1:16 opt: Operation not supported",
            errors.InetSocketError,
        ),
        (
            "Error (criu/page-pipe.c:80): page-pipe: splice: -1: Bad file descriptor",
            errors.PipeSizeError,
        ),
        (
            "Error (criu/net.c:3000): Can't lock network: iptables-restore failed",
            errors.NetworkLockError,
        ),
        (
            "Error (criu/cr-dump.c:1): A session leader of 12(13) is outside of its pid namespace",
            errors.SessionLeaderError,
        ),
        ("mem.c: BUG at criu/mem.c:45", errors.SoftDirtyUnsupportedError),
        ("Error (criu/files.c:1): Can't open something", errors.CriuError),
    ],
)
def test_known_failures_get_their_class(line, cls):
    assert criu_log.classify([line]) is cls


def test_the_rlimit_line_is_never_an_error(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text(
        f"(00.000) Version: 4.2.1\n{RLIMIT}\n(00.2) Error (criu/cr-dump.c:2): Dumping FAILED.\n"
    )
    assert criu_log.is_harmless(RLIMIT)
    assert criu_log.error_lines(log) == ["(00.2) Error (criu/cr-dump.c:2): Dumping FAILED."]
    assert criu_log.error_lines(tmp_path / "missing.log") == []


def test_options_map_names_enums_lists_and_messages():
    opts = build_options(
        {
            "leave_running": True,
            "network_lock": "nftables",
            "manage_cgroups_mode": "none",
            "external": ["mnt[/a]:b"],
            "inherit_fd": [("pipe:[123]", 5)],
            "ps": {"address": "127.0.0.1", "port": 1234},
            "ext_mnt": {"/x": "y"},
            "ghost_limit": 1 << 22,
            "root": "/",
        }
    )
    assert opts.leave_running and opts.network_lock == rpc_schema.NetworkLock.NFTABLES
    assert opts.manage_cgroups_mode == rpc_schema.CgroupMode.CG_NONE
    assert list(opts.external) == ["mnt[/a]:b"]
    assert (opts.inherit_fd[0].key, opts.inherit_fd[0].fd) == ("pipe:[123]", 5)
    assert (opts.ps.address, opts.ps.port) == ("127.0.0.1", 1234)
    assert (opts.ext_mnt[0].key, opts.ext_mnt[0].val) == ("/x", "y")
    assert opts.images_dir_fd == -1
    decoded = rpc_schema.Options()
    decoded.ParseFromString(opts.SerializeToString())
    assert decoded == opts


@pytest.mark.parametrize(
    "values, message",
    [
        ({"leave_runing": True}, "unknown CRIU option 'leave_runing'"),
        ({"images_dir_fd": 3}, "unknown CRIU option"),
        ({"leave_running": 1}, "takes True or False"),
        ({"ghost_limit": -1}, "non-negative"),
        ({"network_lock": "pf"}, "takes one of iptables, nftables, skip"),
        ({"external": "one-string"}, "takes a list"),
        ({"ps": {"adress": "x"}}, "has no field 'adress'"),
        ({"root": 5}, "takes a string"),
    ],
)
def test_bad_options_are_value_errors(values, message):
    with pytest.raises(ValueError, match=message):
        build_options(values)


def test_every_rpc_option_is_offered():
    assert "tcp_established" in OPTION_NAMES and "lazy_pages" in OPTION_NAMES
    assert "images_dir_fd" not in OPTION_NAMES and "pid" not in OPTION_NAMES
