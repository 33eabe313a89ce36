"""The `pycpt` command.

pycpt check [--json]                      can checkpointing work here? what to fix
pycpt engine install [--force] | status   provide / show the CRIU pycpt drives
pycpt demo [--mib N] [--keep] [--json]    checkpoint and restore a live process
pycpt criu version | features             ask CRIU over RPC
pycpt criu dump PID DIR [options]         checkpoint a process tree into DIR
pycpt criu restore DIR [options]          rebuild it from DIR
pycpt freeze | thaw | kill CGROUP         the cgroup freezer
pycpt start CT [--share-net] [--root DIR] -- CMD [ARGS...]
pycpt stop | status CT;  pycpt list;  pycpt exec CT -- CMD [ARGS...]
pycpt chkpnt CT [--dumpfile F]            save to one file and stop (or in stages:
     [--suspend | --dump | --kill | --resume]   suspend, dump, then kill or resume)
pycpt restore CT [--dumpfile F]           rebuild and run (or: --undump, then
     [--undump | --resume | --kill]       --resume or --kill)
pycpt migrate [--online] [--mode M] [--dry-run] [--keep-src] [--keep-images] [--json]
      HOST CT                             move CT to [user@]host[:port] over ssh
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

from pycpt import errors
from pycpt._version import __version__


def _criu_opts(args: argparse.Namespace) -> Dict[str, Any]:
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
            raise ValueError(f"--opt takes KEY=VALUE, not {item!r}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `pycpt` command."""
    parser = argparse.ArgumentParser(
        prog="pycpt", description="Checkpoint, restore and migrate Linux process trees with CRIU."
    )
    parser.add_argument("--version", action="version", version=f"pycpt {__version__}")
    parser.add_argument(
        "--state-dir", help="container state (default $PYCPT_STATE_DIR or /var/lib/pycpt)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="report whether checkpointing can work here")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("engine", help="the CRIU binary pycpt drives")
    esub = p.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    ep = esub.add_parser("install", help="install a working CRIU >= 4.2 for pycpt (idempotent)")
    ep.add_argument("--force", action="store_true", help="reinstall even if one works")
    ep.add_argument(
        "--prefix", help="where to install (default $PYCPT_ENGINE_DIR or /var/lib/pycpt/engine)"
    )
    ep = esub.add_parser("status", help="every CRIU candidate and which one is used")
    ep.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="checkpoint and restore a live process, timing each step")
    p.add_argument("--mib", type=int, default=64, help="memory of the demo process (default 64)")
    p.add_argument("--keep", action="store_true", help="keep the images")
    p.add_argument("--json", action="store_true", help="print the figures as JSON at the end")

    p = sub.add_parser("criu", help="talk to CRIU directly over RPC")
    csub = p.add_subparsers(dest="criu_command", required=True, metavar="REQUEST")
    csub.add_parser("version", help="CRIU's version")
    csub.add_parser("features", help="CRIU's FEATURE_CHECK")
    cp = csub.add_parser("dump", help="checkpoint the tree rooted at PID into DIR")
    cp.add_argument("pid", type=int)
    cp.add_argument("images_dir")
    _add_criu_flags(cp, restore=False)
    cp = csub.add_parser("restore", help="restore the tree saved in DIR")
    cp.add_argument("images_dir")
    _add_criu_flags(cp, restore=True)

    p = sub.add_parser("start", help="start CMD as the init of a new container CT")
    p.add_argument("ct")
    p.add_argument("--share-net", action="store_true", help="use the host's network")
    p.add_argument("--root", help="a private root directory for the container")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    for verb, text in (("stop", "kill every process of CT"), ("status", "what CT is doing")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("ct")
    sub.add_parser("list", help="the containers in the state directory")
    p = sub.add_parser("exec", help="run CMD inside the running container CT")
    p.add_argument("ct")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p = sub.add_parser("chkpnt", help="checkpoint CT (vzctl chkpnt)")
    p.add_argument("ct")
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
    p = sub.add_parser("restore", help="restore CT from its dump file (vzctl restore)")
    p.add_argument("ct")
    p.add_argument("--dumpfile", help="the dump file (default STATE/dump/Dump.CT)")
    stage = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--undump", "rebuild it, frozen (step 1)"),
        ("--resume", "let it run (2)"),
        ("--kill", "kill it instead (2)"),
    ):
        stage.add_argument(flag, action="store_true", help=text)

    p = sub.add_parser("migrate", help="move CT to another host over ssh (vzmigrate)")
    p.add_argument("host", help="[user@]host[:port], reached with ssh keys (never a password)")
    p.add_argument("ct")
    p.add_argument(
        "--online",
        action="store_true",
        help="keep it running until the last moment, frozen only briefly",
    )
    p.add_argument(
        "--mode",
        choices=["offline", "stopcopy", "postcopy"],
        help="how memory moves (default: postcopy with --online, else offline)",
    )
    p.add_argument("--keep-src", action="store_true", help="keep it here, stopped, afterwards")
    p.add_argument(
        "--keep-images",
        action="store_true",
        help="keep the dump here as STATE/dump/Dump.CT (not with postcopy)",
    )
    p.add_argument("--dry-run", action="store_true", help="only check that it could migrate")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--ssh-config", help="ssh_config file for ssh -F (default $PYCPT_SSH_CONFIG)")
    p.add_argument(
        "--remote-pycpt",
        help="the command that runs pycpt on the target (default $PYCPT_REMOTE_PYCPT or `pycpt`)",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    p = sub.add_parser("migrate-target", help=argparse.SUPPRESS)
    p.add_argument("ct")
    p.add_argument("--abort", metavar="TOKEN", help=argparse.SUPPRESS)

    for verb, text in (
        ("freeze", "freeze every task of a cgroup"),
        ("thaw", "thaw a frozen cgroup"),
        ("kill", "kill every task of a cgroup"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("cgroup", help="cgroup directory (v1 freezer or v2)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        from pycpt.doctor import run_checks

        report = run_checks()
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        return 0 if report.ok else 1

    if args.command == "engine":
        from pycpt import engine

        if args.engine_command == "install":
            engine.install_engine(prefix=args.prefix, force=args.force)
            return 0
        status = engine.engine_status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for c in status["candidates"]:
                mark = "ok" if c.get("ok") else "--"
                print(
                    f"{mark} {c['source']:<10} {c.get('version') or '?':<8} {c.get('path') or ''}"
                    + (f"  ({c['problem']})" if c.get("problem") else "")
                )
            print(
                f"using: {status['selected']['path']}"
                if status.get("selected")
                else f"no usable CRIU: {status.get('error')}"
            )
        return 0 if status.get("selected") else 1

    if args.command == "demo":
        from pycpt.demo import run_demo

        figures = run_demo(args.mib, args.keep)
        if args.json:
            print(json.dumps(figures, indent=2))
        return 0 if figures["ok"] else 1

    if args.command == "criu":
        from pycpt.criu import Criu

        with Criu() as criu:
            if args.criu_command == "version":
                print(criu.version())
            elif args.criu_command == "features":
                print(json.dumps(criu.features(), indent=2))
            elif args.criu_command == "dump":
                d = criu.dump(args.pid, args.images_dir, work_dir=args.work_dir, **_criu_opts(args))
                print(
                    f"dumped pid {args.pid} into {d.images_dir} in {d.elapsed:.3f} s "
                    f"(frozen {d.frozen_time * 1e3:.1f} ms, "
                    f"{d.stats.get('pages_written', 0)} pages); log: {d.log_path}"
                )
            else:
                r = criu.restore(args.images_dir, work_dir=args.work_dir, **_criu_opts(args))
                print(
                    f"restored pid {r.pid} from {r.images_dir} in {r.elapsed:.3f} s; "
                    f"log: {r.log_path}"
                )
                if args.rst_sibling:
                    _, wait_status = os.waitpid(r.pid, 0)
                    return os.waitstatus_to_exitcode(wait_status)
        return 0

    if args.command == "migrate":
        return _migrate(args)
    if args.command == "migrate-target":
        from pycpt._migration import target as migrate_target

        if args.state_dir:
            os.environ["PYCPT_STATE_DIR"] = args.state_dir
        return migrate_target.main(args.ct, args.abort)

    if args.command in ("start", "stop", "status", "list", "exec", "chkpnt", "restore"):
        return _container_verb(args)

    from pycpt.freezer import Freezer

    freezer = Freezer(args.cgroup)
    if args.command == "freeze":
        print(f"frozen in {freezer.freeze(timeout=args.timeout) * 1e3:.2f} ms")
    elif args.command == "thaw":
        print(f"thawed in {freezer.thaw(timeout=args.timeout) * 1e3:.2f} ms")
    else:
        freezer.kill(timeout=args.timeout)
        print("killed")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import shlex

    from pycpt.migrate import migrate

    if args.state_dir:
        os.environ["PYCPT_STATE_DIR"] = args.state_dir
    stats = migrate(
        args.host,
        args.ct,
        online=args.online,
        mode=args.mode,
        keep_src=args.keep_src,
        keep_images=args.keep_images,
        dry_run=args.dry_run,
        ssh_config=args.ssh_config,
        remote_pycpt=shlex.split(args.remote_pycpt) if args.remote_pycpt else None,
        progress=None if args.json else sys.stderr,
        connect_timeout=args.connect_timeout,
    )
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
    elif args.dry_run:
        print(f"{args.ct} can migrate to {args.host} ({stats.mode}); nothing was changed")
    else:
        print(
            f"migrated {args.ct} to {args.host} ({stats.mode}): frozen "
            f"{stats.frozen_window * 1e3:.1f} ms, total {stats.total:.2f} s"
        )
    for note in stats.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _command(words: Sequence[str]) -> list:
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise ValueError("give the command after --, e.g. `-- /bin/sh -c 'sleep 1000'`")
    return words


def _container_verb(args: argparse.Namespace) -> int:
    from pycpt.container import Container, list_containers

    if args.command == "list":
        for ct in list_containers(args.state_dir):
            print(f"{ct.id:<20} {ct.status.value:<10} {ct.init_pid or '-'}")
        return 0
    if args.command == "start":
        ct = Container.start(
            args.ct,
            _command(args.cmd),
            state_dir_path=args.state_dir,
            share_net=args.share_net,
            root=args.root,
        )
        print(f"started {ct.id}: init pid {ct.init_pid}, cgroup {ct.cgroup}")
        return 0
    if args.command == "restore":
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
    ct = Container(args.ct, state_dir_path=args.state_dir)
    if not ct.exists:
        raise errors.ContainerNotFoundError(f"no container {args.ct}")
    if args.command == "stop":
        ct.stop()
        print(f"stopped {ct.id}")
    elif args.command == "status":
        print(ct.status.value + (" (dumped, still frozen)" if ct.dumped else ""))
    elif args.command == "exec":
        return ct.exec(_command(args.cmd)).wait()
    elif args.suspend:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `pycpt` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except errors.PycptError as exc:
        print(f"pycpt: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):  # e.g. a clean-up that failed as well
            print(f"  note: {note}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"pycpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pycpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
