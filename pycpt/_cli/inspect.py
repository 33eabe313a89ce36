"""`pycpt inspect`: look inside a checkpoint without restoring it (pycpt.images does the
reading, the report and its text views; this module only picks what to show).

A target that exists as a path is that dump file or images directory; otherwise it is a
container id and means the dump file `pycpt restore CT` would use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from pycpt import errors
from pycpt._cli.base import Subparsers, add_verb

# view flag -> the report section it needs (None: in every report)
VIEWS = {
    "ps": None,
    "files": "files",
    "mem": "memory",
    "sockets": "sockets",
    "manifest": "manifest",
}

DESCRIPTION = """\
Look inside a checkpoint without restoring it: which container, when, made by which
pycpt/CRIU/kernel, signed or not; its processes, memory, namespaces, cgroup, files and
sockets. Nothing is restored and no signature is needed (the file's own claims are shown,
not believed). TARGET is a dump file, an images directory, or a container id (its dump
file, the one `pycpt restore CT` uses)."""


def add_inspect(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "inspect",
        run_inspect,
        "look inside a checkpoint without restoring it",
        description=DESCRIPTION,
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="a dump file, an images directory, or a container id (its dump file)",
    )
    p.add_argument("--ps", action="store_true", help="the processes in detail")
    p.add_argument("--files", action="store_true", help="each process's descriptors")
    p.add_argument("--mem", action="store_true", help="each process's memory areas (VMAs)")
    p.add_argument("--sockets", action="store_true", help="every socket, its addresses and state")
    p.add_argument("--manifest", action="store_true", help="the dump file's manifest")
    p.add_argument(
        "--json",
        action="store_true",
        help="the report as JSON: every section unless views are named (keys in the README)",
    )
    p.add_argument(
        "--diff",
        nargs=2,
        metavar=("A", "B"),
        help="what changed from checkpoint A to B (dump files, directories or container ids)",
    )


def run_inspect(args: argparse.Namespace) -> int:
    from pycpt import images

    views = [v for v in VIEWS if getattr(args, v)]
    state_dir = getattr(args, "state_dir", None)
    if args.diff:
        if args.target is not None or views:
            raise errors.InvalidArgumentError(
                "--diff takes two checkpoints, and no other target or view"
            )
        a, b = (_report(resolve(t, state_dir), images.REPORT_SECTIONS) for t in args.diff)
        d = images.diff_reports(a, b)
        _write(json.dumps(d, indent=2) + "\n" if args.json else images.format_diff(d))
        return 0
    if args.target is None:
        raise errors.InvalidArgumentError(
            "give a dump file, an images directory or a container id to inspect"
        )
    sections: List[str]
    if views:
        sections = [s for s in (VIEWS[v] for v in views) if s]
    else:  # the text summary names the listening sockets
        sections = list(images.REPORT_SECTIONS) if args.json else ["sockets"]
    report = _report(resolve(args.target, state_dir), sections)
    if args.json:
        _write(json.dumps(report, indent=2) + "\n")
    else:
        _write(images.format_report(report, views or ["summary"]))
    return 0


def resolve(target: str, state_dir: Optional[str] = None) -> str:
    """The path a target names: itself if it exists (or looks like a path), else the dump
    file of the container with that id."""
    if os.path.lexists(target) or os.sep in target:
        return target
    from pycpt.container import Container

    try:
        ct = Container(target, state_dir_path=state_dir)
    except ValueError:
        raise errors.DumpFileNotFoundError(
            f"{target} is neither a dump file, an images directory nor a container id",
            path=target,
        ) from None
    path = ct.default_dumpfile()
    if not path.exists():
        raise errors.DumpFileNotFoundError(
            f"container {target} has no dump file ({path} does not exist)",
            path=str(path),
            hint=f"`pycpt chkpnt {target}` writes it; or name the dump file itself",
        )
    return str(path)


def _report(path: str, sections: Sequence[str]) -> Dict[str, Any]:
    from pycpt.images import Images

    with Images.open(path) as im:
        return im.report(sections)


def _write(text: str) -> None:
    sys.stdout.write(text)


PARSERS = (add_inspect,)
