"""The driver of staged rollouts, in the running gateway (docs/rollouts.md).

:class:`RolloutDriver` is one thread that looks at the store every ``poll_s`` seconds: for each
rollout that is running, paused or aborting it reads what the devices answered (their
``update`` events, the bundle their state and telemetry say they run, the ``shadow`` section
of their telemetry), moves devices and stages on, and publishes the signed commands owed to
online devices through the gateway's MQTT session. All of its state is in the store
(gateway.rollout_store), so a gateway restarted mid-rollout goes on where it was: a command
is recorded as sent only once it is published, and is sent again when the device comes
online again without having answered it (commands are idempotent on the device).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.errors import one_line
from gateway.ota import command
from gateway.rollout_pass import RolloutPass
from gateway.rollout_store import ACTIVE, rollouts
from gateway.store import Store

__all__ = ["RolloutDriver"]

log = logging.getLogger("medge.gateway.rollout")

Publish = Callable[[str, bytes], bool]  # (topic, payload) -> published (QoS 1, acknowledged)


class RolloutDriver:
    """Drives every active rollout of ``store``. ``publish``: publish one command (the
    gateway's session; True once the broker has it); ``key``: the site's bundle signer;
    ``url_for``: the URL devices fetch an archive of the bundles folder by (the
    BundleServer's ``url``). Use as a context manager, or call :meth:`tick` yourself."""

    def __init__(
        self,
        store: Store,
        publish: Publish,
        key: ed25519.Ed25519PrivateKey,
        url_for: Callable[[str], str],
        poll_s: float = 1.0,
        metrics: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.publish, self.key, self.url_for = store, publish, key, url_for
        self.poll_s, self.metrics, self.clock = poll_s, metrics, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def __enter__(self) -> RolloutDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RolloutDriver:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-driver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self._last_error = ""
            except Exception as exc:  # the store is down, a row is odd: said once, tried again
                if self.metrics is not None:
                    self.metrics.pass_failures.inc()  # every one counted, said once per reason
                why = one_line(f"{type(exc).__name__}: {exc}")
                if why != self._last_error:
                    log.error(
                        "rollouts: a pass failed (tried again every %g s): %s", self.poll_s, why
                    )
                self._last_error = why
            self._stop.wait(self.poll_s)

    # -- one pass --------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass over the active rollouts (running, paused, aborting), oldest first."""
        active = rollouts(self.store, status=ACTIVE)
        for r in sorted(active, key=lambda r: int(r["id"])):
            RolloutPass(self, r).run()  # updates r["status"] as it changes it
        if self.metrics is not None:
            self.metrics.set_active(active)

    def command(self, site: str, device: str, cmd: str, issued_ms: int, **fields: Any) -> bytes:
        """A command signed with the site's bundle signer."""
        return command(self.key, site, device, cmd, issued_ms, **fields)

    def send(self, where: str, payload: bytes, cmd: str) -> bool:
        """Publish one command; False (said in a line) when the broker did not take it."""
        try:
            ok = self.publish(where, payload)
        except Exception as exc:  # not connected, timed out: tried again next pass
            ok = False
            log.warning("rollouts: %s on %s not published: %s", cmd, where, one_line(str(exc)))
        if ok and self.metrics is not None:
            self.metrics.command(cmd)
        return ok

    def audit(
        self, rid: int, text: str, site: str | None = None, device: str | None = None
    ) -> None:
        """One log line and one audit row (action ``rollout``)."""
        who = f" {site}/{device}" if device else ""
        log.info("rollout %d%s: %s", rid, who, text)
        self.store.add_audit("rollout", f"rollout {rid}: {text}", site, device)
