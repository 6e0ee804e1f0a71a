"""The model the pipeline runs, swapped between two samples: a new bundle's model goes on
probation, and one that fails is rolled back. The updater (``edge_agent.update``) offers
models; the pipeline only sees a slot that quacks like a LoadedModel. See docs/device.md.

After the swap the new model is on probation for its first ``rollback_within`` samples: each
one runs it end to end inside ``prepare`` (preprocess, infer, decode, finite scores of the
right width: the self-test's checks, on live input), so a run-time failure rejects that one
sample (counted, one log line) instead of ending the stream. ``rollback_failures`` such
failures swap the previous model back in between two samples and report
``{"update": "rolled_back", "bundle": bad, "running": previous, "reason": ...}``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.decode import Classification
from edge_agent.errors import MedgeError
from edge_agent.model import LoadedModel
from edge_agent.sources.base import Sample

__all__ = ["ModelSlot", "ProbationError", "check_scores"]

_RECENT = 4  # inputs kept for the self-test of the next bundle


class ProbationError(MedgeError):
    """A model on probation failed on a live sample (the sample is rejected and counted)."""


class ModelSlot:
    """The model the pipeline runs. It quacks like LoadedModel; a new one is swapped in (or
    rolled back) only in :meth:`samples`, between two samples, so no sample sees two models."""

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
        self._trial: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=_RECENT)

    @property
    def bundle(self) -> Bundle:
        return self.current.bundle

    def __getattr__(self, name: str) -> Any:  # anything else a pipeline asks of the model
        if name.startswith("_") or name == "current":
            raise AttributeError(name)
        return getattr(self.current, name)

    @property
    def on_probation(self) -> bool:
        return self.previous is not None

    def prepare(self, sample: np.ndarray) -> np.ndarray:
        if self.previous is None:
            return self.current.prepare(sample)
        model = self.current  # on probation: the whole model runs here, checked
        try:
            x = model.prepare(sample)
        except (MedgeError, ValueError) as exc:
            self._fail(f"preprocess: {exc}")
            raise
        try:
            y = model.infer(x)
            check_scores(model.decode(y), len(model.bundle.manifest.labels))
        except Exception as exc:  # any run-time failure of the new model counts
            why = _first_line(exc)
            self._fail(f"infer: {why}")
            raise ProbationError(f"bundle {model.bundle.id} (on probation): {why}") from exc
        self._trial = (x, y)
        return x

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        trial, self._trial = self._trial, None
        if trial is not None and trial[0] is tensor:
            return trial[1]  # computed and checked in prepare
        return self.current.infer(tensor)

    def _fail(self, why: str) -> None:
        self.failures.append(why)  # the pipeline says it in its one line per rejected sample

    def decode(self, output: np.ndarray) -> Classification:
        return self.current.decode(output)

    def recent(self) -> list[np.ndarray]:
        with self._lock:
            return list(self._recent)

    def offer(self, model: LoadedModel) -> None:
        with self._lock:
            self._pending = model

    def samples(self, stream: Iterable[Sample]) -> Iterator[Sample]:
        for sample in stream:
            with self._lock:
                new, self._pending = self._pending, None
                self._recent.append(sample.data)
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
            yield sample


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
