"""Where pycpt keeps container state: one directory per container, JSON written atomically,
and a lock so that two pycpt commands on one container never interleave.

    <state dir>/ct/<CT>/state.json    what the container is and what it is doing
    <state dir>/ct/<CT>/console.log   its stdout and stderr
    <state dir>/ct/<CT>/lock          held (flock) while a command works on it
    <state dir>/dump/Dump.<CT>        the default dump file
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from pycpt import errors

DEFAULT_STATE_DIR = "/var/lib/pycpt"
MAX_ID_LENGTH = 64
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
    return ct


def state_dir(explicit: Optional[str] = None) -> Path:
    """The state directory: `explicit`, else $PYCPT_STATE_DIR, else /var/lib/pycpt."""
    return Path(explicit or os.environ.get("PYCPT_STATE_DIR") or DEFAULT_STATE_DIR).absolute()


def write_json(path: Path, data: Dict[str, Any], durable: bool = True) -> None:
    """Replace `path` with `data` atomically (temporary file, rename); durable=True also
    fsyncs it first, so that it survives a crash of the machine."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    # One temporary name per process: the caller holds the container's lock, so no other
    # process writes this file now (and mkstemp's random names cost more than the write).
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None if there is no such file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise errors.PycptError(
            f"cannot read {path}: {exc}",
            hint="the state file is damaged; remove it to forget the container",
        ) from exc
    if not isinstance(data, dict):
        raise errors.PycptError(f"{path} does not hold a JSON object")
    return data


class Lock:
    """An exclusive lock on one container, for the length of one command."""

    def __init__(self, path: Path, ct: str, wait: bool = False) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the first command on this container
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            os.close(self.fd)
            raise errors.ContainerBusyError(
                f"container {ct} is busy: another pycpt command is working on it"
            ) from exc

    def release(self) -> None:
        """Unlock. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def container_ids(root: Path) -> Iterator[str]:
    """Ids of the containers that have state under `root`."""
    ct_root = root / "ct"
    if ct_root.is_dir():
        for entry in sorted(ct_root.iterdir()):
            if (entry / "state.json").is_file():
                yield entry.name
