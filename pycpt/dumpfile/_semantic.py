"""What a dump file's images would restore, checked before CRIU runs them.

A signature says who made a file, not that what it holds is a container: a key can leak, a
bug can sign garbage, and --trust-dumpfile takes the user's word. So, for every file, the
images themselves must describe a container: the root task in pid, mount, uts and ipc
namespaces of its own (and net, unless the container shares the host's network), every
task outside the namespaces of the host that dumped it (which a restore would give it: the
restoring host's own), and every task in the container's cgroup or below it, which a
restore moves into this host's cgroup for the container (and nowhere else).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from pycpt import errors

if TYPE_CHECKING:  # the image reader (protobuf) is loaded only by a restore
    from pycpt.images import Images, Namespaces

REQUIRED_NAMESPACES = frozenset({"pid", "mnt", "uts", "ipc"})
"""The namespaces a container's root task has of its own (plus "net" unless share_net)."""


def _refuse(path: str, rule: str, why: str) -> errors.DumpFileRefusedError:
    return errors.DumpFileRefusedError(f"dump file {path} is refused: {why}", path=path, rule=rule)


def check_restorable(
    images: "Images", config: Dict[str, Any], *, path: str, controller: Optional[str]
) -> None:
    """Raise DumpFileRefusedError (`rule` "namespaces", "cgroup" or "images") unless
    `images` restore as a container with `config` (checked by check_config): see the
    module's docstring. `controller` is the cgroup controller whose path a restore remaps
    into the container's cgroup ("" for cgroup v2, "freezer" for v1; None: no cgroup check).
    `path` names the dump file in the error."""
    try:
        ns = images.namespaces()
        _namespaces(ns, config, path)
        if controller is not None:
            _cgroups(images, ns.zombies, controller, path)
    except errors.ImageError as exc:
        raise _refuse(path, "images", f"its images cannot be read: {exc.message}") from exc


def _namespaces(ns: "Namespaces", config: Dict[str, Any], path: str) -> None:
    need = set(REQUIRED_NAMESPACES)
    if not config.get("share_net"):
        need.add("net")
    if not ns.dumper:
        raise _refuse(path, "namespaces", "its images do not say which namespaces were the host's")
    missing = need - ns.created_on_restore()
    if missing:
        kinds = ", ".join(sorted(missing))
        raise _refuse(
            path,
            "namespaces",
            f"its root task (pid {ns.root_pid}) would run in this host's own {kinds} "
            f"namespace{'s' if len(missing) > 1 else ''}, not in the container's",
        )
    for pid in sorted(ns.tasks):
        if pid in ns.zombies and pid != ns.root_pid:
            _zombie(ns, pid, path)
            continue
        shared = (ns.shared_with_dumper(pid) & need) | (need - set(ns.tasks[pid]))
        if shared:
            kinds = ", ".join(sorted(shared))
            raise _refuse(
                path,
                "namespaces",
                f"its task {pid} would run in this host's own {kinds} namespace"
                f"{'s' if len(shared) > 1 else ''}",
            )


def _zombie(ns: "Namespaces", pid: int, path: str) -> None:
    """A zombie runs nothing: CRIU makes it its parent's child, which exits at once, so it has
    no namespaces or cgroups to check (and CRIU records none). One with children is forged."""
    if ns.zombies[pid]:
        raise _refuse(
            path,
            "namespaces",
            f"its task {pid} is recorded as a zombie with children "
            f"({', '.join(map(str, ns.zombies[pid]))}), which no real zombie has",
        )


def _cgroups(images: "Images", zombies: Dict[int, List[int]], controller: str, path: str) -> None:
    cg = images.cgroups()
    label = "cgroup v2" if controller == "" else f"the {controller} cgroup"
    pids = [int(e.pid) for e in images.pstree()]
    root = pids[0]
    base: Optional[str] = None
    for pid in pids:
        if pid in zombies and pid != root:
            continue  # runs nothing; checked by _namespaces
        cg_set = cg.tasks.get(pid)
        if cg_set is None or cg_set == cg.dumper or cg_set not in cg.sets:
            raise _refuse(
                path,
                "cgroup",
                f"its task {pid} would stay in this host's own cgroups, outside the container's",
            )
        where = cg.sets[cg_set].get(controller)
        if where is None or not where.startswith("/") or "/../" in where + "/":
            raise _refuse(path, "cgroup", f"its task {pid} records no path in {label}")
        if pid == root:
            base = where.rstrip("/")
        elif base is None or not (where == base or where.startswith(base + "/")):
            raise _refuse(
                path,
                "cgroup",
                f"its task {pid} is in {label} {where!r}, outside its root task's {base!r}: a "
                "restore would leave it outside the container's cgroup",
            )
