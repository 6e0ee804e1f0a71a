"""Classification metrics, numpy only. Positive class = the clinically positive finding."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["agreement", "auc", "classification_metrics", "confusion"]


def auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for ``y_true`` in {0, 1} (Mann-Whitney U, ties
    counted as half). None when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray, positive: int | None
) -> dict[str, Any]:
    """Accuracy, and for the positive class: sensitivity, specificity, precision, F1, AUC."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    n_classes = scores.shape[1]
    cm = confusion(y_true, y_pred, n_classes)
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "confusion": cm.tolist(),
    }
    if positive is not None:
        tp = cm[positive, positive]
        fn = cm[positive].sum() - tp
        fp = cm[:, positive].sum() - tp
        tn = cm.sum() - tp - fn - fp
        sens, prec = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        out.update(
            sensitivity=sens,
            specificity=_ratio(tn, tn + fp),
            precision=prec,
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            auc=auc(y_true == positive, scores[:, positive]),
        )
    return out


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of samples on which two models predict the same class."""
    return float(np.mean(np.asarray(pred_a) == np.asarray(pred_b)))
