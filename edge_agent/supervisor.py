"""The supervisor of a long-running command: a registry of its worker threads.

A worker that dies (an exception, or a return while the command still runs) ends the
command: :meth:`Supervisor.wait` returns a :class:`Death` whose :meth:`~Death.line` names the
worker and why, and the CLI exits non-zero on that one line so systemd restarts the service.
:meth:`Supervisor.health` is what ``/healthz`` answers: each worker's liveness and the age of
the last message marked (stored, sent), HTTP 200 when all are alive, 503 otherwise.

Why a thread died comes from :data:`threading.excepthook`, which a supervisor replaces while
it is open (the traceback goes to the debug log; the one line to the CLI). Threads it does not
watch are handed to the previous hook unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import one_line

__all__ = ["Death", "Supervisor"]

log = logging.getLogger("medge.supervisor")


@dataclass(frozen=True)
class Death:
    """A worker that stopped while the command was still running."""

    worker: str
    why: str

    def line(self) -> str:
        return f"worker {self.worker} died: {self.why}"


class Supervisor:
    """``sup.watch(name, thread)`` for each worker; ``sup.wait(stop)`` in the main thread.
    Use as a context manager (it installs and removes its thread exception hook)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._workers: dict[str, threading.Thread] = {}
        self._why: dict[threading.Thread, str] = {}
        self._finished: set[str] = set()  # workers whose return is their job done
        self._marks: dict[str, float] = {}
        self._tracked: dict[str, Callable[[], float | None]] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._previous: Any = None
        self.death: Death | None = None

    def __enter__(self) -> Supervisor:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        if threading.excepthook == self._hook and self._previous is not None:
            threading.excepthook = self._previous

    # -- registry --------------------------------------------------------------------------
    def watch(self, name: str, thread: threading.Thread | None) -> None:
        """Watch a started worker thread (``None``: a worker not running, shown as dead)."""
        with self._lock:
            if thread is None:
                self._why.setdefault(_NOT_RUNNING, "not running")
                self._workers[name] = _NOT_RUNNING
            else:
                self._workers[name] = thread

    def forget(self, *names: str) -> None:
        """Stop watching these workers (before stopping them on purpose)."""
        with self._lock:
            for name in names:
                self._workers.pop(name, None)

    def spawn(
        self, name: str, target: Callable[[], object], finishes: bool = False
    ) -> threading.Thread:
        """Start ``target`` in a watched daemon thread. ``finishes``: its return is the
        command's end (e.g. the agent's pipeline when the source ends), not a death."""

        def run() -> None:
            target()
            if finishes:
                with self._lock:
                    self._finished.add(name)
            self._wake.set()

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.watch(name, thread)
        thread.start()
        return thread

    def finished(self, name: str) -> bool:
        with self._lock:
            return name in self._finished

    def mark(self, what: str) -> None:
        """A message was ``what`` (stored, sent) just now: /healthz shows its age."""
        self._marks[what] = self._clock()

    def track(self, what: str, when: Callable[[], float | None]) -> None:
        """/healthz also shows the age of ``when()`` (a time.time(), None: not yet)."""
        self._tracked[what] = when

    # -- watching --------------------------------------------------------------------------
    def _hook(self, args: Any) -> None:
        thread = args.thread
        with self._lock:
            mine = thread is not None and thread in self._workers.values()
            if mine:
                exc = args.exc_value
                self._why[thread] = one_line(f"{args.exc_type.__name__}: {exc}", 500)
        if not mine:
            if self._previous is not None:
                self._previous(args)
            return
        log.debug(
            "worker %s ended by an exception",
            thread.name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )
        self._wake.set()

    def check(self) -> Death | None:
        """The first worker that is no longer alive (and was not done), or None."""
        with self._lock:
            for name, thread in self._workers.items():
                if name in self._finished or thread.is_alive():
                    continue
                if thread is not _NOT_RUNNING and thread.ident is None:
                    continue  # registered before its start
                why = self._why.get(thread, "it stopped (returned)")
                return Death(name, why)
        return None

    def wait(
        self, stop: threading.Event, poll: float = 0.5, done: Callable[[], bool] | None = None
    ) -> Death | None:
        """Block until ``stop`` is set, ``done()`` is true, or a worker dies (returned; also
        kept as :attr:`death`)."""
        while True:
            death = self.check()
            if death is not None:
                self.death = death
                return death
            if stop.is_set() or (done is not None and done()):
                return None
            self._wake.wait(poll)
            self._wake.clear()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(all alive, the JSON body of /healthz)."""
        now = self._clock()
        with self._lock:
            workers = {
                name: {
                    "alive": thread.is_alive() or name in self._finished,
                    **({"error": self._why[thread]} if thread in self._why else {}),
                }
                for name, thread in self._workers.items()
            }
        ok = bool(workers) and all(w["alive"] for w in workers.values())
        marks = dict(self._marks)
        for what, when in self._tracked.items():
            t = when()
            if t is not None:
                marks[what] = t
        body: dict[str, Any] = {
            "status": "ok" if ok else "failing",
            "workers": workers,
            "last_message_age_s": {
                k: round(max(0.0, now - t), 3) for k, t in sorted(marks.items())
            },
        }
        return ok, body


class _Stopped(threading.Thread):
    """Stands for a worker that is not running at all."""

    def is_alive(self) -> bool:
        return False


_NOT_RUNNING = _Stopped(name="not-running")
