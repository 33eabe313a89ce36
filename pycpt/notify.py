"""Notifications CRIU sends during a request, delivered to a Python object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pycpt._criu.swrk import notify_ack


@dataclass(frozen=True)
class NotifyEvent:
    """One notification: CRIU's name for it, the request, the restored root's pid (for
    setup-namespaces and post-restore) and a descriptor (orphan-pts-master's pty master,
    valid only during the call: dup it to keep it)."""

    name: str
    request: str
    pid: Optional[int] = None
    fd: Optional[int] = None


class Notify:
    """Base class for notification handlers: override the steps you care about.

    Method names are CRIU's notification names with underscores: pre_dump, post_dump,
    network_lock, network_unlock, setup_namespaces, post_setup_namespaces, pre_restore,
    post_restore, pre_resume, post_resume, status_ready, orphan_pts_master,
    query_ext_files. Each gets a NotifyEvent. Raising aborts the request: CRIU cleans up
    (a dumped tree resumes, a half-restored one is killed) and the exception is re-raised
    from the Criu call. query_ext_files may return external resource keys to add.
    """

    def pre_dump(self, event: NotifyEvent) -> None:
        """Before CRIU freezes the tree."""

    def post_dump(self, event: NotifyEvent) -> None:
        """After the images are written, while the tree is still frozen."""

    def network_lock(self, event: NotifyEvent) -> None:
        """When CRIU locks the tree's network."""

    def network_unlock(self, event: NotifyEvent) -> None:
        """When CRIU unlocks the network."""

    def setup_namespaces(self, event: NotifyEvent) -> None:
        """After the restored root's namespaces are created (event.pid is the root)."""

    def post_setup_namespaces(self, event: NotifyEvent) -> None:
        """After the restored namespaces are set up."""

    def pre_restore(self, event: NotifyEvent) -> None:
        """Before restore starts."""

    def post_restore(self, event: NotifyEvent) -> None:
        """After the tree is rebuilt, before it runs (event.pid is the root)."""

    def pre_resume(self, event: NotifyEvent) -> None:
        """Just before the restored tree resumes."""

    def post_resume(self, event: NotifyEvent) -> None:
        """After the restored tree resumed."""

    def status_ready(self, event: NotifyEvent) -> None:
        """When a page server or lazy-pages daemon is ready."""

    def orphan_pts_master(self, event: NotifyEvent) -> None:
        """The master of an orphaned pty, in event.fd."""

    def query_ext_files(self, event: NotifyEvent) -> Optional[Sequence[str]]:
        """Return external file keys to add to the dump, or None."""
        return None


class NotifyDispatcher:
    """Turns CRIU's NOTIFY replies into calls on a Notify object and answers CRIU.

    The first exception a handler raises is kept in `error`; CRIU is told the step failed
    and aborts, and the Criu call re-raises it.
    """

    def __init__(self, handler: Any, request: str) -> None:
        self.handler = handler
        self.request = request
        self.error: Optional[BaseException] = None

    def answer(self, reply: Any, fd: int) -> Any:
        """Handle one notification and build the answer CRIU waits for."""
        note = reply.notify
        name = note.script
        event = NotifyEvent(
            name, self.request, note.pid if note.HasField("pid") else None, fd if fd >= 0 else None
        )
        answer = notify_ack(True)
        if self.error is not None:
            answer.notify_success = False
            return answer
        method = getattr(self.handler, name.replace("-", "_"), None)
        if method is None:
            return answer
        try:
            result = method(event)
        except BaseException as exc:  # KeyboardInterrupt too: CRIU must still be answered
            self.error = exc
            answer.notify_success = False
            return answer
        if name == "query-ext-files" and result:
            answer.opts.images_dir_fd = -1
            answer.opts.external.extend(result)
        return answer
