"""`pycpt criu version | features | dump | restore`: CRIU over RPC, for process trees."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict

from pycpt import errors
from pycpt._cli.base import Subparsers, add_verb, print_json, shell_status


def criu_opts(args: argparse.Namespace) -> Dict[str, Any]:
    """CRIU options from the flags plus every --opt KEY=VALUE (VALUE parsed as JSON if it
    can be: true, 3, ["a","b"]; else taken as a string)."""
    opts: Dict[str, Any] = {}
    for flag in (
        "leave_running",
        "leave_stopped",
        "tcp_established",
        "shell_job",
        "ext_unix_sk",
        "file_locks",
        "rst_sibling",
    ):
        if getattr(args, flag, False):
            opts[flag] = True
    for name in ("network_lock", "freeze_cgroup", "root", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    for item in args.opt or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise errors.InvalidArgumentError(f"--opt takes KEY=VALUE, not {item!r}")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw
    return opts


def _add_criu_flags(p: argparse.ArgumentParser, restore: bool) -> None:
    p.add_argument("--leave-stopped", action="store_true", help="leave the tree stopped (SIGSTOP)")
    p.add_argument(
        "--tcp-established", action="store_true", help="checkpoint/restore TCP connections"
    )
    p.add_argument("--shell-job", action="store_true", help="the tree was started from a terminal")
    p.add_argument("--ext-unix-sk", action="store_true", help="allow external unix sockets")
    p.add_argument("--file-locks", action="store_true", help="handle file locks")
    p.add_argument("--log-level", type=int, help="CRIU log level 0-4 (default 2)")
    p.add_argument("--work-dir", help="where the log goes (default: the images directory)")
    p.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="any other CRIU RPC option, e.g. --opt ghost_limit=2097152",
    )
    if restore:
        p.add_argument("--root", help="root directory of the restored tree")
        p.add_argument(
            "--rst-sibling",
            action="store_true",
            help="make the restored root a child of this command (it waits for it)",
        )
    else:
        p.add_argument("--leave-running", action="store_true", help="keep the tree running")
        p.add_argument(
            "--network-lock",
            choices=["iptables", "nftables", "skip"],
            help="how to lock the network (default: nftables when iptables is missing)",
        )
        p.add_argument("--freeze-cgroup", help="freeze through this cgroup instead of ptrace")


def add_criu(sub: Subparsers) -> None:
    p = add_verb(sub, "criu", None, "talk to CRIU directly over RPC")
    csub = p.add_subparsers(
        dest="criu_command", required=True, metavar="REQUEST", help="the request to send"
    )
    add_verb(csub, "version", run_version, "CRIU's version")
    add_verb(csub, "features", run_features, "CRIU's FEATURE_CHECK")
    cp = add_verb(csub, "dump", run_dump, "checkpoint the tree rooted at PID into DIR")
    cp.add_argument("pid", type=int, metavar="PID", help="the root of the process tree")
    cp.add_argument("images_dir", metavar="DIR", help="where CRIU writes the images")
    _add_criu_flags(cp, restore=False)
    cp = add_verb(csub, "restore", run_restore, "restore the tree saved in DIR")
    cp.add_argument("images_dir", metavar="DIR", help="the images a dump wrote")
    _add_criu_flags(cp, restore=True)


def run_version(args: argparse.Namespace) -> int:
    from pycpt.criu import Criu

    with Criu() as criu:
        print(criu.version())
    return 0


def run_features(args: argparse.Namespace) -> int:
    from pycpt.criu import Criu

    with Criu() as criu:
        print_json(criu.features())
    return 0


def run_dump(args: argparse.Namespace) -> int:
    from pycpt.criu import Criu

    with Criu() as criu:
        d = criu.dump(args.pid, args.images_dir, work_dir=args.work_dir, **criu_opts(args))
    print(
        f"dumped pid {args.pid} into {d.images_dir} in {d.elapsed:.3f} s "
        f"(frozen {d.frozen_time * 1e3:.1f} ms, "
        f"{d.stats.get('pages_written', 0)} pages); log: {d.log_path}"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from pycpt.criu import Criu

    with Criu() as criu:
        r = criu.restore(args.images_dir, work_dir=args.work_dir, **criu_opts(args))
    print(f"restored pid {r.pid} from {r.images_dir} in {r.elapsed:.3f} s; log: {r.log_path}")
    if args.rst_sibling:
        _, wait_status = os.waitpid(r.pid, 0)
        return shell_status(os.waitstatus_to_exitcode(wait_status))
    return 0


PARSERS = (add_criu,)
