"""Finding and verifying the CRIU pycpt drives: the candidates in their order, each one's
version and `criu check`, cached per binary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from pycpt.errors import (
    CriuBrokenError,
    CriuNotFoundError,
    CriuTooOldError,
    EngineError,
)

#: The oldest CRIU pycpt works with (4.1 cannot dump AF_INET sockets on current kernels).
MIN_VERSION: Tuple[int, int, int] = (4, 2, 0)

#: Where :func:`install_engine` puts the managed engine unless told otherwise.
DEFAULT_ENGINE_DIR = "/var/lib/pycpt/engine"

#: The file in a managed install that describes it.
MANIFEST_NAME = "engine.json"
_MANIFEST_FORMAT = 1

_VERSION_TIMEOUT = 30.0
_CHECK_TIMEOUT = 120.0

Version = Tuple[int, int, int]
Progress = Callable[[str], Any]


@dataclass(frozen=True)
class Engine:
    """A CRIU binary that pycpt can run, with how to start it.

    ``argv`` is the command prefix: ``(path,)`` for a criu the system can start by itself, or
    ``(loader, "--library-path", libdir, path)`` for a managed install that brings its own C
    library. ``version`` is what ``criu --version`` reported; ``source`` says where it was found:
    ``"PYCPT_CRIU"``, ``"managed"`` or ``"PATH"``.
    """

    argv: Tuple[str, ...]
    path: str
    version: Version
    source: str

    def command(self, *args: str) -> List[str]:
        """The argument list that runs criu with `args` (for subprocess), e.g.
        ``command("swrk", "3")``."""
        return [*self.argv, *args]

    @property
    def version_string(self) -> str:
        """The version as text, e.g. ``"4.2.1"``."""
        return _fmt(self.version)


# --- errors -------------------------------------------------------------------------------


def _error(
    cls: Type[EngineError],
    message: str,
    *,
    hint: str = "",
    path: Optional[str] = None,
    source: str = "",
    version: Optional[Version] = None,
    output: str = "",
) -> EngineError:
    return cls(message, hint=hint, path=path, source=source, version=version, output=output)


def _fmt(version: Optional[Sequence[int]]) -> str:
    return ".".join(str(v) for v in version) if version else "unknown"


def _error_line(output: str, returncode: Optional[int] = None) -> str:
    """The line of criu's output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error") or " Error " in line:
            return line
    if lines:  # e.g. "CRIU needs to have the CAP_SYS_ADMIN ... capability:" + "setcap ..."
        return " ".join(lines[:2])
    return f"exit status {returncode}, no output" if returncode is not None else "no output"


def _where(source: str, path: str) -> str:
    return {
        "PYCPT_CRIU": f"$PYCPT_CRIU ({path})",
        "managed": f"the pycpt-managed criu ({path})",
    }.get(source, f"criu on PATH ({path})")


# --- probing one candidate ------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\s*Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)


def parse_version(output: str) -> Optional[Version]:
    """Parse ``criu --version`` output ("Version: X.Y[.Z]"); None when there is no such line."""
    m = _VERSION_RE.search(output)
    if m is None:
        return None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def _run(argv: Sequence[str], timeout: float) -> Tuple[int, str]:
    """Run a command; return (exit status, stdout and stderr together)."""
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


# Results of `criu --version` and of a passed `criu check`, per binary identity: repeated
# find_engine() calls must not start criu again. Failures are not cached, so a fix is seen.
_cache_lock = threading.Lock()
_version_cache: Dict[tuple, Version] = {}
_verified_cache: Dict[tuple, bool] = {}


def _identity(argv: Sequence[str], path: str) -> tuple:
    st = os.stat(path)
    return (tuple(argv), st.st_dev, st.st_ino, st.st_mtime_ns)


def clear_cache() -> None:
    """Forget cached versions and verifications (they are kept per binary path and mtime)."""
    with _cache_lock:
        _version_cache.clear()
        _verified_cache.clear()


def _probe(source: str, path: str, argv: Sequence[str], *, verify: bool) -> Engine:
    """Read the version of one candidate and (with `verify`) run `criu check`; raise if unusable."""
    where = _where(source, path)
    try:
        key = _identity(argv, path)
    except OSError as exc:
        raise _error(
            CriuNotFoundError,
            f"{where} does not exist: {exc.strerror}",
            path=path,
            source=source,
        ) from exc
    if not os.access(path, os.X_OK):
        raise _error(
            CriuBrokenError,
            f"{where} is not executable",
            hint=f"chmod +x {path}, or point PYCPT_CRIU elsewhere",
            path=path,
            source=source,
        )

    with _cache_lock:
        version = _version_cache.get(key)
    if version is None:
        try:
            rc, out = _run([*argv, "--version"], _VERSION_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _error(
                CriuBrokenError,
                f"{where} could not be started: {exc}",
                path=path,
                source=source,
            ) from exc
        version = parse_version(out)
        if version is None:
            hint = ""
            if "error while loading shared libraries" in out or "GLIBC_" in out:
                hint = (
                    "this criu needs libraries this system lacks; for a pycpt-managed criu point "
                    "PYCPT_CRIU at the engine directory (the one holding engine.json), "
                    "not the binary"
                )
            raise _error(
                CriuBrokenError,
                f"{where} did not report a version: `criu --version` said: {_error_line(out, rc)}",
                hint=hint,
                path=path,
                source=source,
                output=out,
            )
        with _cache_lock:
            _version_cache[key] = version

    if version < MIN_VERSION:
        raise _error(
            CriuTooOldError,
            f"{where} is version {_fmt(version)}; pycpt needs CRIU >= {_fmt(MIN_VERSION)}",
            path=path,
            source=source,
            version=version,
        )

    if verify:
        with _cache_lock:
            verified = _verified_cache.get(key, False)
        if not verified:
            _check(source, path, argv, version)
            with _cache_lock:
                _verified_cache[key] = True
    return Engine(argv=tuple(argv), path=path, version=version, source=source)


def _check(source: str, path: str, argv: Sequence[str], version: Version) -> str:
    """Run a real `criu check`.

    Working means exit status 0 (criu prints "Looks good."). Plain `criu check` only tests
    the features every dump needs, so a non-zero status is a broken engine; the softer
    "Looks good but some kernel features are missing" (only with --extra/--all) is accepted.
    """
    where = _where(source, path)
    try:
        rc, out = _run([*argv, "check"], _CHECK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _error(
            CriuBrokenError,
            f"{where} ({_fmt(version)}) could not run `criu check`: {exc}",
            path=path,
            source=source,
            version=version,
        ) from exc
    if rc == 0 or "Looks good but" in out:
        return out
    hint = ""
    if os.geteuid() != 0:
        hint = "criu needs root (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE): run pycpt as root"
    elif source == "PYCPT_CRIU":
        hint = (
            "point PYCPT_CRIU at a CRIU that works here, or unset it and run `pycpt engine install`"
        )
    raise _error(
        CriuBrokenError,
        f"{where} ({_fmt(version)}) fails `criu check` on this kernel "
        f"(exit status {rc}): {_error_line(out, rc)}",
        hint=hint,
        path=path,
        source=source,
        version=version,
        output=out,
    )


# --- candidates -----------------------------------------------------------------------------


def managed_engine_dir() -> str:
    """The directory of the pycpt-managed engine: ``$PYCPT_ENGINE_DIR`` or the default."""
    return os.path.abspath(os.environ.get("PYCPT_ENGINE_DIR") or DEFAULT_ENGINE_DIR)


def read_manifest(prefix: str) -> Dict[str, Any]:
    """The manifest of the managed install in `prefix` (raises OSError/ValueError if unreadable)."""
    with open(os.path.join(prefix, MANIFEST_NAME), encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST_NAME} has an unknown format")
    return manifest


def _managed_argv(prefix: str, manifest: Dict[str, Any]) -> Tuple[str, Tuple[str, ...]]:
    """(criu path, argv) of a managed install, rebuilt from the prefix so a moved prefix works."""
    rel = manifest["paths"]
    criu = os.path.join(prefix, rel["criu"])
    loader = os.path.join(prefix, rel["loader"])
    libdir = os.path.join(prefix, rel["libdir"])
    return criu, (loader, "--library-path", libdir, criu)


def _managed_candidate(prefix: str, source: str) -> Tuple[str, Tuple[str, ...]]:
    try:
        manifest = read_manifest(prefix)
        return _managed_argv(prefix, manifest)
    except FileNotFoundError as exc:
        raise _error(
            CriuNotFoundError,
            f"no pycpt-managed engine in {prefix} (no {MANIFEST_NAME})",
            path=prefix,
            source=source,
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _error(
            CriuBrokenError,
            f"the pycpt-managed engine in {prefix} has a broken {MANIFEST_NAME}: {exc}",
            hint="run `pycpt engine install --force` to reinstall it",
            path=prefix,
            source=source,
        ) from exc


def _explicit_candidate(value: str) -> Tuple[str, Tuple[str, ...]]:
    """Resolve $PYCPT_CRIU: a managed prefix directory, a path, or a name on PATH."""
    if os.path.isdir(value):
        return _managed_candidate(os.path.abspath(value), "PYCPT_CRIU")
    path = value if "/" in value else shutil.which(value)
    if path is None or not os.path.exists(path):
        raise _error(
            CriuNotFoundError,
            f"PYCPT_CRIU={value} names no existing criu binary",
            hint="set PYCPT_CRIU to a criu binary or a pycpt engine directory, or unset it",
            path=value,
            source="PYCPT_CRIU",
        )
    path = os.path.abspath(path)
    return path, (path,)


def _on_path() -> Tuple[str, Tuple[str, ...]]:
    path = shutil.which("criu")
    if path is None:
        raise _error(
            CriuNotFoundError,
            "no `criu` on PATH",
            source="PATH",
        )
    path = os.path.abspath(path)
    return path, (path,)


_Resolver = Callable[[], Tuple[str, Tuple[str, ...]]]


def _candidates(explicit: Optional[str], automatic: bool) -> List[Tuple[str, _Resolver]]:
    """(source, resolver) in search order; a resolver returns (path, argv) or raises."""
    found: List[Tuple[str, _Resolver]] = []
    if explicit:
        found.append(("PYCPT_CRIU", lambda: _explicit_candidate(explicit)))
    if automatic:
        prefix = managed_engine_dir()
        found.append(("managed", lambda: _managed_candidate(prefix, "managed")))
        found.append(("PATH", _on_path))
    return found


def find_engine(*, verify: bool = True) -> Engine:
    """Find the CRIU pycpt should use, check its version and (with `verify`) that it works here.

    The search order and fallback rules are in this module's docstring. Verification runs a
    real `criu check` (about 40 ms); its success is cached in-process per binary (argv, device,
    inode, mtime), so repeated calls are cheap; failures are not cached. Raises
    CriuNotFoundError, CriuTooOldError or CriuBrokenError,
    each naming the path, the version found and criu's error line.
    """
    explicit = os.environ.get("PYCPT_CRIU")
    errors: List[EngineError] = []
    for source, resolve in _candidates(explicit, automatic=not explicit):
        try:
            path, argv = resolve()
            return _probe(source, path, argv, verify=verify)
        except EngineError as exc:
            if source == "PYCPT_CRIU":
                raise
            errors.append(exc)
    found = [e for e in errors if not isinstance(e, CriuNotFoundError)]
    if not found:
        raise _error(
            CriuNotFoundError,
            "no CRIU found: PYCPT_CRIU is not set; " + "; ".join(e.message for e in errors),
        )
    first = found[0]
    others = [e.message for e in errors if e is not first]
    if others:
        first.message = first.message + " (also: " + "; ".join(others) + ")"
        first.args = (first.message,)
    raise first


def engine_status() -> Dict[str, Any]:
    """Describe every engine candidate for a doctor report (JSON-serialisable).

    Returns ``{"min_version", "managed_dir", "selected", "error", "candidates"}`` where
    ``selected`` is the candidate find_engine() would use (as a dict) or None, ``error`` the
    text of its error otherwise, and each candidate is a dict with ``source``, ``path``,
    ``argv``, ``version``, ``ok``, ``problem`` (error class name and message), ``considered``
    (False for the automatic ones while PYCPT_CRIU overrides them) and, for a managed install,
    its ``manifest``. Every found candidate is verified with `criu check`.
    """
    candidates: List[Dict[str, Any]] = []
    explicit = os.environ.get("PYCPT_CRIU")
    # the automatic candidates are listed even when PYCPT_CRIU hides them: a doctor wants them all
    to_check = _candidates(explicit, automatic=True)
    for source, resolve in to_check:
        entry: Dict[str, Any] = {
            "source": source,
            "path": None,
            "argv": None,
            "version": None,
            "ok": False,
            "problem": None,
            "considered": not explicit or source == "PYCPT_CRIU",
        }
        try:
            path, argv = resolve()
            entry["path"], entry["argv"] = path, list(argv)
            engine = _probe(source, path, argv, verify=True)
            entry["version"] = engine.version_string
            entry["ok"] = True
        except EngineError as exc:
            entry["problem"] = f"{type(exc).__name__}: {exc.message}"
            entry["path"] = entry["path"] or getattr(exc, "path", None)
            v = getattr(exc, "version", None)
            entry["version"] = _fmt(v) if v else None
        if source == "managed" or (source == "PYCPT_CRIU" and explicit and os.path.isdir(explicit)):
            prefix = (
                managed_engine_dir() if source == "managed" else os.path.abspath(explicit or "")
            )
            try:
                entry["manifest"] = read_manifest(prefix)
            except (OSError, ValueError):
                entry["manifest"] = None
        candidates.append(entry)
    status: Dict[str, Any] = {
        "min_version": _fmt(MIN_VERSION),
        "managed_dir": managed_engine_dir(),
        "selected": None,
        "error": None,
        "candidates": candidates,
    }
    try:
        engine = find_engine(verify=True)
        status["selected"] = {
            "source": engine.source,
            "path": engine.path,
            "argv": list(engine.argv),
            "version": engine.version_string,
        }
    except EngineError as exc:
        status["error"] = str(exc)
    return status
