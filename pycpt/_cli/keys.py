"""`pycpt key show | trust`: this host's signing key and the keys it trusts."""

from __future__ import annotations

import argparse

from pycpt._cli.base import Subparsers, add_verb


def add_key(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "key",
        None,
        "this host's dump-file signing key and the keys it trusts",
        epilog="Restore accepts a dump file signed by this host's key or a trusted one.\n"
        "To restore on host B what host A checkpointed: on A `pycpt key show`, on B\n"
        "`pycpt key trust 'LINE'` with the line A printed.",
    )
    ksub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION", help="what to do")
    add_verb(ksub, "show", run_show, "print this host's public key line (made on first use)")
    kp = add_verb(ksub, "trust", run_trust, "trust another host's key for restore")
    kp.add_argument(
        "key",
        metavar="FILE|LINE",
        help="the line `pycpt key show` printed there, or a file holding it",
    )


def run_show(args: argparse.Namespace) -> int:
    from pycpt.dumpfile import Keys

    print(Keys(args.state_dir).public_line())
    return 0


def run_trust(args: argparse.Namespace) -> int:
    from pycpt.dumpfile import Keys, fingerprint, parse_key_line

    added, line = Keys(args.state_dir).trust(args.key)
    raw, comment = parse_key_line(line)
    what = f"{fingerprint(raw)}" + (f" ({comment})" if comment else "")
    print(f"trusted {what}" if added else f"already trusted: {what}")
    return 0


PARSERS = (add_key,)
