"""`pycpt freeze | thaw | kill`: the cgroup freezer."""

from __future__ import annotations

import argparse

from pycpt._cli.base import Subparsers, add_verb


def add_freezer_verbs(sub: Subparsers) -> None:
    for verb, text in (
        ("freeze", "freeze every task of a cgroup"),
        ("thaw", "thaw a frozen cgroup"),
        ("kill", "kill every task of a cgroup"),
    ):
        p = add_verb(sub, verb, run_freezer, text)
        p.add_argument("cgroup", help="cgroup directory (v1 freezer or v2)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        p.set_defaults(freezer_verb=verb)


def run_freezer(args: argparse.Namespace) -> int:
    from pycpt.freezer import Freezer

    freezer = Freezer(args.cgroup)
    if args.freezer_verb == "freeze":
        print(f"frozen in {freezer.freeze(timeout=args.timeout) * 1e3:.2f} ms")
    elif args.freezer_verb == "thaw":
        print(f"thawed in {freezer.thaw(timeout=args.timeout) * 1e3:.2f} ms")
    else:
        freezer.kill(timeout=args.timeout)
        print("killed")
    return 0


PARSERS = (add_freezer_verbs,)
