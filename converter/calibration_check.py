"""Calibration pitfalls, found before they silently cost int8 accuracy (workstation only).

Three checks, each warning one line (docs/report.md):

(a) the calibration set is too small, or misses classes when its labels are given;
(b) calibration data unlike the evaluation data: per-channel mean, spread or range shifted, e.g.
    one set scaled 0-255 and the other 0-1;
(c) the model's BatchNormalization statistics do not match the calibration data: each BN
    layer's input is measured on the data and compared with its moving mean/variance (a model
    fine-tuned without updating BN, or fed data normalized differently from training).

(a) and (b) are numpy, here. (c) runs the model with Keras, so it lives in
converter/child/batchnorm.py and runs in a child process (converter.calibrate); this module
keeps its thresholds and :func:`has_batchnorm`, which tells from a .keras file whether to run it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "BN_CHANNEL_FRACTION",
    "BN_SHIFT",
    "BN_VAR_RATIO",
    "MAX_SAMPLES",
    "MIN_CALIBRATION",
    "SHIFT_SMD",
    "SHIFT_SPREAD",
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
MAX_SAMPLES = 1024  # the checks read at most this many samples


def check_calibration(
    calib_x: np.ndarray,
    eval_x: np.ndarray | None,
    calib_y: np.ndarray | None = None,
    n_classes: int | None = None,
) -> list[str]:
    """Every calibration pitfall found, one line each; empty when none.

    ``calib_x``/``eval_x`` are model inputs (after the bundle's preprocessing), one sample per
    row. ``n_classes`` defaults to the classes seen in ``calib_y``. The BatchNormalization
    check is converter.child.batchnorm's.
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
    c, e = _channels(calib_x[:MAX_SAMPLES]), _channels(eval_x[:MAX_SAMPLES])
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
