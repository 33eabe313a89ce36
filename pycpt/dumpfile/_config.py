"""The container config a dump file (or a migration peer) carries, parsed against an explicit
schema: the keys pycpt knows, their types and ranges. Anything pycpt keeps for itself in a
container's state (migration tokens, image and root paths it made, cgroups, pids) is never
taken from outside: such a key is refused by name, as is any key this pycpt does not know.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict

from pycpt import errors
from pycpt._sys.state import validate_ct_id

MAX_ARGV = 4096  # arguments
MAX_ENV = 4096  # variables
MAX_TEXT = 128 << 10  # bytes of one argument, variable or path (the kernel's MAX_ARG_STRLEN)
MAX_TOTAL = 2 << 20  # bytes of all arguments and variables together (ARG_MAX's order)
MAX_LINKS = 256
_IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}\Z")  # IFNAMSIZ - 1, no '/' or blanks
_ENV_NAME = re.compile(r"[^=\0]{1,4096}\Z")

# state keys pycpt derives or makes itself: never from a dump file or a peer
INTERNAL_KEYS = frozenset(
    {
        "incoming",
        "outgoing",
        "migration",
        "images",
        "made_root",
        "cgroup",
        "init_pid",
        "init_start",
        "phase",
        "dump_done",
        "dumpfile",
        "agent_pid",
        "processes",
        "created",
        "token",
    }
)


def _bad(key: str, why: str) -> errors.ConfigSchemaError:
    return errors.ConfigSchemaError(f"config key {key!r} {why}", key=key)


def _text(key: str, value: Any, *, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _bad(key, f"must be text, not {type(value).__name__}")
    if "\0" in value:
        raise _bad(key, "holds a NUL character")
    if not empty and not value:
        raise _bad(key, "is empty")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise _bad(key, f"is longer than {limit} bytes")
    return value


def _id(value: Any) -> str:
    try:
        return validate_ct_id(value)
    except ValueError as exc:
        raise _bad("id", f"is not a container id: {exc}") from None


def _argv(value: Any) -> list:
    if not isinstance(value, list):
        raise _bad("argv", f"must be a list, not {type(value).__name__}")
    if not value or len(value) > MAX_ARGV:
        raise _bad("argv", f"must hold 1 to {MAX_ARGV} arguments, not {len(value)}")
    args = [_text(f"argv[{i}]", a) for i, a in enumerate(value)]
    if not args[0]:
        raise _bad("argv[0]", "is empty")
    if sum(len(a) for a in args) > MAX_TOTAL:
        raise _bad("argv", f"holds more than {MAX_TOTAL} bytes")
    return args


def _share_net(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("share_net", f"must be true or false, not {type(value).__name__}")
    return value


def _root(value: Any) -> Any:
    if value is None:
        return None
    path = _text("root", value, limit=4096, empty=False)
    if not path.startswith("/") or os.path.normpath(path) != path:
        raise _bad("root", f"must be an absolute, normalised directory path, not {path[:80]!r}")
    return path


def _env(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise _bad("env", f"must be an object, not {type(value).__name__}")
    if len(value) > MAX_ENV:
        raise _bad("env", f"holds more than {MAX_ENV} variables")
    env = {}
    total = 0
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise _bad("env", f"has a bad variable name {str(name)[:60]!r}")
        env[name] = _text(f"env[{name[:60]}]", text)
        total += len(name) + len(text)
    if total > MAX_TOTAL:
        raise _bad("env", f"holds more than {MAX_TOTAL} bytes")
    return env


def _links_down(value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LINKS:
        raise _bad("links_down", f"must be a list of at most {MAX_LINKS} interface names")
    for name in value:
        if not isinstance(name, str) or not _IFNAME.match(name):
            raise _bad("links_down", f"has a bad interface name {str(name)[:40]!r}")
    return list(value)


def _nics(value: Any) -> Any:
    if value is None:
        return []
    from pycpt import network  # its own checks of recorded NICs (bridges, addresses, names)

    try:
        network.from_records(value)
    except (errors.PycptError, ValueError) as exc:
        raise _bad("nics", f"is not valid: {getattr(exc, 'message', exc)}") from None
    return value


def _criu_options(value: Any) -> Dict[str, bool]:
    from pycpt._criu.options import REPLAYED  # the CRIU options a restore replays

    if not isinstance(value, dict):
        raise _bad("criu_options", f"must be an object, not {type(value).__name__}")
    for name, flag in value.items():
        if name not in REPLAYED:
            raise _bad(
                "criu_options", f"has an option a restore does not replay: {str(name)[:40]!r}"
            )
        if not isinstance(flag, bool):
            raise _bad("criu_options", f"has a value for {name} that is not true or false")
    return dict(value)


SCHEMA: Dict[str, Callable[[Any], Any]] = {
    "id": _id,
    "argv": _argv,
    "share_net": _share_net,
    "root": _root,
    "env": _env,
    "links_down": _links_down,
    "nics": _nics,
    "criu_options": _criu_options,
}
"""Every key a container config may hold, and the function that checks (and returns) its
value. All keys are optional: a missing one means what it meant when the container started
(no root, not sharing the host's network, ...)."""


def check_config(config: Any) -> Dict[str, Any]:
    """A container config from outside (a dump file's manifest, a migration peer), checked
    against SCHEMA: returns a new dict of exactly the keys it holds, each checked. Raises
    ConfigSchemaError (a PycptError and ValueError) naming the first key that is unknown,
    internal to pycpt, of the wrong type or out of range."""
    if not isinstance(config, dict):
        raise errors.ConfigSchemaError(f"the config must be an object, not {type(config).__name__}")
    checked: Dict[str, Any] = {}
    for key in sorted(config, key=str):
        if not isinstance(key, str):
            raise errors.ConfigSchemaError(f"the config has a key that is not text: {key!r}")
        if key in INTERNAL_KEYS:
            raise _bad(key, "is internal to pycpt and never taken from a dump file or a peer")
        check = SCHEMA.get(key)
        if check is None:
            raise _bad(key[:60], "is not a config key this pycpt knows")
        checked[key] = check(config[key])
    return checked
