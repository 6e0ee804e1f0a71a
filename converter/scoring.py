"""Running an artifact the way the device does, and scoring what it outputs.

One path for every caller (the conversion, the budget search, event detection over recorded
streams, ``medge evaluate``, a wrapped model): :func:`run_artifact` feeds each sample through
the agent's own preprocessing and backend, one at a time on one thread, and returns the
real-valued outputs; :func:`class_scores` decodes a classifier's outputs as the agent decodes
them; :func:`task_metrics` scores outputs against targets; :func:`agreement` says how often two
sets of outputs agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.metrics import classification_metrics, image_metrics, segmentation_metrics
from converter.regression import regression_metrics
from edge_agent.backends import open_backend
from edge_agent.bundle import Decode, Preprocess
from edge_agent.decode import classify
from edge_agent.preprocess import dequantize, normalize, to_input

__all__ = [
    "Scored",
    "agreement",
    "class_scores",
    "foreground",
    "run_artifact",
    "stream_outputs",
    "task_metrics",
]


@dataclass
class Scored:
    """One artifact, evaluated: its metrics, outputs (one row per sample) and latencies."""

    metrics: dict[str, Any]
    outputs: np.ndarray
    latencies: list[float]
    streams: list[np.ndarray] | None = None  # raw outputs of each recording's windows

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies, 50) * 1e3)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1e3)


def run_artifact(
    path: Path,
    runtime: str,
    preprocess: Preprocess | None,
    samples: np.ndarray,
    layout: str | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Every sample through the agent's own preprocessing and backend, one at a time as a
    device runs them (1 thread); the real-valued first output of each, and each latency.
    ``layout``: the manifest layout of the input (``NCHW`` transposes HWC images);
    ``preprocess`` None: the samples are model inputs already (only cast and quantized)."""
    backend = open_backend(runtime, path, 1)
    spec_in, spec_out = backend.inputs[0], backend.outputs[0]
    spec_in = spec_in.model_copy(update={"layout": layout})
    outs, lat = [], []
    for s in samples:
        t = time.perf_counter()
        x = s if preprocess is None else normalize(preprocess, s)
        raw = backend.invoke([to_input(x, spec_in)])[0]
        outs.append(dequantize(raw, spec_out.quantization).reshape(spec_out.shape[1:]))
        lat.append(time.perf_counter() - t)
    return np.stack(outs), lat


def stream_outputs(
    path: Path,
    runtime: str,
    preprocess: Preprocess,
    windows: Sequence[np.ndarray],
    layout: str | None = None,
) -> list[np.ndarray]:
    """One artifact's raw outputs for every recording's windows, as a device computes them."""
    return [run_artifact(path, runtime, preprocess, x, layout)[0] for x in windows]


def class_scores(
    outs: np.ndarray, decode: Decode, labels: list[str], positive: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw classifier outputs (N, ...) decoded as the agent decodes them: class scores
    (N, len(labels)) and predicted classes (N,)."""
    got = [classify(row.reshape(-1), decode, labels, positive) for row in outs]
    return np.array([g.scores for g in got]), np.array([g.pred for g in got])


def foreground(outs: np.ndarray, activation: str) -> np.ndarray:
    """(N, H, W) foreground probability from (N, H, W[, K]) outputs: the one channel, or for K
    classes 1 - p(background, channel 0); logits (activation ``none``) go through a sigmoid or
    softmax first, as the device decodes them."""
    a = np.asarray(outs, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ConversionError(f"segmentation output of shape {a.shape[1:]} is not (H, W[, K])")
    if activation == "none":
        if a.shape[-1] == 1:
            a = 1.0 / (1.0 + np.exp(-a))
        else:
            e = np.exp(a - a.max(-1, keepdims=True))
            a = e / e.sum(-1, keepdims=True)
    return a[..., 0] if a.shape[-1] == 1 else 1.0 - a[..., 0]


def task_metrics(
    task: str,
    outs: np.ndarray,
    y: np.ndarray,
    decode: Decode,
    labels: list[str],
    positive: int | None,
    hc: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The task's metrics of outputs ``outs`` (N, ...) against targets ``y``; ``hc``: each
    sample's (pixel size in mm, reference head circumference in mm) for a segmentation."""
    if task == "classification":
        scores, pred = class_scores(outs, decode, labels, positive)
        return classification_metrics(y, scores, pred, positive)
    if task == "segmentation":
        fg = foreground(outs, decode.activation)
        masks = np.asarray(y).reshape(fg.shape).astype(bool)
        return segmentation_metrics(masks, fg, decode.mask_threshold, *(hc or (None, None)))
    if task == "regression":
        return regression_metrics(y, outs)
    ref = np.asarray(y, dtype=np.float64)
    out = np.asarray(outs, dtype=np.float64).reshape(ref.shape)
    return image_metrics(ref, out)


def agreement(ref: np.ndarray, got: np.ndarray, task: str = "classification") -> float:
    """How often ``got`` agrees with ``ref`` (one row per sample).

    Predicted classes (1-D): the same class. Classifier outputs (N, K): the same top class, or
    for one output the same side of 0.5 (of 0 for logits). Segmentation: the same foreground
    pixels at 0.5 (0 for logits); image_to_image and regression: values within 5% of the
    reference's range."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.ndim == 1 and task == "classification":
        return float(np.mean(ref == got))
    n = len(ref)
    ref, got = ref.reshape(n, -1), got.reshape(n, -1)
    if task == "segmentation":
        cut = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
        return float(np.mean((got >= cut) == (ref >= cut)))
    if task in ("image_to_image", "regression"):
        span = float(ref.max() - ref.min()) or 1.0
        return float(np.mean(np.abs(got - ref) <= 0.05 * span))
    if ref.shape[1] == 1:
        cut = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
        return float(np.mean((got[:, 0] >= cut) == (ref[:, 0] >= cut)))
    return float(np.mean(got.argmax(1) == ref.argmax(1)))
