"""`pycpt freeze | thaw | kill`: the cgroup freezer."""

from __future__ import annotations

import argparse

from pycpt._cli.base import Subparsers, add_verb


def add_freezer_verbs(sub: Subparsers) -> None:
    for verb, text in (
        ("freeze", "freeze every task of a container or a cgroup"),
        ("thaw", "thaw a frozen container or cgroup"),
        ("kill", "kill every task of a container (pycpt stop) or a cgroup"),
    ):
        p = add_verb(sub, verb, run_freezer, text)
        p.add_argument(
            "cgroup",
            metavar="CT|CGROUP",
            help="a container's id, or a cgroup directory (v1 freezer or v2; a path with /)",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        p.set_defaults(freezer_verb=verb)


def run_freezer(args: argparse.Namespace) -> int:
    from pycpt.freezer import Freezer

    if "/" not in args.cgroup:  # a container id (an id never holds a /)
        from pycpt.container import Container

        ct = Container(args.cgroup, state_dir_path=args.state_dir)
        if ct.exists:
            return _container(ct, args)
    freezer = Freezer(args.cgroup)
    if args.freezer_verb == "freeze":
        print(f"frozen in {freezer.freeze(timeout=args.timeout) * 1e3:.2f} ms")
    elif args.freezer_verb == "thaw":
        print(f"thawed in {freezer.thaw(timeout=args.timeout) * 1e3:.2f} ms")
    else:
        freezer.kill(timeout=args.timeout)
        print("killed")
    return 0


def _container(ct, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from pycpt import errors
    from pycpt.container import ContainerStatus
    from pycpt.freezer import Freezer

    now = ct.status
    if args.freezer_verb == "kill":
        ct.stop(timeout=args.timeout)
        print(f"killed {ct.id}")
        return 0
    wanted = ContainerStatus.RUNNING if args.freezer_verb == "freeze" else ContainerStatus.FROZEN
    if now is not wanted:
        raise errors.ContainerStateError(
            f"cannot {args.freezer_verb} container {ct.id}: it is {now.value}",
            hint="freeze takes a running container, thaw one that `pycpt freeze` froze; "
            "chkpnt --suspend/--resume have their own steps",
        )
    freezer = Freezer(ct.cgroup)
    if args.freezer_verb == "freeze":
        print(f"froze {ct.id} in {freezer.freeze(timeout=args.timeout) * 1e3:.2f} ms")
    else:
        print(f"thawed {ct.id} in {freezer.thaw(timeout=args.timeout) * 1e3:.2f} ms")
    return 0


PARSERS = (add_freezer_verbs,)
