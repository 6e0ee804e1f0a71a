"""Files that must never be seen half written: keys, certificates, the CRL, user lists.

:func:`write_atomic` writes a temporary file in the same directory (created with the final
mode, so a secret is never readable by others, not even briefly), fsyncs it, renames it over
the target (atomic on POSIX) and fsyncs the directory, so that after a crash the file is
either the old one or the new one, never empty or truncated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from edge_agent.errors import MedgeError

__all__ = ["write_atomic"]

log = logging.getLogger("medge.files")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data`` atomically and durably, with ``mode`` (0600: secrets;
    0644 for public files). MedgeError names the file when the disk refuses."""
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)  # mkstemp creates 0600; a public file is widened before rename
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = ""
        _fsync_dir(path.parent)
    except OSError as exc:
        raise MedgeError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:  # a platform without directory handles: the rename is atomic
        log.warning("%s: directory not synced after a rename (%s)", directory, exc.strerror)
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse it; the file's own data is synced
        log.warning("%s: directory not synced after a rename (%s)", directory, exc.strerror)
    finally:
        os.close(fd)
