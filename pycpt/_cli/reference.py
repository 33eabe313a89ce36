"""What the parser knows, for people: the README's CLI reference (Markdown), the man page
(roff) and shell completion (shtab), all made from the parser itself so they cannot drift.

    python -m pycpt._cli.reference README.md    # rewrites the README's reference section
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Dict, Iterator, List, Tuple

from pycpt._cli.base import Subparsers, add_verb
from pycpt._cli.schemas import SCHEMAS

START = "<!-- cli-reference: made by `python -m pycpt._cli.reference README.md` -->"
END = "<!-- cli-reference: end -->"
COMMON_DESTS = ("state_dir", "quiet")


def verbs(parser: argparse.ArgumentParser, path: Tuple[str, ...] = ()) -> Iterator[Any]:
    """(path, parser, help line) for every listed verb below `parser`, in --help's order;
    hidden verbs (no help line) are left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if name in helps:
                    yield (*path, name), sub, helps[name]
                    yield from verbs(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> List[Tuple[str, str]]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, (argparse._HelpAction, argparse._SubParsersAction)
        ):
            continue
        if action.dest in COMMON_DESTS:
            continue  # every verb takes them: said once
        metavar = action.metavar
        if isinstance(metavar, tuple):
            metavar = " ".join(metavar)
        if metavar is None and action.choices is not None:
            metavar = "{" + ",".join(map(str, action.choices)) + "}"
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0:
                flags += " " + (metavar or action.dest.upper())
        else:
            flags = str(metavar or action.dest)
        rows.append((flags, action.help or ""))
    return rows


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())[len("usage: ") :]


def _schema_rows(schema: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    item = schema.get("items", schema)
    rows = []
    for name, prop in item.get("properties", {}).items():
        kind = prop.get("type") or ("one of " + ", ".join(map(str, prop["enum"])))
        if isinstance(kind, list):
            kind = " or ".join(kind)
        rows.append((name, str(kind), prop.get("description", "")))
    return rows


def markdown(parser: argparse.ArgumentParser) -> str:
    """The README's CLI reference section."""
    from pycpt._cli.containers import STATUS_VALUES
    from pycpt.cli import EXIT_STATUSES

    out = [START, "", "## CLI reference", ""]
    out.append(
        "Every verb and option, as `pycpt --help` and `pycpt VERB --help` give them (this "
        "section is made from the parser; a test keeps it so). Options go anywhere before "
        "`--`; `--state-dir DIR` and `-q` are taken by every verb. `pycpt manpage` prints the "
        "same as a man page, `pycpt completion bash|zsh|tcsh` a completion script."
    )
    out += ["", "```", EXIT_STATUSES.rstrip(), "", STATUS_VALUES.rstrip(), "```", ""]
    for path, sub, help_line in verbs(parser):
        out += [f"### pycpt {' '.join(path)}", "", f"{help_line[0].upper()}{help_line[1:]}."]
        out += ["", "```"]
        out += [_usage(sub), "```"]
        description = " ".join((sub.description or "").split())
        if description and description.rstrip(".") != help_line[0].upper() + help_line[1:]:
            out += ["", description]
        rows = _options(sub)
        if rows:
            out += ["", "| argument | what it is |", "|---|---|"]
            out += [f"| `{flags}` | {text.replace('|', '/')} |" for flags, text in rows]
        out.append("")
    out += ["### JSON output", ""]
    out.append(
        "`--json` prints one JSON document on stdout (nothing else there); its schema is "
        "`pycpt.cli.JSON_SCHEMAS[verb]` (JSON Schema), and the tests validate real output "
        "against it. The fields:"
    )
    for verb, schema in SCHEMAS.items():
        shape = "a list of objects" if schema.get("type") == "array" else "an object"
        out += ["", f"`pycpt {verb} --json`: {shape}, {schema.get('description', '')}.", ""]
        out += ["| field | type | meaning |", "|---|---|---|"]
        out += [f"| `{n}` | {k} | {d} |" for n, k, d in _schema_rows(schema)]
    out += ["", END]
    return "\n".join(out) + "\n"


def rewrite_readme(path: str, parser: argparse.ArgumentParser) -> bool:
    """Put markdown(parser) between the markers in the file at `path`; True if it changed."""
    with open(path) as f:
        text = f.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END + "\n")
    new = head + markdown(parser) + tail
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


def _roff(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def manpage(parser: argparse.ArgumentParser) -> str:
    """pycpt(1) in roff."""
    from pycpt._cli.containers import STATUS_VALUES
    from pycpt._version import __version__
    from pycpt.cli import EXIT_STATUSES

    date = datetime.date.today().isoformat()
    out = [
        f'.TH PYCPT 1 "{date}" "pycpt {__version__}" "User Commands"',
        ".SH NAME",
        "pycpt \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".B pycpt",
        "[\\-\\-state\\-dir DIR] [\\-q] COMMAND [OPTIONS] [\\-\\- CMD [ARGS...]]",
        ".SH COMMANDS",
    ]
    for path, sub, help_line in verbs(parser):
        out += [".SS " + _roff("pycpt " + " ".join(path)), _roff(help_line) + ".", ".PP"]
        out += [".nf", _roff(_usage(sub)), ".fi"]
        for flags, text in _options(sub):
            out += [".TP", ".B " + _roff(flags), _roff(text)]
    out += [".SH EXIT STATUS", ".nf", _roff(EXIT_STATUSES), ".fi"]
    out += [".SH CONTAINER STATUS", ".nf", _roff(STATUS_VALUES), ".fi"]
    out += [".SH ENVIRONMENT", ".TP", ".B PYCPT_STATE_DIR", "default of \\-\\-state\\-dir"]
    out += [".TP", ".B PYCPT_CGROUP_PARENT", "where containers' cgroups go (default pycpt)"]
    out += [".TP", ".B PYCPT_CRIU", "the CRIU binary to use (see pycpt engine status)"]
    return "\n".join(out) + "\n"


def add_completion(sub: Subparsers) -> None:
    p = add_verb(
        sub,
        "completion",
        run_completion,
        "print a shell completion script (e.g. `pycpt completion bash > "
        "/etc/bash_completion.d/pycpt`)",
    )
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete for")


def run_completion(args: argparse.Namespace) -> int:
    import shtab

    from pycpt.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def add_manpage(sub: Subparsers) -> None:
    add_verb(
        sub, "manpage", run_manpage, "print pycpt(1), the manual page (man -l <(pycpt manpage))"
    )


def run_manpage(args: argparse.Namespace) -> int:
    from pycpt.cli import build_parser

    print(manpage(build_parser()), end="")
    return 0


PARSERS = (add_completion, add_manpage)


if __name__ == "__main__":
    from pycpt.cli import build_parser

    changed = rewrite_readme(sys.argv[1], build_parser())
    print(json.dumps({"changed": changed}))
