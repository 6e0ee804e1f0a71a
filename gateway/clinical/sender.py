"""Sends what waits in the clinical outbox: DICOM objects to the PACS, FHIR transactions to the
EHR, one thread per configured target (``clinical-pacs``, ``clinical-fhir``).

The gateway writer calls :meth:`ClinicalSender.put` with the rows it stores, before it
acknowledges the device; the threads take the items in order (events first, then by time).
An item leaves the outbox when its receiver has stored it. A failure that may pass (the PACS or
FHIR server unreachable, busy, timing out) holds the whole target back with exponential
back-off, logged once when it starts and once when it ends; a failure that cannot pass parks
the item with its reason (one log line each), and the others go on. Resends are safe: DICOM
UIDs are name-based on (device, seq, ...), FHIR entries are conditional creates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.errors import one_line
from gateway.clinical.delivery import FhirDelivery, Outcome, PacsDelivery
from gateway.clinical.fhir import StoredRow, is_clinical
from gateway.clinical.outbox import ClinicalItem, ClinicalOutbox
from gateway.clinical.settings import OutputsSettings, model_name
from gateway.outbox_lock import OutboxLock

if TYPE_CHECKING:
    from gateway.metrics import ClinicalMetrics

__all__ = ["ClinicalSender", "Row", "TargetStats"]

log = logging.getLogger("medge.gateway.clinical")

Row = tuple[str, str, int, str, float, str | None, dict[str, Any]]
"""(site, device, seq, kind, time, bundle, body) of one stored row."""
NAMES = {"pacs": "PACS", "fhir": "FHIR server"}
_IDLE_S = 1.0  # look at the outbox this often when nothing wakes the thread (an unpark)


@dataclass
class TargetStats:
    """What one target's thread did since it started."""

    sent: int = 0
    retried: int = 0
    parked: int = 0
    skipped_objects: int = 0  # SEG/SC not built, their SR sent without them


@dataclass
class _Outage:
    since: float
    tries: int = 1
    back: float | None = None
    sent: int = 0


@dataclass
class _Worker:
    """One target's thread: takes due items, hands them to its delivery, applies the outcome."""

    target: str
    deliver: Callable[[list[ClinicalItem]], Outcome]
    batch: int
    timeout_s: float
    owner: ClinicalSender
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread = field(init=False)
    outage: _Outage | None = None
    hold: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"clinical-{self.target}", daemon=True)

    @property
    def name(self) -> str:
        return NAMES.get(self.target, self.target)

    def run(self) -> None:
        stop = self.owner.stopping
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # the outbox itself failed (disk): say so, keep the thread
                log.exception("%s sender: the clinical outbox failed; trying again", self.name)
                stop.wait(self.owner.settings.retry_min_s)
        self.end_outage()

    def step(self) -> None:
        now = time.time()
        hold = max(self.hold, self.owner.outbox.hold_until(self.target))
        if hold > now:  # backing off: new items wait behind the failing one, order is kept
            self.owner.stopping.wait(min(hold - now, self.owner.settings.retry_max_s))
            return
        self.wake.clear()
        items = self.owner.outbox.due(self.target, self.batch)
        if not items:
            self.end_outage()
            self.owner.gauges(self.target)
            self.wake.wait(_IDLE_S)
            return
        try:
            outcome = self.deliver(items)
        except Exception as exc:  # a bug, not the receiver: park these, keep going
            log.exception("%s sender: unexpected error on %s", self.name, items[0].name)
            outcome = Outcome(parked=[(i, f"unexpected {one_line(repr(exc))}") for i in items])
        self.apply(outcome)

    def apply(self, outcome: Outcome) -> None:
        box, count = self.owner.outbox, self.owner.count
        for item, reason in outcome.parked:
            box.park([item], reason)
            count(self.target, "parked", 1)
            log.warning(
                "%s: parked %s/%s/%d (%s): %s",
                self.name,
                item.site,
                item.device,
                item.seq,
                item.kind,
                reason,
            )
        if outcome.sent:
            box.delete(outcome.sent)
            count(self.target, "sent", len(outcome.sent))
            if self.outage is not None:
                self.outage.back = self.outage.back or time.time()
                self.outage.sent += len(outcome.sent)
        if outcome.skipped:
            count(self.target, "skipped_objects", len(outcome.skipped))
            for why in outcome.skipped:
                log.warning("%s: sent without an object that cannot be built: %s", self.name, why)
        if outcome.retry is not None:
            self.failed(*outcome.retry)
        self.owner.gauges(self.target)

    def failed(self, items: list[ClinicalItem], reason: str) -> None:
        """A failure that may pass: hold the target back, doubling the wait each time."""
        settings = self.owner.settings
        if self.outage is not None and self.outage.back is not None:
            self.end_outage()  # it came back and failed again: a new outage
        if self.outage is None:
            self.outage = _Outage(time.time())
            waiting = self.owner.outbox.depth().get(self.target, 0)
            log.warning(
                "%s unreachable: %s; %d waiting, trying again with back-off",
                self.name,
                reason,
                waiting,
            )
        else:
            self.outage.tries += 1
        delay = min(
            settings.retry_max_s, settings.retry_min_s * 2 ** min(self.outage.tries - 1, 30)
        )
        self.hold = time.time() + delay
        self.owner.outbox.retry_later(items, reason, self.hold)
        self.owner.count(self.target, "retried", len(items))

    def end_outage(self) -> None:
        o, self.outage = self.outage, None
        if o is not None and o.back is not None:
            log.info("%s back after %.1f s, %d sent", self.name, o.back - o.since, o.sent)


class ClinicalSender:
    """The clinical outbox's senders; ``stats[target]`` counts what each did."""

    def __init__(
        self,
        outbox: ClinicalOutbox,
        settings: OutputsSettings,
        metrics: ClinicalMetrics | None = None,
    ) -> None:
        self.outbox, self.settings, self.metrics = outbox, settings, metrics
        self.stopping = threading.Event()
        self._workers: dict[str, _Worker] = {}
        if settings.pacs is not None:
            pacs = PacsDelivery(settings.pacs.config(), settings.pacs.send, settings.source_keys())
            self._add("pacs", pacs.send, 1, settings.pacs.timeout_s)
        if settings.fhir is not None:
            fhir = FhirDelivery(settings.fhir)
            self._add("fhir", fhir.send, settings.fhir.batch, settings.fhir.timeout_s)
        self.stats = {t: TargetStats() for t in self._workers}
        self._file_lock = OutboxLock(outbox.path, "clinical outbox")

    def _add(self, target: str, deliver: Callable[..., Outcome], batch: int, t: float) -> None:
        self._workers[target] = _Worker(target, deliver, batch, t, self)

    def __enter__(self) -> ClinicalSender:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def targets(
        self,
        site: str,
        device: str,
        seq: int,
        kind: str,
        time: float,
        bundle: str | None,
        body: dict[str, Any],
    ) -> list[str]:
        """The outputs that take this stored row: the PACS a result with a sealed source, the
        FHIR server a clinical result or event of a configured model."""
        out = []
        if self.settings.pacs is not None and kind == "result" and "source" in body:
            out.append("pacs")
        fhir = self.settings.fhir
        made_by = _bundle_of(kind, bundle, body)
        # a clinical row of a configured model; or an event whose bundle is not known (the
        # device's state never named one): queued, to be parked with that reason, not lost
        if (
            fhir is not None
            and (made_by is None or model_name(made_by) in fhir.models)
            and is_clinical(StoredRow(site, device, seq, time, kind, body))
        ):
            out.append("fhir")
        return out

    def put(self, rows: list[Row]) -> int:
        """Queue stored rows for the outputs that take them, durably, in one transaction;
        returns how many items. Call it before acknowledging the device."""
        items = [
            ClinicalItem(t, site, device, seq, kind, when, _bundle_of(kind, bundle, body), body)
            for site, device, seq, kind, when, bundle, body in rows
            for t in self.targets(site, device, seq, kind, when, bundle, body)
        ]
        self.outbox.put_many(items)
        for target in {i.target for i in items}:
            self._workers[target].wake.set()
        return len(items)

    def start(self) -> None:
        """Start the senders; MedgeError when another process sends from the same outbox."""
        self._file_lock.acquire()
        for w in self._workers.values():
            self.gauges(w.target)
            w.thread.start()

    def stop(self) -> None:
        """End the threads: each finishes the exchange it is in (bounded by its timeout)."""
        self.stopping.set()
        for w in self._workers.values():
            w.wake.set()
        for w in self._workers.values():
            if w.thread.is_alive():
                w.thread.join(timeout=w.timeout_s + 5)
        self._file_lock.release()

    def workers(self) -> dict[str, threading.Thread]:
        """The threads that must stay alive (for a Supervisor), by name."""
        return {w.thread.name: w.thread for w in self._workers.values()}

    def unpark(self, target: str | None = None) -> int:
        """Try parked items again (of ``target``, or all); returns how many."""
        n = self.outbox.unpark(target)
        for w in self._workers.values():
            w.wake.set()
        return n

    def count(self, target: str, what: str, n: int) -> None:
        stats = self.stats[target]
        setattr(stats, what, getattr(stats, what) + n)
        if self.metrics is not None:
            metric = getattr(self.metrics, what)
            (metric if what == "skipped_objects" else metric.labels(target)).inc(n)

    def gauges(self, target: str) -> None:
        if self.metrics is not None:
            self.metrics.waiting_now.labels(target).set(self.outbox.depth().get(target, 0))
            self.metrics.parked_now.labels(target).set(self.outbox.parked_count().get(target, 0))


def _bundle_of(kind: str, bundle: str | None, body: dict[str, Any]) -> str | None:
    """The bundle that made a row: a result names it in its body; an event, the device's."""
    named = body.get("bundle") if kind == "result" else None
    return named if isinstance(named, str) and named else bundle
