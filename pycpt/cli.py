"""The `pycpt` command: the parser, the run of one verb, errors and exit statuses.

Each group of verbs lives in its own module under pycpt/_cli/ (see pycpt/_cli/__init__.py
for how to add one); this module only puts them together. Options may come anywhere before
`--`; whatever follows `--` is the command of `start` and `exec`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional, Sequence

from pycpt import errors
from pycpt._cli import (
    checkpoint,
    containers,
    criu,
    doctor,
    engine,
    freezer,
    inspect,
    keys,
    migrate,
    reference,
)
from pycpt._cli.schemas import SCHEMAS as JSON_SCHEMAS
from pycpt._version import __version__

__all__ = ["JSON_SCHEMAS", "build_parser", "main", "parse_args"]

# The verb modules, in the order their verbs are listed by `pycpt --help`.
VERB_MODULES = (
    doctor,
    engine,
    criu,
    containers,
    checkpoint,
    inspect,
    keys,
    migrate,
    freezer,
    reference,
)

EXIT_STATUSES = """\
exit status:
  0    done
  1    failed: the message on stderr says why, with a hint what to do
  2    bad usage (an unknown option, a missing or invalid argument)
  130  interrupted (Ctrl-C; 143 for SIGTERM, 129 for SIGHUP: each fails as cleanly)
       stderr then says what the container was left as and the command that goes on
  141  stdout was closed early (e.g. `pycpt list | head -1`)
  exec, enter, criu restore --rst-sibling: the command's own exit status, 128+N when
  signal N ended it (as shells report it)
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `pycpt` command."""
    parser = argparse.ArgumentParser(
        prog="pycpt",
        description="Checkpoint, restore and migrate Linux containers and process trees "
        "with CRIU (the OpenVZ vzctl workflow).",
        epilog=EXIT_STATUSES + "\n" + containers.STATUS_VALUES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pycpt {__version__}")
    parser.add_argument(
        "--state-dir",
        help="where containers' state lives (default $PYCPT_STATE_DIR or /var/lib/pycpt)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`pycpt COMMAND --help` says more"
    )
    for module in VERB_MODULES:
        for add in module.PARSERS:
            add(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`: options anywhere before the first `--`; for a verb that runs a command
    (start, exec) everything after it is that command, untouched."""
    words = list(argv)
    if "--" in words:
        cut = words.index("--")
        verb = _verb_parser(parser, words[:cut])
        if verb is not None and verb.get_default("takes_command"):
            args = parser.parse_args(words[:cut])
            args.cmd = [*(args.cmd or ()), *words[cut + 1 :]]
            return args
    return parser.parse_args(words)  # `--` as argparse means it: what follows is no option


def _verb_parser(
    parser: argparse.ArgumentParser, words: Sequence[str]
) -> Optional[argparse.ArgumentParser]:
    """The parser of the verb named in `words` (the first word naming one that is not the
    value of a top-level option), or None."""
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif word in verbs.choices:
            return verbs.choices[word]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `pycpt` command; returns the exit status."""
    if isinstance(argv, (str, bytes)):
        raise errors.InvalidArgumentError("main() takes a list of arguments, not a string")
    words: List[str] = list(sys.argv[1:] if argv is None else argv)
    from pycpt._sys import signals

    parser = build_parser()
    args = parse_args(parser, words)
    # what pycpt writes may hold a container's memory, arguments or output: nobody else's
    os.umask(0o077)
    signals.install()  # SIGTERM and SIGHUP fail the command as cleanly as Ctrl-C
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except BrokenPipeError:
        # the reader went away (`pycpt list | head -1`): no traceback, and nothing more is
        # written to the pipe (Python would try again at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except errors.PycptError as exc:
        print(f"pycpt: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):  # e.g. a clean-up that failed as well
            print(f"  note: {note}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except ValueError as exc:
        print(f"pycpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"pycpt: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"  note: {note}", file=sys.stderr)
        from pycpt._cli.containers import where_left

        for line in where_left(args):
            print(line, file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
