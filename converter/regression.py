"""Metrics of a regression model (``--task regression``): one real value per output.

Against the reference values: MAE, RMSE (each with a percentile-bootstrap 95% interval),
Pearson r, and Bland-Altman agreement (bias = mean of prediction - reference, limits of
agreement = bias +- 1.96 SD of the differences). Between an artifact and the float model
(:func:`vs_float`): the same Bland-Altman numbers, Pearson r and the largest difference, so a
quantized artifact's agreement with float reads in the units of the measurement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.metrics import bootstrap_ci

__all__ = ["REGRESSION_METRICS", "bland_altman", "pearson_r", "regression_metrics", "vs_float"]

REGRESSION_METRICS = ("mae", "rmse", "pearson_r", "bias", "loa_low", "loa_high")
Z95 = 1.959963984540054


def _pair(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    g = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    if r.shape != g.shape:
        raise ConversionError(
            f"regression outputs of shape {g.shape[1:]} per sample do not match the targets' "
            f"{r.shape[1:]}"
        )
    return r, g


def pearson_r(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two flat arrays; None when either is constant."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    sa, sb = a.std(), b.std()
    if len(a) < 2 or sa == 0 or sb == 0:
        return None
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def bland_altman(ref: np.ndarray, got: np.ndarray) -> dict[str, float | None]:
    """bias (mean of got - ref) and the 95% limits of agreement, bias +- 1.96 SD."""
    d = np.ravel(got).astype(np.float64) - np.ravel(ref).astype(np.float64)
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else None
    return {
        "bias": bias,
        "loa_low": bias - Z95 * sd if sd is not None else None,
        "loa_high": bias + Z95 * sd if sd is not None else None,
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE (95% bootstrap intervals over samples), Pearson r and Bland-Altman of ``pred``
    against the reference ``y``; with several outputs per sample, over every value."""
    ref, got = _pair(y, pred)
    err = got - ref
    idx = [np.arange(len(err))]
    out: dict[str, Any] = {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "pearson_r": pearson_r(ref, got),
        **bland_altman(ref, got),
        "n": len(err),
    }
    out["mae_ci"] = bootstrap_ci(lambda i: float(np.abs(err[i]).mean()), idx)
    out["rmse_ci"] = bootstrap_ci(lambda i: float(np.sqrt((err[i] ** 2).mean())), idx)
    return out


def vs_float(float_outs: np.ndarray, outs: np.ndarray) -> dict[str, float | None]:
    """How an artifact's values agree with the float model's: Bland-Altman, Pearson r and the
    largest absolute difference."""
    ref, got = _pair(float_outs, outs)
    return {
        **bland_altman(ref, got),
        "pearson_r": pearson_r(ref, got),
        "max_abs_diff": float(np.abs(got - ref).max()) if ref.size else None,
    }
