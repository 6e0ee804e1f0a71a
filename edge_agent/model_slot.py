"""The model the pipeline runs, swapped between two samples: a new bundle's model goes on
probation, and one that fails is rolled back. The updater (``edge_agent.update``) offers
models to the :class:`ModelSlot`; the pipeline's :class:`Probation` stage takes each sample's
model from it. See docs/device.md.

After the swap the new model is on probation for its first ``rollback_within`` samples: the
stage runs it end to end on each one (:func:`probe`: preprocess, infer, decode, finite scores
of the right width: the self-test's checks, on live input), so a run-time failure rejects that
one sample (counted with the preprocess rejections, one log line) instead of ending the stream.
``rollback_failures`` such failures swap the previous model back in between two samples and
report ``{"update": "rolled_back", "bundle": bad, "running": previous, "reason": ...}``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.errors import MedgeError
from edge_agent.graph import Work, reject
from edge_agent.model import LoadedModel, Model
from edge_agent.sources.base import Sample
from edge_agent.telemetry import PipelineStats

__all__ = ["ModelSlot", "Probation", "ProbationError", "check_scores", "probe"]

_RECENT = 4  # inputs kept for the self-test of the next bundle


class ProbationError(MedgeError):
    """A model on probation failed on a live sample (the sample is rejected and counted).
    ``why``: the failure as the rollback's reason tells it (``infer: ...``)."""

    def __init__(self, message: str, why: str | None = None) -> None:
        super().__init__(message)
        self.why = why if why is not None else message


class ModelSlot:
    """The model the pipeline runs; a new one is swapped in (or rolled back) only in
    :meth:`select`, between two samples, so no sample sees two models."""

    def __init__(
        self,
        model: LoadedModel,
        on_swap: Callable[[LoadedModel, LoadedModel], None],
        on_rollback: Callable[[LoadedModel, LoadedModel, str], None] | None = None,
        rollback_failures: int = 3,
        rollback_within: int = 50,
    ) -> None:
        """``on_rollback(bad, restored, reason)``: called between two samples after the swap
        back; ``rollback_failures`` failures among the first ``rollback_within`` samples
        after a swap trigger it."""
        self.current = model
        self.previous: LoadedModel | None = None  # kept while the current one is on probation
        self._on_swap, self._on_rollback = on_swap, on_rollback
        self.rollback_failures, self.rollback_within = rollback_failures, rollback_within
        self.failures: list[str] = []  # of the model on probation
        self._seen = 0
        self._pending: LoadedModel | None = None
        self._pending_reason: str | None = None  # set: the offer is a commanded rollback
        self._lock = threading.Lock()
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=_RECENT)

    @property
    def bundle(self) -> Bundle:
        return self.current.bundle

    @property
    def on_probation(self) -> bool:
        return self.previous is not None

    def fail(self, why: str) -> None:
        """A failure of the model on probation (the pipeline says it in its one line)."""
        self.failures.append(why)

    def recent(self) -> list[np.ndarray]:
        with self._lock:
            return list(self._recent)

    def offer(self, model: LoadedModel, rollback: str | None = None) -> None:
        """Swap ``model`` in before the next sample; with ``rollback`` (its reason) the swap is
        a rollback the gateway commanded: reported as one, and not on probation."""
        with self._lock:
            self._pending, self._pending_reason = model, rollback

    def select(self, sample: Sample) -> LoadedModel:
        """The model ``sample`` runs on: a rollback or a swap happens here, before it."""
        with self._lock:
            new, self._pending = self._pending, None
            commanded, self._pending_reason = self._pending_reason, None
            self._recent.append(sample.data)
        if new is not None and commanded is not None:  # back to a known bundle, no probation
            bad, self.current, self.previous = self.current, new, None
            self.failures, self._seen = [], 0
            if self._on_rollback is not None:
                self._on_rollback(bad, new, commanded)
            return self.current
        if self.previous is not None and len(self.failures) >= self.rollback_failures:
            bad, self.current, self.previous = self.current, self.previous, None
            reason = (
                f"{len(self.failures)} run-time failures in the first {self._seen} samples "
                f"after the swap; last: {self.failures[-1]}"
            )
            if self._on_rollback is not None:
                self._on_rollback(bad, self.current, reason)
        if new is not None:
            old, self.current = self.current, new
            if self.previous is None:  # else keep the last confirmed one to go back to
                self.previous = old
            self.failures, self._seen = [], 0
            self._on_swap(old, new)
        if self.previous is not None:
            if self._seen >= self.rollback_within:
                self.previous = None  # confirmed: the old model can go
            else:
                self._seen += 1
        return self.current

    def samples(self, stream: Iterable[Sample]) -> Iterator[Sample]:
        """``stream``, with :meth:`select` before each sample."""
        for sample in stream:
            self.select(sample)
            yield sample


class Probation:
    """Stage: binds each sample to the slot's model and, while that model is on probation,
    runs it end to end on the sample (:func:`probe`); a failure rejects the sample, counted
    with the preprocess rejections, and counts towards the rollback."""

    def __init__(self, slot: ModelSlot, stats: PipelineStats) -> None:
        self.slot, self.stats = slot, stats

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Work]:
        for sample in samples:
            model = self.slot.select(sample)
            w = Work(sample, model)
            if self.slot.on_probation:
                t0 = time.perf_counter()
                try:
                    w.x, w.y = probe(model, sample.data)
                except ProbationError as exc:
                    self.slot.fail(exc.why)
                    reject(w, "preprocess", self.stats, exc)
                w.took("preprocess", time.perf_counter() - t0)
            yield w


def probe(model: Model, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` end to end on one sample with the self-test's checks: (input tensor, first
    output row), or :class:`ProbationError` (any run-time failure of the model counts)."""
    try:
        x = model.prepare(sample)
    except (MedgeError, ValueError) as exc:
        raise ProbationError(str(exc), f"preprocess: {exc}") from exc
    try:
        y = model.infer(x)
        check_scores(model.decode(y), len(model.bundle.manifest.labels))
    except Exception as exc:  # any run-time failure of the new model counts
        why = _first_line(exc)
        raise ProbationError(
            f"bundle {model.bundle.id} (on probation): {why}", f"infer: {why}"
        ) from exc
    return x, y


def check_scores(c: Any, n_labels: int) -> None:
    """What the self-test and probation check of one output: as many scores as labels, all
    finite; ValueError says what is wrong."""
    scores = getattr(c, "scores", None)
    if scores is None:  # not a classification: nothing more to check here
        return
    if len(scores) != n_labels or not 0 <= c.pred < n_labels:
        raise ValueError(f"{len(scores)} scores for {n_labels} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("non-finite scores")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
