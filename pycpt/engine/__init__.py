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

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

from pycpt.errors import (
    CriuBrokenError,
    CriuNotFoundError,
    CriuTooOldError,
    EngineError,
)

__all__ = [
    "Engine",
    "MIN_VERSION",
    "DEFAULT_ENGINE_DIR",
    "find_engine",
    "install_engine",
    "engine_status",
    "managed_engine_dir",
    "read_manifest",
    "parse_version",
    "clear_cache",
    "find_debian_mirror",
]

#: The oldest CRIU pycpt works with (4.1 cannot dump AF_INET sockets on current kernels).
MIN_VERSION: Tuple[int, int, int] = (4, 2, 0)

#: Where :func:`install_engine` puts the managed engine unless told otherwise.
DEFAULT_ENGINE_DIR = "/var/lib/pycpt/engine"

#: The file in a managed install that describes it.
MANIFEST_NAME = "engine.json"
_MANIFEST_FORMAT = 1

# criu and libcompel1 come from sid; everything else from the base suite unless apt says a sid
# package needs a newer one. A released suite as base keeps the closure small and stable.
_NEW_SUITE = "sid"
_BASE_SUITE = "trixie"
_SEED_PACKAGES = ("criu", "libcompel1")
_MAX_RESOLVE_ROUNDS = 12
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Suite names of the Debian archive, to tell it apart from third-party repositories.
_DEBIAN_SUITES = frozenset(
    "jessie stretch buster bullseye bookworm trixie forky duke sid "
    "oldoldstable oldstable stable testing unstable experimental".split()
)

_VERSION_TIMEOUT = 30.0
_CHECK_TIMEOUT = 120.0
_APT_TIMEOUT = 1800.0

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
        """The argument list that runs criu with `args` (for subprocess), e.g. ``command("swrk", "3")``."""
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
    return {"PYCPT_CRIU": f"$PYCPT_CRIU ({path})", "managed": f"the pycpt-managed criu ({path})"}.get(
        source, f"criu on PATH ({path})"
    )


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
                    "PYCPT_CRIU at the engine directory (the one holding engine.json), not the binary"
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
        hint = "point PYCPT_CRIU at a CRIU that works here, or unset it and run `pycpt engine install`"
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
    inode, mtime), so repeated calls are cheap; failures are not cached. Raises CriuNotFoundError, CriuTooOldError or CriuBrokenError,
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
            prefix = managed_engine_dir() if source == "managed" else os.path.abspath(explicit or "")
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


# --- finding the Debian mirror --------------------------------------------------------------


def _apt_source_files() -> List[str]:
    """apt's sources.list and the files in sources.list.d, in the order apt reads them."""
    sourcelist, sourceparts = "/etc/apt/sources.list", "/etc/apt/sources.list.d"
    if shutil.which("apt-config"):
        try:
            out = subprocess.run(
                ["apt-config", "shell", "L", "Dir::Etc::sourcelist/f", "P", "Dir::Etc::sourceparts/d"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=True,
                timeout=30,
            ).stdout.decode()
            for m in re.finditer(r"^(L|P)='([^']*)'", out, re.MULTILINE):
                if m.group(1) == "L":
                    sourcelist = m.group(2)
                else:
                    sourceparts = m.group(2)
        except (OSError, subprocess.SubprocessError):
            pass
    files = [sourcelist] if os.path.isfile(sourcelist) else []
    if os.path.isdir(sourceparts):
        files += [
            os.path.join(sourceparts, name)
            for name in sorted(os.listdir(sourceparts))
            if name.endswith((".list", ".sources"))
        ]
    return files


def _parse_one_line(text: str) -> Iterator[Dict[str, Any]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\S+)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        options = dict(
            opt.split("=", 1) for opt in (m.group(2) or "").split() if "=" in opt
        )
        yield {
            "types": [m.group(1)],
            "uris": [m.group(3)],
            "suites": [m.group(4)],
            "components": m.group(5).split(),
            "signed_by": options.get("signed-by", ""),
            "enabled": True,
        }


def _parse_deb822(text: str) -> Iterator[Dict[str, Any]]:
    for para in re.split(r"\n[ \t]*\n", text):
        fields: Dict[str, str] = {}
        key = None
        for raw in para.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key is not None:
                fields[key] += "\n" + raw.strip()
                continue
            if ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if not fields:
            continue
        signed_by = fields.get("signed-by", "")
        yield {
            "types": fields.get("types", "").split(),
            "uris": fields.get("uris", "").split(),
            "suites": fields.get("suites", "").split(),
            "components": fields.get("components", "").split(),
            # an inline key block cannot be written into a one-line source: use the keyring then
            "signed_by": "" if "\n" in signed_by else signed_by.split(" ")[0] if signed_by else "",
            "enabled": fields.get("enabled", "yes").lower() not in ("no", "false", "0"),
        }


def _is_debian_main(entry: Dict[str, Any], uri: str, suite: str) -> bool:
    if "deb" not in entry["types"] or "main" not in entry["components"] or not entry["enabled"]:
        return False
    if uri.startswith("cdrom:") or "security" in suite or suite.endswith("/updates"):
        return False
    if uri.rstrip("/").endswith("-security"):
        return False
    return suite.split("-", 1)[0] in _DEBIAN_SUITES


def find_debian_mirror(files: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """The URI of the Debian archive (main, not security) apt is configured with, and its keyring.

    Reads deb822 ``.sources`` files and classic ``.list`` lines (`files`, default: apt's own
    sources). Raises EngineError when no such entry exists.
    """
    if files is None:
        files = _apt_source_files()
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        parse = _parse_deb822 if name.endswith(".sources") else _parse_one_line
        for entry in parse(text):
            for uri in entry["uris"]:
                for suite in entry["suites"]:
                    if _is_debian_main(entry, uri, suite):
                        keyring = entry["signed_by"]
                        if not keyring and os.path.exists(_DEBIAN_KEYRING):
                            keyring = _DEBIAN_KEYRING
                        return uri.rstrip("/"), keyring
    raise _error(
        EngineError,
        "no Debian archive with the 'main' component in apt's sources "
        f"(read: {', '.join(files) or 'no source files'}); pycpt fetches CRIU from Debian {_NEW_SUITE}",
        hint="configure a Debian mirror for apt (e.g. in /etc/apt/sources.list.d/debian.sources), "
        "or install CRIU >= 4.2 yourself and set PYCPT_CRIU to it",
    )


# --- installing -----------------------------------------------------------------------------


_UNMET_RE = re.compile(r"(?:Pre-?)?Depends: ([A-Za-z0-9][A-Za-z0-9+.:-]*)(?: \([^)]*\))? but \S+ is to be installed")


def unmet_from_newer(apt_output: str) -> List[str]:
    """Packages apt says must be newer than the base suite has ("Depends: X ... but V is to be installed")."""
    names: List[str] = []
    for m in _UNMET_RE.finditer(apt_output):
        name = m.group(1).split(":", 1)[0]
        if name not in names:
            names.append(name)
    return names


class _Apt:
    """apt-get with a private configuration: own sources, lists and cache; no dpkg status."""

    def __init__(self, workdir: str, mirror: str, keyring: str) -> None:
        self.workdir = workdir
        for sub in ("lists/partial", "cache/archives/partial", "parts", "prefs", "log"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        signed = f"[signed-by={keyring}] " if keyring else ""
        with open(os.path.join(workdir, "sources.list"), "w", encoding="utf-8") as f:
            for suite in (_NEW_SUITE, _BASE_SUITE):
                f.write(f"deb {signed}{mirror} {suite} main\n")
        w = workdir
        self.options = [
            f"-oDir::Etc::SourceList={w}/sources.list",
            f"-oDir::Etc::SourceParts={w}/parts",
            f"-oDir::Etc::Preferences={w}/prefs/none",
            f"-oDir::Etc::PreferencesParts={w}/prefs",
            f"-oDir::State::Lists={w}/lists",
            f"-oDir::State::extended_states={w}/extended_states",
            "-oDir::State::status=/dev/null",
            f"-oDir::Cache={w}/cache",
            f"-oDir::Log={w}/log",
            "-oDebug::NoLocking=1",
            # the private dirs are root-only; apt's _apt sandbox user could not write them
            "-oAPT::Sandbox::User=root",
            "-oAPT::Get::List-Cleanup=0",
            "-q",
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
        self.env["LC_ALL"] = "C"  # apt's messages are parsed below

    def run(self, *args: str) -> Tuple[int, str]:
        proc = subprocess.run(
            ["apt-get", *self.options, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            timeout=_APT_TIMEOUT,
            check=False,
        )
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    @property
    def archives(self) -> str:
        return os.path.join(self.workdir, "cache", "archives")


def _apt_problem(out: str) -> str:
    lines = [l.strip() for l in out.splitlines() if l.startswith(("E:", "W:", "Err:", " ")) and l.strip()]
    return "\n".join(lines[-12:]) or out.strip()[-2000:]


def _resolve_and_download(apt: _Apt, progress: Progress) -> List[str]:
    """Download criu from sid with its closure from the base suite, taking from sid what must be newer."""
    wanted = [f"{p}/{_NEW_SUITE}" for p in _SEED_PACKAGES]
    for _ in range(_MAX_RESOLVE_ROUNDS):
        rc, out = apt.run(
            "-t", _BASE_SUITE, "--no-install-recommends", "-y", "--download-only", "install", *wanted
        )
        if rc == 0:
            return wanted
        newer = [n for n in unmet_from_newer(out) if f"{n}/{_NEW_SUITE}" not in wanted]
        if not newer:
            if "Failed to fetch" in out or "Unable to fetch" in out:
                what = "downloading the packages failed"
            else:
                what = "apt could not resolve criu's dependencies"
            raise _error(
                EngineError,
                f"{what} (apt-get install {' '.join(wanted)}, exit status {rc}):\n{_apt_problem(out)}",
                hint="check the network and the mirror; a sid transition may be in progress, retry later",
                output=out,
            )
        progress(f"  {', '.join(newer)}: {_BASE_SUITE}'s version is too old for criu, taking {_NEW_SUITE}'s")
        wanted += [f"{n}/{_NEW_SUITE}" for n in newer]
    raise _error(
        EngineError,
        f"apt could not resolve criu's dependencies in {_MAX_RESOLVE_ROUNDS} rounds (last set: {' '.join(wanted)})",
        hint="a sid transition may be in progress; retry later",
    )


def _deb_name_version(deb: str) -> Tuple[str, str]:
    out = subprocess.run(
        ["dpkg-deb", "-f", deb, "Package", "Version"], stdout=subprocess.PIPE, check=True, timeout=60
    ).stdout.decode()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Package", "").strip(), fields.get("Version", "").strip()


def _find_loader(prefix: str) -> str:
    loaders = sorted(glob.glob(os.path.join(prefix, "usr/lib/*-linux-gnu*/ld-linux*.so.*")))
    loaders = [p for p in loaders if os.path.isfile(p)]
    if not loaders:
        raise _error(
            EngineError,
            f"the unpacked packages in {prefix} contain no dynamic loader (ld-linux*.so.*): libc6 is missing",
            path=prefix,
        )
    return loaders[0]


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False if the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err), f"renameat2({a}, {b}, RENAME_EXCHANGE)")


def replace_dir(new: str, target: str) -> None:
    """Put directory `new` at `target`, atomically replacing an existing one (which is removed)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old install
        return
    old = tempfile.mkdtemp(prefix=".pycpt-engine-old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _reuse(prefix: str, progress: Progress) -> Optional[Engine]:
    """The existing verified managed install in `prefix`, or None (saying why) if there is none."""
    if not os.path.exists(os.path.join(prefix, MANIFEST_NAME)):
        return None
    try:
        path, argv = _managed_candidate(prefix, "managed")
        engine = _probe("managed", path, argv, verify=True)
    except EngineError as exc:
        progress(f"pycpt: the existing engine in {prefix} is unusable, reinstalling: {exc.message}")
        return None
    progress(
        f"pycpt: CRIU {engine.version_string} is already installed in {prefix} and passes "
        "`criu check`; nothing to do (force=True reinstalls)"
    )
    return engine


def install_engine(
    *, prefix: Optional[str] = None, force: bool = False, progress: Progress = print
) -> Engine:
    """Install Debian sid's CRIU with its libraries into `prefix` and return it as an Engine.

    `prefix` defaults to ``$PYCPT_ENGINE_DIR`` or ``/var/lib/pycpt/engine``. Idempotent: an
    existing install that passes `criu check` with version >= MIN_VERSION is reused unless
    `force`. A criu on PATH is not consulted: this always provides the managed install (the
    CLI decides whether one is needed). The system is not changed: apt runs with a private
    configuration and the packages are unpacked with ``dpkg-deb -x``. The new install is built
    in a temporary directory next to `prefix` and moved into place only after `criu check`
    passed, so a failed install leaves the previous one intact. `progress` receives one line
    per step. Needs root, apt-get, dpkg-deb and a Debian mirror in apt's sources; raises
    EngineError (CriuTooOldError/CriuBrokenError when the result does not work).
    """
    prefix = os.path.abspath(prefix or managed_engine_dir())
    if os.geteuid() != 0:
        raise _error(
            EngineError,
            "installing CRIU needs root: the install is verified with `criu check`, which needs "
            f"root (apt and dpkg-deb alone would not), and {prefix} must be writable",
            hint="run `pycpt engine install` as root",
        )
    if not force:
        engine = _reuse(prefix, progress)
        if engine is not None:
            return engine

    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise _error(
            EngineError,
            f"installing CRIU needs Debian's package tools; not found: {', '.join(missing)}",
            hint="on a non-Debian system install CRIU >= 4.2 with its package manager and set PYCPT_CRIU",
        )
    mirror, keyring = find_debian_mirror()
    parent = os.path.dirname(prefix)
    os.makedirs(parent, mode=0o755, exist_ok=True)

    started = time.monotonic()
    with open(os.path.join(parent, ".pycpt-engine.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time per directory
        if not force:  # another process may have finished one meanwhile
            engine = _reuse(prefix, lambda _msg: None)
            if engine is not None:
                progress(f"pycpt: CRIU {engine.version_string} was just installed in {prefix}")
                return engine
        work = tempfile.mkdtemp(prefix=".pycpt-engine-apt-", dir=parent)
        stage = tempfile.mkdtemp(prefix=".pycpt-engine-new-", dir=parent)
        try:
            engine = _build(prefix, stage, work, mirror, keyring, progress)
            replace_dir(stage, prefix)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # verify again where it now lives: the paths in argv changed with the move
    path, argv = _managed_candidate(prefix, "managed")
    engine = _probe("managed", path, argv, verify=True)
    progress(
        f"pycpt: installed CRIU {engine.version_string} in {prefix} "
        f"({time.monotonic() - started:.1f} s); `criu check` passed"
    )
    return engine


def _build(
    prefix: str, stage: str, work: str, mirror: str, keyring: str, progress: Progress
) -> Engine:
    """Download, unpack and verify into `stage`; write the manifest for its final place `prefix`."""
    apt = _Apt(work, mirror, keyring)
    progress(f"pycpt: fetching package lists for {_NEW_SUITE} and {_BASE_SUITE} from {mirror}")
    rc, out = apt.run("update")
    if rc != 0 or "Err:" in out:
        raise _error(
            EngineError,
            f"could not fetch the package lists of {_NEW_SUITE} and {_BASE_SUITE} from {mirror} "
            f"(apt-get update, exit status {rc}):\n{_apt_problem(out)}",
            hint="check the network and that the mirror serves sid and trixie",
            output=out,
        )
    progress(f"pycpt: resolving criu from {_NEW_SUITE}, its libraries from {_BASE_SUITE}")
    wanted = _resolve_and_download(apt, progress)
    debs = sorted(glob.glob(os.path.join(apt.archives, "*.deb")))
    size = sum(os.path.getsize(d) for d in debs)
    progress(
        f"pycpt: downloaded {len(debs)} packages ({size / 1e6:.1f} MB); from {_NEW_SUITE}: "
        + ", ".join(w.split("/")[0] for w in wanted)
    )

    packages: Dict[str, str] = {}
    for deb in debs:
        name, version = _deb_name_version(deb)
        packages[name] = version
        subprocess.run(["dpkg-deb", "-x", deb, stage], check=True, timeout=300)
    os.chmod(stage, 0o755)

    criu = os.path.join(stage, "usr/sbin/criu")
    if not os.path.isfile(criu):
        raise _error(EngineError, f"the criu package did not contain usr/sbin/criu (unpacked in {stage})")
    loader = _find_loader(stage)
    libdir = os.path.dirname(loader)
    progress(f"pycpt: unpacked into {stage}; running `criu check`")
    engine = _probe("managed", criu, (loader, "--library-path", libdir, criu), verify=True)

    rel = {
        "criu": os.path.relpath(criu, stage),
        "loader": os.path.relpath(loader, stage),
        "libdir": os.path.relpath(libdir, stage),
    }
    manifest = {
        "format": _MANIFEST_FORMAT,
        "version": engine.version_string,
        "criu_package": packages.get("criu", ""),
        "packages": dict(sorted(packages.items())),
        "from_new_suite": [w.split("/")[0] for w in wanted],
        "suites": [_NEW_SUITE, _BASE_SUITE],
        "paths": rel,
        "argv": list(_managed_argv(prefix, {"paths": rel})[1]),
        "download_bytes": size,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(stage, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return engine
