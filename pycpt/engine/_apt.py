"""Debian's CRIU through apt with a private configuration: the mirror apt is configured
with, and the resolution of criu's closure (from sid where it must be newer)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from pycpt.engine._find import Progress, _error
from pycpt.errors import (
    EngineError,
)

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

_APT_TIMEOUT = 1800.0


# --- finding the Debian mirror --------------------------------------------------------------


def _apt_source_files() -> List[str]:
    """apt's sources.list and the files in sources.list.d, in the order apt reads them."""
    sourcelist, sourceparts = "/etc/apt/sources.list", "/etc/apt/sources.list.d"
    if shutil.which("apt-config"):
        try:
            out = subprocess.run(
                [
                    "apt-config",
                    "shell",
                    "L",
                    "Dir::Etc::sourcelist/f",
                    "P",
                    "Dir::Etc::sourceparts/d",
                ],
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
        options = dict(opt.split("=", 1) for opt in (m.group(2) or "").split() if "=" in opt)
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
        f"(read: {', '.join(files) or 'no source files'}); "
        f"pycpt fetches CRIU from Debian {_NEW_SUITE}",
        hint="configure a Debian mirror for apt (e.g. in /etc/apt/sources.list.d/debian.sources), "
        "or install CRIU >= 4.2 yourself and set PYCPT_CRIU to it",
    )


# --- installing -----------------------------------------------------------------------------


_UNMET_RE = re.compile(
    r"(?:Pre-?)?Depends: ([A-Za-z0-9][A-Za-z0-9+.:-]*)(?: \([^)]*\))? but \S+ is to be installed"
)


def unmet_from_newer(apt_output: str) -> List[str]:
    """Packages apt says must be newer than the base suite has ("Depends: X ... but V is to
    be installed")."""
    names: List[str] = []
    for m in _UNMET_RE.finditer(apt_output):
        name = m.group(1).split(":", 1)[0]
        if name not in names:
            names.append(name)
    return names


class Apt:
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
    lines = [
        line.strip()
        for line in out.splitlines()
        if line.startswith(("E:", "W:", "Err:", " ")) and line.strip()
    ]
    return "\n".join(lines[-12:]) or out.strip()[-2000:]


def _resolve_and_download(apt: Apt, progress: Progress) -> List[str]:
    """Download criu from sid with its closure from the base suite, taking from sid what must
    be newer."""
    wanted = [f"{p}/{_NEW_SUITE}" for p in _SEED_PACKAGES]
    for _ in range(_MAX_RESOLVE_ROUNDS):
        rc, out = apt.run(
            "-t",
            _BASE_SUITE,
            "--no-install-recommends",
            "-y",
            "--download-only",
            "install",
            *wanted,
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
                f"{what} (apt-get install {' '.join(wanted)}, exit status {rc}):\n"
                f"{_apt_problem(out)}",
                hint="check the network and the mirror; a sid transition may be in progress, "
                "retry later",
                output=out,
            )
        progress(
            f"  {', '.join(newer)}: {_BASE_SUITE}'s version is too old for criu, "
            f"taking {_NEW_SUITE}'s"
        )
        wanted += [f"{n}/{_NEW_SUITE}" for n in newer]
    raise _error(
        EngineError,
        f"apt could not resolve criu's dependencies in {_MAX_RESOLVE_ROUNDS} rounds "
        f"(last set: {' '.join(wanted)})",
        hint="a sid transition may be in progress; retry later",
    )


def _deb_name_version(deb: str) -> Tuple[str, str]:
    out = subprocess.run(
        ["dpkg-deb", "-f", deb, "Package", "Version"],
        stdout=subprocess.PIPE,
        check=True,
        timeout=60,
    ).stdout.decode()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Package", "").strip(), fields.get("Version", "").strip()
