"""Evaluate a bundle on labelled data with the device's own runtime and preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.metrics import classification_metrics
from edge_agent.bundle import Bundle
from edge_agent.model import LoadedModel
from edge_agent.sources.npz import load_labelled

__all__ = ["evaluate_bundle"]


def evaluate_bundle(
    bundle_dir: str | Path,
    data: str | Path,
    split: str | None = None,
    runtime: str = "litert",
    precision: str | None = None,
) -> dict[str, Any]:
    """Metrics of one artifact: the first of ``runtime``, or the one of ``precision``."""
    bundle = Bundle.load(bundle_dir)
    model = LoadedModel(bundle, runtime, precision=precision)
    x, y, _ = load_labelled(data, split)
    if y is None:
        raise ConversionError(f"{data}: evaluation needs labels (y or <split>_labels)")
    n = len(bundle.manifest.labels)
    if int(y.max()) >= n:
        raise ConversionError(
            f"{data}: labels run to {int(y.max())} but the bundle has {n} classes"
        )
    results = [model.predict(s) for s in x]
    scores = np.array([r.scores for r in results])
    pred = np.array([r.pred for r in results])
    metrics = classification_metrics(y, scores, pred, bundle.manifest.positive_index)
    art = model.artifact
    return {
        "bundle": bundle.id,
        "artifact": f"{art.runtime}-{art.precision}",
        "data": Path(data).name,
        "split": split,
        "positive_label": bundle.manifest.positive_label,
        **metrics,
    }
