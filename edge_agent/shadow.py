"""A second model run beside the one that publishes, on a share of the same samples, to
measure how far it agrees before anyone relies on it (docs/device.md, "Shadow runs").

Two uses, one mechanism:

- **Shadow mode** of a candidate bundle (the ``shadow-bundle`` command of a rollout): the
  candidate runs on ``share`` of the samples, its results are compared with the current
  model's and never published; telemetry ``shadow`` reports the agreement.
- **The float check** (agent config ``float_check_share``): where the running bundle also
  ships a float artifact, that artifact runs on a small share of samples, so a quantization
  problem that only real inputs show is seen; telemetry ``float_check``.

Both models' predicted labels are compared; for a segmentation model, also their masks:
the Dice overlap of the candidate's mask with the published one, per sample (``dice``: mean,
lowest, how many), since two masks can carry one label and differ in shape.

A :class:`ShadowRun` takes whole samples deterministically (every 1/share-th, by an
accumulator, so 25 % is exactly one sample in four) and keeps within a CPU budget: the
candidate may spend at most ``cpu_budget`` times what the current model spent on inference
since the run began; a sample past it is skipped and counted, never queued. A candidate that
fails on a sample is counted (``failures``, its last reason kept) and the stream goes on.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.decode import dice
from edge_agent.graph import Work
from edge_agent.model import Model

__all__ = ["Compare", "ShadowRun"]

_LATENCIES = 1000  # recent shadow latencies kept for p50/p99
_PAIRS = 64  # distinct "current->candidate" label pairs reported at most


class ShadowRun:
    """One candidate model compared with the publishing one. Thread-safe: the pipeline calls
    :meth:`observe`, the telemetry thread :meth:`snapshot`."""

    def __init__(self, model: Model, share: float, cpu_budget: float, kind: str = "shadow") -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share {share} is not in (0, 1]")
        if not cpu_budget > 0:
            raise ValueError(f"cpu_budget {cpu_budget} is not positive")
        self.model, self.share, self.cpu_budget, self.kind = model, share, cpu_budget, kind
        self.since = time.time()
        self._lock = threading.Lock()
        self._due = 0.0
        self._main_s = 0.0  # the publishing model's inference time since this run began
        self._own_s = 0.0
        self.samples = 0  # compared
        self.agreed = 0
        self.skipped = 0  # taken by the share but over the CPU budget
        self.failures = 0
        self.last_failure: str | None = None
        self._pairs: Counter[str] = Counter()
        self._lat: deque[float] = deque(maxlen=_LATENCIES)
        self._dice: list[float] = []  # [sum, lowest, n] once a mask pair was compared

    @property
    def bundle_id(self) -> str:
        return self.model.bundle.id

    def observe(self, w: Work) -> None:
        """Account ``w``'s inference time; run the candidate on it when its turn comes and
        the budget allows, and compare its prediction with the published one."""
        if w.rejected is not None or w.decoded is None:
            return
        self._main_s += w.latency.get("infer", 0.0)
        self._due += self.share
        if self._due < 1.0:
            return
        self._due -= 1.0
        if self._own_s > self.cpu_budget * self._main_s:
            with self._lock:
                self.skipped += 1
            return
        t0 = time.perf_counter()
        try:
            out = self.model.infer(self.model.prepare(w.sample.data))
            mine = self.model.decode(out)
            overlap = _overlap(w, self.model, out)
        except Exception as exc:  # the candidate's fault, counted; the stream goes on
            with self._lock:
                self.failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"[:200]
            return
        finally:
            took = time.perf_counter() - t0
            self._own_s += took
        self._compare(w.decoded, mine, took, overlap)

    def _compare(self, published: Any, mine: Any, took: float, overlap: float | None) -> None:
        a, b = _label(published), _label(mine)
        with self._lock:
            self.samples += 1
            self._lat.append(took * 1000.0)
            if overlap is not None:
                d = self._dice or [0.0, 1.0, 0.0]
                self._dice = [d[0] + overlap, min(d[1], overlap), d[2] + 1]
            if a == b:
                self.agreed += 1
            else:
                key = f"{a}->{b}"
                if key in self._pairs or len(self._pairs) < _PAIRS:
                    self._pairs[key] += 1

    def snapshot(self) -> dict[str, Any]:
        """The telemetry section: cumulative since the run began."""
        with self._lock:
            lat = np.fromiter(self._lat, float) if self._lat else None
            body: dict[str, Any] = {
                "bundle": self.bundle_id,
                "samples": self.samples,
                "agreement": round(self.agreed / self.samples, 6) if self.samples else None,
                "disagree": dict(self._pairs.most_common()),
                "latency_ms": (
                    {
                        "p50": round(float(np.percentile(lat, 50)), 3),
                        "p99": round(float(np.percentile(lat, 99)), 3),
                    }
                    if lat is not None
                    else {}
                ),
                "skipped": self.skipped,
                "share": self.share,
                "since": round(self.since, 3),
            }
            if self._dice:
                total, lowest, n = self._dice
                body["dice"] = {"mean": round(total / n, 6), "min": round(lowest, 6), "n": int(n)}
            if self.failures:
                body["failures"] = self.failures
                body["last_failure"] = self.last_failure
            return body


def _overlap(w: Work, model: Model, out: Any) -> float | None:
    """Dice of the candidate's mask with the published one, for a segmentation model whose
    mask has the published one's shape; None otherwise (not compared, not counted)."""
    mask_of = getattr(model, "foreground", None)
    published_of = getattr(w.model, "foreground", None)
    if mask_of is None or published_of is None or w.y is None:
        return None
    mine, theirs = mask_of(out), published_of(w.y)
    if mine is None or theirs is None or mine.shape != theirs.shape:
        return None
    return dice(theirs, mine)


def _label(decoded: Any) -> str:
    """What two models must agree on: the predicted label (a class; for a mask, the label its
    decoding gives, as the published result says it)."""
    return str(getattr(decoded, "pred_label", "-"))


class Compare:
    """Stage: each decoded sample also goes to the running shadow runs (a rollout's candidate,
    the float check); their results are only counted. ``runs``: returns the current runs
    (they change while the stream runs)."""

    def __init__(self, runs: Any) -> None:
        self.runs = runs

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            for run in self.runs():
                run.observe(w)
            yield w
