"""The vzctl checkpoint verbs: `pycpt chkpnt` and `pycpt restore`."""

from __future__ import annotations

import argparse
import time

from pycpt._cli.base import Subparsers, add_ct, add_verb
from pycpt._cli.containers import container_of


def add_chkpnt(sub: Subparsers) -> None:
    p = add_verb(sub, "chkpnt", run_chkpnt, "checkpoint CT (vzctl chkpnt)")
    add_ct(p)
    p.add_argument("--dumpfile", help="the dump file (default STATE/dump/Dump.CT)")
    p.add_argument("--compress", choices=["gz", "xz"], help="compress the dump file")
    stage = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--suspend", "freeze it (step 1)"),
        ("--dump", "dump it, still frozen (2)"),
        ("--kill", "kill it after a good dump (3)"),
        ("--resume", "thaw it instead (3)"),
    ):
        stage.add_argument(flag, action="store_true", help=text)


def run_chkpnt(args: argparse.Namespace) -> int:
    ct = container_of(args)
    if args.suspend:
        print(f"suspended {ct.id} in {ct.suspend() * 1e3:.1f} ms")
    elif args.dump:
        t = time.perf_counter()
        path = ct.dump(args.dumpfile, compress=args.compress)
        print(f"dumped {ct.id} to {path} in {time.perf_counter() - t:.3f} s; still frozen")
    elif args.kill:
        ct.kill()
        print(f"killed {ct.id}")
    elif args.resume:
        print(f"resumed {ct.id} in {ct.resume() * 1e3:.1f} ms")
    else:
        t = time.perf_counter()
        path = ct.chkpnt(args.dumpfile, compress=args.compress)
        print(f"checkpointed {ct.id} to {path} in {time.perf_counter() - t:.3f} s")
    return 0


def add_restore(sub: Subparsers) -> None:
    p = add_verb(sub, "restore", run_restore, "restore CT from its dump file (vzctl restore)")
    add_ct(p)
    p.add_argument("--dumpfile", help="the dump file (default STATE/dump/Dump.CT)")
    stage = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--undump", "rebuild it, frozen (step 1)"),
        ("--resume", "let it run (2)"),
        ("--kill", "kill it instead (2)"),
    ):
        stage.add_argument(flag, action="store_true", help=text)


def run_restore(args: argparse.Namespace) -> int:
    from pycpt.container import Container

    ct = Container(args.ct, state_dir_path=args.state_dir)
    if args.resume:
        print(f"resumed {ct.id} in {ct.resume() * 1e3:.1f} ms")
    elif args.kill:
        ct.kill()
        print(f"killed {ct.id}")
    else:
        t = time.perf_counter()
        ct = Container.restore(
            args.ct, args.dumpfile, state_dir_path=args.state_dir, undump_only=args.undump
        )
        print(
            f"{'undumped' if args.undump else 'restored'} {ct.id} in "
            f"{time.perf_counter() - t:.3f} s: init pid {ct.init_pid}"
            + (", frozen until --resume" if args.undump else "")
        )
    return 0


PARSERS = (add_chkpnt, add_restore)
