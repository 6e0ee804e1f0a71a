"""The pipeline, as one graph: source -> preprocess -> infer -> decode -> events -> outbox.

Stages never call their neighbours; this function moves data forward and times each stage.
A sample that a stage rejects is reported in one line, counted, and the stream goes on.
Windowing happens at the source (``edge_agent.sources.open_source``); events come from the
manifest's ``decode.events`` (``edge_agent.events``), timed by the samples' own times.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from edge_agent.cam import cam_body
from edge_agent.decode import Classification, Decoded, ImageResult, Segmentation
from edge_agent.errors import MedgeError
from edge_agent.events import EventTracker
from edge_agent.model import LoadedModel
from edge_agent.sources.base import Sample
from edge_agent.telemetry import PipelineStats

__all__ = ["result_body", "run_pipeline"]

log = logging.getLogger("medge.agent.pipeline")

Emit = Callable[[str, dict[str, Any]], None]


def run_pipeline(
    samples: Iterable[Sample],
    model: LoadedModel,
    emit: Emit,
    stats: PipelineStats,
    cam: bool = True,
) -> None:
    """Run every sample through ``model`` and ``emit`` each result (and each event).

    ``model`` may be a slot (``edge_agent.update.ModelSlot``) whose model changes between
    samples (a bundle update): open events of the old model are then closed. ``cam``: add the
    class activation heatmap to results when the bundle has one.
    """
    clock = time.perf_counter
    tracker: EventTracker | None = None
    tracked: object = None
    try:
        for sample in samples:
            bundle = model.bundle  # a slot's current model: swapped only between samples
            if bundle is not tracked:
                _close(tracker, emit)
                tracker, tracked = _tracker(model), bundle
            t0 = clock()
            try:
                x = model.prepare(sample.data)  # preprocess
            except (MedgeError, ValueError) as exc:
                n = stats.error("preprocess")
                log.warning("sample %s rejected by preprocess (%d so far): %s", sample.id, n, exc)
                continue
            t1 = clock()
            spec = bundle.manifest.cam if cam else None
            try:  # infer: a runtime that fails on one input loses that sample, not the stream
                outputs = model.infer_outputs(x) if spec is not None else None
                y = outputs[0].reshape(-1) if outputs is not None else model.infer(x)
            except (MedgeError, ValueError, RuntimeError) as exc:
                n = stats.error("infer")
                log.warning("sample %s: inference failed (%d so far): %s", sample.id, n, exc)
                continue
            t2 = clock()
            try:
                c = model.decode(y)  # decode
            except (MedgeError, ValueError) as exc:
                n = stats.error("decode")
                log.warning("sample %s: output not decoded (%d so far): %s", sample.id, n, exc)
                continue
            extra: dict[str, Any] = {}
            if outputs is not None and spec is not None:
                heat = outputs[spec.output]
                extra["cam"] = cam_body(heat, c.pred, c.pred_label, spec.upsample_to)
            t3 = clock()
            latency = {"preprocess": t1 - t0, "infer": t2 - t1, "decode": t3 - t2, "total": t3 - t0}
            body = result_body(sample, c.pred, c.pred_label, _scores(c), model, latency)
            body.update(_task_fields(c), **extra)
            emit("result", body)
            if tracker is not None and isinstance(c, Classification):
                at = sample.time if sample.time is not None else time.time()
                for event in tracker.update(at, c.scores, sample.id):
                    emit("event", event)
            stats.record(**latency)
    finally:
        _close(tracker, emit)


def _tracker(model: LoadedModel) -> EventTracker | None:
    m = model.bundle.manifest
    if m.task != "classification" or not m.decode.events:
        return None
    return EventTracker(m.decode.events, m.labels)


def _close(tracker: EventTracker | None, emit: Emit) -> None:
    if tracker is None:
        return
    for event in tracker.finish():
        emit("event", event)
    if tracker.suppressed:
        log.info("events suppressed by their refractory time: %s", tracker.suppressed)


def _scores(c: Decoded) -> list[float]:
    return c.scores if isinstance(c, Classification) else []


def _task_fields(c: Decoded) -> dict[str, Any]:
    if isinstance(c, Segmentation):
        return {"mask": c.body()}
    if isinstance(c, ImageResult):
        return {"image": c.body()}
    return {}


def result_body(
    sample: Sample,
    pred: int,
    pred_label: str,
    scores: list[float],
    model: LoadedModel,
    latency: dict[str, float],
) -> dict[str, Any]:
    labels = model.bundle.manifest.labels
    truth = sample.label if sample.label is not None and 0 <= sample.label < len(labels) else None
    return {
        "input": sample.id,
        # audit: which exact input produced this result (never the input itself)
        "input_sha256": hashlib.sha256(np.ascontiguousarray(sample.data).tobytes()).hexdigest(),
        "sample_time": sample.time,  # the source's time: recorded for a replay
        "pred": pred,
        "pred_label": pred_label,
        "scores": [round(s, 6) for s in scores],
        "label": truth,
        "label_name": labels[truth] if truth is not None else None,
        "latency_ms": round(latency["total"] * 1000.0, 3),
        "bundle": model.bundle.id,
    }
