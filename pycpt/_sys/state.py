"""Where pycpt keeps container state: one directory per container, JSON written atomically,
a lock so that two pycpt commands on one container never interleave, and an intent record
so that the next command can finish or undo what a killed one left half done.

    <state dir>/ct/<CT>/state.json    what the container is and what it is doing
    <state dir>/ct/<CT>/intent.json   what a command is doing right now (see Container)
    <state dir>/ct/<CT>/console.log   its stdout and stderr
    <state dir>/ct/<CT>/lock          held (flock) while a command works on it
    <state dir>/dump/Dump.<CT>        the default dump file

The state directory is a trust boundary: pycpt runs as root and acts on what it finds
there (kills cgroups, removes files, restores dump files), so nobody but root may be able
to change it. As sshd's StrictModes: the directory and every parent up to / must be owned
by root and not writable by group or others (a parent may be, with the sticky bit, as
/tmp is). Everything under it is opened relative to a directory descriptor with
O_NOFOLLOW, so no symlink is ever followed or created there, and each directory and file
is checked (owner, mode, type) as it is opened; what fails is reported as tampered with,
and nothing is done on its word.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from pycpt import errors

DEFAULT_STATE_DIR = "/var/lib/pycpt"
MAX_ID_LENGTH = 64
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A container's cgroup is <parent>/<id>: an id must never name one of the interface files
# the kernel puts in every cgroup ("<controller>.<file>", and cgroup v1's bare names).
_CGROUP_FILE = re.compile(
    r"(cgroup|cpu|cpuacct|cpuset|io|memory|pids|rdma|hugetlb|misc|freezer|blkio|devices|"
    r"net_cls|net_prio|perf_event|dmem)\..*|tasks|notify_on_release|release_agent"
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o700
FILE_MODE = 0o600


def validate_ct_id(ct: object) -> str:
    """`ct` if it is a usable container id, else InvalidArgumentError saying why."""
    rule = (
        f"an id is 1-{MAX_ID_LENGTH} letters, digits, '.', '_' and '-', starting with a letter "
        "or digit (it names a directory and a cgroup)"
    )
    if not isinstance(ct, str):
        raise errors.InvalidArgumentError(
            f"a container id is a string, not {type(ct).__name__}", hint=rule
        )
    if not ct:
        raise errors.InvalidArgumentError("a container id cannot be empty", hint=rule)
    if len(ct) > MAX_ID_LENGTH:
        raise errors.InvalidArgumentError(
            f"container id too long ({len(ct)} > {MAX_ID_LENGTH} characters)", hint=rule
        )
    if not _ID.fullmatch(ct) or ct in (".", ".."):
        raise errors.InvalidArgumentError(f"invalid container id {ct!r}", hint=rule)
    if _CGROUP_FILE.fullmatch(ct):
        raise errors.InvalidArgumentError(
            f"invalid container id {ct!r}: it is the name of a cgroup interface file, and a "
            "container's cgroup is named after its id",
            hint=rule,
        )
    return ct


def state_dir(explicit: Optional[str] = None) -> Path:
    """The state directory: `explicit`, else $PYCPT_STATE_DIR, else /var/lib/pycpt."""
    return Path(explicit or os.environ.get("PYCPT_STATE_DIR") or DEFAULT_STATE_DIR).absolute()


# --- trust ---------------------------------------------------------------------------------


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def dir_problem(st: os.stat_result, *, parent: bool) -> Optional[str]:
    """Why a directory (its lstat/fstat) cannot be trusted, or None. A `parent` (above the
    state directory) may be writable by others if it has the sticky bit, as /tmp."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not _owner_ok(st):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022 and not (parent and st.st_mode & stat.S_ISVTX):
        who = " and ".join(
            w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit
        )
        return f"is writable by {who} (mode {st.st_mode & 0o7777:04o})"
    return None


def file_problem(st: os.stat_result) -> Optional[str]:
    """Why a file under the state directory cannot be trusted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not _owner_ok(st):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {st.st_mode & 0o7777:04o})"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links"
    return None


def dump_file_problem(st: os.stat_result) -> Optional[str]:
    """Why a dump file (its lstat) cannot be trusted to be the one pycpt wrote, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return None  # no file at all: reading it says what it is
    if not _owner_ok(st):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {st.st_mode & 0o7777:04o})"
    return None


def _tampered(path: Path, problem: str) -> errors.StateTamperedError:
    return errors.StateTamperedError(f"{path} {problem}", path=str(path))


def _os_error(path: Path, exc: OSError, doing: str) -> errors.StateDirError:
    if exc.errno == errno.EROFS:
        return errors.StateDirError(
            f"cannot {doing} {path}: the file system is read-only",
            path=str(path),
            hint="point --state-dir / PYCPT_STATE_DIR at a writable directory",
        )
    if exc.errno == errno.ELOOP:
        return _tampered(path, "is a symbolic link")
    return errors.StateDirError(f"cannot {doing} {path}: {exc.strerror}", path=str(path))


def open_trusted_dir(path: Path, *, create: bool = False, sticky_ok: bool = False) -> int:
    """A descriptor of directory `path` (made, mode 0700, with any missing parents when
    `create`), reached from / one component at a time with O_NOFOLLOW, every component
    checked: owned by root, not writable by group or others (parents, and `path` itself
    when `sticky_ok`: unless sticky, as /tmp). Symlinks on the way are followed only if root
    owns them (then they are resolved first, and the real path is checked); one of another
    user (say in /tmp) is refused. Raises StateDirError, or FileNotFoundError when it is
    missing and not `create`."""
    _check_links(Path(os.path.abspath(path)))
    real = Path(os.path.realpath(path))
    parts = real.parts[1:]
    fd = os.open("/", _DIR_FLAGS)
    here = Path("/")
    try:
        for i, name in enumerate(parts):
            st = os.fstat(fd)
            problem = dir_problem(st, parent=True)
            if problem:
                raise errors.StateDirError(
                    f"refusing state directory {path}: {here} {problem}",
                    path=str(path),
                    hint="a state directory and its parents must be owned by root and not "
                    "writable by others (sticky parents such as /tmp excepted); "
                    f"fix {here} or choose another --state-dir",
                )
            here = here / name
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError as exc:
                if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
                    raise _tampered(here, "is a symbolic link") from exc  # made meanwhile
                raise _os_error(here, exc, "open") from exc
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _os_error(here, exc, "create") from exc
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _os_error(here, exc, "open") from exc
            os.close(fd)
            fd = nfd
            del i
        problem = dir_problem(os.fstat(fd), parent=sticky_ok)
        if problem:
            raise errors.StateDirError(
                f"refusing state directory {path}: it {problem}",
                path=str(path),
                hint=f"chown root {path} and chmod go-w {path} (or choose another --state-dir)",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_links(path: Path) -> None:
    """Refuse a path that goes through a symlink root does not own."""
    prefix = Path("/")
    for name in path.parts[1:]:
        prefix = prefix / name
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return  # the rest is made, or reported missing, by the walk
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode) and not _owner_ok(st):
            raise errors.StateDirError(
                f"refusing {path}: {prefix} is a symbolic link of uid {st.st_uid}, not root's",
                path=str(path),
                hint="give the real path, in directories only root can change",
            )


def open_subdir(dirfd: int, name: str, where: Path, *, create: bool = False) -> int:
    """Directory `name` in `dirfd` (whose path is `where`), O_NOFOLLOW, checked; made (0700)
    when missing and `create`. FileNotFoundError when missing; StateTamperedError when it
    is a symlink, not a directory or not root's alone."""
    path = where / name
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except NotADirectoryError as exc:  # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR
        link = stat.S_ISLNK(os.lstat(name, dir_fd=dirfd).st_mode)
        raise _tampered(path, "is a symbolic link" if link else "is not a directory") from exc
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, DIR_MODE, dir_fd=dirfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error(path, exc, "create") from exc
        return open_subdir(dirfd, name, where)
    except OSError as exc:
        raise _os_error(path, exc, "open") from exc
    problem = dir_problem(os.fstat(fd), parent=False)
    if problem:
        os.close(fd)
        raise _tampered(path, problem)
    return fd


def open_file(dirfd: int, name: str, where: Path, flags: int, mode: int = FILE_MODE) -> int:
    """File `name` in `dirfd` opened with `flags` | O_NOFOLLOW | O_CLOEXEC and checked
    (regular, root's, not writable by others, one link)."""
    path = where / name
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _os_error(path, exc, "open") from exc
    problem = file_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise _tampered(path, problem)
    return fd


def fsync_dir(dirfd: int) -> None:
    """fsync a directory (so that a rename or unlink in it survives a crash)."""
    os.fsync(dirfd)


def write_json_at(
    dirfd: int, name: str, data: Dict[str, Any], where: Path, *, durable: bool = True
) -> None:
    """Replace `name` in `dirfd` with `data` atomically (temporary file, rename), mode 0600;
    durable=True fsyncs the file and the directory, so that it survives a crash."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    # One temporary name per process: the caller holds the container's lock, so no other
    # process writes this file now (and random names cost more than the write).
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, FILE_MODE, dir_fd=dirfd)
        except FileExistsError:  # a process of ours with this pid died here
            os.unlink(tmp, dir_fd=dirfd)
            fd = os.open(tmp, flags, FILE_MODE, dir_fd=dirfd)
    except OSError as exc:
        raise _os_error(where / name, exc, "write") from exc
    try:
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        if durable:
            fsync_dir(dirfd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        if isinstance(exc, OSError):
            raise _os_error(where / name, exc, "write") from exc
        raise


def read_json_at(dirfd: int, name: str, where: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in `name`, or None if there is no such file."""
    path = where / name
    try:
        fd = open_file(dirfd, name, where, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise errors.StateTamperedError(
            f"cannot read {path}: {exc}",
            path=str(path),
            hint="the state file is damaged; `pycpt gc` or removing it forgets the container",
        ) from exc
    if not isinstance(data, dict):
        raise errors.StateTamperedError(f"{path} does not hold a JSON object", path=str(path))
    return data


def unlink_at(dirfd: int, name: str) -> bool:
    """Remove file `name` (a symlink itself, never its target); False if it was not there."""
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    return True


def remove_tree_at(dirfd: int, name: str) -> None:
    """Remove `name` in `dirfd` and everything below it without following any symlink (a
    symlink is removed itself). Missing is fine."""
    try:
        st = os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        # rmtree's descriptor-based walk: it never follows a symlink, even one swapped in
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        unlink_at(dirfd, name)


def write_json(path: Path, data: Dict[str, Any], durable: bool = True) -> None:
    """write_json_at() by path: the parent directory is reached through a checked walk (and
    made, mode 0700, if missing)."""
    fd = open_trusted_dir(path.parent, create=True)
    try:
        write_json_at(fd, path.name, data, path.parent, durable=durable)
    finally:
        os.close(fd)


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """read_json_at() by path (None when the file or its directory is missing)."""
    try:
        fd = open_trusted_dir(path.parent)
    except FileNotFoundError:
        return None
    try:
        return read_json_at(fd, path.name, path.parent)
    finally:
        os.close(fd)


class Lock:
    """An exclusive lock on one container, for the length of one command.

    The lock file `name` is opened in directory `dirfd` (O_NOFOLLOW, checked). A held lock
    means a live pycpt: the lock goes with the last descriptor, which no child inherits.
    A lock file may be removed with the container's directory while another command waits
    on it; that command then finds its file unlinked and takes the lock again from the
    start."""

    def __init__(
        self, dirfd: int, where: Path, ct: str, wait: bool = False, name: str = "lock"
    ) -> None:
        self.fd = -1
        while True:
            fd = open_file(dirfd, name, where, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                os.close(fd)
                raise errors.ContainerBusyError(
                    f"container {ct} is busy: another pycpt command is working on it"
                ) from exc
            except BaseException:
                os.close(fd)
                raise
            if os.fstat(fd).st_nlink > 0:
                self.fd = fd
                return
            os.close(fd)  # removed while we waited: lock the new one

    def release(self) -> None:
        """Unlock. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(fd: int) -> Optional[int]:
    """The pid of the process holding an flock on the file open at `fd`, or None. Read from
    /proc/locks, so that looking never takes the lock (a command starting that very moment
    must not find its container busy because someone ran `pycpt list`)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def list_dir(dirfd: int) -> List[str]:
    """The names in a directory, sorted."""
    return sorted(os.listdir(dirfd))


def container_ids(root: Path) -> Iterator[str]:
    """Ids of the containers that have a record under `root` (a state.json, or the intent
    record of a command that never got as far as writing one). Lock-only directories are
    left to `pycpt gc`."""
    try:
        rootfd = open_trusted_dir(root)
    except FileNotFoundError:
        return
    try:
        try:
            ctfd = open_subdir(rootfd, "ct", root)
        except FileNotFoundError:
            return
        try:
            for name in list_dir(ctfd):
                if _ID.fullmatch(name) and any(
                    _is_file(ctfd, f"{name}/{record}") for record in ("state.json", "intent.json")
                ):
                    yield name
        finally:
            os.close(ctfd)
    finally:
        os.close(rootfd)


def is_file_at(dirfd: int, relative: str) -> bool:
    """True if `relative` (in `dirfd`) is a regular file, the last component not followed."""
    return _is_file(dirfd, relative)


def _is_file(dirfd: int, relative: str) -> bool:
    try:
        st = os.stat(relative, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)
