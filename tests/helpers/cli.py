"""Running the `pycpt` command as a user would: a real subprocess of this interpreter."""

from __future__ import annotations

import subprocess
import sys
from typing import Any


def run(*args: str, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """`pycpt ARGS` (python -m pycpt), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pycpt", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
        **kw,
    )
