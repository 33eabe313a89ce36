"""Keyword arguments -> CRIU's RPC options message, checked against the schema."""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from enum import IntEnum
from typing import Any, Dict, List, Mapping, Optional, Tuple

from google.protobuf.descriptor import FieldDescriptor

from pycpt import errors
from pycpt._criu import rpc_schema

# Set by pycpt from paths and pids, never directly by callers.
MANAGED = frozenset({"images_dir_fd", "work_dir_fd", "images_dir", "pid", "notify_scripts"})

OPTION_NAMES = tuple(
    sorted(f.name for f in rpc_schema.Options.DESCRIPTOR.fields if f.name not in MANAGED)
)

# `criu --help`'s names (dashes as underscores) where the RPC field is named otherwise; both
# are accepted.
ALIASES = {
    "skip_in_flight": "tcp_skip_in_flight",
    "restore_sibling": "rst_sibling",
    "cgroup_root": "cg_root",
    "ext_mount_map": "ext_mnt",
    "enable_external_masters": "ext_masters",
    "enable_external_sharing": "ext_sharing",
    "irmap_scan_path": "irmap_scan_paths",
    "prev_images_dir": "parent_img",
    "veth_pair": "veths",
    "file_validation": "file_validation_method",
    "config": "config_file",
}
CLI_NAMES = {rpc: cli for cli, rpc in ALIASES.items()}

_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_NAMESPACES = {"net": 0x40000000}  # CLONE_NEWNET: the only one criu's --empty-ns takes


def parse_size(value: Any, what: str = "size") -> int:
    """A size as criu's command line takes it: an integer of bytes, or "512K", "64M", "1G"
    (powers of 1024; "1GiB", "1gb" too)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise errors.InvalidArgumentError(f"{what} takes a non-negative size, not {value}")
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise errors.InvalidArgumentError(
            f"{what} takes a size, not {value!r}", hint="bytes, or a number with K, M, G or T"
        )
    return int(match[1]) << (10 * " KMGT".index(match[2].upper() or " "))


def option_name(name: str) -> str:
    """The RPC field for a CRIU option given by its RPC name or its `criu --help` name
    (dashes or underscores, with or without the leading --)."""
    key = name.lstrip("-").replace("-", "_")
    key = ALIASES.get(key, key)
    if key in MANAGED or key not in rpc_schema.Options.DESCRIPTOR.fields_by_name:
        raise errors.InvalidArgumentError(f"unknown CRIU option {name!r}", hint=_suggest(key))
    return key


def _suggest(key: str) -> str:
    known = sorted(set(OPTION_NAMES) | set(ALIASES))
    near = [n for n in known if len(key) >= 4 and (key in n or n in key)]
    near += [n for n in difflib.get_close_matches(key, known, n=3, cutoff=0.6) if n not in near]
    near = [n for n in near if n not in {ALIASES.get(m) for m in near}][:3]
    names = [f"{n} (= {ALIASES[n]})" if n in ALIASES else n for n in near]
    return (f"did you mean {' or '.join(names)}? " if names else "") + (
        "The names are criu's options with underscores; pycpt.criu.OPTION_NAMES lists them"
    )


def normalize(values: Mapping[str, Any]) -> Dict[str, Any]:
    """`values` under RPC field names, with the command line's spellings turned into what
    the RPC takes: human sizes (ghost_limit="1G"), empty_ns="net", manage_cgroups="full"
    (manage_cgroups + manage_cgroups_mode), ext_mnt/cg_root/veths/inherit_fd as criu's
    "KEY:VALUE" strings (or a dict)."""
    out: Dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        key = option_name(name)
        if key in out:
            raise errors.InvalidArgumentError(
                f"CRIU option {key!r} given twice (as {name!r} too)",
                hint="give each option once, under either of its names",
            )
        out.update(_convert(key, value))
    return out


def _pairs(value: Any, sep: str) -> Any:
    """'K<sep>V' strings (or one), a dict, or already pairs -> a list of pairs."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        return list(value.items())
    if not isinstance(value, (list, tuple)):
        return value
    out = []
    for item in value:
        if isinstance(item, str):
            left, found, right = item.partition(sep)
            if not found:
                raise errors.InvalidArgumentError(
                    f"{item!r} is not of the form KEY{sep}VALUE",
                    hint=f"criu's command line spells these KEY{sep}VALUE",
                )
            item = (left, right)
        out.append(item)
    return out


def _convert(key: str, value: Any) -> Dict[str, Any]:
    if key == "ghost_limit":
        return {key: parse_size(value, "CRIU option 'ghost_limit'")}
    if key == "empty_ns" and not isinstance(value, int):
        names = [value] if isinstance(value, str) else list(value)
        unknown = [n for n in names if n not in _NAMESPACES]
        if unknown:
            raise errors.InvalidArgumentError(
                f"CRIU option 'empty_ns' takes namespace names ({', '.join(_NAMESPACES)}) "
                f"or a bitmask, not {value!r}"
            )
        mask = 0
        for n in names:
            mask |= _NAMESPACES[n]
        return {key: mask}
    if key == "manage_cgroups" and isinstance(value, str):
        return {key: True, "manage_cgroups_mode": value}
    if key == "ext_mnt":
        return {key: _pairs(value, ":")}
    if key == "veths":
        return {key: _pairs(value, "=")}
    if key == "cg_root":
        items = [value] if isinstance(value, (str, Mapping)) else value
        rooted = []
        for item in items:
            if isinstance(item, str):
                ctrl, _, path = item.rpartition(":")
                item = {"ctrl": ctrl, "path": path} if ctrl else {"path": path}
            rooted.append(item)
        return {key: rooted}
    if key == "inherit_fd" and isinstance(value, (str, list, tuple)):
        items = [value] if isinstance(value, str) else value
        fds = []
        for item in items:
            if isinstance(item, str):
                match = re.fullmatch(r"fd\[(\d+)\]:(.+)", item)
                if match is None:
                    raise errors.InvalidArgumentError(
                        f"inherit_fd {item!r} is not of the form fd[N]:KEY"
                    )
                item = (match[2], int(match[1]))
            fds.append(item)
        return {key: fds}
    return {key: value}


def build_options(values: Mapping[str, Any]) -> "rpc_schema.Options":
    """An Options message from `values` (CRIU option names: the RPC field's, or as in
    `criu dump --help` with underscores, see normalize()). Scalars take Python values,
    enums their name ("nftables") or number, repeated fields a list, message fields a dict
    (or a tuple in field order)."""
    opts = rpc_schema.Options(images_dir_fd=-1)
    for name, value in normalize(values).items():
        field = rpc_schema.Options.DESCRIPTOR.fields_by_name[name]
        if _is_repeated(field):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise errors.InvalidArgumentError(
                    f"CRIU option {name!r} takes a list, not {value!r}"
                )
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
            raise errors.InvalidArgumentError(
                f"CRIU option {field.name!r}: {value!r} has too many items"
            )
        pairs = {f.name: v for f, v in zip(sub.fields, value, strict=False)}
    else:
        raise errors.InvalidArgumentError(
            f"CRIU option {field.name!r} takes a dict or tuple of "
            f"({', '.join(f.name for f in sub.fields)}), not {value!r}"
        )
    for key, item in pairs.items():
        inner = sub.fields_by_name.get(key)
        if inner is None:
            raise errors.InvalidArgumentError(
                f"CRIU option {field.name!r} has no field {key!r}; fields: "
                + ", ".join(f.name for f in sub.fields)
            )
        setattr(message, key, _scalar(inner, item))


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise errors.InvalidArgumentError(
                f"CRIU option {field.name!r} takes True or False, not {value!r}"
            )
        return value
    if kind == FieldDescriptor.TYPE_STRING:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise errors.InvalidArgumentError(
                f"CRIU option {field.name!r} takes a string, not {value!r}"
            )
        return value
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum(field, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidArgumentError(
            f"CRIU option {field.name!r} takes an integer, not {value!r}"
        )
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and value < 0:
        raise errors.InvalidArgumentError(
            f"CRIU option {field.name!r} takes a non-negative integer"
        )
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
    raise errors.InvalidArgumentError(
        f"CRIU option {field.name!r} takes one of "
        + ", ".join(n.lower() for n in names)
        + f", not {value!r}"
    )


# --- when each option matters, and its command-line form ---------------------------------
#
# RPC option -> "dump", "restore" or "both" (given at a dump, it matters at the restore too:
# containers record some of those in the dump file's config), or "pycpt" (set by pycpt from
# its own state: images, pids, cgroups, descriptors; callers may not set it on a container).
# The command-line spelling is CLI_NAMES' (above); _ATTACHED lists the flags whose value
# must be attached with "=" (criu's optional-argument options).
# Options a dump file may ask its restore for (recorded in its config, "criu_options"): only
# those that change how CRIU reads the images, never paths, mounts or programs of the host.
# Others that matter at restore are given to the restore again (criu_opts=). All are flags.
REPLAYED = frozenset(
    {"tcp_established", "file_locks", "ext_unix_sk", "shell_job", "tcp_close", "evasive_devices"}
)

STAGES: Dict[str, str] = {
    "leave_running": "pycpt",
    "ext_unix_sk": "both",
    "tcp_established": "both",
    "evasive_devices": "both",
    "shell_job": "both",
    "file_locks": "both",
    "log_level": "both",
    "log_file": "pycpt",
    "ps": "pycpt",
    "root": "pycpt",
    "parent_img": "dump",
    "track_mem": "dump",
    "auto_dedup": "both",
    "link_remap": "dump",
    "veths": "restore",
    "cpu_cap": "both",
    "force_irmap": "dump",
    "exec_cmd": "pycpt",
    "ext_mnt": "both",
    "manage_cgroups": "both",
    "cg_root": "pycpt",
    "rst_sibling": "pycpt",
    "inherit_fd": "pycpt",
    "auto_ext_mnt": "both",
    "ext_sharing": "both",
    "ext_masters": "both",
    "skip_mnt": "dump",
    "enable_fs": "dump",
    "unix_sk_ino": "both",
    "manage_cgroups_mode": "both",
    "ghost_limit": "dump",
    "irmap_scan_paths": "dump",
    "external": "both",
    "empty_ns": "restore",
    "join_ns": "restore",
    "cgroup_props": "both",
    "cgroup_props_file": "both",
    "cgroup_dump_controller": "dump",
    "freeze_cgroup": "pycpt",
    "timeout": "both",
    "tcp_skip_in_flight": "dump",
    "weak_sysctls": "restore",
    "lazy_pages": "pycpt",
    "status_fd": "pycpt",
    "orphan_pts_master": "pycpt",
    "config_file": "both",
    "tcp_close": "both",
    "lsm_profile": "restore",
    "tls_cacert": "both",
    "tls_cacrl": "both",
    "tls_cert": "both",
    "tls_key": "both",
    "tls": "both",
    "tls_no_cn_verify": "both",
    "cgroup_yard": "both",
    "pre_dump_mode": "dump",
    "pidfd_store_sk": "pycpt",
    "lsm_mount_context": "restore",
    "network_lock": "both",
    "mntns_compat_mode": "restore",
    "skip_file_rwx_check": "restore",
    "unprivileged": "both",
    "leave_stopped": "pycpt",
    "display_stats": "both",
    "log_to_stderr": "pycpt",
    "allow_uprobes": "both",
    "ghost_fiemap": "dump",
    "file_validation_method": "both",
}
_ATTACHED = {
    "log_level": "--verbosity=",
    "manage_cgroups_mode": "--manage-cgroups=",
    "unix_sk_ino": "--ext-unix-sk=",
}
# no command-line form: the RPC field is a number where the command line takes names
_RPC_ONLY = frozenset({"cpu_cap"})


def stage_of(name: str) -> str:
    """When option `name` matters: "dump", "restore", "both", or "pycpt" (pycpt sets it)."""
    return STAGES[option_name(name)]


def flag_of(name: str) -> str:
    """The `criu` command-line flag of option `name` (ending in "=" when its value must be
    attached)."""
    key = option_name(name)
    return _ATTACHED.get(key) or "--" + CLI_NAMES.get(key, key).replace("_", "-")


def command_line_args(values: Mapping[str, Any]) -> Tuple[str, ...]:
    """The same options as `criu` command-line flags: `tcp_established=True` is
    `--tcp-established`, `network_lock="nftables"` is `--network-lock nftables`,
    `tcp_skip_in_flight=True` is `--skip-in-flight`, a list repeats its flag, a message
    field takes criu's KEY:VALUE forms, an enum its name; False and None are left out
    (criu's default)."""
    build_options(values)  # the same checks as over RPC: names, types, enum values
    args: List[str] = []
    for key, value in normalize(values).items():
        if value is False:
            continue
        if key in _RPC_ONLY:
            raise errors.InvalidArgumentError(
                f"CRIU option {key!r} has no command-line form; it needs the RPC path "
                "(a compressed dump file)"
            )
        field = rpc_schema.Options.DESCRIPTOR.fields_by_name[key]
        items = value if _is_repeated(field) else [value]
        if isinstance(items, Mapping):
            items = list(items.items())
        for item in items:
            args += _flag_value(key, flag_of(key), field, item)
    return tuple(args)


def _flag_value(name: str, flag: str, field: FieldDescriptor, value: Any) -> List[str]:
    if value is True:
        return [flag]
    if name == "auto_ext_mnt":
        return [flag, "auto"]
    if name == "empty_ns":
        names = [n for n, bit in _NAMESPACES.items() if int(value) & bit]
        return [flag, ",".join(names)]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        text = _message_text(name, field, value)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        number = _enum(field, value)
        text = field.enum_type.values_by_number[number].name.lower().removeprefix("cg_")
        text = {"build_id": "buildid", "file_size": "filesize"}.get(text, text)
    else:
        text = str(os.fspath(value) if isinstance(value, os.PathLike) else value)
    return [flag + text] if flag.endswith("=") else [flag, text]


def _message_text(name: str, field: FieldDescriptor, value: Any) -> str:
    """A message option (veths, ext_mnt, join_ns, unix_sk_ino) in criu's command-line form."""
    sub = field.message_type
    if isinstance(value, Mapping):
        parts = dict(value)
    elif isinstance(value, (tuple, list)):
        parts = {f.name: v for f, v in zip(sub.fields, value, strict=False)}
    else:
        raise errors.InvalidArgumentError(f"CRIU option {name!r} takes a dict, not {value!r}")
    if name == "veths":
        return f"{parts['if_in']}={parts['if_out']}"
    if name == "ext_mnt":
        return f"{parts['key']}:{parts['val']}"
    if name == "join_ns":
        extra = f",{parts['extra_opt']}" if parts.get("extra_opt") else ""
        return f"{parts['ns']}:{parts['ns_file']}{extra}"
    if name == "unix_sk_ino":
        return str(int(parts["inode"]))
    raise errors.InvalidArgumentError(f"CRIU option {name!r} has no command-line form here")


def parse_option(text: str) -> Tuple[str, Any]:
    """One `--criu-opt NAME=VALUE` as (RPC option name, value), VALUE read by the field's
    type: a bool from true/false/yes/no/1/0 (NAME alone is true), an integer (sizes like
    64M for ghost_limit), a string or an enum's name as given, a message as JSON
    ({"if_in": "eth0", "if_out": "veth1"}) or criu's KEY:VALUE / IN=OUT form. A repeated
    option takes one item per use."""
    raw_name, sep, raw = text.partition("=")
    name = option_name(raw_name)
    field = rpc_schema.Options.DESCRIPTOR.fields_by_name[name]
    kind = field.type
    value: Any
    if kind == FieldDescriptor.TYPE_BOOL:
        word = raw.strip().lower() if sep else "true"
        if word not in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            raise errors.InvalidArgumentError(
                f"CRIU option {name!r} takes true or false, not {raw!r}"
            )
        value = word in ("true", "yes", "1", "on")
    elif not sep:
        raise errors.InvalidArgumentError(
            f"CRIU option {name!r} takes a value: --criu-opt {name}=VALUE"
        )
    elif kind == FieldDescriptor.TYPE_MESSAGE and raw.lstrip().startswith("{"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise errors.InvalidArgumentError(
                f"CRIU option {name!r} takes a JSON object, not {raw!r}"
            ) from exc
    elif kind in (
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_MESSAGE,
    ):
        value = raw  # messages in criu's own spelling: normalize() reads them
    elif name == "ghost_limit" or name == "empty_ns":
        value = raw
    else:
        try:
            value = int(raw, 0)
        except ValueError:
            raise errors.InvalidArgumentError(
                f"CRIU option {name!r} takes an integer, not {raw!r}"
            ) from None
    return name, [value] if _is_repeated(field) else value


def default_network_lock() -> Optional[str]:
    """The network lock pycpt asks CRIU for when the caller names none: nftables where
    iptables is missing (CRIU's default lock needs it), else CRIU's own default (None)."""
    return None if shutil.which("iptables-restore") is not None else "nftables"
