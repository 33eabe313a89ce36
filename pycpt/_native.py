"""The only module that imports the compiled extension, and the one mapping of a C shim's
-errno return to an exception (OSError picks PermissionError, ProcessLookupError, ...)."""

from __future__ import annotations

import os

try:
    from pycpt._cpt import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "pycpt's C extension (pycpt._cpt) is missing: install pycpt with `pip install .` "
        "(or `pip install -e .`) so that the build compiles it"
    ) from exc

__all__ = ["ffi", "lib", "check", "os_error"]


def os_error(ret: int, context: str = "") -> OSError:
    """The OSError subclass for a -errno return `ret`, naming `context` if given."""
    if context:
        return OSError(-ret, os.strerror(-ret), context)
    return OSError(-ret, os.strerror(-ret))


def check(ret: int, context: str) -> int:
    """Return `ret` when it is >= 0; raise the OSError subclass for -errno otherwise."""
    if ret < 0:
        raise os_error(ret, context)
    return ret
