"""The pipeline, as one graph: source -> preprocess -> infer -> decode -> outbox.

Stages never call their neighbours; this function moves data forward and times each stage.
A sample that a stage rejects is reported in one line, counted, and the stream goes on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from edge_agent.errors import MedgeError
from edge_agent.model import LoadedModel
from edge_agent.sources.base import Sample
from edge_agent.telemetry import PipelineStats

__all__ = ["result_body", "run_pipeline"]

log = logging.getLogger("medge.agent.pipeline")


def run_pipeline(
    samples: Iterable[Sample],
    model: LoadedModel,
    emit: Callable[[str, dict[str, Any]], None],
    stats: PipelineStats,
) -> None:
    clock = time.perf_counter
    for sample in samples:
        t0 = clock()
        try:
            x = model.prepare(sample.data)  # preprocess
        except (MedgeError, ValueError) as exc:
            n = stats.error("preprocess")
            log.warning("sample %s rejected by preprocess (%d so far): %s", sample.id, n, exc)
            continue
        t1 = clock()
        y = model.infer(x)  # infer
        t2 = clock()
        c = model.decode(y)  # decode
        t3 = clock()
        latency = {"preprocess": t1 - t0, "infer": t2 - t1, "decode": t3 - t2, "total": t3 - t0}
        emit("result", result_body(sample, c.pred, c.pred_label, c.scores, model, latency))
        stats.record(**latency)


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
        "pred": pred,
        "pred_label": pred_label,
        "scores": [round(s, 6) for s in scores],
        "label": truth,
        "label_name": labels[truth] if truth is not None else None,
        "latency_ms": round(latency["total"] * 1000.0, 3),
        "bundle": model.bundle.id,
    }
