"""Run the `pycpt` command, stopped at a chosen point: when function MODULE:QUALNAME is
called for the Nth time, this process gets signal SIG (SIGKILL: it dies there, as after a
kill -9 or a crash of pycpt alone; SIGINT, SIGTERM, SIGHUP: raised there, as a user would).

    python tests/helpers/die_at.py pycpt.container:Container._kill_all 1 SIGKILL -- chkpnt ct1

Run by path, as a command; the tests use it to reach every step of a verb in turn."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any


def main() -> int:
    spec, nth, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args = sys.argv[sys.argv.index("--") + 1 :]
    module_name, qualname = spec.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, attribute = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attribute)
    calls = [0]
    signum = signal.Signals[name]

    def stopped_here(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            if signum == signal.SIGKILL:
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signum)  # delivered to the main thread, wherever we are
        return original(*a, **kw)

    setattr(owner, attribute, stopped_here)
    from pycpt.cli import main as pycpt_main

    return pycpt_main(args)


if __name__ == "__main__":
    sys.exit(main())
