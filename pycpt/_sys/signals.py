"""The signals that ask pycpt to stop (SIGINT, SIGTERM, SIGHUP), held back while it finishes
or undoes a step: a container must never be left between two states because the user
pressed Ctrl-C at the wrong moment."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Iterator, List

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt (the CLI installs it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler: SIGTERM and SIGHUP take the path Ctrl-C takes."""
    raise Interrupted(signum)


def install() -> None:
    """SIGTERM and SIGHUP raise Interrupted, so the command fails as cleanly as on Ctrl-C
    (the default would end the process where it stands)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupted)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP for the block; one that came meanwhile is
    delivered once the block is done (if the block fails, its error goes on instead, with a
    note). Outside the main thread Python delivers no signals, so nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: List[int] = []
    saved: Dict[int, Any] = {}
    for signum in STOPPING:
        saved[signum] = signal.signal(signum, lambda n, f: came.append(n))
    try:
        yield
    except BaseException as exc:
        if came:
            exc.add_note(f"({signal.Signals(came[0]).name} came meanwhile: held back)")
        raise
    finally:
        for number, handler in saved.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
    if came:
        signal.raise_signal(came[0])
