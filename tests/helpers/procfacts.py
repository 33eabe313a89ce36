"""What /proc says about processes, in the terms a checkpoint records them (pids as the
processes see them in their own pid namespace), to compare with `pycpt inspect`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple


def tree(pid: int) -> List[int]:
    """pid and all its descendants (host pids)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _status(pid: int) -> Dict[str, List[str]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.split()
    return out


def maps(pid: int) -> List[Tuple[int, int, str]]:
    """(start, end, name) of every mapping; CRIU keeps [vvar] and [vvar_vclock] as one VMA,
    so they are merged here too."""
    out: List[Tuple[int, int, str]] = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if (
            name.startswith("[vvar")
            and out
            and out[-1][2].startswith("[vvar")
            and out[-1][1] == start
        ):
            out[-1] = (out[-1][0], end, "[vvar]")
            continue
        out.append((start, end, name))
    return out


def descriptors(pid: int) -> Dict[int, str]:
    """{fd: what /proc/PID/fd/FD links to} (a descriptor closed meanwhile is left out)."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


def snapshot(host_pids: Iterable[int]) -> Dict[int, Dict[str, Any]]:
    """{pid in its own namespace: facts} of each process: ppid, pgid, sid (all in that
    namespace; the root's parent outside it is 0), state letter, threads, argv, uid, gid,
    mappings and descriptors (fd -> readlink)."""
    host_pids = list(host_pids)
    ns_of = {}
    statuses = {}
    for p in host_pids:
        st = _status(p)
        statuses[p] = st
        ns_of[p] = int(st["NSpid"][-1])
    out: Dict[int, Dict[str, Any]] = {}
    for p in host_pids:
        st = statuses[p]
        stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        fds = descriptors(p)
        out[ns_of[p]] = {
            "host_pid": p,
            "ppid": ns_of.get(int(st["PPid"][0]), 0),
            "pgid": int(st["NSpgid"][-1]),
            "sid": int(st["NSsid"][-1]),
            "state": stat[0],
            "threads": len(os.listdir(f"/proc/{p}/task")),
            "argv": [
                a.decode()
                for a in Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            ],
            "comm": Path(f"/proc/{p}/comm").read_text().rstrip("\n"),
            "uid": int(st["Uid"][0]),
            "gid": int(st["Gid"][0]),
            "maps": maps(p),
            "fds": fds,
        }
    return out
