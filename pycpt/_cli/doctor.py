"""`pycpt check` and `pycpt demo`."""

from __future__ import annotations

import argparse

from pycpt._cli.base import Subparsers, add_verb, print_json


def add_check(sub: Subparsers) -> None:
    p = add_verb(sub, "check", run_check, "report whether checkpointing can work here")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_check(args: argparse.Namespace) -> int:
    from pycpt.doctor import run_checks

    report = run_checks()
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format())
    return 0 if report.ok else 1


def add_demo(sub: Subparsers) -> None:
    p = add_verb(sub, "demo", run_demo, "checkpoint and restore a live process, timing each step")
    p.add_argument("--mib", type=int, default=64, help="memory of the demo process (default 64)")
    p.add_argument("--keep", action="store_true", help="keep the images")
    p.add_argument("--json", action="store_true", help="print the figures as JSON at the end")


def run_demo(args: argparse.Namespace) -> int:
    from pycpt.demo import run_demo as demo

    figures = demo(args.mib, args.keep)
    if args.json:
        print_json(figures)
    return 0 if figures["ok"] else 1


PARSERS = (add_check, add_demo)
