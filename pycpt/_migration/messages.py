"""Every message of the migration protocol, as data: which operations each side may send,
their fields, and the type, range and shape of each. A message that does not fit is refused
before any of it is used (`check`), with a MigrationProtocolError naming the operation, the
field and the rule it broke; the other side reports that error.

The peer is another host's pycpt, reached over ssh with our key, but still input: a bug, a
different version or someone in its place must not make this side index a missing key,
write outside its directory, or skip a space check because a size was negative.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from pycpt.errors import MigrationProtocolError

PROTOCOL = 3  # 3: the page channel is a Unix socket through ssh ("page-channel")

MAX_SIZE = 1 << 62  # bytes: any real size, and no overflow anywhere
MAX_TEXT = 64 << 10  # a free-text field (an error message, a path)
MAX_LIST = 4096

_TOKEN = re.compile(r"[0-9a-f]{16,64}")
_CT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX256 = re.compile(r"[0-9a-f]{64}")
_IFNAME = re.compile(r"[^/\s\x00:]{1,15}")
_VERSION = re.compile(r"[0-9A-Za-z.+~_-]{1,64}")
_WORD = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IP = re.compile(r"[0-9a-fA-F.:/]{2,64}")


# --- field types ---------------------------------------------------------------------------


class Field:
    """One field's rule: check(value, where) returns the value or raises
    MigrationProtocolError."""

    what = "a value"

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, where: str, rule: str = "") -> MigrationProtocolError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return MigrationProtocolError(f"{where} must be {rule or self.what}, not {shown}")


@dataclass(frozen=True)
class Int(Field):
    """An integer (never a bool) in [lo, hi]."""

    lo: int = 0
    hi: int = MAX_SIZE

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"an integer from {self.lo} to {self.hi}"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise self.fail(value, where)
        return value


SIZE = Int()  # bytes, a count: >= 0
PORT = Int(1, 65535)


@dataclass(frozen=True)
class Float(Field):
    """A finite number (an int is accepted) in [lo, hi]."""

    lo: float = 0.0
    hi: float = 1e9

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a number from {self.lo:g} to {self.hi:g}"

    def check(self, value: Any, where: str) -> Any:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.fail(value, where)
        if not self.lo <= value <= self.hi:
            raise self.fail(value, where)
        return float(value)


SECONDS = Float()


class Bool(Field):
    what = "true or false"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not bool:
            raise self.fail(value, where)
        return value


BOOL = Bool()


@dataclass(frozen=True)
class Text(Field):
    """A string of at most `max` characters, without NUL, matching `pattern` if given."""

    max: int = MAX_TEXT
    pattern: Optional["re.Pattern[str]"] = None
    what_: str = ""

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.what_ or f"a string of at most {self.max} characters"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not str or len(value) > self.max or "\x00" in value:
            raise self.fail(value, where)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(value, where)
        return value


TEXT = Text()
TOKEN = Text(64, _TOKEN, "a token (16 to 64 lowercase hex digits)")
CT_ID = Text(64, _CT, "a container id (letters, digits, '.', '_', '-')")
SHA256 = Text(64, _HEX256, "a SHA-256 (64 lowercase hex digits)")
VERSION = Text(64, _VERSION, "a version string")
WORD = Text(64, _WORD, "a short word")
PATH = Text(4096, re.compile(r"/[^\x00]*"), "an absolute path")
SOCKET_PATH = Text(
    107, re.compile(r"/[A-Za-z0-9._/-]*"), "a socket path (letters, digits, . _ - /)"
)
PAGE_KEY = Text(128, re.compile(r"[0-9a-f]{128}"), "a key (128 lowercase hex digits)")


class FileName(Field):
    """A plain file name: it lands in a directory of ours and must stay there."""

    what = "a plain file name (no '/', not '.' or '..', at most 255 bytes)"

    def check(self, value: Any, where: str) -> Any:
        if (
            type(value) is not str
            or value in ("", ".", "..")
            or "/" in value
            or "\x00" in value
            or len(value.encode("utf-8", "surrogateescape")) > 255
        ):
            raise self.fail(value, where)
        return value


FILE_NAME = FileName()


@dataclass(frozen=True)
class OneOf(Field):
    """One of a few given strings."""

    choices: Tuple[str, ...]

    @property
    def what(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not str or value not in self.choices:
            raise self.fail(value, where)
        return value


@dataclass(frozen=True)
class Maybe(Field):
    """null or what `inner` accepts."""

    inner: Field

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"null or {self.inner.what}"

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)


@dataclass(frozen=True)
class ListOf(Field):
    """A list of between lo and hi items, each as `item` says."""

    item: Field
    lo: int = 0
    hi: int = MAX_LIST

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a list of {self.lo} to {self.hi} items"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not list or not self.lo <= len(value) <= self.hi:
            raise self.fail(value, where)
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf(Field):
    """An object with string keys (as `key` says) and values as `value` says."""

    key: Field
    value: Field
    hi: int = MAX_LIST

    what = "an object"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not dict or len(value) > self.hi:
            raise self.fail(value, where)
        return {
            self.key.check(k, f"{where} key"): self.value.check(v, f"{where}[{k!r}]")
            for k, v in value.items()
        }


@dataclass(frozen=True)
class Record(Field):
    """An object with exactly these fields: `required` ones must be there, `optional` ones
    may; any other key is refused."""

    required: Mapping[str, Field]
    optional: Mapping[str, Field]

    what = "an object"

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not dict:
            raise self.fail(value, where)
        return check_fields(value, self.required, self.optional, where)


def check_fields(
    obj: Dict[str, Any], required: Mapping[str, Field], optional: Mapping[str, Field], where: str
) -> Dict[str, Any]:
    """`obj` checked against its required and optional fields; unknown keys are refused."""
    out: Dict[str, Any] = {}
    for name, rule in required.items():
        if name not in obj:
            raise MigrationProtocolError(f"{where} lacks the required field {name!r}")
        out[name] = rule.check(obj[name], f"{where}.{name}")
    for name, value in obj.items():
        if name in required:
            continue
        extra = optional.get(name)
        if extra is None:
            raise MigrationProtocolError(f"{where} has an unknown field {name!r}")
        out[name] = extra.check(value, f"{where}.{name}")
    return out


# --- what a container's configuration may say ----------------------------------------------

# A container's NIC as pycpt.network records it; the target checks its meaning again
# (pycpt.network.from_records) and names the outside end for itself.
NIC = Record(
    required={
        "name": Text(15, _IFNAME, "an interface name"),
        "mac": Text(17, _MAC, "a MAC address"),
        "bridge": Text(15, _IFNAME, "an interface name"),
        "addresses": ListOf(Text(64, _IP, "an address"), 1, 64),
    },
    optional={
        "host_name": Text(15, _IFNAME, "an interface name"),
        "host_mac": Text(17, _MAC, "a MAC address"),
        "gateways": ListOf(Text(64, _IP, "an address"), 0, 2),
        "mtu": Int(0, 65535),
    },
)
NICS = Maybe(ListOf(NIC, 0, 8))

# The target builds the container's record from this: nothing it keeps for itself (cgroup,
# pids, incoming/outgoing records, dump files, images) may come from the source.
CONFIG = Record(
    required={"id": CT_ID},
    optional={
        "argv": ListOf(Text(128 << 10), 1, MAX_LIST),
        "share_net": BOOL,
        "root": Maybe(PATH),
        "env": Maybe(MapOf(Text(4096, re.compile(r"[^=\x00]+")), Text(128 << 10), MAX_LIST)),
        "links_down": Maybe(ListOf(Text(15, _IFNAME, "an interface name"))),
        "nics": NICS,
        # CRIU options the restore replays (only some: pycpt.container.restore_options)
        "criu_options": Maybe(MapOf(Text(64, re.compile(r"[a-z_]+"), "an option name"), BOOL)),
    },
)


# --- the messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation: its required and optional fields."""

    required: Mapping[str, Field]
    optional: Mapping[str, Field]


def _op(required: Optional[Mapping[str, Field]] = None, **optional: Field) -> Op:
    return Op(dict(required or {}), optional)


MODES = ("offline", "stopcopy", "postcopy")

# Both directions carry these: a heartbeat and the end of a file stream.
_COMMON: Dict[str, Op] = {
    "hb": _op(
        {"seq": SIZE},
        stage=WORD,
        # the target, while pages arrive: how much of the container's memory is in
        pages=Record({"bytes": SIZE, "percent": Int(0, 100)}, {}),
    ),
    "file": _op({"name": FILE_NAME, "size": SIZE}),
    "sha256": _op({"name": FILE_NAME, "hex": SHA256}),
    "files-end": _op(),
    "error": _op(
        {"kind": WORD, "message": TEXT},
        hint=TEXT,
        stage=WORD,
    ),
}

# What the source sends (the target accepts).
FROM_SOURCE: Dict[str, Op] = {
    **_COMMON,
    "hello": _op(
        {
            "protocol": Int(0, 1 << 31),
            "pycpt": VERSION,
            "token": TOKEN,
            "criu": ListOf(Int(0, 1 << 31), 1, 4),
            "ct": CT_ID,
            "mode": OneOf(MODES),
            "memory": SIZE,
            "root": BOOL,
            "dry_run": BOOL,
        },
        nics=NICS,  # the container's NICs: the target checks its bridges and addresses
    ),
    # asks for the page channel (pycpt/_migration/pages.py), at the end of preflight
    "page-channel": _op(),
    "page-server": _op({"expect": SIZE}),
    "page-server-result": _op(),
    "images": _op({"expect": SIZE}),
    "restore": _op({"config": CONFIG}),
    "resume": _op(),
    "abort": _op(reason=TEXT),
    "bye": _op(),
}

# What the target sends (the source accepts).
FROM_TARGET: Dict[str, Op] = {
    **_COMMON,
    "ready": _op(
        {
            "pycpt": VERSION,
            "criu": ListOf(Int(0, 1 << 31), 1, 4),
            "images_dir": PATH,
            "free": SIZE,
            "mem_available": SIZE,
            "root": Maybe(PATH),
        },
        # what the NIC checks found: "bridge br0: up", "10.0.0.5: free on br0"
        net=ListOf(TEXT, 0, 64),
    ),
    # where the page channel's listener is, and the key both ends prove over it
    "page-channel": _op({"path": SOCKET_PATH, "key": PAGE_KEY}),
    "page-server": _op(),
    "page-server-result": _op(
        {
            "status": Maybe(Int(-(1 << 31), 1 << 31)),
            "errors": ListOf(TEXT, 0, 16),
            "free": Maybe(SIZE),
            "images_dir": Maybe(PATH),
        }
    ),
    "received": _op({"files": SIZE, "bytes": SIZE, "page_bytes": SIZE, "seconds": SECONDS}),
    "undumped": _op(
        {"seconds": SECONDS}, lazy_daemon=SECONDS, criu_restore=SECONDS, freeze=SECONDS
    ),
    # committed: the target keeps the container from now on (stop-and-copy: before it thawed)
    "running": _op({"seconds": SECONDS, "committed": BOOL}),
    # post-copy: every page arrived and the target keeps the container (or, answering an
    # "abort", it had done so already)
    "committed": _op(seconds=SECONDS, page_bytes=SIZE),
    # the target removed its copy; ran: whether that copy had run (post-copy, after resume)
    "aborted": _op({"ran": BOOL}, reason=TEXT),
}

KINDS = (
    "MigrationError",
    "TargetIncompatibleError",
    "TargetContainerExistsError",
    "MigrationProtocolError",
)


def check(msg: Any, accepted: Mapping[str, Op], sender: str = "the other side") -> Dict[str, Any]:
    """`msg` (a decoded JSON value) if it is a message `accepted` lists, with every field
    as its rule says; else MigrationProtocolError saying what is wrong."""
    if type(msg) is not dict:
        raise MigrationProtocolError(
            f"a message from {sender} must be an object, not {type(msg).__name__}"
        )
    op = msg.get("op")
    if type(op) is not str:
        raise MigrationProtocolError(f"a message from {sender} lacks its operation ('op')")
    spec = accepted.get(op)
    if spec is None:
        shown = op if len(op) <= 40 else op[:37] + "..."
        raise MigrationProtocolError(f"{sender} sent an unknown operation {shown!r}")
    fields = {k: v for k, v in msg.items() if k != "op"}
    return {"op": op, **check_fields(fields, spec.required, spec.optional, op)}


def names(accepted: Mapping[str, Op]) -> Sequence[str]:
    """The operations `accepted` lists (for messages and tests)."""
    return sorted(accepted)
