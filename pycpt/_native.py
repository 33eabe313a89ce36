"""The only module that imports the compiled extension; turns -errno returns into OSError."""

from __future__ import annotations

import os

try:
    from pycpt._cpt import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "pycpt's C extension (pycpt._cpt) is missing: install pycpt with `pip install .` "
        "(or `pip install -e .`) so that the build compiles it"
    ) from exc

__all__ = ["ffi", "lib", "check"]


def check(ret: int, context: str) -> int:
    """Return `ret` when it is >= 0; raise the OSError subclass for -errno otherwise."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret), context)
    return ret
