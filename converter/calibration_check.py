"""Calibration pitfalls, found before they silently cost int8 accuracy (workstation only).

Three checks, each warning one line (docs/report.md):

(a) the calibration set is too small, or misses classes when its labels are given;
(b) calibration data unlike the evaluation data: per-channel mean, spread or range shifted, e.g.
    one set scaled 0-255 and the other 0-1;
(c) the model's BatchNormalization statistics do not match the calibration data: each BN
    layer's input is measured on the data and compared with its moving mean/variance (a model
    fine-tuned without updating BN, or fed data normalized differently from training).

TensorFlow is imported inside :func:`bn_mismatch` only. ``python -m converter.calibration_check
job.json`` runs the checks in a child process, as the converter runs its TensorFlow work.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BN_CHANNEL_FRACTION",
    "BN_SHIFT",
    "BN_VAR_RATIO",
    "MIN_CALIBRATION",
    "SHIFT_SMD",
    "SHIFT_SPREAD",
    "bn_mismatch",
    "bn_statistics",
    "check_calibration",
    "class_coverage",
    "distribution_shift",
]

MIN_CALIBRATION = 100
SHIFT_SMD = 1.0  # |mean difference| / pooled std above this: the data differ
SHIFT_SPREAD = 4.0  # ratio of (1st..99th percentile) ranges or of stds above this (or below 1/x)
BN_SHIFT = 1.5  # |batch mean - moving mean| / sqrt(moving var): a channel is off above this
BN_VAR_RATIO = 4.0  # batch var / moving var above this (or below 1/x): a channel is off
BN_CHANNEL_FRACTION = 0.25  # a layer is flagged when more than this share of channels is off
_MAX_SAMPLES = 1024


def check_calibration(
    model_path: str | Path | None,
    calib_x: np.ndarray,
    eval_x: np.ndarray | None,
    calib_y: np.ndarray | None = None,
    n_classes: int | None = None,
) -> list[str]:
    """Every calibration pitfall found, one line each; empty when none.

    ``calib_x``/``eval_x`` are model inputs (after the bundle's preprocessing), one sample per
    row. ``model_path`` is a Keras model (.keras/.h5) for the BatchNormalization check; other
    formats, or None, skip it. ``n_classes`` defaults to the classes seen in ``calib_y``.
    """
    calib_x = np.asarray(calib_x)
    warnings = []
    if len(calib_x) < MIN_CALIBRATION:
        warnings.append(
            f"calibration set has only {len(calib_x)} samples (< {MIN_CALIBRATION}); "
            "int8 ranges may not represent the data"
        )
    if calib_y is not None:
        warnings += class_coverage(calib_y, n_classes)
    if eval_x is not None:
        warnings += distribution_shift(calib_x, np.asarray(eval_x))
    if model_path is not None and Path(model_path).suffix.lower() in (".keras", ".h5"):
        warnings += bn_mismatch(model_path, calib_x)
    return warnings


def class_coverage(calib_y: np.ndarray, n_classes: int | None = None) -> list[str]:
    """A warning when the labelled calibration set lacks a class."""
    y = np.asarray(calib_y).reshape(-1).astype(np.int64)
    n = n_classes if n_classes is not None else int(y.max()) + 1 if len(y) else 0
    counts = np.bincount(y[(y >= 0) & (y < n)], minlength=n) if n else np.zeros(0, int)
    missing = [str(c) for c in range(n) if counts[c] == 0]
    if missing:
        return [
            f"calibration set has no samples of class {', '.join(missing)} (of {n} classes); "
            "int8 ranges will not cover what the model does on them"
        ]
    return []


def _channels(x: np.ndarray) -> np.ndarray:
    """(samples*positions, channels): the last axis is the channel when it is short (<= 16)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim >= 3 and x.shape[-1] <= 16:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, 1)


def distribution_shift(calib_x: np.ndarray, eval_x: np.ndarray) -> list[str]:
    """One warning when calibration and evaluation data differ per channel in mean (by more
    than SHIFT_SMD pooled standard deviations), in spread or range (by more than SHIFT_SPREAD
    times either way)."""
    c, e = _channels(calib_x[:_MAX_SAMPLES]), _channels(eval_x[:_MAX_SAMPLES])
    if c.shape[1] != e.shape[1]:
        return [f"calibration data have {c.shape[1]} channels, evaluation data {e.shape[1]}"]
    problems = []
    for ch in range(c.shape[1]):
        a, b = c[:, ch], e[:, ch]
        ma, mb, sa, sb = a.mean(), b.mean(), a.std(), b.std()
        ra = np.percentile(a, 99) - np.percentile(a, 1)
        rb = np.percentile(b, 99) - np.percentile(b, 1)
        pooled = np.sqrt((sa * sa + sb * sb) / 2)
        smd = abs(ma - mb) / pooled if pooled > 0 else (0.0 if ma == mb else np.inf)
        spread = max(_ratio(sa, sb), _ratio(ra, rb))
        if smd > SHIFT_SMD or spread > SHIFT_SPREAD:
            problems.append(
                f"channel {ch}: mean {ma:.4g} vs {mb:.4g}, std {sa:.4g} vs {sb:.4g}, "
                f"range {a.min():.4g}..{a.max():.4g} vs {b.min():.4g}..{b.max():.4g}"
            )
    if not problems:
        return []
    more = f" (and {len(problems) - 3} more channels)" if len(problems) > 3 else ""
    hint = _scaling_hint(c, e)
    return [
        "calibration data are unlike the evaluation data (calibration vs evaluation): "
        + "; ".join(problems[:3])
        + more
        + hint
    ]


def _ratio(a: float, b: float) -> float:
    """max(a/b, b/a); inf when exactly one is zero, 1 when both are."""
    if a == b:
        return 1.0
    if a == 0 or b == 0:
        return float("inf")
    return float(max(a / b, b / a))


def _scaling_hint(c: np.ndarray, e: np.ndarray) -> str:
    big, small = max(np.abs(c).max(), np.abs(e).max()), min(np.abs(c).max(), np.abs(e).max())
    if small > 0 and 100 <= big / small <= 400:
        return "; one looks scaled 0-255 and the other 0-1 (check --preprocess and the files)"
    return ""


def bn_statistics(model_path: str | Path, calib_x: np.ndarray) -> list[dict[str, Any]] | str:
    """Per top-level BatchNormalization layer, how its input on ``calib_x`` compares with its
    moving statistics: ``shift`` (|batch mean - moving mean| / moving std) and ``ratio`` (batch
    variance / moving variance) per channel, and ``off``, the share of channels beyond
    BN_SHIFT or BN_VAR_RATIO (``n_off`` of them). A string says why the check cannot run."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(model_path, compile=False)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return []
    shape = tuple(model.inputs[0].shape[1:])
    x = np.asarray(calib_x[:_MAX_SAMPLES], dtype=np.float32)
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        return (
            f"BatchNormalization check skipped: calibration samples of shape {x.shape[1:]} do "
            f"not fit the model input {shape}"
        )
    probe = keras.Model(model.inputs, [layer.input for layer in bns])
    acts = probe.predict(x.reshape(len(x), *shape), batch_size=64, verbose=0)
    if len(bns) == 1:
        acts = [acts]
    stats = []
    for layer, act in zip(bns, acts, strict=True):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        a = np.moveaxis(np.asarray(act, dtype=np.float64), axis, -1)
        a = a.reshape(-1, a.shape[-1])
        mm = np.asarray(layer.moving_mean, dtype=np.float64)
        mv = np.asarray(layer.moving_variance, dtype=np.float64) + layer.epsilon
        shift = np.abs(a.mean(0) - mm) / np.sqrt(mv)
        ratio = (a.var(0) + layer.epsilon) / mv
        off = (shift > BN_SHIFT) | (ratio > BN_VAR_RATIO) | (ratio < 1 / BN_VAR_RATIO)
        stats.append(
            {
                "layer": layer.name,
                "shift": shift,
                "ratio": ratio,
                "off": float(off.mean()),
                "n_off": int(off.sum()),
            }
        )
    return stats


def bn_mismatch(model_path: str | Path, calib_x: np.ndarray) -> list[str]:
    """One warning when BatchNormalization layers' moving statistics do not match the
    statistics of their input on ``calib_x`` in more than BN_CHANNEL_FRACTION of their
    channels. Layers of the top-level model are checked (not those inside nested sub-models)."""
    stats = bn_statistics(model_path, calib_x)
    if isinstance(stats, str):
        return [stats]
    bad = [
        f"'{s['layer']}' {s['n_off']}/{len(s['shift'])} channels off "
        f"(median mean shift {np.median(s['shift']):.3g} std, median variance ratio "
        f"{np.median(s['ratio']):.3g})"
        for s in stats
        if s["off"] > BN_CHANNEL_FRACTION
    ]
    if not bad:
        return []
    return [
        f"BatchNormalization statistics do not match the calibration data in {len(bad)} of "
        f"{len(stats)} layers: "
        + "; ".join(bad[:3])
        + (" ..." if len(bad) > 3 else "")
        + ": the data are normalized unlike the training data, or BN was not updated after "
        "fine-tuning"
    ]


def has_batchnorm(model_path: str | Path) -> bool | None:
    """Whether a Keras model has BatchNormalization layers, read from the ``.keras`` file's
    config without TensorFlow; None when that cannot be told here (.h5, SavedModel, ...)."""
    path = Path(model_path)
    if path.suffix.lower() != ".keras" or not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as z:
            config = z.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    return '"BatchNormalization"' in config


def main(job_file: str) -> None:
    """Child-process entry: job {model, calib (.npy), eval (.npy or null), calib_y (.npy or
    null), n_classes, out} — or {model, calib, bn_only: true, out} for the BatchNormalization
    check alone; writes the warnings as a JSON list to ``out``."""
    job: dict[str, Any] = json.loads(Path(job_file).read_text())
    if job.get("bn_only"):
        Path(job["out"]).write_text(json.dumps(bn_mismatch(job["model"], np.load(job["calib"]))))
        return

    def load(key: str) -> np.ndarray | None:
        return np.load(job[key]) if job.get(key) else None

    warnings = check_calibration(
        job.get("model"),
        np.load(job["calib"]),
        load("eval"),
        calib_y=load("calib_y"),
        n_classes=job.get("n_classes"),
    )
    Path(job["out"]).write_text(json.dumps(warnings))


if __name__ == "__main__":
    main(sys.argv[1])
