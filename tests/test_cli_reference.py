"""The README's CLI reference, the man page and shell completion are made from the parser
(pycpt/_cli/reference.py): this keeps the README's copy true (issue 14.10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pycpt._cli import reference
from pycpt.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_reference_is_the_parser_s():
    text = README.read_text()
    start, end = text.index(reference.START), text.index(reference.END)
    found = text[start : end + len(reference.END) + 1]
    assert found == reference.markdown(build_parser()), (
        "the README's CLI reference is out of date: run `python -m pycpt._cli.reference README.md`"
    )


def test_every_listed_verb_is_in_the_readme_and_hidden_ones_are_not():
    text = README.read_text()
    listed = [" ".join(path) for path, _, _ in reference.verbs(build_parser())]
    assert "rm" in listed and "enter" in listed and "checkpoints" in listed
    for verb in listed:
        assert f"### pycpt {verb}\n" in text
    assert "migrate-target" not in listed


def pycpt(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "pycpt", *args], capture_output=True, text=True, check=True
    ).stdout


def test_man_page_and_completion():
    man = pycpt("manpage")
    assert man.startswith(".TH PYCPT 1") and ".SH EXIT STATUS" in man and "chkpnt" in man
    rendered = subprocess.run(["man", "-l", "-"], input=man, capture_output=True, text=True)
    if rendered.returncode == 0:  # man-db may be missing: the roff itself was checked
        assert "pycpt chkpnt" in rendered.stdout
    bash = pycpt("completion", "bash")
    assert "chkpnt" in bash and "--leave-running" in bash
    assert "_shtab_pycpt" in bash or "complete" in bash
    zsh = pycpt("completion", "zsh")
    assert "#compdef pycpt" in zsh


def test_top_level_help_names_the_status_values_and_exit_statuses():
    out = pycpt("--help")
    for word in ("running", "frozen", "suspended", "dumped", "undumped", "stopped", "141", "128+N"):
        assert word in out
