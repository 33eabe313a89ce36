"""`pycpt engine install | status`: the CRIU pycpt drives."""

from __future__ import annotations

import argparse

from pycpt._cli.base import Subparsers, add_verb, print_json


def add_engine(sub: Subparsers) -> None:
    p = add_verb(sub, "engine", None, "the CRIU binary pycpt drives")
    esub = p.add_subparsers(
        dest="engine_command", required=True, metavar="ACTION", help="what to do"
    )
    ep = add_verb(
        esub, "install", run_install, "install a working CRIU >= 4.2 for pycpt (idempotent)"
    )
    ep.add_argument("--force", action="store_true", help="reinstall even if one works")
    ep.add_argument(
        "--prefix", help="where to install (default $PYCPT_ENGINE_DIR or /var/lib/pycpt/engine)"
    )
    ep = add_verb(esub, "status", run_status, "every CRIU candidate and which one is used")
    ep.add_argument("--json", action="store_true", help="machine-readable output")


def run_install(args: argparse.Namespace) -> int:
    from pycpt import engine

    engine.install_engine(prefix=args.prefix, force=args.force)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from pycpt import engine

    status = engine.engine_status()
    if args.json:
        print_json(status)
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


PARSERS = (add_engine,)
