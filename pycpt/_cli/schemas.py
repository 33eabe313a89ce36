"""The JSON the command prints with --json, as JSON Schema (draft 2020-12). The README's
"JSON output" section is made from these (tests/test_cli_reference.py keeps it so), and
the tests validate real output against them."""

from __future__ import annotations

from typing import Any, Dict

_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}
_STATUS = {
    "enum": [
        "running",
        "frozen",
        "suspended",
        "dumped",
        "undumped",
        "stopped",
        "migrating",
        "migrated",
        "receiving pages",
        "tampered",
    ],
    "description": "what the container is doing (see `pycpt status --help`); `tampered` "
    "(`list` only): its record cannot be trusted and is left alone (see `error`)",
}

CONTAINER: Dict[str, Any] = {
    "type": "object",
    "description": "one container (`pycpt status CT --json`)",
    "required": [
        "id",
        "status",
        "dumped",
        "init_pid",
        "created",
        "argv",
        "root",
        "share_net",
        "cgroup",
        "dumpfile",
        "dumpfile_size",
        "exit_status",
        "console_log",
    ],
    "properties": {
        "id": {"type": "string"},
        "status": _STATUS,
        "dumped": {"type": "boolean", "description": "suspended with a good dump already"},
        "init_pid": {**_NULLABLE_INT, "description": "host pid of its init while it has one"},
        "created": {"type": ["number", "null"], "description": "Unix time it was first started"},
        "argv": {"type": "array", "items": {"type": "string"}},
        "root": {**_NULLABLE_STR, "description": "its private root directory, if any"},
        "share_net": {"type": "boolean"},
        "cgroup": _NULLABLE_STR,
        "dumpfile": {**_NULLABLE_STR, "description": "the last dump file, while it exists"},
        "dumpfile_size": _NULLABLE_INT,
        "exit_status": {
            **_NULLABLE_INT,
            "description": "how its program ended (128+N: signal N); null while it runs or "
            "when unknown (after a restore, or a stop)",
        },
        "console_log": {"type": "string"},
        "error": {
            "type": "string",
            "description": "(`list`, a tampered record only) why it cannot be trusted",
        },
        "nics": {
            "type": "array",
            "description": "its NICs on host bridges (`start --net`)",
            "items": {
                "type": "object",
                "required": ["name", "mac", "bridge", "host_name", "addresses", "gateways"],
                "properties": {
                    "name": {"type": "string", "description": "inside: eth0, ..."},
                    "mac": {"type": "string"},
                    "bridge": {"type": "string"},
                    "host_name": {"type": "string", "description": "the outside veth end here"},
                    "addresses": {
                        "type": "array",
                        "items": {"type": "string", "description": "ADDR/PREFIX"},
                    },
                    "gateways": {"type": "array", "items": {"type": "string"}},
                    "mtu": {"type": "integer", "description": "0: the default"},
                },
            },
        },
    },
    "additionalProperties": True,
}

LIST: Dict[str, Any] = {
    "type": "array",
    "description": "every container (`pycpt list --json`)",
    "items": CONTAINER,
}

CHKPNT: Dict[str, Any] = {
    "type": "object",
    "description": "what `pycpt chkpnt CT --json` did",
    "required": ["id", "action", "seconds", "dumpfile", "dumpfile_size", "status"],
    "properties": {
        "id": {"type": "string"},
        "action": {"enum": ["chkpnt", "suspend", "dump", "kill", "resume"]},
        "seconds": {"type": "number", "minimum": 0},
        "dumpfile": {**_NULLABLE_STR, "description": "written by chkpnt and --dump"},
        "dumpfile_size": _NULLABLE_INT,
        "status": _STATUS,
    },
    "additionalProperties": True,
}

RESTORE: Dict[str, Any] = {
    "type": "object",
    "description": "what `pycpt restore CT --json` did",
    "required": ["id", "action", "seconds", "dumpfile", "status", "init_pid"],
    "properties": {
        "id": {"type": "string"},
        "action": {"enum": ["restore", "undump", "resume", "kill"]},
        "seconds": {"type": "number", "minimum": 0},
        "dumpfile": {**_NULLABLE_STR, "description": "restored from (restore, --undump)"},
        "status": _STATUS,
        "init_pid": _NULLABLE_INT,
    },
    "additionalProperties": True,
}

CHECKPOINTS: Dict[str, Any] = {
    "type": "array",
    "description": "the named checkpoints of a container (`pycpt checkpoints CT --json`)",
    "items": {
        "type": "object",
        "required": ["name", "path", "created", "pycpt_version", "criu_version", "error"],
        "properties": {
            "name": {"type": "string"},
            "path": {"type": "string"},
            "size": {"type": "integer"},
            "created": {**_NULLABLE_STR, "description": "ISO 8601, from its manifest"},
            "pycpt_version": _NULLABLE_STR,
            "criu_version": _NULLABLE_STR,
            "error": {**_NULLABLE_STR, "description": "why its manifest cannot be read"},
        },
    },
}

CHECK: Dict[str, Any] = {
    "type": "object",
    "description": "the doctor's report (`pycpt check --json`)",
    "required": ["ok", "status", "verdict", "system", "items"],
    "properties": {
        "ok": {"type": "boolean", "description": "checkpointing can work here"},
        "status": {"enum": ["OK", "SKIP", "WARN", "FAIL"]},
        "verdict": {"type": "string"},
        "system": {"type": "object"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "category", "status", "detail", "fix"],
                "properties": {
                    "name": {"type": "string"},
                    "category": {"type": "string"},
                    "status": {"enum": ["OK", "SKIP", "WARN", "FAIL"]},
                    "detail": {"type": "string"},
                    "fix": {"type": "string"},
                },
            },
        },
        "engine": {"type": ["object", "null"]},
    },
}

MIGRATE: Dict[str, Any] = {
    "type": "object",
    "description": "the statistics of `pycpt migrate --json` (also with --dry-run)",
    "required": [
        "ct",
        "host",
        "mode",
        "stages",
        "frozen_window",
        "total",
        "bytes_sent",
        "image_bytes",
        "memory_bytes",
        "notes",
        "dry_run",
    ],
    "properties": {
        "ct": {"type": "string"},
        "host": {"type": "string"},
        "mode": {"enum": ["offline", "stopcopy", "postcopy"]},
        "stages": {
            "type": "object",
            "additionalProperties": {"type": "number"},
            "description": "seconds per stage (preflight, freeze, dump, transfer, ...)",
        },
        "frozen_window": {"type": "number", "description": "seconds frozen"},
        "total": {"type": "number"},
        "bytes_sent": {"type": "integer"},
        "image_bytes": {"type": "integer"},
        "memory_bytes": {"type": "integer"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "dry_run": {"type": "boolean"},
        "target": {"type": "object"},
    },
    "additionalProperties": True,
}

# verb -> the schema of what it prints with --json
SCHEMAS: Dict[str, Dict[str, Any]] = {
    "status": CONTAINER,
    "list": LIST,
    "chkpnt": CHKPNT,
    "restore": RESTORE,
    "checkpoints": CHECKPOINTS,
    "check": CHECK,
    "migrate": MIGRATE,
}
