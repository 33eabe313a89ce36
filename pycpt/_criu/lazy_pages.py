"""What CRIU's lazy pages (post-copy) need from this host: big enough pipes."""

from __future__ import annotations

from pathlib import Path

from pycpt import errors
from pycpt._sys.procfs import cap_eff

# CRIU's lazy-pages source moves memory through pipes of up to ~3.2 MiB (seen here: at the
# default 1 MiB limit the dump fails with "page-pipe: tee: 65536: Operation not permitted").
LAZY_PIPE_SIZE = 4 << 20
CAP_SYS_RESOURCE = 24


def require_pipe_size(request: str) -> None:
    """Refuse a lazy dump up front when its pipes cannot be made big enough."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return  # cannot tell: let CRIU try
    caps = cap_eff()
    if caps is None:
        return
    if limit < LAZY_PIPE_SIZE and not caps >> CAP_SYS_RESOURCE & 1:
        raise errors.PipeSizeError(
            f"CRIU {request} with lazy_pages refused: fs.pipe-max-size is {limit} bytes and "
            f"this process lacks CAP_SYS_RESOURCE; the lazy-pages source needs pipes of "
            f"about {LAZY_PIPE_SIZE >> 20} MiB",
            request=request,
        )
