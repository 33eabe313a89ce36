"""Containers: `pycpt start | stop | status | list | exec`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pycpt._cli.base import Subparsers, add_command, add_ct, add_verb, command_words, shell_status

if TYPE_CHECKING:
    from pycpt.container import Container


def container_of(args: argparse.Namespace) -> "Container":
    """The container named by args.ct, which must exist."""
    from pycpt import errors
    from pycpt.container import Container

    ct = Container(args.ct, state_dir_path=args.state_dir)
    if not ct.exists:
        raise errors.ContainerNotFoundError(f"no container {args.ct}")
    return ct


def add_start(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "start",
        run_start,
        "start CMD as the init of a new container CT",
    )
    add_ct(p, "the new container's id (letters, digits, ._-)")
    add_command(p, "the container's init (pid 1 inside)")
    p.add_argument("--share-net", action="store_true", help="use the host's network")
    p.add_argument("--root", help="a private root directory for the container")


def run_start(args: argparse.Namespace) -> int:
    from pycpt.container import Container

    ct = Container.start(
        args.ct,
        command_words(args.cmd),
        state_dir_path=args.state_dir,
        share_net=args.share_net,
        root=args.root,
    )
    print(f"started {ct.id}: init pid {ct.init_pid}, cgroup {ct.cgroup}")
    return 0


def add_stop(sub: Subparsers) -> None:
    add_ct(add_verb(sub, "stop", run_stop, "kill every process of CT"))


def run_stop(args: argparse.Namespace) -> int:
    ct = container_of(args)
    ct.stop()
    print(f"stopped {ct.id}")
    return 0


def add_status(sub: Subparsers) -> None:
    add_ct(add_verb(sub, "status", run_status, "what CT is doing"))


def run_status(args: argparse.Namespace) -> int:
    ct = container_of(args)
    print(ct.describe())
    return 0


def add_list(sub: Subparsers) -> None:
    add_verb(sub, "list", run_list, "the containers in the state directory")


def run_list(args: argparse.Namespace) -> int:
    from pycpt.container import list_containers

    for ct in list_containers(args.state_dir):
        print(f"{ct.id:<20} {ct.status.value:<10} {ct.init_pid or '-'}")
    return 0


def add_exec(sub: Subparsers) -> None:
    p = add_verb(sub, "exec", run_exec, "run CMD inside the running container CT")
    add_ct(p)
    add_command(p)


def run_exec(args: argparse.Namespace) -> int:
    return shell_status(container_of(args).exec(command_words(args.cmd)).wait())


PARSERS = (add_start, add_stop, add_status, add_list, add_exec)
