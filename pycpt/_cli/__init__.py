"""The verbs of the `pycpt` command, one module per group (pycpt/cli.py builds the parser
from them, runs the chosen verb and maps errors to exit statuses).

Adding a verb: in the module of its group (or a new module listed in pycpt/cli.py's
VERB_MODULES), write

    def add_NAME(sub: Subparsers) -> None:          # its parser
        p = add_verb(sub, "NAME", run_NAME, "one line: what it does")
        add_ct(p)                                    # the container id, if it takes one
        p.add_argument("--flag", help="one line")

    def run_NAME(args: argparse.Namespace) -> int:   # runs it; returns the exit status
        from pycpt.container import Container        # heavy imports inside, not at the top
        ...

and append add_NAME to the module's PARSERS. Errors are raised, not printed: pycpt/cli.py
turns a PycptError into "pycpt: error: ..." and exit status 1, a ValueError into 2.
"""
