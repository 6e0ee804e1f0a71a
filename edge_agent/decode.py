"""Decoding model outputs into results: plain functions over real-valued scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import Decode

__all__ = ["Classification", "class_scores", "classify"]


@dataclass(frozen=True)
class Classification:
    pred: int
    pred_label: str
    scores: list[float]


def class_scores(raw: np.ndarray, activation: str) -> np.ndarray:
    """Per-class probabilities from one real-valued output row."""
    z = np.asarray(raw, dtype=np.float64).reshape(-1)
    if z.size == 1:  # one sigmoid unit: probability of class 1
        p = z[0] if activation != "none" else 1.0 / (1.0 + np.exp(-z[0]))
        return np.array([1.0 - p, p])
    if activation == "none":
        e = np.exp(z - z.max())
        return e / e.sum()
    if activation == "sigmoid":
        return z
    return z


def classify(
    raw: np.ndarray, spec: Decode, labels: list[str], positive: int | None
) -> Classification:
    """Scores and the predicted class, honouring a binary threshold on the positive class."""
    scores = class_scores(raw, spec.activation)
    if spec.threshold is not None and positive is not None and scores.size == 2:
        pred = positive if scores[positive] >= spec.threshold else 1 - positive
    else:
        pred = int(np.argmax(scores))
    return Classification(pred=pred, pred_label=labels[pred], scores=[float(s) for s in scores])
