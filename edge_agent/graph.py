"""The agent's pipeline as a declared graph of operators, wired by :meth:`Graph.add_flow`.

An operator is a callable that takes the stream of its upstream and returns its own stream
(``Iterable[In] -> Iterator[Out]``); the first one is a source (``stream(stop)``). Each yields
one item for each it takes, at once, so a sample goes all the way through before the next one
is read: stages never call their neighbours, and data only moves forward. The edges inside one
thread hold no queue; where two threads meet there is a :class:`~edge_agent.ports.Port`
(a live source's reader and the stream, the pipeline and the outbox's sender).

What flows from the model stage on is a :class:`Work`: the sample, the model it runs on, what
each stage made of it, and the messages to publish. A stage that rejects a sample marks the
work (:func:`reject`: counted, one log line) and passes it on; later stages leave it alone,
so a stage that keeps state per model (events) still sees every sample.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.decode import Decoded
from edge_agent.model import Model
from edge_agent.sources.base import Sample
from edge_agent.telemetry import PipelineStats

__all__ = ["Graph", "Operator", "Work", "reject"]

log = logging.getLogger("medge.agent.pipeline")

Operator = Callable[[Iterable[Any]], Iterator[Any]]

# the one line a rejected sample gets, by the stage that rejected it
_SAID = {
    "preprocess": "sample %s rejected by preprocess (%d so far): %s",
    "infer": "sample %s: inference failed (%d so far): %s",
    "decode": "sample %s: output not decoded (%d so far): %s",
}


@dataclass
class Work:
    """One sample on its way through the model stages."""

    sample: Sample
    model: Model
    x: np.ndarray | None = None  # the input tensor (preprocess)
    y: np.ndarray | None = None  # the first output row (infer)
    outputs: list[np.ndarray] | None = None  # every output, when the CAM is asked for
    decoded: Decoded | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more result fields (the CAM)
    pictured: bool = True  # the result carries the thumbnail and CAM (edge_agent.pictures)
    latency: dict[str, float] = field(default_factory=dict)  # seconds, by stage
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # to publish
    rejected: str | None = None  # the stage that rejected the sample

    def took(self, stage: str, seconds: float) -> None:
        self.latency[stage] = self.latency.get(stage, 0.0) + seconds


def reject(work: Work, stage: str, stats: PipelineStats, exc: BaseException) -> None:
    """Mark ``work`` rejected by ``stage``: counted, told in one line; the stream goes on."""
    work.rejected = stage
    n = stats.error(stage)
    log.warning(
        _SAID.get(stage, "sample %s rejected by " + stage + " (%d so far): %s"),
        work.sample.id,
        n,
        exc,
    )


class Graph:
    """Operators and the flows between them: one chain from a source to a sink."""

    def __init__(self, name: str = "pipeline") -> None:
        self.name = name
        self._next: dict[int, Any] = {}
        self._nodes: dict[int, Any] = {}
        self._has_upstream: set[int] = set()

    def add_flow(self, upstream: Any, downstream: Operator) -> Graph:
        """Wire ``upstream``'s output into ``downstream``'s input."""
        if id(upstream) in self._next:
            raise ValueError(f"{self.name}: {_name(upstream)} already flows somewhere")
        if id(downstream) in self._has_upstream:
            raise ValueError(f"{self.name}: {_name(downstream)} already has an upstream")
        for node in (upstream, downstream):
            self._nodes[id(node)] = node
        self._next[id(upstream)] = downstream
        self._has_upstream.add(id(downstream))
        return self

    def operators(self) -> list[Any]:
        """The nodes in flow order, the source first."""
        roots = [n for k, n in self._nodes.items() if k not in self._has_upstream]
        if len(roots) != 1:
            raise ValueError(f"{self.name}: needs exactly one source, has {len(roots)}")
        chain = [roots[0]]
        while id(chain[-1]) in self._next:
            chain.append(self._next[id(chain[-1])])
        if len(chain) != len(self._nodes):
            raise ValueError(f"{self.name}: not one chain")
        return chain

    def run(self, stop: threading.Event) -> None:
        """Stream the source through every operator until it ends or ``stop`` is set."""
        source, *ops = self.operators()
        items: Iterable[Any] = source.stream(stop) if hasattr(source, "stream") else source
        for op in ops:
            items = op(items)
        for _ in items:  # the sink's output: nothing left to do with it
            pass


def _name(node: Any) -> str:
    return str(getattr(node, "name", None) or type(node).__name__)
