"""The dump file's format: its marker, its manifest, and the names a part may have."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

FORMAT_VERSION: int = 1
"""The dump format this pycpt writes, and the newest it reads."""

MARKER_NAME = "PYCPT-DUMP"
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = (None, "gz", "xz")
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}\Z")  # a plain file name, no path
_RESERVED = (MARKER_NAME, MANIFEST_NAME)


@dataclass(frozen=True)
class Part:
    """One file of the images directory as stored in the dump file."""

    name: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """What a dump file holds and where it comes from (its manifest.json)."""

    format_version: int
    pycpt_version: str
    criu_version: str
    kernel: str
    created: str
    config: Dict[str, Any]
    parts: List[Part] = field(default_factory=list)
    compression: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The manifest as JSON-able data (what manifest.json holds, less its checksum)."""
        d = dataclasses.asdict(self)
        d["parts"] = [dataclasses.asdict(p) for p in self.parts]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Build a Manifest from `to_dict()` data; ValueError names the first bad field.

        Unknown keys are ignored, so that a later pycpt may add fields within one format.
        """
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")

        def get(key: str, types: Union[type, Tuple[type, ...]]) -> Any:
            if key not in data:
                raise ValueError(f"the manifest has no {key!r}")
            value = data[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise ValueError(f"the manifest's {key!r} has the wrong type")
            return value

        compression = data.get("compression")
        if compression not in COMPRESSIONS:
            raise ValueError(f"the manifest's compression {compression!r} is unknown")
        created = get("created", str)
        try:
            datetime.datetime.fromisoformat(created)
        except ValueError:
            raise ValueError(f"the manifest's creation time {created!r} is not ISO 8601") from None
        parts = []
        for raw in get("parts", list):
            if not isinstance(raw, dict):
                raise ValueError("a part of the manifest is not a JSON object")
            name, size, sha = raw.get("name"), raw.get("size"), raw.get("sha256")
            if not isinstance(name, str) or not _valid_name(name):
                raise ValueError(f"the manifest names a bad part {name!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"part {name} has a bad size {size!r}")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError(f"part {name} has a bad sha256 {sha!r}")
            parts.append(Part(name, size, sha))
        if len({p.name for p in parts}) != len(parts):
            raise ValueError("the manifest names a part twice")
        return cls(
            format_version=get("format_version", int),
            pycpt_version=get("pycpt_version", str),
            criu_version=get("criu_version", str),
            kernel=get("kernel", str),
            created=created,
            config=get("config", dict),
            parts=parts,
            compression=compression,
        )


def _canonical(data: Dict[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _manifest_bytes(manifest: Manifest) -> bytes:
    # The checksum covers every value (the config too, which no part hash covers).
    data = manifest.to_dict()
    data["checksum"] = "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"


def _valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in _RESERVED
