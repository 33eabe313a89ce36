"""`pycpt migrate` (vzmigrate) and the hidden `pycpt migrate-target` it runs on the target."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from pycpt import errors
from pycpt._cli import progress
from pycpt._cli.base import Subparsers, add_ct, add_verb, print_json


def add_migrate(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "migrate",
        run_migrate,
        "move CT to another host over ssh (vzmigrate)",
        description="Move CT to another host over ssh (vzmigrate); or, with --abort, settle "
        "a migration of CT that was interrupted.",
        epilog="`pycpt migrate --abort CT` asks the target what became of its copy: gone -> "
        "CT resumes here; running there -> the copy here is ended. If the target cannot be "
        "asked, CT stays frozen here; --force resumes it here anyway (check first that it "
        "does not run there).",
    )
    p.add_argument(
        "host",
        metavar="HOST",
        nargs="?",
        help="[user@]host[:port], reached with ssh keys (never a password)",
    )
    add_ct(p)
    p.add_argument(
        "--abort",
        action="store_true",
        help="settle an interrupted migration of CT (no HOST: the record names it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --abort: resume CT here even if the target cannot be asked",
    )
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


def run_migrate(args: argparse.Namespace) -> int:
    import shlex

    from pycpt.migrate import migrate

    if args.state_dir:
        os.environ["PYCPT_STATE_DIR"] = args.state_dir
    if args.abort:
        from pycpt.migrate import abort

        if args.host is not None:
            raise errors.InvalidArgumentError("--abort takes only CT: the record names the host")
        print(abort(args.ct, force=args.force))
        return 0
    if args.force:
        raise errors.InvalidArgumentError("--force goes with --abort")
    if args.host is None:
        raise errors.InvalidArgumentError("give the host to migrate to: pycpt migrate HOST CT")
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
        progress=_progress(args),
        connect_timeout=args.connect_timeout,
    )
    if args.json:
        print_json(stats.to_dict())
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


def _progress(args: argparse.Namespace) -> Any:
    """One line per stage on stderr (not with --json); on a terminal also a live bar while
    the images (transfer) and the memory (pages, post-copy) move."""
    from pycpt.migrate import Progress

    if args.json:
        return None
    if not progress.wanted(args):
        return sys.stderr

    class Live(Progress):
        bar: Optional[progress.Progress] = None

        def begin(self, stage: str, total: Optional[int] = None) -> None:
            self._close()
            sample = {"transfer": _written_by_me, "pages": _written_by_children}.get(stage)
            if sample is not None:
                start = sample()
                self.bar = progress.Progress(True, stage, lambda: sample() - start, total)
                self.bar.__enter__()

        def _close(self) -> None:
            if self.bar is not None:
                self.bar.__exit__()
                self.bar = None

        def __call__(self, stage: str, seconds: float, nbytes: int = 0, note: str = "") -> None:
            self._close()
            super().__call__(stage, seconds, nbytes, note)

    return Live(sys.stderr)


def _io(pid: str) -> int:
    """Bytes `pid` has written so far (wchar: to files, pipes and sockets alike)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _written_by_me() -> int:
    return _io("self")  # the images go over pycpt's own ssh session


def _children(pid: str) -> list:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += f.read().split()
    except OSError:
        pass
    return found


def _written_by_children() -> int:
    # post-copy's memory leaves through CRIU's page server, below this process (its swrk,
    # or a process that one started)
    kids = _children(str(os.getpid()))
    return sum(_io(pid) for pid in kids + [g for k in kids for g in _children(k)])


def add_migrate_target(sub: Subparsers) -> None:
    p = add_verb(sub, "migrate-target", run_migrate_target, None)  # hidden: the source runs it
    add_ct(p)
    p.add_argument("--abort", metavar="TOKEN", help=argparse.SUPPRESS)


def run_migrate_target(args: argparse.Namespace) -> int:
    from pycpt._migration import target as migrate_target

    if args.state_dir:
        os.environ["PYCPT_STATE_DIR"] = args.state_dir
    return migrate_target.main(args.ct, args.abort)


PARSERS = (add_migrate, add_migrate_target)
