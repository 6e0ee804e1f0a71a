"""One sending process per outbox file. Two gateway workers given the same forward or clinical
outbox would both send every item (the receivers are idempotent, so nothing is stored twice,
but each item goes out twice and the two race to delete it): the second refuses to start,
saying which process holds the file. An advisory ``flock`` on ``OUTBOX.lock`` (mode 0600),
released by the kernel when its holder ends, even by SIGKILL: a stale lock cannot block a
restarted gateway. Reading an outbox beside the running gateway (``medge gateway outputs``)
takes no lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edge_agent.errors import MedgeError

__all__ = ["OutboxLock"]


class OutboxLock:
    """``acquire()`` or MedgeError; ``release()`` at stop. ``what`` names the outbox in the
    error (``forward outbox``, ``clinical outbox``)."""

    def __init__(self, outbox: Path, what: str) -> None:
        self.outbox, self.what = Path(outbox), what
        self.path = self.outbox.with_name(self.outbox.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise MedgeError(
                f"{self.what} {self.outbox} is already being sent from by {holder}: give each "
                "gateway worker its own outbox file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
