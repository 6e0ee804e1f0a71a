"""Clinical metrics with 95% intervals, numpy only; positive class = the clinically positive one.

Classification (sensitivity, specificity, precision, F1, AUC, ROC), segmentation (Dice, IoU,
HD95, and the head circumference error where pixel sizes are known), image-to-image (PSNR,
SSIM), events over a recording (sensitivity, precision, false alarms per hour) and the output SNR
of a quantized model. docs/report.md says what each number means and how its interval is
computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_agent.measure import head_circumference_mm

__all__ = [
    "auc",
    "bootstrap_ci",
    "classification_metrics",
    "confusion",
    "distance_to",
    "event_metrics",
    "hc_metrics",
    "hd95",
    "image_metrics",
    "output_snr_db",
    "roc_curve",
    "segmentation_metrics",
    "wilson_ci",
]

Z95 = 1.959963984540054
N_BOOTSTRAP = 500
SEED = 20240607  # fixed: the same data always gives the same interval


def _avg_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``, ties given the mean of the ranks they span."""
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inv.reshape(-1)]


def auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for ``y_true`` in {0, 1} (Mann-Whitney U, ties
    counted as half). None when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    u = _avg_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[list[float], list[float]]:
    """The exact ROC curve: one point per distinct score (tied scores move together, a diagonal
    step), from (0, 0) to (1, 1). Empty lists when only one class is present."""
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return [], []
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr.tolist(), tpr.tolist()


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def wilson_ci(k: float, n: float, z: float = Z95) -> list[float] | None:
    """Wilson score interval of the proportion k/n (95% by default); None when n is 0."""
    if not n:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def bootstrap_ci(
    stat: Callable[[np.ndarray], float | None],
    strata: Sequence[np.ndarray],
    n_boot: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> list[float] | None:
    """Percentile 95% interval of ``stat(indices)`` over resamples that draw, with replacement,
    as many indices from each stratum as it holds (a stratified bootstrap). None when the
    statistic is undefined on the data."""
    strata = [np.asarray(s, dtype=np.int64) for s in strata if len(s)]
    if not strata:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
        v = stat(idx)
        if v is not None and np.isfinite(v):
            vals.append(v)
    if not vals:
        return None
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [float(lo), float(hi)]


def _f1(y: np.ndarray, pred: np.ndarray) -> float | None:
    tp = int(np.sum(y & pred))
    return _ratio(2 * tp, int(y.sum()) + int(pred.sum()))


def _per_class(cm: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    out = {}
    for c in range(len(cm)):
        tp, support, predicted = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        out[str(c)] = {
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, support + predicted),
            "support": support,
        }
    return out


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray, positive: int | None
) -> dict[str, Any]:
    """Accuracy, and for the positive class: sensitivity, specificity, precision, F1, AUC;
    ``ci`` holds their 95% intervals, ``per_class`` precision/recall/F1/support per class."""
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
    ci: dict[str, list[float] | None] = {"accuracy": wilson_ci(np.trace(cm), cm.sum())}
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
        is_pos, said_pos = y_true == positive, y_pred == positive
        strata = [np.flatnonzero(is_pos), np.flatnonzero(~is_pos)]
        score = scores[:, positive]
        ci.update(
            sensitivity=wilson_ci(tp, tp + fn),
            specificity=wilson_ci(tn, tn + fp),
            precision=wilson_ci(tp, tp + fp),
            f1=bootstrap_ci(lambda i: _f1(is_pos[i], said_pos[i]), strata),
            auc=bootstrap_ci(lambda i: auc(is_pos[i], score[i]), strata)
            if out["auc"] is not None
            else None,
        )
    out["ci"] = ci
    out["per_class"] = _per_class(cm)
    return out


# ---- segmentation --------------------------------------------------------------------------


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The mask pixels that touch background (4-neighbours; outside the image counts as it)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def distance_to(points: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Exact Euclidean distance from every pixel to the nearest True pixel of ``points`` (H, W):
    a column pass, then the exact lower envelope along rows (O(H W^2), no scipy needed)."""
    h, w = points.shape
    big = float(h + w) ** 2
    g = np.full((h, w), np.inf)
    run = np.full(w, np.inf)
    for y in range(h):  # distance to the nearest point above or at, per column
        run = np.where(points[y], 0.0, run + 1)
        g[y] = run
    run = np.full(w, np.inf)
    for y in range(h - 1, -1, -1):  # ... or below
        run = np.where(points[y], 0.0, run + 1)
        g[y] = np.minimum(g[y], run)
    g2 = np.minimum(g * g, big)
    dx2 = (np.arange(w)[:, None] - np.arange(w)[None, :]) ** 2.0
    out = np.empty((h, w))
    for y in range(0, h, chunk):
        out[y : y + chunk] = (g2[y : y + chunk, None, :] + dx2[None]).min(-1)
    return np.sqrt(out)


def hd95(mask_a: np.ndarray, mask_b: np.ndarray) -> float | None:
    """95th percentile of the symmetric boundary-to-boundary distances, in pixels (both
    directions pooled, as MedPy computes it). None unless both masks have foreground."""
    ba, bb = _boundary(np.asarray(mask_a, bool)), _boundary(np.asarray(mask_b, bool))
    if not ba.any() or not bb.any():
        return None
    d = np.r_[distance_to(bb)[ba], distance_to(ba)[bb]]
    return float(np.percentile(d, 95))


def _mean_ci(values: np.ndarray) -> tuple[float | None, list[float] | None]:
    if len(values) == 0:
        return None, None
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), bootstrap_ci(lambda i: float(v[i].mean()), [np.arange(len(v))])


def hc_metrics(
    mask_true: np.ndarray, mask_pred: np.ndarray, pixel_mm: np.ndarray, hc_mm: np.ndarray
) -> dict[str, Any]:
    """Head circumference from each predicted mask (edge_agent.measure: an ellipse fitted to the
    largest component, times its pixel size) against the reference ``hc_mm``: the mean absolute
    error in mm over the images where a mask was measured (``hc_n``; ``hc_unmeasured`` counts
    the rest), and ``hc_mae_mm_reference``, the same error of the reference masks' own fit (the
    floor a perfect mask would reach)."""
    px = np.asarray(pixel_mm, dtype=np.float64).reshape(-1)
    ref = np.asarray(hc_mm, dtype=np.float64).reshape(-1)
    if not len(px) == len(ref) == len(mask_pred):
        raise ValueError(f"{len(mask_pred)} masks but {len(px)} pixel sizes and {len(ref)} HCs")

    def errors(masks: np.ndarray) -> np.ndarray:
        got = [head_circumference_mm(m, s) for m, s in zip(masks, px, strict=True)]
        return np.array(
            [np.nan if g is None else abs(g - r) for g, r in zip(got, ref, strict=True)]
        )

    err, floor = errors(mask_pred), errors(mask_true)
    mae, ci = _mean_ci(err[np.isfinite(err)])
    return {
        "hc_mae_mm": mae,
        "hc_mae_mm_ci": ci,
        "hc_mae_mm_reference": _mean_ci(floor[np.isfinite(floor)])[0],
        "hc_n": int(np.isfinite(err).sum()),
        "hc_unmeasured": int((~np.isfinite(err)).sum()),
    }


def segmentation_metrics(
    mask_true: np.ndarray,
    prob: np.ndarray,
    threshold: float = 0.5,
    pixel_mm: np.ndarray | None = None,
    hc_mm: np.ndarray | None = None,
) -> dict[str, Any]:
    """Dice, IoU and HD95 of ``prob >= threshold`` against ``mask_true``, both (N, H, W), and
    with ``pixel_mm`` and ``hc_mm`` (one per image) the head circumference error of
    :func:`hc_metrics`.

    Dice and IoU are per image, then averaged; an image where both masks are empty scores 1.
    HD95 is averaged over the images where both masks have foreground; ``hd95_undefined``
    counts those where exactly one is empty (a miss or a false finding: no distance exists).
    Intervals: percentile bootstrap over images.
    """
    t = np.asarray(mask_true).astype(bool)
    p = np.asarray(prob, dtype=np.float64) >= threshold
    if t.shape != p.shape or t.ndim != 3:
        raise ValueError(f"masks must both be (N, H, W), got {t.shape} and {p.shape}")
    inter = (t & p).sum((1, 2)).astype(np.float64)
    size_t, size_p = t.sum((1, 2)), p.sum((1, 2))
    union = (t | p).sum((1, 2))
    both_empty = (size_t + size_p) == 0
    dice = np.where(both_empty, 1.0, 2 * inter / np.maximum(size_t + size_p, 1))
    iou = np.where(both_empty, 1.0, inter / np.maximum(union, 1))
    dists = [hd95(a, b) for a, b in zip(t, p, strict=True)]
    defined = np.array([d for d in dists if d is not None])
    dice_m, dice_ci = _mean_ci(dice)
    iou_m, iou_ci = _mean_ci(iou)
    hd_m, hd_ci = _mean_ci(defined)
    hc = {} if pixel_mm is None or hc_mm is None else hc_metrics(t, p, pixel_mm, hc_mm)
    return {
        "n": len(t),
        "threshold": threshold,
        "dice": dice_m,
        "dice_ci": dice_ci,
        "iou": iou_m,
        "iou_ci": iou_ci,
        "hd95": hd_m,
        "hd95_ci": hd_ci,
        "hd95_n": len(defined),
        "hd95_undefined": int(np.sum((size_t == 0) != (size_p == 0))),
        **hc,
    }


# ---- image to image ------------------------------------------------------------------------


def _gauss(size: int, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (H, W, C) with the 1-D kernel ``g`` on both axes."""
    k = len(g)
    rows = sum(g[i] * img[i : img.shape[0] - k + 1 + i] for i in range(k))
    return sum(g[i] * rows[:, i : img.shape[1] - k + 1 + i] for i in range(k))


def _ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5 (smaller for small
    images), K1 0.01, K2 0.03, valid region only, averaged over channels."""
    size = min(11, a.shape[0], a.shape[1])
    size -= 1 - size % 2  # odd
    g = _gauss(size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s.mean())


def image_metrics(
    ref: np.ndarray, out: np.ndarray, data_range: float | None = None
) -> dict[str, Any]:
    """PSNR (dB) and SSIM of ``out`` against ``ref``, (N, H, W) or (N, H, W, C), averaged over
    images. ``data_range`` defaults to max - min of the whole reference set. PSNR is inf for an
    image reproduced exactly. Intervals: percentile bootstrap over images."""
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    if r.shape != o.shape or r.ndim not in (3, 4):
        raise ValueError(f"images must both be (N, H, W[, C]), got {r.shape} and {o.shape}")
    if r.ndim == 3:
        r, o = r[..., None], o[..., None]
    rng = float(data_range) if data_range is not None else float(r.max() - r.min())
    if rng <= 0:
        raise ValueError("the reference images are constant: give data_range")
    mse = ((r - o) ** 2).mean((1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10 * np.log10(rng * rng / np.maximum(mse, 1e-300)), np.inf)
    ssim = np.array([_ssim(a, b, rng) for a, b in zip(r, o, strict=True)])
    psnr_m, psnr_ci = _mean_ci(psnr)
    ssim_m, ssim_ci = _mean_ci(ssim)
    return {
        "n": len(r),
        "data_range": rng,
        "psnr": psnr_m,
        "psnr_ci": psnr_ci,
        "ssim": ssim_m,
        "ssim_ci": ssim_ci,
    }


def output_snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2): how far a quantized output is from the float
    one, in dB; inf when identical."""
    r = np.asarray(ref, dtype=np.float64)
    noise = float(((r - np.asarray(test, dtype=np.float64)) ** 2).sum())
    signal = float((r * r).sum())
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


# ---- events over a recording ---------------------------------------------------------------


def event_metrics(
    true_events: Sequence[tuple[float, float]],
    detected: Sequence[tuple[float, float]],
    duration_s: float,
    tolerance_s: float = 0.0,
) -> dict[str, Any]:
    """Event-level sensitivity, precision and false alarms per hour over a recording.

    A detection matches an event when they overlap once the event is widened by ``tolerance_s``
    on both sides; the matching is one-to-one and as large as possible (events in order of their
    end take the earliest-ending free detection that overlaps, which is optimal for intervals).
    A detection that matches nothing is a false alarm, a second detection of the same event too.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    events = sorted(
        ((float(a) - tolerance_s, float(b) + tolerance_s) for a, b in true_events),
        key=lambda e: e[1],
    )
    dets = sorted(((float(a), float(b)) for a, b in detected), key=lambda d: d[1])
    free = [True] * len(dets)
    tp = 0
    for start, end in events:
        for j, (ds, de) in enumerate(dets):
            if free[j] and ds <= end and de >= start:
                free[j] = False
                tp += 1
                break
    fp, fn = len(dets) - tp, len(events) - tp
    return {
        "sensitivity": _ratio(tp, len(events)),
        "precision": _ratio(tp, len(dets)),
        "false_alarms_per_hour": fp / (duration_s / 3600.0),
        "n_true": len(events),
        "n_detected": len(dets),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "sensitivity_ci": wilson_ci(tp, len(events)),
        "precision_ci": wilson_ci(tp, len(dets)),
    }
