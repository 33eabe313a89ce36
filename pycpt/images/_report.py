"""What `pycpt inspect` shows, as JSON-able data: the report of one checkpoint and the
difference between two. The keys are stable (REPORT_SCHEMA names their version) and are
documented in the README ("Looking inside a checkpoint").

Everything here is read from untrusted images: values are copied into plain ints, strings
and lists (never protobuf objects), and every string is left as the images have it (the
text views escape what a terminal would interpret).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from pycpt.errors import ImageError, PycptError
from pycpt.images import PAGE_SIZE, REPORT_SCHEMA, REPORT_SECTIONS, _enum_name

if TYPE_CHECKING:
    from pycpt.images import Images, Memory

J = Dict[str, Any]  # a JSON object

_SIGNATURE = "manifest.sig"
_SIGNATURE_MAX = 4096
_NETWORK_LOCKS = {0: "iptables", 1: "nftables", 2: "skip"}  # criu/include/cr_options.h
_SOCKET_TYPES = ("INETSK", "UNIXSK", "NETLINKSK", "PACKETSK")


# --- one checkpoint ----------------------------------------------------------------------


def summary(im: "Images") -> Dict[str, Any]:
    """The checkpoint's content without where it came from: images, inventory, processes
    (each with its memory, namespaces, cgroup and count of descriptors), namespaces,
    cgroups and counts of files. Reads no pages but each process's command line."""
    inv = im.inventory()
    tree = im.process_tree()
    ns = im.namespaces()
    cg = im.cgroups()
    entries = im.file_entries()
    procs = []
    fd_ids: Dict[int, str] = {}  # open file id -> type, over every descriptor
    fds = 0
    for t in tree:
        d = asdict(t)
        d["state"] = t.state.label
        d["stop_signal"] = d.pop("stop_signo")
        d["argv"] = _argv(im, t.pid)
        d["cwd"], d["root"] = im.cwd(t.pid)
        mem = im.memory(t.pid) if im.get(f"mm-{t.pid}.img") is not None else None
        d["memory"] = _memory(mem) if mem is not None else None
        d["namespaces"] = ns.tasks.get(t.pid, {})
        d["cgroup"] = cg.of(t.pid)
        own = im.fdinfo(t.pid)  # none for a zombie
        d["fds"] = len(own)
        fds += len(own)
        for fi in own:
            fe = entries.get(fi.id)
            fd_ids[int(fi.id)] = _type_name(fe) if fe is not None else "UND"
        procs.append(d)
    by_type: Dict[str, int] = {}
    for kind in fd_ids.values():
        by_type[kind] = by_type.get(kind, 0) + 1
    pipes = {
        int(entries[i].pipe.pipe_id)
        for i, k in fd_ids.items()
        if k == "PIPE" and entries[i].HasField("pipe")
    }
    images = list(im)
    return {
        "images": {
            "count": len(images),
            "bytes": sum(f.size for f in images),
            "pages_bytes": sum(f.size for f in images if f.kind == "PAGES"),
            "unknown": [f.name for f in images if f.kind is None],
        },
        "inventory": {
            "img_version": int(inv.img_version),
            "lsm": _enum_name(inv, "lsmtype") if inv.HasField("lsmtype") else None,
            "dump_uptime_us": int(inv.dump_uptime) if inv.HasField("dump_uptime") else None,
            "tcp_close": bool(inv.tcp_close),
            "network_lock": _NETWORK_LOCKS.get(int(inv.network_lock_method))
            if inv.HasField("network_lock_method")
            else None,
        },
        "page_size": PAGE_SIZE,
        "processes": procs,
        "namespaces": {
            "dumper": ns.dumper,
            "root_own": sorted(ns.own()),
            "created_on_restore": sorted(ns.created_on_restore()),
            "root_shared_with_dumper": sorted(ns.shared_with_dumper()),
            "saved": ns.saved,
        },
        "cgroups": {"sets": {str(k): v for k, v in cg.sets.items()}, "dumper_set": cg.dumper},
        "counts": {
            "processes": len(tree),
            "threads": sum(len(t.threads) for t in tree),
            "fds": fds,
            "open_files": len(fd_ids),
            "by_type": dict(sorted(by_type.items())),
            "sockets": sum(by_type.get(k, 0) for k in _SOCKET_TYPES),
            "pipes": len(pipes),
        },
    }


def report(im: "Images", sections: Iterable[str] = REPORT_SECTIONS) -> Dict[str, Any]:
    """The report of `pycpt inspect --json`: where the checkpoint is and who made it
    ("source", "dump"), summary() and the `sections` asked for (see REPORT_SECTIONS)."""
    wanted = set(sections)
    unknown = wanted - set(REPORT_SECTIONS)
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}; known: {REPORT_SECTIONS}")
    manifest = im.manifest()
    out: Dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "source": {
            "path": im.source,
            "kind": im.source_kind,
            "size": im.source_size,
            "compression": im.compression,
            "modified": im.modified,
        },
        "dump": dump_facts(im, manifest),
    }
    out.update(summary(im))
    if "files" in wanted or "memory" in wanted:
        for proc in out["processes"]:
            pid = proc["pid"]
            if "files" in wanted:
                proc["files"] = [_open_file(f) for f in im.files(pid)]
            if "memory" in wanted:
                mem = im.memory(pid) if im.get(f"mm-{pid}.img") is not None else None
                proc["vmas"] = [_vma(v) for v in mem.vmas] if mem is not None else []
    if "sockets" in wanted:
        out["sockets"] = [
            {
                "id": s.id,
                "ino": s.ino,
                "family": s.family,
                "type": s.type,
                "protocol": s.protocol,
                "state": s.state,
                "local": s.local,
                "peer": s.peer,
                "owners": [{"pid": pid, "fd": fd} for pid, fd in s.owners],
                "inq": s.inq,
                "outq": s.outq,
                "unsent": s.unsent,
            }
            for s in im.sockets()
        ]
    if "manifest" in wanted:
        out["manifest"] = manifest
    return out


def dump_facts(im: "Images", manifest: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Which container, when, made by which pycpt/CRIU/kernel, and the signature; from the
    manifest (None: an images directory, whose facts are unknown)."""
    m = manifest or {}
    config = m["config"] if isinstance(m.get("config"), dict) else {}
    return {
        "format": im.dump_format(),
        "container": _str(config.get("id")),
        "created": _str(m.get("created")),
        "pycpt_version": _str(m.get("pycpt_version")),
        "criu_version": _str(m.get("criu_version")),
        "kernel": _str(m.get("kernel")),
        "signature": signature(im),
    }


def signature(im: "Images") -> Dict[str, Any]:
    """Whether the dump file is signed, by which key, and (once pycpt can check it) whether
    the signature holds and the key is trusted here. Inspecting never needs a signature.

    Keys: signed (bool), format (int or None), key ("pycpt-ed25519 BASE64" or None),
    fingerprint ("SHA256:..." or None), verified and trusted (bool, or None when not
    checked), text (one line for people).
    """
    fmt = im.dump_format()
    out: Dict[str, Any] = {
        "signed": False,
        "format": fmt,
        "key": None,
        "fingerprint": None,
        "verified": None,
        "trusted": None,
    }
    if fmt is None:
        out["text"] = "unsigned (an images directory)"
        return out
    raw = im.member(_SIGNATURE, _SIGNATURE_MAX)
    if raw is None:
        out["text"] = f"unsigned (format {fmt})"
        return out
    try:
        sig = json.loads(raw)
        key = sig["key"]
        kind, b64 = key.split()[:2]
        if kind != "pycpt-ed25519":
            raise ValueError(f"key type {kind!r}")
        material = base64.b64decode(b64, validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ImageError(f"is not a pycpt signature ({exc})", file=_SIGNATURE) from exc
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(material).digest()).decode()
    out.update(signed=True, key=f"{kind} {b64}", fingerprint=fingerprint.rstrip("="))
    out["verified"], out["trusted"], text = _check_signature(im, sig)
    out["text"] = f"signed by {out['fingerprint']}" + (f" ({text})" if text else "")
    return out


def _check_signature(
    im: "Images", sig: Dict[str, Any]
) -> Tuple[Optional[bool], Optional[bool], str]:
    """(verified, trusted, note) of a format 2 signature: checked over the manifest's exact
    bytes, the key looked up in this host's keys ($PYCPT_STATE_DIR; none are made)."""
    from pycpt import dumpfile  # only a signed dump file needs the key code

    raw_sig = im.member(_SIGNATURE, _SIGNATURE_MAX) or b""
    manifest = im.member("manifest.json") or b""
    try:
        key, valid = dumpfile.check_signature(raw_sig, manifest)
    except ValueError as exc:
        return False, None, f"malformed: {exc}"
    try:
        trusted = dumpfile.Keys().trusted(create=False)
    except PycptError as exc:
        return valid, None, f"{'valid' if valid else 'INVALID'}; keys unreadable: {exc.message}"
    if not valid:
        return False, key in trusted, "INVALID: the manifest does not match its signature"
    if key in trusted:
        return True, True, f"valid, trusted: {trusted[key]}"
    return True, False, "valid, but not by a key this host trusts"


# --- two checkpoints ---------------------------------------------------------------------


def diff_reports(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """What changed from report `a` to report `b` (two checkpoints of one container, made
    with every section): processes, descriptors, sockets and memory sizes. Processes are
    matched by pid (a container's pids are its own), descriptors by (pid, fd), sockets by
    their family, type, protocol and addresses."""
    pa = {p["pid"]: p for p in a.get("processes", [])}
    pb = {p["pid"]: p for p in b.get("processes", [])}
    procs: Dict[str, Any] = {
        "added": [_proc_brief(pb[pid]) for pid in pb if pid not in pa],
        "removed": [_proc_brief(pa[pid]) for pid in pa if pid not in pb],
        "changed": [],
    }
    files, memory = [], []
    for pid in pa.keys() & pb.keys():
        changes = {
            k: [pa[pid].get(k), pb[pid].get(k)]
            for k in ("ppid", "pgid", "sid", "state", "argv", "comm", "uid", "gid", "exe", "cwd")
            if pa[pid].get(k) != pb[pid].get(k)
        }
        if len(pa[pid]["threads"]) != len(pb[pid]["threads"]):
            changes["threads"] = [len(pa[pid]["threads"]), len(pb[pid]["threads"])]
        if changes:
            procs["changed"].append({"pid": pid, "changes": changes})
        fd = _diff_files(pa[pid].get("files") or [], pb[pid].get("files") or [])
        if fd is not None:
            files.append({"pid": pid, **fd})
        mem = _diff_memory(pa[pid].get("memory"), pb[pid].get("memory"))
        if mem is not None:
            memory.append({"pid": pid, **mem})
    procs["changed"].sort(key=lambda c: c["pid"])
    files.sort(key=lambda c: c["pid"])
    memory.sort(key=lambda c: c["pid"])
    for pid in pb.keys() - pa.keys():  # a new process's memory, from nothing
        mem = _diff_memory(None, pb[pid].get("memory"))
        if mem is not None:
            memory.append({"pid": pid, **mem})
    for pid in pa.keys() - pb.keys():
        mem = _diff_memory(pa[pid].get("memory"), None)
        if mem is not None:
            memory.append({"pid": pid, **mem})
    return {
        "schema": REPORT_SCHEMA,
        "a": _header(a),
        "b": _header(b),
        "same_container": a["dump"].get("container") == b["dump"].get("container"),
        "processes": procs,
        "files": files,
        "sockets": _diff_sockets(a.get("sockets") or [], b.get("sockets") or []),
        "memory": memory,
        "counts": {
            k: [a["counts"].get(k), b["counts"].get(k)]
            for k in ("processes", "threads", "fds", "open_files", "sockets", "pipes")
        },
    }


def _header(r: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "path": r["source"]["path"],
        "container": r["dump"].get("container"),
        "created": r["dump"].get("created"),
        "modified": r["source"].get("modified"),
    }


def _proc_brief(p: Dict[str, Any]) -> Dict[str, Any]:
    return {
        k: p.get(k) for k in ("pid", "ppid", "sid", "state", "comm", "argv", "uid") if k in p
    } | {"threads": len(p.get("threads") or [])}


def _diff_files(
    a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]]
) -> Optional[Dict[str, Any]]:
    fa = {f["fd"]: f for f in a}
    fb = {f["fd"]: f for f in b}
    added = [_fd_brief(fb[fd]) for fd in sorted(fb.keys() - fa.keys())]
    removed = [_fd_brief(fa[fd]) for fd in sorted(fa.keys() - fb.keys())]
    changed = []
    for fd in sorted(fa.keys() & fb.keys()):
        x, y = fa[fd], fb[fd]
        if _fd_brief(x) != _fd_brief(y):
            changed.append({"fd": fd, "before": _fd_brief(x), "after": _fd_brief(y)})
    if not (added or removed or changed):
        return None
    return {"added": added, "removed": removed, "changed": changed}


def _fd_brief(f: Dict[str, Any]) -> Dict[str, Any]:
    return {"fd": f["fd"], "type": f["type"], "description": _stable(f), "pos": f.get("pos")}


def _stable(f: Dict[str, Any]) -> str:
    """A descriptor's description without the kernel's inode numbers, which a restore
    changes (pipe:[N], a unix socket's peer inode): what the diff compares."""
    d = f.get("details") or {}
    if f["type"] == "PIPE":
        return "pipe" + (f" ({d['queued']} bytes queued)" if d.get("queued") else "")
    if f["type"] == "FIFO":
        return f"fifo {d.get('path') or ''}".strip()
    if f["type"] == "UNIXSK":
        return f"unix {d.get('type')} {d.get('name') or '(unnamed)'} {d.get('state')}"
    return str(f["description"])


def _socket_key(s: Dict[str, Any]) -> Tuple[Any, ...]:
    return (s["family"], s["type"], s["protocol"], s["local"], s["peer"])


def _diff_sockets(a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    # unnamed unix sockets share a key: matched as a multiset, the surplus is added/removed
    left: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for s in a:
        left.setdefault(_socket_key(s), []).append(s)
    added, changed = [], []
    for s in b:
        same = left.get(_socket_key(s))
        if not same:
            added.append(_socket_brief(s))
            continue
        before = same.pop(0)
        if before["state"] != s["state"]:
            changed.append({"before": _socket_brief(before), "after": _socket_brief(s)})
    removed = [_socket_brief(s) for rest in left.values() for s in rest]
    return {"added": added, "removed": removed, "changed": changed}


def _socket_brief(s: Dict[str, Any]) -> Dict[str, Any]:
    return {k: s.get(k) for k in ("family", "type", "protocol", "state", "local", "peer", "owners")}


def _diff_memory(
    a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]
) -> Optional[Dict[str, Any]]:
    if a is None and b is None:
        return None
    za = a or {"bytes": 0, "vmas": 0, "pages": {}, "by_kind": {}}
    zb = b or {"bytes": 0, "vmas": 0, "pages": {}, "by_kind": {}}
    out: Dict[str, Any] = {
        "bytes": [za["bytes"], zb["bytes"]],
        "vmas": [za["vmas"], zb["vmas"]],
        "pages": {
            k: [za["pages"].get(k, 0), zb["pages"].get(k, 0)]
            for k in ("dumped", "shared", "zero", "from_file", "lazy", "in_parent")
        },
        "by_kind": {
            kind: [
                za["by_kind"].get(kind, {}).get("bytes", 0),
                zb["by_kind"].get(kind, {}).get("bytes", 0),
            ]
            for kind in sorted(set(za["by_kind"]) | set(zb["by_kind"]))
        },
    }
    out["pages"] = {k: v for k, v in out["pages"].items() if v[0] != v[1]}
    out["by_kind"] = {k: v for k, v in out["by_kind"].items() if v[0] != v[1]}
    if out["bytes"][0] == out["bytes"][1] and out["vmas"][0] == out["vmas"][1] and not out["pages"]:
        return None
    return out


def _kind_bytes(mem: J, kind: str) -> int:
    return int(mem["by_kind"].get(kind, {}).get("bytes", 0))


# --- pieces ------------------------------------------------------------------------------


def _argv(im: "Images", pid: int) -> Optional[List[str]]:
    if im.get(f"mm-{pid}.img") is None:
        return None
    try:
        return im.argv(pid)
    except ImageError as exc:
        # the pages image of a compressed dump file is not kept: no command line then
        if "not kept" in exc.message:
            return None
        raise


def _memory(mem: "Memory") -> Dict[str, Any]:
    return {
        "vmas": len(mem.vmas),
        "bytes": mem.size,
        "pages": {
            "dumped": mem.pages_dumped,
            "shared": mem.pages_shared,
            "lazy": mem.pages_lazy,
            "in_parent": mem.pages_in_parent,
            "zero": mem.pages_zero,
            "from_file": mem.pages_from_file,
            "not_dumped": mem.pages_not_dumped,
        },
        "by_kind": mem.by_kind(),
    }


def _open_file(f: Any) -> Dict[str, Any]:
    return {
        "fd": f.fd,
        "id": f.id,
        "type": f.type,
        "cloexec": f.cloexec,
        "flags": f.flags,
        "pos": f.pos,
        "description": f.description,
        "details": f.details,
    }


def _vma(v: Any) -> Dict[str, Any]:
    return {
        "start": v.start,
        "end": v.end,
        "size": v.size,
        "kind": v.kind,
        "prot": v.prot_text,
        "file": v.file,
        "pgoff": v.pgoff,
        "shmid": v.shmid,
        "pages_dumped": v.pages_dumped,
        "pages_lazy": v.pages_lazy,
        "pages_in_parent": v.pages_in_parent,
        "pages_absent": v.pages_absent,
    }


def _type_name(fe: Any) -> str:
    return _enum_name(fe, "type")


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None
