"""The model watches its own inputs: live samples and scores against the bundle's reference.

The converter summarises the reference data into the manifest's ``reference``
(:class:`edge_agent.bundle.Reference`, made and binned by :mod:`edge_agent.reference`, so both
sides bin the same way). On the device a
:class:`DriftMonitor` sees each published sample as its source gave it (``Work.sample.data``,
before preprocessing) and its decoded class scores, and over the last ``window`` samples,
every ``every`` samples, computes a population-stability index

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

(``e``: the reference's shares, ``a``: the window's, both smoothed by half a sample per bin)
per signal channel, on the image intensity histogram and on the score histogram. A check
starts a warning when its PSI exceeds ``psi_on`` plus the sampling allowance
``(bins - 1) * (1 / n_reference + 1 / n_window)`` (the PSI two samples of one distribution
reach by chance) and ends below ``psi_off`` plus the same allowance.

A signal channel's PSI uses five bins cut at the reference's 0.1, 1, 99 and 99.9 % quantiles:
what it watches is values beyond the range the model was validated on (a gain error, a unit
change), not mass moving inside it, which a change of patient or activity does (measured on
held-out MIT-BIH records and WISDM subjects: docs/device.md, "Input drift and signal
quality"). The per-sample signal-quality checks are in :mod:`edge_agent.signal_quality`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.bundle import Manifest, Reference
from edge_agent.graph import Work
from edge_agent.reference import bin_counts, image_counts, psi, rounded, score_bin
from edge_agent.signal_quality import (
    Flag,
    Hysteresis,
    as_channels,
    image_flags,
    last_frame,
    signal_flags,
)

log = logging.getLogger("medge.agent.drift")

__all__ = ["EVENTS", "MESSAGE", "DriftMonitor", "DriftSettings", "WatchInputs"]

MESSAGE = "inputs no longer look like the data this model was validated on"
EVENTS = ("input_drift", "signal_quality")  # the events this module sends: about the inputs,
# not the patient (the gateway's FHIR output leaves them out)

Emit = Callable[[str, dict[str, Any]], None]


class DriftSettings(BaseModel):
    """How the agent watches its inputs (docs/device.md, "Input drift and signal quality")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(default=2000, ge=10, description="Samples in the sliding window.")
    every: int = Field(default=100, ge=1, description="Samples between two PSI checks.")
    psi_on: float = Field(
        default=0.25, gt=0, description="PSI (+ allowance) that starts a warning."
    )
    psi_off: float = Field(default=0.10, ge=0, description="PSI (+ allowance) that ends it.")
    quality_on: int = Field(default=3, ge=1, description="Bad samples in a row: a warning.")
    quality_off: int = Field(default=10, ge=1, description="Good samples in a row: it ends.")
    frozen_on: int = Field(default=10, ge=1, description="Identical frames in a row: frozen.")
    max_hz: float | None = Field(
        default=50.0,
        gt=0,
        description="Watch at most this many samples a second (one every 1/max_hz s; the "
        "rest are counted as unwatched): watching costs ~30 us a sample, as much as a small "
        "model's inference. ECG beats, IMU windows and video frames come slower than this; "
        "null: every sample.",
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> DriftSettings:
        if self.psi_off > self.psi_on:
            raise ValueError(f"psi_off {self.psi_off} must be <= psi_on {self.psi_on}")
        return self


class _Drift:
    """One PSI check: its reference shares, the window's counts, its state."""

    def __init__(self, expected: Sequence[float], n_ref: int, bins: int) -> None:
        self.expected, self.n_ref, self.k = list(expected), n_ref, bins
        self.sum = np.zeros(bins)
        self.value: float | None = None
        self.warning, self.started = False, 0

    def allowance(self, n_live: int) -> float:
        return (self.k - 1) * (1.0 / self.n_ref + 1.0 / max(n_live, 1))


class DriftMonitor:
    """Watch live samples against ``reference``; ``labels``: the bundle's, in output order."""

    def __init__(
        self, reference: Reference, labels: Sequence[str], settings: DriftSettings | None = None
    ) -> None:
        self.ref, self.labels = reference, list(labels)
        self.settings = s = settings or DriftSettings()
        self._lock = threading.Lock()
        self._ring: deque[dict[str, np.ndarray]] = deque()
        self._drift: dict[str, _Drift] = {}
        for i, ch in enumerate(reference.channels):
            self._drift[f"channel_{i}"] = _Drift(ch.psi_shares, reference.count, len(ch.psi_shares))
        if reference.image is not None:
            img = reference.image
            self._drift["intensity"] = _Drift(img.histogram, reference.count, len(img.histogram))
        sc = reference.scores
        self._score_index: int | None = None
        if sc is not None:
            self._drift["scores"] = _Drift(sc.histogram, sc.count, len(sc.histogram))
            if sc.score_of in self.labels:
                self._score_index = self.labels.index(sc.score_of)
        self._classes = np.zeros(len(self.labels))
        names = ["flat_line", "clipping"] if reference.kind == "signal" else ["black_frame"]
        if reference.kind == "signal" and len(reference.channels) >= 2:
            names.insert(1, "stuck_channel")
        self._quality = {n: Hysteresis(s.quality_on, s.quality_off) for n in names}
        if reference.kind == "image":
            self._quality["frozen_frame"] = Hysteresis(s.frozen_on, s.quality_off)
        self._last: dict[str, Flag] = {}
        self._previous: np.ndarray | None = None
        self._changes: list[dict[str, Any]] = []
        self.samples = 0
        self.skipped = 0  # samples whose shape the reference cannot read

    @classmethod
    def for_manifest(
        cls, manifest: Manifest, settings: DriftSettings | None = None
    ) -> DriftMonitor | None:
        """A monitor for a bundle's manifest; None when it has no reference (before 1.4)."""
        if manifest.reference is None:
            return None
        return cls(manifest.reference, manifest.labels, settings)

    def observe(self, sample_data: np.ndarray, decoded_scores: Sequence[float] | None) -> None:
        """One published sample (raw, as its source gave it) and its class scores (None: not
        a classification, or not decoded)."""
        with self._lock:
            self.samples += 1
            try:
                row, flags = self._measure(np.asarray(sample_data), decoded_scores)
            except (ValueError, IndexError):
                self.skipped += 1
                return
            for name, flag in flags.items():
                self._last[name] = flag
                change = self._quality[name].update(flag.bad)
                if change is not None:
                    self._note(
                        "signal_quality", name, change, flag.value, flag.threshold, flag.detail
                    )
            self._add(row, 1.0)
            self._ring.append(row)
            if len(self._ring) > self.settings.window:
                self._add(self._ring.popleft(), -1.0)
            if len(self._ring) >= self.settings.window and self.samples % self.settings.every == 0:
                self._check()

    def _add(self, row: dict[str, np.ndarray], sign: float) -> None:
        for name, counts in row.items():
            if name == "classes":
                self._classes += sign * counts
            else:
                self._drift[name].sum += sign * counts

    def _measure(
        self, data: np.ndarray, scores: Sequence[float] | None
    ) -> tuple[dict[str, np.ndarray], dict[str, Flag]]:
        row: dict[str, np.ndarray] = {}
        ref = self.ref
        if ref.kind == "signal":
            x = as_channels(data)
            if not np.isfinite(x).all():
                raise ValueError("not finite")
            for i, ch in enumerate(ref.channels[: x.shape[1]]):
                row[f"channel_{i}"] = bin_counts(x[:, i], ch.psi_edges)
            flags = signal_flags(x, ref.channels)
            if "stuck_channel" not in self._quality:
                flags.pop("stuck_channel", None)
        else:
            assert ref.image is not None
            lo, hi = ref.image.range
            frame = last_frame(data, ref.image.clip)
            row["intensity"] = image_counts(frame, lo, hi, len(ref.image.histogram))
            flags = image_flags(frame, self._previous, ref.image)
            self._previous = np.array(frame, copy=True)
        if scores is not None and "scores" in self._drift and len(scores) == len(self.labels):
            s = np.asarray(scores, dtype=np.float64)
            v = s[self._score_index] if self._score_index is not None else s.max()
            hist = np.zeros(len(self._drift["scores"].expected))
            hist[score_bin(float(v))] = 1.0
            row["scores"] = hist
            row["classes"] = np.eye(len(self.labels))[int(np.argmax(s))]
        return row, flags

    def _check(self) -> None:
        s = self.settings
        for name, d in self._drift.items():
            n = sum(1 for r in self._ring if name in r) if name == "scores" else len(self._ring)
            if n < s.window // 2:
                continue
            d.value = psi(d.expected, d.n_ref, d.sum)
            extra = d.allowance(n)
            if not d.warning and d.value > s.psi_on + extra:
                d.warning, d.started = True, d.started + 1
                self._note("input_drift", name, "start", d.value, s.psi_on + extra, "PSI")
            elif d.warning and d.value < s.psi_off + extra:
                d.warning = False
                self._note("input_drift", name, "end", d.value, s.psi_off + extra, "PSI")

    def _note(
        self, event: str, check: str, state: str, value: float, threshold: float, detail: str
    ) -> None:
        what = f"{detail} {value:.3g} over {threshold:.3g}" if detail == "PSI" else detail
        if state == "end":
            what = f"back to normal: {detail} {value:.3g}" if detail == "PSI" else "back to normal"
        self._changes.append(
            {
                "event": event,
                "state": state,
                "check": check,
                "value": rounded(value),
                "threshold": rounded(threshold),
                "alert": True,
                "severity": "warning",
                "message": f"{MESSAGE} ({check}: {what})",
            }
        )

    def changes(self) -> list[dict[str, Any]]:
        """The warnings started and ended since the last call, as ``event`` bodies."""
        with self._lock:
            out, self._changes = self._changes, []
            return out

    def close(self) -> list[dict[str, Any]]:
        """End every open warning (the stream ended, the bundle changed); with the changes not
        taken yet, as ``event`` bodies."""
        with self._lock:
            for name, d in self._drift.items():
                if d.warning:
                    d.warning = False
                    self._note("input_drift", name, "end", d.value or 0.0, 0.0, "stream end")
            for name, h in self._quality.items():
                if h.warning:
                    h.warning = False
                    flag = self._last.get(name)
                    self._note(
                        "signal_quality",
                        name,
                        "end",
                        flag.value if flag else 0.0,
                        0.0,
                        "stream end",
                    )
            out, self._changes = self._changes, []
            return out

    def snapshot(self) -> dict[str, Any]:
        """The ``inputs`` section of the telemetry (two levels inside it)."""
        with self._lock:
            state = {n: ("warning" if d.warning else "ok") for n, d in self._drift.items()}
            state.update({n: h.state for n, h in self._quality.items()})
            out: dict[str, Any] = {
                "window": self.settings.window,
                "every": self.settings.every,
                "samples": self.samples,
                "in_window": len(self._ring),
                "skipped": self.skipped,
                "psi": {
                    n: None if d.value is None else rounded(d.value) for n, d in self._drift.items()
                },
                "state": state,
                "bad": {n: h.bad for n, h in self._quality.items()},
                "warnings": {
                    **{n: d.started for n, d in self._drift.items()},
                    **{n: h.started for n, h in self._quality.items()},
                },
                "warning": sum(1 for v in state.values() if v == "warning"),
            }
            if self._classes.sum() > 0:
                shares = self._classes / self._classes.sum()
                out["classes"] = {
                    lab: rounded(v) for lab, v in zip(self.labels, shares, strict=True)
                }
            return out


class WatchInputs:
    """Stage: each decoded sample into its bundle's :class:`DriftMonitor` (one per bundle; a
    bundle without a reference is not watched); the warnings it starts and ends go out with
    the sample's messages as ``event`` bodies. When the bundle changes, and at the end of the
    stream, the old monitor's open warnings end (at the end, straight into ``emit``)."""

    def __init__(
        self,
        emit: Emit,
        settings: DriftSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit, self.settings = emit, settings
        self.monitor: DriftMonitor | None = None
        self._bundle = ""  # the watched bundle's id, for the messages of its monitor
        hz = (settings or DriftSettings()).max_hz
        self._period, self._clock, self._next = (1.0 / hz if hz else 0.0), clock, 0.0
        self.unwatched = 0  # samples passed over by max_hz
        self.not_watched: str | None = None  # why the running bundle's inputs are not watched

    def _due(self) -> bool:
        """Whether this sample is watched (at most max_hz a second)."""
        if not self._period:
            return True
        now = self._clock()
        if now < self._next:
            self.unwatched += 1
            return False
        self._next = max(self._next + self._period, now)
        return True

    def snapshot(self) -> dict[str, Any] | None:
        """The current monitor's telemetry section; ``{"watched": false, "why"}`` when the
        running bundle cannot be watched; None before the first sample."""
        monitor = self.monitor
        if monitor is None:
            return None if self.not_watched is None else {"watched": False, "why": self.not_watched}
        snap = monitor.snapshot()
        return {**snap, "unwatched": self.unwatched} if self.unwatched else snap

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        watched: object = None
        try:
            for w in works:
                bundle = w.model.bundle
                if bundle is not watched:
                    ended = self.monitor.close() if self.monitor is not None else []
                    w.messages += [("event", self._tagged(b, w)) for b in ended]
                    self.monitor = DriftMonitor.for_manifest(bundle.manifest, self.settings)
                    watched, self._bundle = bundle, bundle.id
                    self._say_if_unwatched(bundle.id)
                if self.monitor is not None and w.rejected is None and self._due():
                    scores = getattr(w.decoded, "scores", None)
                    self.monitor.observe(w.sample.data, scores)
                    w.messages += [("event", self._tagged(b, w)) for b in self.monitor.changes()]
                yield w
        finally:
            if self.monitor is not None:
                for body in self.monitor.close():
                    self.emit("event", self._tagged(body, None))

    def _say_if_unwatched(self, bundle: str) -> None:
        """One warning line per bundle whose inputs cannot be watched, and why (telemetry
        ``inputs`` says it too, so the dashboard shows it)."""
        if self.monitor is not None:
            self.not_watched = None
            return
        self.not_watched = (
            f"bundle {bundle} has no reference summary of its calibration data (converted "
            "before manifest 1.4): its inputs are not watched for drift or signal quality; "
            "convert it again"
        )
        log.warning("%s", self.not_watched)

    def _tagged(self, body: dict[str, Any], w: Work | None) -> dict[str, Any]:
        """An event body with the bundle whose monitor made it, and the sample that did."""
        if w is None:
            return {**body, "bundle": self._bundle}
        return {**body, "input": w.sample.id, "start": w.sample.time, "bundle": self._bundle}
