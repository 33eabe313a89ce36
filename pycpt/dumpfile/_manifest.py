"""The dump file's format: its marker, its manifest, and the names a part may have.

Format 2's manifest lists every part with its size and the BLAKE3 hash of each of its
chunks (1 MiB), and is signed (manifest.sig, see _keys). Its exact bytes are what is
signed, so the reader parses them strictly and never serialises them again: exactly the
known keys, each of its type and range, parts sorted by name, no key twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

FORMAT_VERSION: int = 2
"""The dump format this pycpt writes, and the newest it reads."""

MARKER_NAME = "PYCPT-DUMP"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
COMPRESSIONS = (None, "gz", "xz")
HASH = "blake3"
CHUNK_SIZE = 1 << 20  # one pipe's worth from CRIU's image streamer
DIGEST_SIZE = 32
MIN_CHUNK, MAX_CHUNK = 64 << 10, 64 << 20
MAX_MANIFEST = 16 << 20  # a 9 GiB image takes 590 KB of hex; 16 MiB is ~250 GiB of parts
MAX_PARTS = 4096
MAX_TEXT = 256
MAX_PART_SIZE = 1 << 62
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,99}\Z")  # a plain file name, no path
_HEX_RE = re.compile(r"(?:[0-9a-f]{64})*\Z")
RESERVED = (MARKER_NAME, MANIFEST_NAME, SIGNATURE_NAME)
_KEYS = {
    "format_version",
    "pycpt_version",
    "criu_version",
    "kernel",
    "created",
    "host",
    "config",
    "compression",
    "hash",
    "chunk_size",
    "parts",
}


@dataclass(frozen=True)
class Part:
    """One file of the images directory as stored in the dump file: its size and the
    concatenated BLAKE3 digests of its chunks (format 1 files carry one SHA-256 instead)."""

    name: str
    size: int
    chunks: bytes = b""
    sha256: str = ""

    def digest(self, index: int) -> bytes:
        """The BLAKE3 digest of chunk `index`."""
        return self.chunks[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    @property
    def chunk_count(self) -> int:
        """How many chunks the part has."""
        return len(self.chunks) // DIGEST_SIZE


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
    host: str = ""
    hash: str = HASH
    chunk_size: int = CHUNK_SIZE

    def part(self, name: str) -> Optional[Part]:
        """The part called `name`, or None."""
        return next((p for p in self.parts if p.name == name), None)

    @property
    def size(self) -> int:
        """The bytes of all parts together."""
        return sum(p.size for p in self.parts)

    def to_dict(self) -> Dict[str, Any]:
        """The manifest as JSON-able data (format 2: chunk digests as hex)."""
        d = dataclasses.asdict(self)
        d["parts"] = [
            {"name": p.name, "size": p.size, "chunks": p.chunks.hex()}
            for p in sorted(self.parts, key=lambda p: p.name)
        ]
        return d

    def to_bytes(self) -> bytes:
        """The exact bytes of manifest.json (what the signature covers)."""
        return (
            json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
            + "\n"
        ).encode()

    @classmethod
    def parse(cls, raw: bytes) -> "Manifest":
        """The format 2 manifest in `raw`, checked strictly (the config only for being an
        object: pycpt.dumpfile.check_config checks it); ValueError names what is wrong."""
        if len(raw) > MAX_MANIFEST:
            raise ValueError(f"the manifest has {len(raw)} bytes, more than {MAX_MANIFEST}")
        data = _strict_json(raw)
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        keys = set(data)
        if keys != _KEYS:
            extra, missing = sorted(keys - _KEYS), sorted(_KEYS - keys)
            raise ValueError(
                "the manifest's keys are not format 2's"
                + (f"; unknown: {', '.join(k[:40] for k in extra[:5])}" if extra else "")
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        if _int(data, "format_version") != FORMAT_VERSION:
            raise ValueError(f"the manifest says format {data['format_version']}")
        created = _text(data, "created")
        try:
            datetime.datetime.fromisoformat(created)
        except ValueError:
            raise ValueError(f"the manifest's creation time {created!r} is not ISO 8601") from None
        if data["compression"] not in COMPRESSIONS:
            raise ValueError(f"the manifest's compression {str(data['compression'])[:20]!r}")
        if data["hash"] != HASH:
            raise ValueError(f"the manifest's hash {str(data['hash'])[:20]!r} is not {HASH}")
        chunk = _int(data, "chunk_size")
        if not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
            raise ValueError(f"the manifest's chunk size {chunk} is not a power of two in range")
        if not isinstance(data["config"], dict):
            raise ValueError("the manifest's config is not an object")
        raw_parts = data["parts"]
        if not isinstance(raw_parts, list) or len(raw_parts) > MAX_PARTS:
            raise ValueError(f"the manifest's parts are not a list of at most {MAX_PARTS}")
        parts = [_part(p, chunk) for p in raw_parts]
        names = [p.name for p in parts]
        if names != sorted(set(names)):
            raise ValueError("the manifest's parts are not sorted by name, or one is there twice")
        return cls(
            format_version=FORMAT_VERSION,
            pycpt_version=_text(data, "pycpt_version"),
            criu_version=_text(data, "criu_version"),
            kernel=_text(data, "kernel"),
            created=created,
            host=_text(data, "host"),
            config=data["config"],
            parts=parts,
            compression=data["compression"],
            hash=HASH,
            chunk_size=chunk,
        )


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """How many chunks a part of `size` bytes has."""
    return -(-size // chunk_size)


def _part(raw: Any, chunk_size: int) -> Part:
    if not isinstance(raw, dict) or set(raw) != {"name", "size", "chunks"}:
        raise ValueError("a part of the manifest is not an object of name, size and chunks")
    name, size, chunks = raw["name"], raw["size"], raw["chunks"]
    if not isinstance(name, str) or not valid_name(name):
        raise ValueError(f"the manifest names a bad part {str(name)[:60]!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < MAX_PART_SIZE:
        raise ValueError(f"part {name} has a bad size {str(size)[:40]}")
    if not isinstance(chunks, str) or not _HEX_RE.match(chunks):
        raise ValueError(f"part {name} has malformed chunk hashes")
    if len(chunks) != 2 * DIGEST_SIZE * chunk_count(size, chunk_size):
        raise ValueError(f"part {name} has {len(chunks) // 64} chunk hashes for {size} bytes")
    return Part(name, size, bytes.fromhex(chunks))


def _text(data: Dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"the manifest's {key!r} is not text of at most {MAX_TEXT} characters")
    return value


def _int(data: Dict[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the manifest's {key!r} is not an integer")
    return value


def _strict_json(raw: Union[bytes, str]) -> Any:
    """JSON that means one thing only: UTF-8, no key twice in an object, no NaN/Infinity."""

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        obj: Dict[str, Any] = {}
        for k, v in items:
            if k in obj:
                raise ValueError(f"key {k[:40]!r} appears twice in one object")
            obj[k] = v
        return obj

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise ValueError("the manifest is not UTF-8") from None
    except RecursionError:
        raise ValueError("the manifest nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the manifest is not valid JSON ({exc})") from None


def valid_name(name: str) -> bool:
    """True for a name a part may have: a plain file name (letters, digits, ._+-), not
    one of the reserved member names."""
    return bool(_NAME_RE.match(name)) and name not in RESERVED
