"""Containers: `pycpt start | stop | status | list | exec | enter | rm | logs | gc`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from pycpt._cli.base import (
    Subparsers,
    add_command,
    add_ct,
    add_verb,
    command_words,
    note,
    print_json,
    shell_status,
)

if TYPE_CHECKING:
    from pycpt.container import Container


def report(found: Sequence[Any]) -> None:
    """What recovering an interrupted command did (Container.notes), and the command that
    goes on from there, on stderr. (When the verb fails they are notes of its error.)"""
    for recovery in found:
        note(f"pycpt: note: {recovery.note}")
        if recovery.command:
            note(f"  next: {recovery.command}")


# what goes on from a status an interrupted command can leave (`{ct}`: the container)
_NEXT = {
    "dumped": "pycpt restore {ct}",
    "suspended": "pycpt chkpnt {ct} --dump (or pycpt resume {ct})",
    "undumped": "pycpt restore {ct} --resume (or --kill)",
}


def where_left(args: argparse.Namespace) -> List[str]:
    """After an interrupted command on a container: the status it was left in, and the
    command that goes on from there (nothing if the command named none, or it is gone)."""
    from pycpt import errors
    from pycpt.container import Container

    ct_id = getattr(args, "ct", None)
    if not isinstance(ct_id, str):
        return []
    try:
        ct = Container(ct_id, state_dir_path=getattr(args, "state_dir", None))
        if not ct.exists:
            return [f"  container {ct_id}: none (nothing was left)"]
        status = ct.status.value
        said = [f"  container {ct_id}: {ct.describe()}"]
    except (errors.PycptError, OSError):
        return []  # its state says nothing trustworthy: `pycpt status` will say why
    if status == "suspended" and ct.dumped:
        return said + [f"  next: pycpt chkpnt {ct_id} --kill (or pycpt resume {ct_id})"]
    if status in _NEXT:
        said.append("  next: " + _NEXT[status].format(ct=ct_id))
    return said


def recovered(args: argparse.Namespace) -> "Container":
    """container_of(), once an interrupted command's step on it is finished or undone."""
    from pycpt.container import Container

    report(Container(args.ct, state_dir_path=args.state_dir).recover())
    return container_of(args)


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
    p.add_argument(
        "--net",
        action="append",
        metavar="SPEC",
        help="a NIC on an existing host bridge (repeatable): bridge=BR,ip=ADDR/PREFIX"
        "[,ip6=ADDR/PREFIX][,gw=GW][,gw6=GW][,mac=MAC][,name=IF][,mtu=N]",
    )
    p.add_argument(
        "--ipadd",
        action="append",
        metavar="ADDR[/PREFIX]",
        help="vzctl-style: an address on the bridge $PYCPT_BRIDGE (repeatable, one NIC; "
        "the prefix defaults to that of the bridge's own address in the subnet)",
    )


def run_start(args: argparse.Namespace) -> int:
    from pycpt.container import Container

    net: list = list(args.net or [])
    if args.ipadd:
        from pycpt.network import ipadd_spec

        net.append(ipadd_spec(args.ipadd))
    ct = Container.start(
        args.ct,
        command_words(args.cmd),
        state_dir_path=args.state_dir,
        share_net=args.share_net,
        root=args.root,
        net=net or None,
    )
    report(ct.notes)
    pid, exit_status = ct.state.get("init_pid"), ct.exit_status
    print(
        f"started {ct.id}: init pid {pid}, cgroup {ct.cgroup}"
        + (f" (it has ended already: exit status {exit_status})" if exit_status is not None else "")
    )
    for nic in ct.nics:
        print(f"  {nic}")
    return 0


def add_stop(sub: Subparsers) -> None:
    add_ct(add_verb(sub, "stop", run_stop, "kill every process of CT"))


def run_stop(args: argparse.Namespace) -> int:
    ct = container_of(args)
    ct.stop()
    report(ct.notes)
    print(f"stopped {ct.id}")
    return 0


def add_status(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "status",
        run_status,
        "what CT is doing",
        epilog=STATUS_VALUES,
    )
    add_ct(p)
    p.add_argument("--json", action="store_true", help="machine-readable (see the README)")


STATUS_VALUES = """\
status values:
  running    its processes run
  frozen     running, but frozen by `pycpt freeze CT` (until `pycpt thaw CT`)
  suspended  frozen by `chkpnt --suspend` ("dumped, still frozen" once --dump wrote it)
  dumped     saved in its dump file, no process left (`pycpt restore CT` brings it back)
  undumped   rebuilt by `restore --undump`, frozen before its first instruction
  stopped    no process: stopped, or its program ended ("exit status N" when known)
  migrating  leaving for another host (or a migration left it in doubt: status says what to do)
  migrated   it runs on another host now (status says which)
  receiving pages  arrived by post-copy migration, running while its memory arrives
"""


def run_status(args: argparse.Namespace) -> int:
    ct = recovered(args)
    if args.json:
        print_json(ct.info())
    else:
        print(ct.describe())
        for nic in ct.nics:
            print(f"  {nic}")
    return 0


def add_list(sub: Subparsers) -> None:
    p = add_verb(sub, "list", run_list, "the containers in the state directory (podman ps -a)")
    p.add_argument("--json", action="store_true", help="machine-readable (see the README)")


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def run_list(args: argparse.Namespace) -> int:
    from pycpt import errors
    from pycpt.container import list_containers

    infos = []
    for ct in list_containers(args.state_dir):
        try:
            report(ct.recover())  # an interrupted command's step finished or undone first
            if ct.exists:  # (not an interrupted start, undone)
                infos.append(ct.info())
        except errors.StateDirError as exc:
            # shown, and left alone: nothing is done on the word of what cannot be trusted
            note(f"pycpt: note: container {ct.id} is left alone: {exc.message}")
            infos.append(_tampered(ct.id, exc))
    if args.json:
        print_json(infos)
        return 0
    # an ADDRESSES column only where some container has NICs (`start --net`)
    nets = any(i["nics"] for i in infos)
    rows = [["ID", "STATUS", "INIT PID", "CREATED", "DUMP FILE", "SIZE", "EXIT"]]
    if nets:
        rows[0].append("ADDRESSES")
    for i in infos:
        created = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["created"]))
            if i["created"]
            else "-"
        )
        exit_status = i["exit_status"]
        rows.append(
            [
                i["id"],
                i["status"],
                str(i["init_pid"] or "-"),
                created,
                i["dumpfile"] or "-",
                _size(i["dumpfile_size"]),
                "-" if exit_status is None else str(exit_status),
            ]
        )
        if nets:
            addresses = [a.partition("/")[0] for n in i["nics"] for a in n["addresses"]]
            rows[-1].append(",".join(addresses) or "-")
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _tampered(ct: str, exc: Exception) -> Dict[str, Any]:
    """A row of `list` for a container whose record cannot be trusted."""
    return {
        "id": ct,
        "status": "tampered",
        "dumped": False,
        "init_pid": None,
        "created": None,
        "argv": [],
        "root": None,
        "share_net": False,
        "cgroup": None,
        "dumpfile": None,
        "dumpfile_size": None,
        "exit_status": None,
        "console_log": "",
        "nics": [],
        "error": str(getattr(exc, "message", exc)),
    }


def add_rm(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "rm",
        run_rm,
        "remove CT: its processes, state, console log and dump files (vzctl destroy)",
        description="Remove container CT: its cgroup, state and console log, and its dump "
        "files (the last one written, the default one, its named checkpoints). A running, "
        "suspended or undumped container, or one with a dump file, needs --force (or "
        "--keep-dumpfile to keep its dump files).",
    )
    add_ct(p)
    p.add_argument(
        "-f", "--force", action="store_true", help="kill its processes, delete its dump files"
    )
    p.add_argument("--keep-dumpfile", action="store_true", help="leave its dump files in place")


def run_rm(args: argparse.Namespace) -> int:
    ct = container_of(args)
    for path in ct.remove(force=args.force, keep_dumpfile=args.keep_dumpfile):
        print(f"removed dump file {path}")
    print(f"removed {ct.id}")
    return 0


def add_logs(sub: Subparsers) -> None:
    p = add_verb(sub, "logs", run_logs, "print CT's console log (its init's stdout and stderr)")
    add_ct(p)
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing what comes, until CT stops"
    )


def run_logs(args: argparse.Namespace) -> int:
    from pycpt.container import ContainerStatus

    ct = container_of(args)
    out = sys.stdout.buffer
    try:
        log = open(ct.log_path, "rb")  # noqa: SIM115 (kept open while following)
    except FileNotFoundError:
        if not args.follow:
            return 0
        log = None
    try:
        while True:
            data = log.read(1 << 16) if log is not None else b""
            if data:
                out.write(data)
                out.flush()
                continue
            if not args.follow or ct.status in (
                ContainerStatus.STOPPED,
                ContainerStatus.DUMPED,
            ):
                return 0
            time.sleep(0.2)
            if log is None and ct.log_path.exists():
                log = open(ct.log_path, "rb")  # noqa: SIM115
    finally:
        if log is not None:
            log.close()


def add_exec(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "exec",
        run_exec,
        "run CMD inside the running container CT",
        description="Run CMD inside the running container CT and wait for it; its exit "
        "status is CMD's (128+N when signal N ended it). Without -d the command is pycpt's "
        "child, not part of the container: a checkpoint leaves it out.",
    )
    add_ct(p)
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="start CMD in the background as the container's own process (its init adopts "
        "it; output to the console log), so that checkpoints include it",
    )
    add_command(p)


def run_exec(args: argparse.Namespace) -> int:
    return shell_status(recovered(args).exec(command_words(args.cmd), detach=args.detach).wait())


def add_enter(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "enter",
        run_enter,
        "an interactive shell inside CT, on a terminal of its own (vzctl enter)",
        description="Run an interactive login shell (bash if the container has it, else sh) "
        "inside the running container CT, on a new pseudo-terminal relayed to this one "
        "(vzctl enter); `-- CMD` runs CMD instead. Exits with the shell's status.",
    )
    add_ct(p)
    add_command(p, "what to run instead of the shell")


def run_enter(args: argparse.Namespace) -> int:
    import os
    import pty

    ct = container_of(args)
    shell = ["/bin/sh", "-c", 'exec "$(command -v bash || echo /bin/sh)" -l']
    argv = ct.exec_argv(list(args.cmd) if args.cmd else shell)
    print(f"entered {ct.id} (exit the shell to leave)", file=sys.stderr)
    status = pty.spawn(argv)
    return shell_status(os.waitstatus_to_exitcode(status))


def add_gc(sub: Subparsers) -> None:
    add_verb(
        sub,
        "gc",
        run_gc,
        "finish or undo every interrupted command here and remove what it left",
        description="Finish or undo the step of every interrupted command on the containers "
        "of the state directory and remove what such commands left: temporary files and "
        "directories, empty cgroups of containers that no longer run, directories that hold "
        "only a lock. A container a running pycpt holds (its lock) is left alone, and so is "
        "one whose record cannot be trusted.",
    )


def run_gc(args: argparse.Namespace) -> int:
    from pycpt.container import collect_garbage

    for line in collect_garbage(args.state_dir):
        print(line)
    return 0


PARSERS = (
    add_start,
    add_stop,
    add_status,
    add_list,
    add_exec,
    add_enter,
    add_rm,
    add_logs,
    add_gc,
)
