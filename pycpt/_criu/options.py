"""Keyword arguments -> CRIU's RPC options message, checked against the schema."""

from __future__ import annotations

import os
import shutil
from enum import IntEnum
from typing import Any, Dict, List, Mapping, Optional, Tuple

from google.protobuf.descriptor import FieldDescriptor

from pycpt._criu import rpc_schema

# Set by pycpt from paths and pids, never directly by callers.
MANAGED = frozenset({"images_dir_fd", "work_dir_fd", "images_dir", "pid", "notify_scripts"})

OPTION_NAMES = tuple(
    sorted(f.name for f in rpc_schema.Options.DESCRIPTOR.fields if f.name not in MANAGED)
)


def build_options(values: Mapping[str, Any]) -> "rpc_schema.Options":
    """An Options message from `values` (CRIU option names as in `criu dump --help`, with
    underscores). Scalars take Python values, enums their name ("nftables") or number,
    repeated fields a list, message fields a dict (or a tuple in field order)."""
    opts = rpc_schema.Options(images_dir_fd=-1)
    for name, value in values.items():
        if value is None:
            continue
        field = rpc_schema.Options.DESCRIPTOR.fields_by_name.get(name)
        if field is None or name in MANAGED:
            raise ValueError(
                f"unknown CRIU option {name!r}; valid options: " + ", ".join(OPTION_NAMES)
            )
        if _is_repeated(field):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"CRIU option {name!r} takes a list, not {value!r}")
            items = value.items() if isinstance(value, Mapping) else value
            container = getattr(opts, name)
            for item in items:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(container.add(), field, item)
                else:
                    container.append(_scalar(field, item))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(opts, name), field, value)
        else:
            setattr(opts, name, _scalar(field, value))
    return opts


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5.28 has is_repeated; older releases only label (removed in 7)
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _fill(message: Any, field: FieldDescriptor, value: Any) -> None:
    sub = field.message_type
    if isinstance(value, Mapping):
        pairs: Dict[str, Any] = dict(value)
    elif isinstance(value, (tuple, list)):
        if len(value) > len(sub.fields):
            raise ValueError(f"CRIU option {field.name!r}: {value!r} has too many items")
        pairs = {f.name: v for f, v in zip(sub.fields, value, strict=False)}
    else:
        raise ValueError(
            f"CRIU option {field.name!r} takes a dict or tuple of "
            f"({', '.join(f.name for f in sub.fields)}), not {value!r}"
        )
    for key, item in pairs.items():
        inner = sub.fields_by_name.get(key)
        if inner is None:
            raise ValueError(
                f"CRIU option {field.name!r} has no field {key!r}; fields: "
                + ", ".join(f.name for f in sub.fields)
            )
        setattr(message, key, _scalar(inner, item))


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"CRIU option {field.name!r} takes True or False, not {value!r}")
        return value
    if kind == FieldDescriptor.TYPE_STRING:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"CRIU option {field.name!r} takes a string, not {value!r}")
        return value
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum(field, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"CRIU option {field.name!r} takes an integer, not {value!r}")
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and value < 0:
        raise ValueError(f"CRIU option {field.name!r} takes a non-negative integer")
    return value


def _enum(field: FieldDescriptor, value: Any) -> int:
    names = field.enum_type.values_by_name
    if isinstance(value, IntEnum) or (isinstance(value, int) and not isinstance(value, bool)):
        if int(value) in field.enum_type.values_by_number:
            return int(value)
    elif isinstance(value, str):
        key = value.upper().replace("-", "_")
        for candidate in (key, "CG_" + key):  # "none" is spelled CG_NONE in the schema
            if candidate in names:
                return names[candidate].number
    raise ValueError(
        f"CRIU option {field.name!r} takes one of "
        + ", ".join(n.lower() for n in names)
        + f", not {value!r}"
    )


def command_line_args(values: Mapping[str, Any]) -> Tuple[str, ...]:
    """The same options as `criu` command-line flags: `tcp_established=True` is
    `--tcp-established`, `network_lock="nftables"` is `--network-lock nftables`; False and
    None are left out."""
    args: List[str] = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return tuple(args)


def default_network_lock() -> Optional[str]:
    """The network lock pycpt asks CRIU for when the caller names none: nftables where
    iptables is missing (CRIU's default lock needs it), else CRIU's own default (None)."""
    return None if shutil.which("iptables-restore") is not None else "nftables"
