"""Evaluate a bundle on labelled data with the device's own runtime and preprocessing.

The metrics follow the bundle's task: classification (accuracy, sensitivity, specificity,
precision, F1, AUC with 95% intervals), segmentation (Dice, IoU, HD95 of the raw output
thresholded at ``decode.mask_threshold``) and image_to_image (PSNR, SSIM against reference
images). Given annotated recordings (``streams``), a classifier bundle with a ``window`` and
``decode.events`` is also scored on event detection over them (converter.stream_eval).
docs/report.md says what each number means.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converter.data import load_samples, load_targets, require_finite
from converter.errors import ConversionError
from converter.metrics import (
    classification_metrics,
    image_metrics,
    roc_curve,
    segmentation_metrics,
)
from converter.regression import regression_metrics
from converter.scoring import class_scores, foreground, run_artifact, stream_outputs
from converter.stream_eval import cut, load_recording, score_streams
from edge_agent.bundle import Bundle
from edge_agent.model import LoadedModel

__all__ = ["evaluate_bundle", "format_evaluation"]


def evaluate_bundle(
    bundle_dir: str | Path,
    data: str | Path | None,
    split: str | None = None,
    runtime: str = "litert",
    precision: str | None = None,
    roc: bool = False,
    streams: Sequence[str | Path] = (),
    tolerance_s: float = 0.0,
) -> dict[str, Any]:
    """Metrics of one artifact: the first of ``runtime``, or the one of ``precision``.
    ``roc`` adds the ROC curve of the positive class (classification with a positive class);
    ``streams`` adds event detection over those annotated recordings."""
    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    model = LoadedModel(bundle, runtime, precision=precision)
    if data is None and not streams:
        raise ConversionError("nothing to evaluate on: give labelled data, recordings, or both")
    metrics: dict[str, Any] = {}
    if data is None:
        pass
    elif m.task == "classification":
        metrics = _classification(model, data, split, roc)
    else:
        x, y = load_targets(Path(data), split, m.task, option="--split")
        outs = _outputs(model, x)
        if m.task == "regression":
            metrics = regression_metrics(y, outs)
        elif m.task == "segmentation":
            fg = foreground(outs, m.decode.activation)
            if y.size != fg.size:
                raise ConversionError(
                    f"{data}: masks of shape {y.shape[1:]} do not match the model's output "
                    f"{fg.shape[1:]}"
                )
            metrics = segmentation_metrics(y.reshape(fg.shape) != 0, fg, m.decode.mask_threshold)
        else:
            if y.size != outs.size:
                raise ConversionError(
                    f"{data}: reference images of shape {y.shape[1:]} do not match the "
                    f"model's output {outs.shape[1:]}"
                )
            metrics = image_metrics(y, outs.reshape(y.shape))
    art = model.artifact
    variant = f"{art.runtime}-{art.precision}"
    if streams:
        metrics["events"] = _events(model, [Path(p) for p in streams], variant, tolerance_s)
    return {
        "bundle": bundle.id,
        "task": m.task,
        "artifact": variant,
        "data": Path(data).name if data is not None else None,
        "split": split,
        "labels": m.labels,
        "positive_label": m.positive_label,
        **metrics,
    }


def _events(model: LoadedModel, paths: list[Path], variant: str, tolerance_s: float) -> Any:
    """Event detection over recordings, windowed and decoded exactly as the agent does it."""
    m = model.bundle.manifest
    if m.window is None or not m.decode.events:
        raise ConversionError(
            f"bundle '{m.name}' has no window and event rules (convert it with --window and "
            "--event) to find events in a recording"
        )
    streams = [cut(load_recording(p, m.decode.events), m.window) for p in paths]
    for p, s in zip(paths, streams, strict=True):
        require_finite(s.x, p, None, "recording windows")
    art = model.artifact
    if model.feature is not None:  # a chained bundle: the device's own chain, window by window
        outs = [np.stack([model.infer(model.prepare(w)) for w in s.x]) for s in streams]
    else:
        outs = stream_outputs(
            model.bundle.path_of(art),
            art.runtime,
            m.preprocess,
            [s.x for s in streams],
            art.inputs[0].layout,
        )
    return score_streams(
        streams,
        {variant: outs},
        lambda o: _scores(model, o)[0],
        m.decode.events,
        m.labels,
        tolerance_s,
    )


def _outputs(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """The artifact's raw first output of every sample, run as the device runs it."""
    art = model.artifact
    m = model.bundle.manifest
    if model.feature is not None:  # a chained bundle: the device's own chain, per clip
        shape = tuple(art.outputs[0].shape[1:])
        return np.stack([model.infer(model.prepare(c)).reshape(shape) for c in x])
    return run_artifact(
        model.bundle.path_of(art), art.runtime, m.preprocess, x, art.inputs[0].layout
    )[0]


def _scores(model: LoadedModel, outs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = model.bundle.manifest
    return class_scores(outs, m.decode, m.labels, m.positive_index)


def _classification(
    model: LoadedModel, data: str | Path, split: str | None, roc: bool
) -> dict[str, Any]:
    m = model.bundle.manifest
    x, y, _, _ = load_samples(data, split, "evaluation", "--split")
    if y is None:
        raise ConversionError(f"{data}: evaluation needs labels (y or <split>_labels)")
    n = len(m.labels)
    if int(y.max()) >= n:
        raise ConversionError(
            f"{data}: labels run to {int(y.max())} but the bundle has {n} classes"
        )
    scores, pred = _scores(model, _outputs(model, x))
    positive = m.positive_index
    out = classification_metrics(y, scores, pred, positive)
    if roc and positive is not None:
        fpr, tpr = roc_curve(y == positive, scores[:, positive])
        out["roc"] = {"fpr": fpr, "tpr": tpr}
    return out


def format_evaluation(result: dict[str, Any]) -> str:
    """:func:`evaluate_bundle`'s result for a person: one line per value, its 95% interval beside
    it, then one line per class."""
    lines = []
    labels = result.get("labels") or []
    for k, v in result.items():
        if k in ("labels", "confusion", "ci", "per_class", "roc", "events") or k.endswith("_ci"):
            continue
        ci = (result.get("ci") or {}).get(k) or result.get(f"{k}_ci")
        text = f"{v:.4f}" if isinstance(v, float) else "n/a" if v is None else str(v)
        if ci:
            text += f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})"
        lines.append(f"{k:22s} {text}")
    for idx, c in (result.get("per_class") or {}).items():
        name = labels[int(idx)] if int(idx) < len(labels) else f"class {idx}"
        vals = ", ".join(
            f"{m} {c[m]:.4f}" if c[m] is not None else f"{m} n/a"
            for m in ("precision", "recall", "f1")
        )
        lines.append(f"{name:22s} {vals}, support {c['support']}")
    if result.get("confusion"):
        lines.append(f"{'confusion':22s} {result['confusion']} (rows: truth, columns: prediction)")
    events = result.get("events") or {}
    for rule, e in (events.get("variants") or {}).get(result.get("artifact"), {}).items():
        cells = []
        for k in ("sensitivity", "precision", "specificity", "false_alarms_per_hour"):
            ci = e.get(f"{k}_ci")
            cells.append(
                f"{k} {'n/a' if e[k] is None else f'{e[k]:.4f}'}"
                + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            )
        lines.append(
            f"{'event ' + rule:22s} {', '.join(cells)}; "
            f"{e['tp']} found, {e['fn']} missed, {e['fp']} false, "
            f"over {events['hours']:.3f} h"
        )
    return "\n".join(lines)
