"""One delivery attempt per target, as plain objects the sender's threads call: what went,
what must be parked (and why), what may go later. No threads, no outbox here.

- :class:`PacsDelivery`: one result -> open its sealed source UIDs with the fog source keys,
  fetch the source's header (cached), build the SR (+ SEG, SC), STOW-RS or C-STORE them;
- :class:`FhirDelivery`: up to ``batch`` results/events -> one transaction Bundle; a row that
  cannot become FHIR is parked alone, the rest go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pydicom import Dataset

from edge_agent.errors import EnvelopeError
from edge_agent.keys import RecipientKey
from edge_agent.source_ids import SourceUids, open_source
from gateway.clinical.dicom_objects import DicomObjectError, MedgeResult, dicom_objects
from gateway.clinical.fhir import FhirBuildError, ModelFacts, StoredRow, transaction
from gateway.clinical.fhir_client import FhirError, post_transaction
from gateway.clinical.outbox import ClinicalItem
from gateway.clinical.pacs import PacsConfig, PacsError, c_store, fetch_header, stow
from gateway.clinical.settings import FhirSettings, model_name

__all__ = ["FhirDelivery", "Outcome", "PacsDelivery"]

_HEADERS_KEPT = 32


@dataclass
class Outcome:
    """What one attempt did: ``sent`` (the receiver has them), ``parked`` (item, reason),
    ``retry`` (items, reason) when a failure may pass, ``skipped`` objects not built."""

    sent: list[ClinicalItem] = field(default_factory=list)
    parked: list[tuple[ClinicalItem, str]] = field(default_factory=list)
    retry: tuple[list[ClinicalItem], str] | None = None
    skipped: list[str] = field(default_factory=list)


class _Park(Exception):
    """Sending this item again cannot help."""


class PacsDelivery:
    """Sends one result's DICOM objects to the PACS."""

    def __init__(self, cfg: PacsConfig, send: str, keys: dict[str, RecipientKey]) -> None:
        self.cfg, self.keys = cfg, keys
        self._send = c_store if send == "c-store" else stow
        self._headers: OrderedDict[str, Dataset] = OrderedDict()

    def send(self, items: list[ClinicalItem]) -> Outcome:
        out = Outcome()
        for item in items:
            try:
                out.skipped += self._one(item)
                out.sent.append(item)
            except _Park as exc:
                out.parked.append((item, str(exc)))
            except PacsError as exc:
                if not exc.retry:
                    out.parked.append((item, str(exc)))
                    continue
                out.retry = ([item], exc.reason)
                break  # the PACS is failing: what follows waits
        return out

    def _one(self, item: ClinicalItem) -> list[str]:
        """Send the item's objects; the reasons of objects left out (SEG/SC not built)."""
        who = f"{item.site}/{item.device}/{item.seq}"
        try:
            uids, frame = open_source(item.body.get("source"), item.site, item.device, self.keys)
        except EnvelopeError as exc:
            raise _Park(str(exc)) from exc
        header = self._header(uids)
        result = MedgeResult(
            item.body,
            datetime.fromtimestamp(item.time, timezone.utc),
            f"{item.site}/{item.device}",
            frame=frame,
            seq=item.seq,
        )
        skipped: list[str] = []
        try:
            objects = dicom_objects(header, result, skipped)
        except DicomObjectError as exc:
            raise _Park(f"{who}: {exc}") from exc
        self._send(objects, self.cfg)
        return [f"{who}: {why}" for why in skipped]

    def _header(self, uids: SourceUids) -> Dataset:
        header = self._headers.get(uids.instance)
        if header is None:
            header = fetch_header(self.cfg, uids.study, uids.series, uids.instance)
            self._headers[uids.instance] = header
            if len(self._headers) > _HEADERS_KEPT:
                self._headers.popitem(last=False)
        else:
            self._headers.move_to_end(uids.instance)
        return header


def _row(item: ClinicalItem) -> StoredRow:
    return StoredRow(item.site, item.device, item.seq, item.time, item.kind, item.body)


def _always(facts: ModelFacts) -> Callable[[StoredRow], ModelFacts]:
    return lambda _row: facts


class FhirDelivery:
    """Sends a batch of results and events to the FHIR server in one transaction."""

    def __init__(self, settings: FhirSettings) -> None:
        self.settings = settings
        self.cfg = settings.config()
        self.patients = dict(settings.patients)

    def _facts(self, item: ClinicalItem) -> ModelFacts:
        facts = self.settings.facts(item.bundle)
        if facts is not None:
            return facts
        if item.bundle is None:
            raise _Park(f"{item.name}: which bundle made it is not known (no model to map)")
        raise _Park(
            f"{item.name}: model {model_name(item.bundle)!r} of {item.bundle} is not in "
            "outputs.fhir.models"
        )

    def send(self, items: list[ClinicalItem]) -> Outcome:
        out = Outcome()
        good: list[tuple[ClinicalItem, ModelFacts]] = []
        for item in items:  # each row alone first: one that cannot be built is parked alone
            try:
                facts = self._facts(item)
                transaction([_row(item)], _always(facts), self.patients)
            except (_Park, FhirBuildError) as exc:
                out.parked.append((item, str(exc)))
                continue
            good.append((item, facts))
        if not good:
            return out
        facts_of = {(i.site, i.device, i.seq): f for i, f in good}
        bundle = transaction(
            [_row(i) for i, _ in good], lambda r: facts_of[(r.site, r.device, r.seq)], self.patients
        )
        sent = [i for i, _ in good]
        try:
            post_transaction(self.cfg, bundle)
        except FhirError as exc:
            if exc.retryable:
                out.retry = (sent, exc.reason)
            else:
                out.parked += [(i, str(exc)) for i in sent]
            return out
        out.sent = sent
        return out
