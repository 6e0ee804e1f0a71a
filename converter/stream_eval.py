"""Event detection over recorded streams, scored as the device would find the events.

A recording (npz) is cut into windows exactly as the agent cuts a live stream (the manifest's
``window``: fixed length and hop, or one window per R peak), each window's class scores come
from a model variant, and the agent's own :class:`edge_agent.events.EventTracker` turns them
into events with the manifest's ``decode.events`` rules. The events found are matched against
the annotated ones (:func:`converter.metrics.event_metrics`): event sensitivity and precision,
false alarms per hour, and the window-level specificity (the share of windows away from every
annotated event that no detected event covers).

Recording format (one npz per recording):

``signal``     (T,) or (T, C) samples
``rate_hz``    sampling rate (``fs`` is read too, as in the MIT-BIH files)
``events``     (N, 2) annotated events, start and end in seconds from the first sample; every
               rule is scored against them; ``events_<rule>`` scores one rule against its own
``r_peaks``    R peak sample indices, needed by beat windows (``window.centre: beat``)

A window's time is its first sample's time (as the agent's sources stamp it); a detected event
covers the samples its windows saw, from its first window's start to its last window's end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from converter.errors import ConversionError
from converter.metrics import event_metrics, wilson_ci
from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.errors import BundleError
from edge_agent.events import EventTracker
from edge_agent.window import beat_starts, sliding_windows

__all__ = [
    "EVENT_METRICS",
    "Recording",
    "StreamWindows",
    "cut",
    "detect",
    "event_scalars",
    "load_recording",
    "score_streams",
]

EVENT_METRICS = ("sensitivity", "precision", "specificity", "false_alarms_per_hour")
"""The numbers of each rule that reach the manifest (``event_<rule>_<metric>``) and that
``--budget`` may name (false alarms: a rise is the loss)."""


@dataclass
class Recording:
    name: str
    signal: np.ndarray  # (T,) or (T, C)
    rate_hz: float
    events: dict[str, list[tuple[float, float]]]  # rule name ("*": every rule) -> (start, end) s
    r_peaks: np.ndarray | None = None

    @property
    def duration_s(self) -> float:
        return len(self.signal) / self.rate_hz

    def truth(self, rule: str) -> list[tuple[float, float]]:
        return self.events.get(rule, self.events.get("*", []))


@dataclass
class StreamWindows:
    """The windows of one recording, in stream order, with what was left out and why."""

    recording: Recording
    x: np.ndarray  # (N, length[, C]) raw samples
    times: np.ndarray  # (N,) seconds: each window's first sample
    span_s: float  # how long one window lasts
    skipped: dict[str, int] = field(default_factory=dict)


def _events(arr: np.ndarray, path: Path, key: str) -> list[tuple[float, float]]:
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0:
        return []
    if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all() or (a[:, 1] < a[:, 0]).any():
        raise ConversionError(
            f"{path}: '{key}' must be (N, 2) finite start/end seconds with end >= start"
        )
    return [(float(s), float(e)) for s, e in a]


def load_recording(path: Path, rules: Sequence[EventRule]) -> Recording:
    """One annotated recording; every problem is one line naming the file and the key."""
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable npz recording ({exc})") from None
    with d:
        signal, rate = _signal(d, path)
        events = _annotations(d, path, rules)
        peaks = np.asarray(d["r_peaks"], dtype=np.int64) if "r_peaks" in d else None
    return Recording(path.name, signal, rate, events, peaks)


def _signal(d: NpzFile, path: Path) -> tuple[np.ndarray, float]:
    """The recording's samples and sampling rate, checked."""
    if "signal" not in d:
        raise ConversionError(f"{path}: a recording needs 'signal' (T,) or (T, C)")
    signal = np.asarray(d["signal"])
    rate_key = "rate_hz" if "rate_hz" in d else "fs" if "fs" in d else None
    if rate_key is None:
        raise ConversionError(f"{path}: a recording needs its sampling rate ('rate_hz')")
    rate = float(d[rate_key])
    if not rate > 0:
        raise ConversionError(f"{path}: '{rate_key}' must be > 0, got {rate}")
    if signal.ndim not in (1, 2) or len(signal) == 0:
        raise ConversionError(f"{path}: 'signal' must be (T,) or (T, C), got {signal.shape}")
    return signal, rate


def _annotations(
    d: NpzFile, path: Path, rules: Sequence[EventRule]
) -> dict[str, list[tuple[float, float]]]:
    """The annotated events by rule name (``"*"``: every rule); each rule must have some."""
    events: dict[str, list[tuple[float, float]]] = {}
    if "events" in d:
        events["*"] = _events(d["events"], path, "events")
    names = {r.name for r in rules}
    for key in d.files:
        if key.startswith("events_"):
            name = key[len("events_") :]
            if name not in names:
                raise ConversionError(
                    f"{path}: '{key}' names no event rule (rules: {', '.join(sorted(names))})"
                )
            events[name] = _events(d[key], path, key)
    missing = [r.name for r in rules if r.name not in events and "*" not in events]
    if missing:
        raise ConversionError(
            f"{path}: no annotated events for rule '{missing[0]}' "
            f"('events' or 'events_{missing[0]}', (N, 2) seconds; empty when there are none)"
        )
    return events


def cut(rec: Recording, window: WindowSpec) -> StreamWindows:
    """The windows the agent would make of this recording (edge_agent.window, the ECG source's
    beat windows); windows holding a non-finite sample are skipped and counted, as on the
    device."""
    if window.rate_hz is not None and abs(window.rate_hz - rec.rate_hz) > 1e-6:
        raise ConversionError(
            f"{rec.name}: recorded at {rec.rate_hz:g} Hz but the model's window rate_hz is "
            f"{window.rate_hz:g} Hz"
        )
    n, total = window.length, len(rec.signal)
    skipped: dict[str, int] = {}
    if window.centre == "beat":
        if rec.r_peaks is None:
            raise ConversionError(f"{rec.name}: beat windows need 'r_peaks' in the recording")
        before = window.before if window.before is not None else n // 2
        starts = np.asarray(beat_starts(rec.r_peaks.tolist(), total, n, before), dtype=np.int64)
        if len(rec.r_peaks) > len(starts):
            skipped["edge_beats"] = len(rec.r_peaks) - len(starts)
        x = (
            np.stack([rec.signal[s : s + n] for s in starts])
            if len(starts)
            else np.empty((0, n, *rec.signal.shape[1:]), dtype=rec.signal.dtype)
        )
    else:
        x = sliding_windows(rec.signal, n, window.hop)
        starts = np.arange(len(x), dtype=np.int64) * window.hop
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.ones(0, bool)
    if not finite.all():
        skipped["invalid"] = int((~finite).sum())
    if not finite.any():
        raise ConversionError(
            f"{rec.name}: no whole window of {n} samples ({total} samples recorded)"
        )
    return StreamWindows(
        rec,
        np.ascontiguousarray(x[finite]),
        starts[finite] / rec.rate_hz,
        n / rec.rate_hz,
        skipped,
    )


def detect(
    scores: np.ndarray,
    times: np.ndarray,
    span_s: float,
    rules: Sequence[EventRule],
    labels: Sequence[str],
) -> dict[str, list[tuple[float, float]]]:
    """Per rule, the (start, end) seconds of each event the agent's tracker finds in these
    per-window class scores; an event covers its windows, so it ends one window after its last
    window's time."""
    try:
        tracker = EventTracker(rules, labels)
    except BundleError as exc:
        raise ConversionError(str(exc)) from None
    found: dict[str, list[tuple[float, float]]] = {r.name: [] for r in rules}
    messages: list[dict[str, Any]] = []
    for i, (t, s) in enumerate(zip(times.tolist(), scores, strict=True)):
        messages += tracker.update(t, s, str(i))
    for m in messages + tracker.finish():
        if m["state"] == "end":
            found[m["event"]].append((float(m["start"]), float(m["end"]) + span_s))
    return found


def _specificity(
    times: np.ndarray,
    span_s: float,
    truth: list[tuple[float, float]],
    found: list[tuple[float, float]],
    tolerance_s: float,
) -> tuple[int, int]:
    """Windows that overlap no annotated event (widened by the tolerance): how many of them no
    detected event covers, and how many there are."""
    ends = times + span_s
    negative = np.ones(len(times), dtype=bool)
    for s, e in truth:
        negative &= ~((times <= e + tolerance_s) & (ends >= s - tolerance_s))
    flagged = np.zeros(len(times), dtype=bool)
    for s, e in found:
        flagged |= (times >= s) & (ends <= e + 1e-9)
    return int((negative & ~flagged).sum()), int(negative.sum())


def score_streams(
    streams: Sequence[StreamWindows],
    outputs: Mapping[str, Sequence[np.ndarray]],
    decode_scores: Callable[[np.ndarray], np.ndarray],
    rules: Sequence[EventRule],
    labels: Sequence[str],
    tolerance_s: float = 0.0,
) -> dict[str, Any]:
    """The report section: per variant and rule, the event metrics over every recording
    together (events and hours summed), and each recording's own counts.

    ``outputs[variant][k]`` holds the raw model outputs of ``streams[k]``'s windows;
    ``decode_scores`` turns raw outputs (N, ...) into class scores (N, len(labels)) the way the
    agent decodes them."""
    hours = sum(s.recording.duration_s for s in streams) / 3600.0
    section: dict[str, Any] = {
        "tolerance_s": tolerance_s,
        "rules": [r.model_dump() for r in rules],
        "recordings": [
            {
                "file": s.recording.name,
                "duration_s": round(s.recording.duration_s, 3),
                "windows": len(s.x),
                "skipped": s.skipped,
                "events": {r.name: len(s.recording.truth(r.name)) for r in rules},
            }
            for s in streams
        ],
        "hours": round(hours, 4),
        "variants": {},
    }
    for variant, outs in outputs.items():
        per_rule: dict[str, Any] = {}
        found_all = [
            detect(decode_scores(o), s.times, s.span_s, rules, labels)
            for s, o in zip(streams, outs, strict=True)
        ]
        for r in rules:
            tp = fp = fn = n_true = n_det = quiet = n_neg = 0
            per_rec = []
            for s, found in zip(streams, found_all, strict=True):
                truth = s.recording.truth(r.name)
                m = event_metrics(truth, found[r.name], s.recording.duration_s, tolerance_s)
                q, neg = _specificity(s.times, s.span_s, truth, found[r.name], tolerance_s)
                tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
                n_true, n_det = n_true + m["n_true"], n_det + m["n_detected"]
                quiet, n_neg = quiet + q, n_neg + neg
                detected = [list(d) for d in found[r.name]]
                per_rec.append(
                    {
                        "file": s.recording.name,
                        "tp": m["tp"],
                        "fp": m["fp"],
                        "fn": m["fn"],
                        "detected": detected,
                    }
                )
            per_rule[r.name] = {
                "sensitivity": tp / n_true if n_true else None,
                "sensitivity_ci": wilson_ci(tp, n_true),
                "precision": tp / n_det if n_det else None,
                "precision_ci": wilson_ci(tp, n_det),
                "false_alarms_per_hour": fp / hours if hours else None,
                "specificity": quiet / n_neg if n_neg else None,
                "specificity_ci": wilson_ci(quiet, n_neg),
                "n_true": n_true,
                "n_detected": n_det,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "negative_windows": n_neg,
                "recordings": per_rec,
            }
        section["variants"][variant] = per_rule
    return section


def event_scalars(section: dict[str, Any], variant: str) -> dict[str, float | None]:
    """Flat ``event_<rule>_<metric>`` numbers of one variant, for the manifest's metrics."""
    out: dict[str, float | None] = {}
    for rule, m in section["variants"].get(variant, {}).items():
        for k in EVENT_METRICS:
            out[f"event_{rule}_{k}"] = m[k]
    return out
