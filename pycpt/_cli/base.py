"""What every verb module shares: registering a verb, the common arguments, output."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, Callable, List, Optional, Sequence

from pycpt import errors

Subparsers = Any  # argparse's _SubParsersAction (private in argparse, so not named here)
Runner = Callable[[argparse.Namespace], int]

# Options every verb takes anywhere before `--` (also before the verb). Their default is
# SUPPRESS, so that a value given before the verb is not reset by the verb's parser.
COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument(
    "--state-dir",
    default=argparse.SUPPRESS,
    help="where containers' state lives (default $PYCPT_STATE_DIR or /var/lib/pycpt)",
)
COMMON.add_argument(
    "-q",
    "--quiet",
    action="store_true",
    default=argparse.SUPPRESS,
    help="no progress bars on stderr (they are drawn only on a terminal anyway)",
)


def add_log_level(p: argparse.ArgumentParser) -> None:
    """-v / --log-level: CRIU's log level, its whole log kept beside the container's state."""
    p.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const=4,
        help="CRIU's most detailed log (level 4), kept as STATE/ct/CT/criu-*.log",
    )
    p.add_argument(
        "--log-level",
        type=int,
        choices=range(5),
        metavar="0-4",
        help="CRIU's log level (default 2), its log kept as STATE/ct/CT/criu-*.log",
    )


def add_verb(
    sub: Subparsers,
    name: str,
    run: Optional[Runner],
    help: Optional[str],
    *,
    description: Optional[str] = None,
    epilog: Optional[str] = None,
) -> argparse.ArgumentParser:
    """Add verb `name` to `sub`: `help` is its line in the list of verbs (None hides it),
    `description` the text of its own --help (default: `help`), `run` what runs it (None
    for a verb that only groups others)."""
    kwargs: dict = {}
    if help is not None:  # without `help`, argparse leaves the verb out of every listing
        kwargs["help"] = help
    text = description or (help[0].upper() + help[1:] + "." if help else None)
    p = sub.add_parser(
        name,
        # the epilog keeps its lines (tables); the description is one paragraph, wrapped
        description=textwrap.fill(
            " ".join(text.split()), 79, break_on_hyphens=False, break_long_words=False
        )
        if text
        else None,
        epilog=epilog,
        parents=[COMMON],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    p.set_defaults(run=run)
    return p


def add_ct(p: argparse.ArgumentParser, help: str = "the container's id") -> None:
    """The container id argument."""
    p.add_argument("ct", metavar="CT", help=help)


def add_command(p: argparse.ArgumentParser, help: str = "the command to run") -> None:
    """The command after `--` (args.cmd): pycpt/cli.py hands everything after the first
    `--` to it untouched, so options of the verb may come before or after its id."""
    p.add_argument("cmd", nargs="*", metavar="CMD", help=f"-- CMD [ARGS...]: {help}")
    p.set_defaults(takes_command=True)


def command_words(words: Optional[Sequence[str]]) -> List[str]:
    """The command after `--` (or the words given without it)."""
    words = list(words or ())
    if not words:
        raise errors.InvalidArgumentError(
            "give the command after --, e.g. `-- /bin/sh -c 'sleep 1000'`"
        )
    return words


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout."""
    print(json.dumps(data, indent=2, sort_keys=False))


def note(text: str) -> None:
    """A remark on stderr (stdout stays for results)."""
    print(text, file=sys.stderr)


def shell_status(returncode: int) -> int:
    """A child's exit status as shells report it: a death by signal N is 128+N (Popen and
    os.waitstatus_to_exitcode give -N)."""
    return 128 - returncode if returncode < 0 else returncode
