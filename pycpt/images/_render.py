"""The text views of `pycpt inspect`: a report (pycpt.images.Images.report) or a difference
(diff_reports) as people read it. Every string from the images is escaped before it reaches
a terminal (a process name or a path can hold control characters)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

_MAX_ROWS = 12  # processes in the summary before "... N more"
_MAX_SOCKETS = 4


def format_report(report: Dict[str, Any], views: Sequence[str] = ("summary",)) -> str:
    """`report` as text: each of `views` ("summary", "ps", "files", "mem", "sockets",
    "manifest") in turn. The report must hold the sections the views show."""
    texts: Dict[str, Callable[[Dict[str, Any]], str]] = {
        "summary": format_summary,
        "ps": format_ps,
        "files": format_files,
        "mem": format_memory,
        "sockets": format_sockets,
        "manifest": format_manifest,
    }
    unknown = [v for v in views if v not in texts]
    if unknown:
        raise ValueError(f"unknown views {unknown}; known: {list(texts)}")
    return "\n".join(texts[v](report) for v in views)


# --- text views --------------------------------------------------------------------------


def format_summary(r: Dict[str, Any]) -> str:
    """The one-screen summary of a report."""
    src, dump = r["source"], r["dump"]
    lines = []
    what = "dump file" if src["kind"] == "dumpfile" else "images"
    packing = []
    if dump["format"] is not None:
        packing.append(f"format {dump['format']}")
    if src["kind"] == "dumpfile":
        packing.append(f"{src['compression']}-compressed" if src["compression"] else "plain")
    lines.append(
        _row(what, f"{_clean(src['path'])}  ({_size(src['size'])}, {', '.join(packing)})")
        if packing
        else _row(what, f"{_clean(src['path'])}  ({_size(src['size'])})")
    )
    lines.append(_row("container", _clean(dump["container"] or "(not recorded)")))
    lines.append(_row("created", _when(dump["created"], src.get("modified"))))
    made = [
        f"pycpt {_clean(dump['pycpt_version'] or '?')}",
        f"CRIU {_clean(dump['criu_version'] or '?')}",
        f"kernel {_clean(dump['kernel'] or '?')}",
    ]
    lines.append(
        _row("made by", ", ".join(made) if dump["criu_version"] else "(no manifest: unknown)")
    )
    lines.append(_row("signature", _clean(dump["signature"]["text"])))
    img = r["images"]
    lines.append(
        _row(
            "images",
            f"{img['count']} files, {_size(img['bytes'])}, of which pages "
            f"{_size(img['pages_bytes'])}"
            + (f"; {len(img['unknown'])} of an unknown kind" if img["unknown"] else ""),
        )
    )
    counts = r["counts"]
    lines.append("")
    lines.append(
        f"processes   {counts['processes']} ({counts['threads']} threads)"
        + ("" if counts["processes"] <= _MAX_ROWS else f", the first {_MAX_ROWS}:")
    )
    lines.append(f"  {'PID':>7} {'PPID':>7} {'SID':>7} {'STATE':<8} {'THR':>4} {'UID':>6}  COMMAND")
    for p in r["processes"][:_MAX_ROWS]:
        lines.append(
            f"  {p['pid']:>7} {p['ppid']:>7} {p['sid']:>7} {_state(p):<8} "
            f"{len(p['threads']):>4} {_opt(p['uid']):>6}  {_command(p, 50)}"
        )
    if counts["processes"] > _MAX_ROWS:
        lines.append(f"  ... {counts['processes'] - _MAX_ROWS} more: pycpt inspect --ps")
    if any(p["argv"] is None and p["memory"] is not None for p in r["processes"]):
        lines.append(
            "  [name]: the command line's pages are not at hand"
            + (" (a compressed file keeps none)" if src["compression"] else "")
        )
    lines.append("")
    lines.append(
        f"memory      {'PID':>7} {'MAPPED':>10} {'DUMPED':>10} {'SHARED':>10} {'ZERO':>10} "
        f"{'LAZY':>10}"
    )
    for p in r["processes"][:_MAX_ROWS]:
        m = p["memory"]
        if m is None:
            lines.append(f"            {p['pid']:>7} (no memory image)")
            continue
        pg = m["pages"]
        lines.append(
            f"            {p['pid']:>7} {_size(m['bytes']):>10} {_pages(pg['dumped']):>10} "
            f"{_pages(pg['shared']):>10} {_pages(pg['zero']):>10} {_pages(pg['lazy']):>10}"
        )
        lines.append(f"            {'':>7} {m['vmas']} VMAs: {_kinds(m['by_kind'], 4)}")
    lines.append("")
    lines.append(_row("namespaces", _namespaces(r["namespaces"])))
    lines.append(_row("cgroup", _cgroup(r)))
    lines.append(_row("files", _file_counts(counts)))
    listening = _listening(r)
    if listening:
        lines.append(_row("listening", listening))
    return "\n".join(lines) + "\n"


def format_ps(r: Dict[str, Any]) -> str:
    """Every process with its ids, state, threads, credentials and command line."""
    lines = [
        f"{'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7} {'STATE':<18} {'THR':>4} {'UID':>6} "
        f"{'GID':>6}  COMMAND"
    ]
    for p in r["processes"]:
        lines.append(
            f"{p['pid']:>7} {p['ppid']:>7} {p['pgid']:>7} {p['sid']:>7} {_state(p, True):<18} "
            f"{len(p['threads']):>4} {_opt(p['uid']):>6} {_opt(p['gid']):>6}  {_command(p, None)}"
        )
        extra = [f"comm {_clean(p['comm'])}"]
        if p["exe"]:
            extra.append(f"exe {_clean(p['exe'])}")
        if p["cwd"]:
            extra.append(f"cwd {_clean(p['cwd'])}")
        if p["root"] and p["root"] != "/":
            extra.append(f"root {_clean(p['root'])}")
        if len(p["threads"]) > 1:
            extra.append("threads " + " ".join(str(t) for t in p["threads"]))
        if p["seccomp"] and p["seccomp"] != "disabled":
            extra.append(f"seccomp {p['seccomp']}")
        if p["state"] == "dead":
            extra.append(_exit_text(p["exit_code"]))
        lines.append(" " * 17 + "; ".join(extra))
    return "\n".join(lines) + "\n"


def format_files(r: Dict[str, Any]) -> str:
    """Each process's descriptors: fd -> what it is."""
    lines = []
    for p in r["processes"]:
        lines.append(f"pid {p['pid']} ({_clean(p['comm'])}): {len(p.get('files') or [])} fds")
        lines.append(f"  {'FD':>5}  {'TYPE':<10} {'MODE':<6} {'POS':>10}  WHAT")
        for f in p.get("files") or []:
            pos = "" if f["pos"] is None else str(f["pos"])
            lines.append(
                f"  {f['fd']:>5}  {f['type']:<10} {_mode(f):<6} {pos:>10}  "
                f"{_clean(f['description'])}"
            )
        if p["cwd"]:
            lines.append(f"  cwd {_clean(p['cwd'])}, root {_clean(p['root'] or '?')}")
    return "\n".join(lines) + "\n"


def format_memory(r: Dict[str, Any]) -> str:
    """Each process's VMAs with their kind and pages (dumped, lazy, absent)."""
    lines = []
    for p in r["processes"]:
        vmas = p.get("vmas") or []
        m = p["memory"]
        total = _size(m["bytes"]) if m else "?"
        lines.append(f"pid {p['pid']} ({_clean(p['comm'])}): {len(vmas)} VMAs, {total}")
        lines.append(
            f"  {'START':>12}-{'END':<12} {'SIZE':>9} PROT {'KIND':<13} {'DUMPED':>7} "
            f"{'LAZY':>5} {'ABSENT':>7}  FILE"
        )
        for v in vmas:
            lines.append(
                f"  {v['start']:>12x}-{v['end']:<12x} {_size(v['size']):>9} {v['prot']} "
                f"{v['kind']:<13} {v['pages_dumped']:>7} {v['pages_lazy']:>5} "
                f"{v['pages_absent']:>7}  {_clean(v['file'] or '')}"
            )
    lines.append("(pages of 4 KiB; absent: never touched or the zero page, or read from the file)")
    return "\n".join(lines) + "\n"


def format_sockets(r: Dict[str, Any]) -> str:
    """Every socket with its family, state, addresses, queues and holders."""
    lines = [
        f"{'FAMILY':<7} {'TYPE':<9} {'PROTO':<5} {'STATE':<12} {'LOCAL':<28} {'PEER':<28} "
        f"{'INQ':>6} {'OUTQ':>6}  HELD BY (pid:fd)"
    ]
    for s in r.get("sockets") or []:
        held = " ".join(f"{o['pid']}:{o['fd']}" for o in s["owners"]) or "-"
        lines.append(
            f"{s['family']:<7} {s['type']:<9} {s['protocol']:<5} {s['state']:<12} "
            f"{_clean(s['local'] or '-'):<28} {_clean(s['peer'] or '-'):<28} "
            f"{_opt(s['inq']):>6} {_opt(s['outq']):>6}  {held}"
        )
    if len(lines) == 1:
        lines.append("(no sockets)")
    return "\n".join(lines) + "\n"


def format_manifest(r: Dict[str, Any]) -> str:
    """The dump file's manifest: its fields and its parts (not verified here)."""
    m = r.get("manifest")
    if m is None:
        return "(no manifest: an images directory)\n"
    lines = ["(as the file says; `pycpt restore` verifies it, inspect does not)"]
    for k in sorted(m):
        if k == "parts":
            continue
        value = m[k] if isinstance(m[k], str) else json.dumps(m[k], sort_keys=True)
        lines.append(f"{_clean(str(k)):<16} {_clean(value)}")
    parts = m.get("parts")
    if isinstance(parts, list):
        ok = [p for p in parts if isinstance(p, dict)]
        total = sum(p["size"] for p in ok if isinstance(p.get("size"), int))
        lines.append(f"{'parts':<16} {len(parts)}, {_size(total)}")
        for p in ok:
            digest = p.get("sha256") or p.get("chunks") or ""
            digest = digest[:16] + "..." if isinstance(digest, str) and len(digest) > 16 else ""
            size = p.get("size")
            lines.append(
                f"  {_clean(str(p.get('name'))):<28} "
                f"{size if isinstance(size, int) else '?':>12}  {_clean(digest)}"
            )
    return "\n".join(lines) + "\n"


def format_diff(d: Dict[str, Any]) -> str:
    """What changed between two checkpoints, for people."""
    a, b = d["a"], d["b"]
    lines = [
        f"--- {_clean(a['path'])}  ({_when(a['created'], a['modified'])})",
        f"+++ {_clean(b['path'])}  ({_when(b['created'], b['modified'])})",
    ]
    if not d["same_container"]:
        lines.append(
            f"note: these are checkpoints of different containers "
            f"({_clean(a['container'] or '?')}, {_clean(b['container'] or '?')})"
        )
    c = d["counts"]
    lines.append(
        "counts: "
        + ", ".join(
            f"{k} {v[0]} -> {v[1]}" if v[0] != v[1] else f"{k} {v[0]}" for k, v in c.items()
        )
    )
    procs = d["processes"]
    for p in procs["added"]:
        lines.append(f"+ process {p['pid']} (ppid {p['ppid']}, {p['state']}): {_command(p, None)}")
    for p in procs["removed"]:
        lines.append(f"- process {p['pid']} (ppid {p['ppid']}): {_command(p, None)}")
    for ch in procs["changed"]:
        what = ", ".join(f"{k} {_short(v[0])} -> {_short(v[1])}" for k, v in ch["changes"].items())
        lines.append(f"~ process {ch['pid']}: {what}")
    for f in d["files"]:
        for x in f["added"]:
            lines.append(f"+ pid {f['pid']} fd {x['fd']}: {_fd_text(x)}")
        for x in f["removed"]:
            lines.append(f"- pid {f['pid']} fd {x['fd']}: {_fd_text(x)}")
        for x in f["changed"]:
            lines.append(
                f"~ pid {f['pid']} fd {x['fd']}: {_fd_text(x['before'])} -> {_fd_text(x['after'])}"
            )
    s = d["sockets"]
    for x in s["added"]:
        lines.append(f"+ socket {_socket_text(x)}")
    for x in s["removed"]:
        lines.append(f"- socket {_socket_text(x)}")
    for x in s["changed"]:
        lines.append(
            f"~ socket {_socket_text(x['before'])}: {x['before']['state']} -> {x['after']['state']}"
        )
    for m in d["memory"]:
        parts = [f"mapped {_change(*m['bytes'])}"]
        if m["vmas"][0] != m["vmas"][1]:
            parts.append(f"VMAs {m['vmas'][0]} -> {m['vmas'][1]}")
        parts += [f"{k} {_change(v[0] * 4096, v[1] * 4096)}" for k, v in m["pages"].items()]
        parts += [f"{k} {_change(*v)}" for k, v in m["by_kind"].items()]
        lines.append(f"~ memory of {m['pid']}: " + ", ".join(parts))
    if len(lines) == 3 + (not d["same_container"]):
        lines.append("no change in processes, files, sockets or memory sizes")
    return "\n".join(lines) + "\n"


# --- pieces ------------------------------------------------------------------------------


def _clean(text: Any) -> str:
    """`text` with whatever a terminal would interpret (control and format characters)
    escaped: names, paths and arguments come from untrusted images."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in s
    )


def _row(label: str, value: str) -> str:
    return f"{label:<11} {value}"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _change(a: int, b: int) -> str:
    """ "25.3 MiB -> 25.4 MiB (+72.0 KiB)"."""
    sign = "+" if b >= a else "-"
    return f"{_size(a)} -> {_size(b)} ({sign}{_size(abs(b - a))})"


def _pages(n: int) -> str:
    return _size(n * 4096)


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def _short(v: Any) -> str:
    if isinstance(v, list):
        return _clean(" ".join(str(x) for x in v))[:60]
    return _clean(_opt(v))


def _exit_text(status: Any) -> str:
    """A zombie's wait status as words."""
    import signal

    if not isinstance(status, int):
        return "exit status unknown"
    if status & 0x7F:
        try:
            return f"killed by {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"killed by signal {status & 0x7F}"
    return f"exit status {(status >> 8) & 0xFF}"


def _state(p: Dict[str, Any], signal_name: bool = False) -> str:
    state = str(p.get("state"))
    if state == "dead":  # CRIU's word for a zombie: dead, not yet reaped
        return "zombie"
    if signal_name and state == "stopped" and p.get("stop_signal"):
        import signal

        try:
            return f"stopped ({signal.Signals(p['stop_signal']).name})"
        except ValueError:
            return f"stopped (signal {p['stop_signal']})"
    return state


def _command(p: Dict[str, Any], width: Optional[int]) -> str:
    argv = p.get("argv")
    text = " ".join(argv) if argv else f"[{p.get('comm') or '?'}]"
    text = _clean(text)
    if width is not None and len(text) > width:
        text = text[: width - 3] + "..."
    return text


def _when(created: Optional[str], modified: Optional[float]) -> str:
    if created:
        text = _clean(created)
        return text[:-6] + " UTC" if text.endswith("+00:00") else text
    if modified is not None:
        t = datetime.datetime.fromtimestamp(modified, datetime.timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%S UTC") + " (the file's time: no manifest)"
    return "unknown"


def _kinds(by_kind: Dict[str, Dict[str, int]], most: int) -> str:
    order = sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])
    text = ", ".join(f"{k} {v['vmas']} ({_size(v['bytes'])})" for k, v in order[:most])
    return text + (f", {len(order) - most} more kinds" if len(order) > most else "")


def _namespaces(ns: Dict[str, Any]) -> str:
    new = ns["created_on_restore"]
    shared = ns["root_shared_with_dumper"]
    parts = []
    if new:
        parts.append("own, made anew on restore: " + " ".join(new))
    if shared:
        parts.append("the host's (the restoring CRIU's): " + " ".join(shared))
    return "; ".join(parts) or "(none recorded)"


def _cgroup(r: Dict[str, Any]) -> str:
    if not r["processes"]:
        return "(no processes)"
    root = r["processes"][0]
    cg = root["cgroup"]
    if not cg:
        if root.get("cg_set") is not None and root["cg_set"] == r["cgroups"]["dumper_set"]:
            return "the dumping CRIU's own (not saved: restored into the restorer's)"
        return "(not recorded)"
    if "" in cg:
        return f"{_clean(cg[''])} (cgroup v2)"
    paths = sorted(set(cg.values()))
    if len(paths) == 1:
        return f"{_clean(paths[0])} ({', '.join(sorted(cg))})"
    return "; ".join(f"{_clean(k)} {_clean(v)}" for k, v in sorted(cg.items()))


_TYPE_WORDS = {
    "REG": "regular",
    "PIPE": "pipe",
    "FIFO": "fifo",
    "INETSK": "inet socket",
    "UNIXSK": "unix socket",
    "NETLINKSK": "netlink socket",
    "PACKETSK": "packet socket",
    "EVENTPOLL": "epoll",
    "NS": "namespace",
}


def _file_counts(c: Dict[str, Any]) -> str:
    parts = []
    for kind, n in sorted(c["by_type"].items(), key=lambda kv: -kv[1]):
        text = f"{_TYPE_WORDS.get(kind, kind.lower())} {n}"
        if kind == "PIPE":
            text += f" ({c['pipes']} pipes)"
        parts.append(text)
    return f"{c['fds']} descriptors, {c['open_files']} open files" + (
        ": " + ", ".join(parts) if parts else ""
    )


def _listening(r: Dict[str, Any]) -> str:
    seen: List[str] = []
    for s in r.get("sockets") or []:
        if s["state"] == "LISTEN" and s["local"]:
            seen.append(f"{s['protocol'] or s['family']} {s['local']}")
    seen = list(dict.fromkeys(seen))
    more = len(seen) - _MAX_SOCKETS
    return _clean(", ".join(seen[:_MAX_SOCKETS]) + (f" (+{more}: --sockets)" if more > 0 else ""))


def _mode(f: Dict[str, Any]) -> str:
    flags = f.get("flags")
    if flags is None:
        return ""
    mode = {0: "r", 1: "w", 2: "rw"}.get(flags & 3, "?")
    if flags & os.O_APPEND:
        mode += "a"
    if flags & os.O_NONBLOCK:
        mode += "n"
    return mode


def _fd_text(x: Dict[str, Any]) -> str:
    pos = f" @{x['pos']}" if x.get("pos") else ""
    return f"{x['type']} {_clean(x['description'])}{pos}"


def _socket_text(s: Dict[str, Any]) -> str:
    text = f"{s['protocol'] or s['family']} {_clean(s['local'] or '(unnamed)')}"
    if s.get("peer"):
        text += f" -> {_clean(s['peer'])}"
    held = " ".join(f"{o['pid']}:{o['fd']}" for o in s.get("owners") or [])
    return f"{text} {s['state']}" + (f" (held by {held})" if held else "")
