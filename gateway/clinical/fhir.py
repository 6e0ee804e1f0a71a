"""FHIR R4 resources from what the gateway stores: wearable/ECG results and their events.

Plain functions over stored rows (site, device, seq, time, kind, body) and the facts of the
bundle that made them (:class:`ModelFacts`), shaped after the HL7 Personal Health Device (PHD)
implementation guide where it applies (docs/outputs.md, "FHIR R4"):

- :func:`result_observation` — one Observation per result: status ``final``, the predicted
  class as ``valueCodeableConcept``, one component per class score, identifier
  ``urn:medge:<site>`` | ``<device>/<seq>`` (conditional create makes a resend a no-op);
- :func:`event_observation` — one Observation per event (a fall, a PVC run), identified by its
  rule and start: ``preliminary`` with ``effectivePeriod.start`` when it starts, ``final`` with
  start and end when it ends, flagged by ``interpretation`` (``AA`` critical, else ``A``);
- :func:`physical_device`, :func:`model_device` — the device, and the bundle running on it
  (``version`` = the bundle id, ``parent`` = the device);
- :func:`transaction` — all of them in one transaction Bundle: conditional create (POST with
  ``ifNoneExist`` on the identifier) for devices, results and event starts, conditional update
  (PUT ``Observation?identifier=...``) for event ends, so a resend never duplicates.

The models are ``fhir.resources.R4B`` (FHIR 4.3.0): fhir.resources 8 ships R5 (the default),
R4B and STU3 but no 4.0.1 package, and every element used here is the same in R4 4.0.1 and R4B
(Observation, Device, Bundle did not change between them). Construction validates; any failure
is one :class:`FhirBuildError` naming the row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from edge_agent.drift import EVENTS as DRIFT_EVENTS
from edge_agent.errors import EnvelopeError, MedgeError, one_line
from edge_agent.schemas import check_body

__all__ = [
    "CODE_SYSTEM",
    "FALL",
    "LOINC",
    "SNOMED",
    "Coding",
    "FhirBuildError",
    "ModelFacts",
    "StoredRow",
    "event_key",
    "event_observation",
    "is_clinical",
    "model_device",
    "physical_device",
    "result_observation",
    "search_token",
    "site_system",
    "transaction",
]

Signal = Literal["ecg", "imu", "ppg"]
Coding = tuple[str, str, str]
"""(system, code, display) of one FHIR Coding."""

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CODE_SYSTEM = "urn:medge:codesystem"
"""Base of medge's own code systems: ``:model`` (model names), ``:label:<model>`` (its
classes), ``:event:<model>`` (its event rules), ``:score`` (what a component holds)."""
_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_DEVICE_TYPE = "urn:medge:codesystem:device-type"

# Only codes whose meaning matches the finding exactly; anything else is medge's own code.
EKG_IMPRESSION: Coding = (LOINC, "8601-7", "EKG impression")
FALL: Coding = (SNOMED, "1912002", "Fall")
_CODE_OF_SIGNAL: dict[str, Coding | None] = {"ecg": EKG_IMPRESSION, "imu": None, "ppg": None}
# ECG beats and rhythms come from electrodiagnostics ("procedure" in the category code system);
# a wrist IMU measures bodily movement ("activity"); a PPG classifier's finding is neither a
# vital sign (no LOINC vital-sign code and unit) nor an exam: also "procedure".
_CATEGORY_OF_SIGNAL: dict[str, tuple[str, str]] = {
    "ecg": ("procedure", "Procedure"),
    "imu": ("activity", "Activity"),
    "ppg": ("procedure", "Procedure"),
}
EPOCH_MIN = 1e9  # a time below this (2001-09-09) is seconds into a recording, not a date
EPOCH_MAX = 253_402_300_800.0  # 10000-01-01: FHIR dates have four-digit years


class FhirBuildError(MedgeError):
    """A stored row (or the facts given with it) cannot become a valid FHIR resource."""


@dataclass(frozen=True)
class ModelFacts:
    """What the manifest of the bundle behind a row says (the gateway knows it from the
    bundle it pushed, or from the device's ``state``)."""

    bundle: str  # the bundle id, name@version#hash (edge_agent.bundle.Bundle.id)
    name: str
    labels: tuple[str, ...]
    signal: Signal
    positive_label: str | None = None
    task: str = "classification"
    label_codings: Mapping[str, Coding] = field(default_factory=dict)
    """Standard codes for some labels (e.g. ``{"fall": FALL}``), added beside medge's own."""

    def __post_init__(self) -> None:
        if self.task != "classification":
            raise FhirBuildError(f"{self.bundle}: only classification results map to FHIR here")
        if self.signal not in _CATEGORY_OF_SIGNAL:
            raise FhirBuildError(f"{self.bundle}: signal {self.signal!r} is not ecg, imu or ppg")
        if self.positive_label is not None and self.positive_label not in self.labels:
            raise FhirBuildError(f"{self.bundle}: positive label is not one of the labels")


@dataclass(frozen=True)
class StoredRow:
    """One stored ``result`` or ``event`` (gateway.store: the results table)."""

    site: str
    device: str
    seq: int
    time: float  # the device's time of the message (epoch seconds)
    kind: str
    body: dict[str, Any]

    @classmethod
    def from_store(cls, row: Mapping[str, Any]) -> StoredRow:
        """From a row as Store.query returns it (``body`` is JSON text)."""
        body = row["body"]
        try:
            parsed = json.loads(body) if isinstance(body, str | bytes) else body
        except ValueError as exc:
            raise FhirBuildError(f"{_name(row)}: stored body is not JSON") from exc
        return cls(
            row["site"], row["device"], int(row["seq"]), float(row["time"]), row["kind"], parsed
        )

    @property
    def name(self) -> str:
        return f"{self.kind} {self.site}/{self.device}/{self.seq}"


def _name(row: Mapping[str, Any]) -> str:
    return one_line(f"{row.get('kind')} {row.get('site')}/{row.get('device')}/{row.get('seq')}")


def site_system(site: str) -> str:
    """The identifier system of every resource of a site."""
    return f"urn:medge:{site}"


def search_token(system: str, value: str) -> str:
    """``system|value`` as a FHIR token search parameter, escaped as the search syntax says."""

    def esc(s: str) -> str:
        for c in "\\|,$":
            s = s.replace(c, "\\" + c)
        return s

    return f"{esc(system)}|{esc(value)}"


def _coding(c: Coding) -> dict[str, str]:
    return {"system": c[0], "code": c[1], "display": c[2]}


def _concept(text: str, *codings: Coding | None) -> dict[str, Any]:
    return {"coding": [_coding(c) for c in codings if c is not None], "text": text}


def _label(facts: ModelFacts, label: str) -> dict[str, Any]:
    own = (f"{CODE_SYSTEM}:label:{facts.name}", label, label)
    return _concept(label, facts.label_codings.get(label), own)


def _instant(t: float, row: StoredRow) -> str:
    if not EPOCH_MIN <= t < EPOCH_MAX:  # e.g. a device whose clock was never set
        raise FhirBuildError(f"{row.name}: time {t!r} is not a date from 2001 to 9999")
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _when(t: Any, row: StoredRow) -> tuple[float, float | None]:
    """(epoch time, recording offset or None): a recording offset (a replay) is placed at the
    device's message time, and said."""
    if t is None:
        return row.time, None
    return (float(t), None) if t >= EPOCH_MIN else (row.time, float(t))


def _build(cls: Any, data: dict[str, Any], row: StoredRow) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FhirBuildError(one_line(f"{row.name}: {where}: {first['msg']}")) from exc


def _checked(row: StoredRow, kind: str) -> dict[str, Any]:
    if row.kind != kind:
        raise FhirBuildError(f"{row.name}: not a {kind}")
    try:
        return check_body(kind, row.body)
    except EnvelopeError as exc:
        raise FhirBuildError(one_line(f"{row.name}: {exc}")) from exc


def physical_device(site: str, device: str) -> Device:
    """The wearable / edge device itself, identified by its name at the site."""
    data = {
        "resourceType": "Device",
        "identifier": [{"system": site_system(site), "value": device}],
        "status": "active",
        "deviceName": [{"name": device, "type": "user-friendly-name"}],
        "type": _concept("edge device", (_DEVICE_TYPE, "edge-device", "medge edge device")),
    }
    return _build(Device, data, StoredRow(site, device, 0, 0.0, "device", {}))


def _model_id(device: str, facts: ModelFacts) -> str:
    return f"{device}/{facts.bundle}"


def model_device(site: str, device: str, facts: ModelFacts, parent: str | None = None) -> Device:
    """The model bundle as it runs on ``device`` (software: a Device whose ``version`` is the
    bundle id and whose ``parent`` is the device, by reference ``parent`` when given)."""
    data: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": site_system(site), "value": _model_id(device, facts)}],
        "status": "active",
        "deviceName": [{"name": facts.name, "type": "model-name"}],
        "type": _concept("AI model", (_DEVICE_TYPE, "model", "medge model bundle")),
        "version": [{"value": facts.bundle}],
    }
    if parent is not None:
        data["parent"] = {"reference": parent}
    return _build(Device, data, StoredRow(site, device, 0, 0.0, "device", {}))


def _base(row: StoredRow, facts: ModelFacts, value: str, refs: Mapping[str, str | None]) -> dict:
    category, display = _CATEGORY_OF_SIGNAL[facts.signal]
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": site_system(row.site), "value": value}],
        "category": [{"coding": [{"system": _CATEGORY, "code": category, "display": display}]}],
    }
    if refs.get("device"):
        data["device"] = {"reference": refs["device"]}
    if refs.get("subject"):
        data["subject"] = {"reference": refs["subject"]}
    return data


def _score(code: str, text: str, value: float, unit: str = "1") -> dict[str, Any]:
    return {
        "code": _concept(text, (f"{CODE_SYSTEM}:score", code, text)),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def result_observation(
    row: StoredRow, facts: ModelFacts, device_ref: str | None = None, subject: str | None = None
) -> Observation:
    """A result as an Observation (see the module's docstring)."""
    body = _checked(row, "result")
    if body.get("bundle") not in (None, facts.bundle):
        raise FhirBuildError(
            one_line(f"{row.name}: from bundle {body['bundle']}, not {facts.bundle}")
        )
    pred, scores = body.get("pred"), body.get("scores")
    if type(pred) is not int or not 0 <= pred < len(facts.labels):
        raise FhirBuildError(f"{row.name}: pred is not a class of {facts.bundle}")
    if body.get("pred_label") not in (None, facts.labels[pred]):
        raise FhirBuildError(f"{row.name}: pred_label does not name class {pred} of {facts.bundle}")
    if not isinstance(scores, list) or len(scores) != len(facts.labels):
        raise FhirBuildError(f"{row.name}: scores do not match the {len(facts.labels)} labels")
    t, offset = _when(body.get("sample_time"), row)
    data = _base(row, facts, f"{row.device}/{row.seq}", {"device": device_ref, "subject": subject})
    own = (f"{CODE_SYSTEM}:model", facts.name, f"{facts.name} classification")
    data |= {
        "status": "final",
        "code": _concept(f"{facts.name} classification", _CODE_OF_SIGNAL[facts.signal], own),
        "effectiveDateTime": _instant(t, row),
        "issued": _instant(row.time, row),
        "valueCodeableConcept": _label(facts, facts.labels[pred]),
        "component": [
            _score(f"score:{label}", f"score of {label}", float(s))
            for label, s in zip(facts.labels, scores, strict=True)
        ],
    }
    if facts.positive_label is not None:
        positive = facts.labels[pred] == facts.positive_label
        code, text = ("A", "Abnormal") if positive else ("N", "Normal")
        data["interpretation"] = [_concept(text, (_INTERPRETATION, code, text))]
    notes = [f"input {body['input']}"] if body.get("input") else []
    if offset is not None:
        notes.append(f"recording offset {offset:g} s (a replay): effective time is the message's")
    if notes:
        data["note"] = [{"text": "; ".join(notes)}]
    return _build(Observation, data, row)


def is_clinical(row: StoredRow) -> bool:
    """Whether a stored row becomes FHIR: a result, or an event start/end of the model's own
    rules (not an update's, nor an input drift or signal-quality warning: those are about the
    device's inputs, not the patient; they stay in the gateway's store and alerts)."""
    if row.kind == "result":
        return True
    body = row.body
    return (
        row.kind == "event"
        and body.get("state") in ("start", "end")
        and body.get("event") not in DRIFT_EVENTS
    )


def event_key(row: StoredRow) -> str:
    """The identifier value of the event a start or end message belongs to."""
    body = row.body
    return f"{row.device}/event/{body.get('event')}@{body.get('start')!r}"


def _period(body: dict[str, Any], row: StoredRow) -> tuple[dict[str, str], float | None]:
    start, offset = _when(body.get("start"), row)
    if body["state"] != "end":
        return {"start": _instant(start, row)}, offset
    end = body.get("end")
    if offset is not None:  # a replay: the end is the message's time, the start before it
        duration = float(body.get("duration_s") or 0.0)
        return {"start": _instant(row.time - duration, row), "end": _instant(row.time, row)}, offset
    if end is None or end < start:
        raise FhirBuildError(f"{row.name}: event end is missing or before its start")
    return {"start": _instant(start, row), "end": _instant(float(end), row)}, offset


def event_observation(
    row: StoredRow, facts: ModelFacts, device_ref: str | None = None, subject: str | None = None
) -> Observation:
    """An event start or end as an Observation (see the module's docstring)."""
    body = _checked(row, "event")
    if body.get("state") not in ("start", "end"):
        raise FhirBuildError(f"{row.name}: event state {body.get('state')!r} is not clinical")
    label = body.get("label")
    if body.get("start") is None:
        raise FhirBuildError(f"{row.name}: event has no start")
    if label not in facts.labels:
        raise FhirBuildError(f"{row.name}: event label is not a class of {facts.bundle}")
    period, offset = _period(body, row)
    data = _base(row, facts, event_key(row), {"device": device_ref, "subject": subject})
    name = str(body["event"])
    critical = body.get("severity") == "critical"
    code, text = ("AA", "Critical abnormal") if critical else ("A", "Abnormal")
    components = []
    if body.get("peak") is not None:
        components.append(_score("peak", f"peak score of {label}", float(body["peak"])))
    if body.get("windows") is not None:
        components.append(
            {
                "code": _concept("windows", (f"{CODE_SYSTEM}:score", "windows", "windows")),
                "valueInteger": body["windows"],
            }
        )
    if body.get("duration_s") is not None:
        components.append(_score("duration", "duration", float(body["duration_s"]), "s"))
    notes = [f"severity {body.get('severity', 'unset')}, alert {json.dumps(body.get('alert'))}"]
    if body.get("ended_by"):
        notes.append(f"ended by {body['ended_by']}")
    if offset is not None:
        notes.append(f"recording offset {offset:g} s (a replay): times are the message's")
    data |= {
        "status": "final" if body["state"] == "end" else "preliminary",
        "code": _concept(f"{name} event", (f"{CODE_SYSTEM}:event:{facts.name}", name, name)),
        "effectivePeriod": period,
        "issued": _instant(row.time, row),
        "valueCodeableConcept": _label(facts, str(label)),
        "interpretation": [_concept(text, (_INTERPRETATION, code, text))],
        "component": components,
        "note": [{"text": "; ".join(notes)}],
    }
    return _build(Observation, data, row)


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, system + '|' + value)}"


def _latest(rows: Iterable[StoredRow]) -> list[StoredRow]:
    """Clinical rows, each result once, each event once in its latest state (an end
    replaces its start: one transaction must not create and update the same resource)."""
    keep: dict[str, StoredRow] = {}
    for row in sorted(rows, key=lambda r: (r.site, r.device, r.seq)):
        if not is_clinical(row):
            continue
        key = f"{row.device}/{row.seq}" if row.kind == "result" else event_key(row)
        keep[f"{row.site}|{key}"] = row
    return list(keep.values())


def transaction(
    rows: Iterable[StoredRow],
    facts_of: Callable[[StoredRow], ModelFacts],
    patients: Mapping[str, str] | None = None,
) -> Bundle:
    """One transaction Bundle of ``rows`` (results and event starts/ends; other rows are
    skipped: :func:`is_clinical`), with the Devices they reference. ``facts_of`` gives each
    row's bundle facts; ``patients`` maps ``site/device`` or ``device`` to a Patient reference
    (none: the Observations have no subject)."""
    patients = patients or {}
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(resource: Any, system: str, value: str, update: bool = False) -> str:
        url = _full_url(system, value)
        if url in seen:
            return url
        seen.add(url)
        kind = resource.get_resource_type()
        query = f"identifier={_quote(search_token(system, value))}"
        request = (
            {"method": "PUT", "url": f"{kind}?{query}"}
            if update
            else {"method": "POST", "url": kind, "ifNoneExist": query}
        )
        entries.append({"fullUrl": url, "resource": _json(resource), "request": request})
        return url

    for row in _latest(rows):
        facts, system = facts_of(row), site_system(row.site)
        dev = add(physical_device(row.site, row.device), system, row.device)
        model = add(
            model_device(row.site, row.device, facts, dev), system, _model_id(row.device, facts)
        )
        subject = patients.get(f"{row.site}/{row.device}", patients.get(row.device))
        if row.kind == "result":
            obs = result_observation(row, facts, model, subject)
            add(obs, system, f"{row.device}/{row.seq}")
        else:
            obs = event_observation(row, facts, model, subject)
            add(obs, system, event_key(row), update=row.body.get("state") == "end")
    return _build(
        Bundle,
        {"resourceType": "Bundle", "type": "transaction", "entry": entries},
        StoredRow("", "", 0, 0.0, "bundle", {}),
    )


def _quote(text: str) -> str:
    return quote(text, safe="")


def _json(resource: Any) -> dict[str, Any]:
    """A built resource as FHIR JSON (no empty elements)."""
    return json.loads(resource.model_dump_json(exclude_none=True))
