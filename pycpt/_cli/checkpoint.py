"""The vzctl checkpoint verbs: `pycpt chkpnt`, `pycpt restore` and `pycpt checkpoints`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from pycpt._cli import progress
from pycpt._cli.base import Subparsers, add_ct, add_log_level, add_verb, print_json
from pycpt._cli.containers import container_of, report

_DEFAULTS = """CRIU options (defaults chosen so that common programs checkpoint; README, "Checkpoint
options"): a deleted file still open is saved up to --ghost-limit (256M); a connection a
listener has not accepted yet is dropped (--no-skip-in-flight fails the dump instead);
established TCP connections and file locks are saved."""


def _add_criu_flags(p: argparse.ArgumentParser, dump: bool) -> None:
    """The CRIU option flags of chkpnt (dump=True) or restore."""
    if dump:
        p.add_argument(
            "--ghost-limit",
            metavar="SIZE",
            help="save deleted-but-open files up to SIZE each (bytes, or 64M, 1G; default 256M)",
        )
        p.add_argument(
            "--link-remap",
            action="store_true",
            default=None,
            help="keep a file whose open name was removed but that has other links "
            "(CRIU links it back as link_remap.N until the restore)",
        )
        p.add_argument(
            "--skip-in-flight",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="drop connections not yet accepted (default) / fail the dump on them",
        )
    p.add_argument(
        "--tcp-close",
        action="store_true",
        default=None,
        help="restore TCP connections closed, not established"
        + (" (recorded in the dump file)" if dump else ""),
    )
    p.add_argument(
        "--criu-opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other CRIU option by its RPC or command-line name (repeatable; a list "
        "option takes one item per use, a message one JSON object), e.g. external=mnt[]:m",
    )


def _criu_opts(args: argparse.Namespace) -> Dict[str, Any]:
    from pycpt._criu.options import parse_option
    from pycpt.errors import CriuOptionError

    opts: Dict[str, Any] = {}
    for text in args.criu_opt:
        try:
            name, value = parse_option(text)
        except ValueError as exc:
            raise CriuOptionError(
                f"--criu-opt {text}: {getattr(exc, 'message', exc)}",
                hint=getattr(exc, "hint", ""),
            ) from None
        if isinstance(value, list):
            opts.setdefault(name, []).extend(value)
        else:
            opts[name] = value
    return opts


def _options(args: argparse.Namespace, dump: bool) -> Dict[str, Any]:
    """The keyword arguments of Container.chkpnt/dump (dump=True) or restore."""
    out: Dict[str, Any] = {"tcp_close": args.tcp_close, "criu_opts": _criu_opts(args)}
    if dump:
        out.update(
            ghost_limit=args.ghost_limit,
            link_remap=args.link_remap,
            skip_in_flight=args.skip_in_flight,
        )
    return out


def _refuse_options(args: argparse.Namespace, step: str, dump: bool) -> None:
    given = [k for k, v in _options(args, dump).items() if v not in (None, {}, [])]
    if given:
        from pycpt.errors import CriuOptionError

        raise CriuOptionError(
            f"CRIU options ({', '.join('--' + g.replace('_', '-') for g in given)}) do not "
            f"apply to {step}",
            hint="give them to the step that runs CRIU: "
            + ("chkpnt (or --dump)" if dump else "restore (or --undump)"),
        )


def _report(args: argparse.Namespace, ct: Any, result: Dict[str, Any], text: str) -> int:
    """The outcome of a chkpnt or restore step: JSON (--json) or one line; on stderr first,
    what recovering an interrupted command on the container did (ct.notes)."""
    report(ct.notes)
    if args.json:
        print_json(result)
    else:
        print(text)
    return 0


def _dumpfile_info(path: Optional[os.PathLike]) -> Dict[str, Any]:
    if path is None:
        return {"dumpfile": None, "dumpfile_size": None}
    try:
        size: Optional[int] = os.stat(path).st_size
    except OSError:
        size = None
    return {"dumpfile": str(path), "dumpfile_size": size}


def add_chkpnt(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "chkpnt",
        run_chkpnt,
        "checkpoint CT (vzctl chkpnt)",
        description="Checkpoint container CT into one dump file and stop it (vzctl chkpnt); "
        "or in stages: --suspend, --dump, then --kill or --resume.",
        epilog=_DEFAULTS,
    )
    add_ct(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dumpfile", help="the dump file (default STATE/dump/Dump.CT)")
    where.add_argument(
        "--name", help="a named checkpoint (STATE/checkpoints/CT/NAME; `pycpt checkpoints CT`)"
    )
    p.add_argument("--compress", choices=["gz", "xz"], help="compress the dump file")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --dumpfile even if it is not a pycpt dump file",
    )
    p.add_argument("--json", action="store_true", help="machine-readable (see the README)")
    add_log_level(p)
    stage = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--leave-running", "dump it and let it run on (podman checkpoint -R)"),
        ("--suspend", "freeze it (step 1)"),
        ("--dump", "dump it, still frozen (2)"),
        ("--kill", "kill it after a good dump (3)"),
        ("--resume", "thaw it instead (3)"),
    ):
        stage.add_argument(flag, action="store_true", help=text)
    _add_criu_flags(p, dump=True)


def _dump_path(args: argparse.Namespace, ct: Any) -> Path:
    """The dump file --dumpfile or --name names, else the default one."""
    if args.dumpfile:
        return Path(args.dumpfile)
    return ct.checkpoint_path(args.name) if args.name else ct.default_dumpfile()


def _dump_progress(args: argparse.Namespace, ct: Any) -> progress.Progress:
    """A bar for the dump file as it is written, out of the container's memory."""
    if not progress.wanted(args):
        return progress.Progress(False, "", lambda: 0, None)
    target = _dump_path(args, ct)
    memory = progress.memory_of(ct.cgroup)()
    return progress.Progress(
        True, f"chkpnt {ct.id}", progress.dump_written(ct.id, target), memory or None
    )


def run_chkpnt(args: argparse.Namespace) -> int:
    ct = container_of(args)
    ct.criu_log_level = args.log_level
    result: Dict[str, Any] = {"id": ct.id}
    started = time.perf_counter()
    if args.suspend or args.kill or args.resume:
        _refuse_options(args, "--suspend, --kill or --resume", dump=True)
    if args.suspend:
        result.update(action="suspend", seconds=ct.suspend(), **_dumpfile_info(None))
        text = f"suspended {ct.id} in {result['seconds'] * 1e3:.1f} ms"
    elif args.dump:
        with _dump_progress(args, ct):
            path = ct.dump(
                args.dumpfile,
                compress=args.compress,
                name=args.name,
                overwrite=args.overwrite,
                **_options(args, dump=True),
            )
        result.update(action="dump", seconds=time.perf_counter() - started, **_dumpfile_info(path))
        text = f"dumped {ct.id} to {path} in {result['seconds']:.3f} s; still frozen"
    elif args.kill:
        ct.kill()
        result.update(action="kill", seconds=time.perf_counter() - started, **_dumpfile_info(None))
        text = f"killed {ct.id}"
    elif args.resume:
        result.update(action="resume", seconds=ct.resume(), **_dumpfile_info(None))
        text = f"resumed {ct.id} in {result['seconds'] * 1e3:.1f} ms"
    else:
        with _dump_progress(args, ct):
            path = ct.chkpnt(
                args.dumpfile,
                compress=args.compress,
                leave_running=args.leave_running,
                name=args.name,
                overwrite=args.overwrite,
                **_options(args, dump=True),
            )
        result.update(
            action="chkpnt", seconds=time.perf_counter() - started, **_dumpfile_info(path)
        )
        text = f"checkpointed {ct.id} to {path} in {result['seconds']:.3f} s" + (
            "; still running" if args.leave_running else ""
        )
    result["status"] = ct.status.value
    return _report(args, ct, result, text)


def add_restore(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "restore",
        run_restore,
        "restore CT from its dump file (vzctl restore)",
        description="Restore container CT from its dump file and run it (vzctl restore); or "
        "in stages: --undump, then --resume or --kill. Restoring another container's dump "
        "file under a new id makes a new container running that program (podman's "
        "restore --import --name).",
    )
    add_ct(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dumpfile", help="the dump file (default STATE/dump/Dump.CT)")
    where.add_argument("--name", help="the named checkpoint to restore (`pycpt checkpoints CT`)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="let an existing CT become the dump file's program (another argv, root or net)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable (see the README)")
    add_log_level(p)
    p.add_argument(
        "--trust-dumpfile",
        action="store_true",
        help="DANGEROUS: restore a file not signed by a trusted key (or unsigned, format 1); "
        "its processes run as root whatever it holds",
    )
    stage = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--undump", "rebuild it, frozen (step 1)"),
        ("--resume", "let it run (2)"),
        ("--kill", "kill it instead (2)"),
    ):
        stage.add_argument(flag, action="store_true", help=text)
    _add_criu_flags(p, dump=False)


def _restore_progress(args: argparse.Namespace, ct: Any) -> progress.Progress:
    """A bar for the restored processes' memory, out of the dump's memory pages."""
    if not progress.wanted(args):
        return progress.Progress(False, "", lambda: 0, None)
    from pycpt import dumpfile
    from pycpt.container import cgroup_root

    source = _dump_path(args, ct)
    try:
        parts = dumpfile.read_manifest(source).parts
        total: Optional[int] = sum(p.size for p in parts if "pages-" in p.name) or None
    except Exception:  # the restore itself says what is wrong with the file
        total = None
    return progress.Progress(
        True, f"restore {ct.id}", progress.memory_of(cgroup_root() / ct.id), total
    )


def run_restore(args: argparse.Namespace) -> int:
    from pycpt.container import Container

    ct = Container(args.ct, state_dir_path=args.state_dir)
    result: Dict[str, Any] = {"id": ct.id}
    started = time.perf_counter()
    if args.resume or args.kill:
        _refuse_options(args, "--resume or --kill", dump=False)
    if args.resume:
        result.update(action="resume", seconds=ct.resume(), dumpfile=None)
        text = f"resumed {ct.id} in {result['seconds'] * 1e3:.1f} ms"
    elif args.kill:
        ct.kill()
        result.update(action="kill", seconds=time.perf_counter() - started, dumpfile=None)
        text = f"killed {ct.id}"
    else:
        with _restore_progress(args, ct):
            ct = Container.restore(
                args.ct,
                args.dumpfile,
                state_dir_path=args.state_dir,
                undump_only=args.undump,
                name=args.name,
                replace=args.replace,
                log_level=args.log_level,
                trust_dumpfile=args.trust_dumpfile,
                **_options(args, dump=False),
            )
        result.update(
            action="undump" if args.undump else "restore",
            seconds=time.perf_counter() - started,
            dumpfile=ct.state.get("dumpfile"),
        )
        text = (
            f"{'undumped' if args.undump else 'restored'} {ct.id} in "
            f"{result['seconds']:.3f} s: init pid {ct.init_pid}"
            + (", frozen until --resume" if args.undump else "")
        )
    result.update(status=ct.status.value, init_pid=ct.init_pid)
    return _report(args, ct, result, text)


def add_checkpoints(sub: Subparsers) -> None:
    p = add_verb(sub, "checkpoints", run_checkpoints, "the named checkpoints of CT")
    add_ct(p)
    p.add_argument("--json", action="store_true", help="machine-readable (see the README)")


def run_checkpoints(args: argparse.Namespace) -> int:
    from pycpt.container import Container

    found = Container(args.ct, state_dir_path=args.state_dir).checkpoints()
    if args.json:
        print_json(found)
        return 0
    rows = [["NAME", "CREATED", "SIZE", "PATH"]]
    for c in found:
        size = f"{c['size'] / 2**20:.1f} MiB" if c.get("size") is not None else "-"
        rows.append([c["name"], c["created"] or f"({c['error']})", size, c["path"]])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


PARSERS = (add_chkpnt, add_restore, add_checkpoints)
