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


# --- the line that failed, not the harmless probes (issue 12, item 5) ---------------------
# Excerpts of real CRIU 4.2.1 logs from this machine (container dumps and restores).

HARMLESS_LINES = [
    RLIMIT,
    'Error (criu/util.c:642): execvp("iptables-save", ...) failed: No such file or directory',
    "     1: Error (criu/util.c:1723): iptables-save -V failed",
    'Error (criu/util.c:642): execvp("iptables-legacy-save", ...) failed: No such file or '
    "directory",
    "     1: Error (criu/util.c:1723): iptables-legacy-save -V failed",
    'Error (criu/util.c:642): execvp("ip6tables-save", ...) failed: No such file or directory',
    "     1: Error (criu/util.c:1723): ip6tables-save -V failed",
    'Error (criu/util.c:642): execvp("ip6tables-legacy-save", ...) failed: No such file or '
    "directory",
    "     1: Error (criu/util.c:1723): ip6tables-legacy-save -V failed",
    'Error (criu/util.c:642): execvp("iptables-restore", ...) failed: No such file or directory',
    "     1: Error (criu/util.c:1723): iptables-restore -V failed",
    'Error (criu/util.c:642): execvp("iptables-legacy-restore", ...) failed: No such file or '
    "directory",
    "     1: Error (criu/util.c:1723): iptables-legacy-restore -V failed",
    'Error (criu/util.c:642): execvp("ip6tables-restore", ...) failed: No such file or directory',
    "     1: Error (criu/util.c:1723): ip6tables-restore -V failed",
    'Error (criu/util.c:642): execvp("ip6tables-legacy-restore", ...) failed: No such file or '
    "directory",
    "     1: Error (criu/util.c:1723): ip6tables-legacy-restore -V failed",
    "Error: ipv4: Address already assigned.",
    "Error: ipv6: address already assigned.",
]

# a streamed restore whose CRIU lock table was never made: harmless only as this pair
NFT_PAIR = [
    "Error: Could not process rule: No such file or directory",
    "delete table inet CRIU-74e783ab-4343-41b3-9b",
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^",
]

# `pycpt chkpnt` of a container holding /tmp/w12-x open, `rm /tmp/w12-x`, `pycpt restore`
MISSING_FILE_RESTORE = [
    RLIMIT,
    "Error: ipv4: Address already assigned.",
    "Error: ipv6: address already assigned.",
    *HARMLESS_LINES[9:17],
    "     1: Error (criu/files-reg.c:2353): Can't open file tmp/w12-x on restore: No such file "
    "or directory",
    "     1: Error (criu/files-reg.c:2267): Can't open file tmp/w12-x: No such file or directory",
    "     1: Error (criu/files.c:1221): Unable to open fd=3 id=0x6",
    "Error (criu/cr-restore.c:2331): Restoring FAILED.",
    "Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory",
]

# issue 12 item 4 before the hold: a streamed IPv6 restore without any network lock
SEND_QUEUE_RESTORE = [
    RLIMIT,
    *HARMLESS_LINES[17:],
    *HARMLESS_LINES[9:17],
    "     1: Error (soccr/soccr.c:819): Can't restore not-sent send queue data (-1), want "
    "(0-923:3782144:923): Broken pipe",
    "     1: Error (criu/files.c:1221): Unable to open fd=4 id=0xd",
    "Error (criu/cr-restore.c:2331): Restoring FAILED.",
    "Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory",
]


# a bare tree's dump while the host's /dev/shm, which CRIU tarred with it, was changing:
# only tar's own lines (no CRIU format) say why
TMPFS_DUMP = [
    "(00.170131) Dumping tmpfs 0:25",
    "tar: ./.pycpt-migrate-net-postcopy-0-1bd8b20cfa4381a4/dump.log: File removed before we "
    "read it",
    "tar: ./.pycpt-migrate-net-postcopy-0-1bd8b20cfa4381a4: file changed as we read it",
    "tar: .: file changed as we read it",
    "Error (criu/util.c:657): exited, status=1",
    "Error (criu/filesystems.c:426): Can't dump tmpfs content",
    "Error (criu/cr-dump.c:1975): Dumping FAILED.",
]


@pytest.mark.parametrize("line", HARMLESS_LINES)
def test_each_known_harmless_line(line):
    assert criu_log.is_harmless(line)
    assert criu_log.error_lines_of([line]) == []
    assert criu_log.classify([line]) is errors.CriuError  # names no failure


def test_the_nftables_unlock_line_is_harmless_only_before_criu_s_table():
    assert criu_log.error_lines_of(NFT_PAIR) == []
    other = [NFT_PAIR[0], "add table inet mine"]
    assert criu_log.error_lines_of(other) == [NFT_PAIR[0]]


@pytest.mark.parametrize(
    "log, cls, text",
    [
        (
            MISSING_FILE_RESTORE,
            errors.CriuError,
            "Can't open file tmp/w12-x on restore: No such file or directory",
        ),
        (
            SEND_QUEUE_RESTORE,
            errors.CriuError,
            "Can't restore not-sent send queue data (-1), want (0-923:3782144:923): Broken pipe",
        ),
        (
            TMPFS_DUMP,
            errors.CriuError,
            "tar: ./.pycpt-migrate-net-postcopy-0-1bd8b20cfa4381a4/dump.log: File removed "
            "before we read it",
        ),
    ],
)
def test_the_line_that_failed_names_the_failure(tmp_path, log, cls, text):
    path = tmp_path / "restore.log"
    path.write_text("\n".join(["(00.000) Version: 4.2.1", *log, *NFT_PAIR]) + "\n")
    lines = criu_log.error_lines(path)
    assert not any(criu_log.is_harmless(ln) for ln in lines)
    assert criu_log.classify(lines) is cls  # not NetworkLockError for the probes
    assert criu_log.failure_text(lines) == text
    assert criu_log.failing_line(lines) == next(ln.strip() for ln in log if text in ln)


def test_a_failed_program_s_own_lines_come_with_criu_s_report():
    """What tar wrote is kept with CRIU's "exited, status=1" (at most 3 lines, none of
    CRIU's own); a report with nothing of the program's before it stays alone."""
    lines = criu_log.error_lines_of(TMPFS_DUMP)
    assert lines == [ln.strip() for ln in TMPFS_DUMP[1:]]
    assert criu_log.error_lines_of(["x", *TMPFS_DUMP[1:]])[0] == TMPFS_DUMP[1]  # 3 at most
    alone = ["(00.1) Dumping tmpfs 0:25", "Error (criu/util.c:657): exited, status=1"]
    assert criu_log.error_lines_of(alone) == [alone[1]]


@pytest.mark.parametrize(
    "line",
    [
        "Error (criu/cr-restore.c:2331): Restoring FAILED.",
        "Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory",
        "     1: Error (criu/files.c:1221): Unable to open fd=4 id=0xd",
        "Error (criu/cr-restore.c:1): Can't wait or bad status",
    ],
)
def test_consequences_are_not_the_failure(line):
    cause = "Error (criu/net.c:3000): Locking network failed using nftables"
    assert criu_log.is_consequence(line)
    assert criu_log.failing_line([line, cause]) == cause
    assert criu_log.classify([line, cause]) is errors.NetworkLockError
    assert criu_log.failing_line([line]) == line  # nothing else to blame
