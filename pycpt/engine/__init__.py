"""The CRIU binary pycpt drives ("the engine"): find it, verify it, install a private one.

Where an engine comes from, in this order (the first that works is used):

1. ``$PYCPT_CRIU``: a criu binary (a path, or a bare name looked up on PATH), or the
   directory of a pycpt-managed install (one holding ``engine.json``). Setting it is an
   explicit choice, so a missing, too old or broken engine there is an error: pycpt does not
   silently fall back to another one.
2. The pycpt-managed install in ``$PYCPT_ENGINE_DIR`` (default ``/var/lib/pycpt/engine``),
   made by :func:`install_engine` (``pycpt engine install``).
3. ``criu`` on PATH.

Candidates 2 and 3 are automatic: when the managed install is broken but the PATH criu
works, the PATH criu is used (``engine_status()`` still reports the broken one). When none
works, the error of the first candidate found is raised, naming the others' problems too.

A managed install is Debian sid's criu plus its library closure, including the C library,
unpacked with ``dpkg-deb -x`` into the prefix and started through the prefix's own dynamic
loader. Nothing outside the prefix changes: apt runs with a private configuration, an empty
dpkg status and private lists, so Debian 12 (whose glibc cannot run sid's criu) and Debian 13
both get the same, working CRIU.

Errors raised here are :class:`~pycpt.errors.EngineError` subclasses that carry, besides
``message`` and ``hint``: ``path`` (the criu binary), ``source``, ``version`` (a tuple or
None) and ``output`` (what criu or apt printed, or "").
"""

from pycpt.engine._apt import find_debian_mirror, unmet_from_newer
from pycpt.engine._find import (
    DEFAULT_ENGINE_DIR,
    MANIFEST_NAME,
    MIN_VERSION,
    Engine,
    clear_cache,
    engine_status,
    find_engine,
    managed_engine_dir,
    parse_version,
    read_manifest,
)
from pycpt.engine._install import install_engine, replace_dir

__all__ = [
    "Engine",
    "MIN_VERSION",
    "DEFAULT_ENGINE_DIR",
    "MANIFEST_NAME",
    "find_engine",
    "install_engine",
    "engine_status",
    "managed_engine_dir",
    "read_manifest",
    "parse_version",
    "clear_cache",
    "find_debian_mirror",
    "replace_dir",
    "unmet_from_newer",
]
