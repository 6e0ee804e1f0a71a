"""Decoding model outputs into results: plain functions over real-valued outputs.

``classification``: class scores and the predicted class. ``segmentation``: a mask from the
per-pixel output and what a clinician reads off it (area, bounding box, components, the largest
contour as a short polygon), never the frame. ``image_to_image``: output statistics and a small
PNG thumbnail. OpenCV is used for components and contours when it is installed; a numpy
fallback gives the same fields without it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.bundle import Decode
from edge_agent.mask import components, cv2_or_none, trace_contour
from edge_agent.measure import fit_ellipse
from edge_agent.png import encode_png, thumbnail

__all__ = [
    "MAX_POLYGON",
    "Classification",
    "Decoded",
    "ImageResult",
    "Segmentation",
    "class_scores",
    "classify",
    "components",
    "dice",
    "foreground",
    "image_stats",
    "segment",
    "simplify_polygon",
    "trace_contour",
]

MAX_POLYGON = 32
"""At most this many vertices in a segmentation result's contour."""


@dataclass(frozen=True)
class Classification:
    pred: int
    pred_label: str
    scores: list[float]


@dataclass(frozen=True)
class Segmentation:
    """What a mask says, in pixels of the model's output: bbox is [x0, y0, x1, y1] inclusive."""

    pred: int
    pred_label: str
    area_px: int
    area_frac: float
    bbox: list[int] | None
    components: int
    contour: list[list[int]]
    size: list[int]  # [height, width] of the mask
    class_px: dict[str, int] = field(default_factory=dict)
    # the ellipse fitted to the largest component's outline (measure.fit_ellipse): centre,
    # full axes, angle in pixels of the mask; None when there is none to fit
    ellipse: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        return {
            "area_px": self.area_px,
            "area_frac": round(self.area_frac, 6),
            "bbox": self.bbox,
            "components": self.components,
            "contour": self.contour,
            "size": self.size,
            "class_px": self.class_px,
            "ellipse": self.ellipse,
        }


@dataclass(frozen=True)
class ImageResult:
    """An image-to-image output, summarised: statistics and a small PNG of it."""

    pred: int
    pred_label: str
    min: float
    max: float
    mean: float
    size: list[int]
    png: bytes

    def body(self) -> dict[str, Any]:
        return {
            "min": round(self.min, 6),
            "max": round(self.max, 6),
            "mean": round(self.mean, 6),
            "size": self.size,
            "png": base64.b64encode(self.png).decode("ascii"),
        }


Decoded = Classification | Segmentation | ImageResult


def class_scores(raw: np.ndarray, activation: str) -> np.ndarray:
    """Per-class probabilities from one real-valued output row."""
    z = np.asarray(raw, dtype=np.float64).reshape(-1)
    if z.size == 1:  # one sigmoid unit: probability of class 1
        p = z[0] if activation != "none" else 1.0 / (1.0 + np.exp(-z[0]))
        return np.array([1.0 - p, p])
    if activation == "none":
        e = np.exp(z - z.max())
        return e / e.sum()
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


def _probabilities(out: np.ndarray, activation: str) -> np.ndarray:
    """(H, W, K) per-pixel probabilities from a (1, H, W, K), (H, W, K) or (H, W) output."""
    a = np.asarray(out, dtype=np.float32)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"segmentation output of shape {out.shape} is not (1, H, W, K)")
    if activation == "none":  # logits
        if a.shape[-1] == 1:
            return 1.0 / (1.0 + np.exp(-a))
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return a


def simplify_polygon(points: list[list[int]], max_points: int = MAX_POLYGON) -> list[list[int]]:
    """Douglas-Peucker on a closed polygon, with a tolerance raised until it has at most
    ``max_points`` vertices."""
    if len(points) <= 3:
        return points
    pts = np.asarray(points, dtype=np.float64)
    span = float(np.ptp(pts, axis=0).max()) or 1.0
    eps = 0.01 * span
    while True:
        keep = _dp_closed(pts, eps)
        if len(keep) <= max_points:
            return [points[i] for i in keep]
        eps *= 1.5


def _dp_closed(pts: np.ndarray, eps: float) -> list[int]:
    far = int(np.argmax(((pts - pts[0]) ** 2).sum(axis=1)))
    keep = {0, far}
    for a, b in ((0, far), (far, len(pts))):
        stack = [(a, b)]
        while stack:
            i, j = stack.pop()
            if j - i < 2:
                continue
            p0, p1 = pts[i], pts[j % len(pts)]
            seg = p1 - p0
            inner = pts[i + 1 : j]
            norm = float(np.hypot(*seg))
            if norm == 0:
                dist = np.hypot(*(inner - p0).T)
            else:
                dist = np.abs(seg[0] * (inner[:, 1] - p0[1]) - seg[1] * (inner[:, 0] - p0[0]))
                dist = dist / norm
            k = int(np.argmax(dist))
            if dist[k] > eps:
                keep.add(i + 1 + k)
                stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return sorted(keep)


def _largest_contour(lab: np.ndarray, n: int) -> list[list[int]]:
    if n == 0:
        return []
    largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    blob = lab == largest
    cv2 = cv2_or_none()
    if cv2 is not None:
        found, _ = cv2.findContours(blob.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        c = max(found, key=len)
        if len(c) <= 3:
            return [[int(x), int(y)] for x, y in c.reshape(-1, 2)]
        eps = 0.01 * float(np.ptp(c.reshape(-1, 2), axis=0).max() or 1)
        while len(poly := cv2.approxPolyDP(c, eps, True)) > MAX_POLYGON:
            eps *= 1.5  # the same tolerance rule as simplify_polygon
        return [[int(x), int(y)] for x, y in poly.reshape(-1, 2)]
    return simplify_polygon(trace_contour(blob))


def _foreground(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: one channel, its probability >= threshold; K channels, the most probable
    class is not the first (background) and its probability >= threshold."""
    if prob.shape[-1] == 1:
        return np.asarray(prob[..., 0] >= threshold)
    return np.asarray((prob.argmax(axis=-1) > 0) & (prob.max(axis=-1) >= threshold))


def foreground(out: np.ndarray, spec: Decode) -> np.ndarray:
    """The (H, W) bool mask a segmentation output decodes to (as :func:`segment` finds it)."""
    return _foreground(_probabilities(out, spec.activation), spec.mask_threshold)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two bool masks of one shape; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def segment(out: np.ndarray, spec: Decode, labels: list[str]) -> Segmentation:
    """A segmentation output -> mask -> its area, bbox, components and largest contour.

    One channel: foreground where the probability >= ``mask_threshold``. K channels: where the
    most probable class is not the first (background) and its probability >= the threshold.
    """
    prob = _probabilities(out, spec.activation)
    h, w, k = prob.shape
    class_px: dict[str, int] = {}
    mask = _foreground(prob, spec.mask_threshold)
    if k > 1:
        best = prob.argmax(axis=-1)
        counts = np.bincount(best[mask].ravel(), minlength=k)
        class_px = {labels[i] if i < len(labels) else str(i): int(counts[i]) for i in range(1, k)}
    area = int(mask.sum())
    bbox = None
    if area:
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    lab, n = components(mask)
    if k == 1:
        pred = 1 if area else 0
    else:
        pred = int(np.argmax([0, *list(class_px.values())])) if area else 0
    pred_label = labels[pred] if pred < len(labels) else str(pred)
    return Segmentation(
        pred=pred,
        pred_label=pred_label,
        area_px=area,
        area_frac=area / float(h * w),
        bbox=bbox,
        components=n,
        contour=_largest_contour(lab, n),
        size=[h, w],
        class_px=class_px,
        ellipse=_ellipse(mask, area),
    )


def _ellipse(mask: np.ndarray, area: int) -> dict[str, Any] | None:
    fitted = fit_ellipse(mask) if area else None
    return fitted.body() if fitted is not None else None


def image_stats(out: np.ndarray, labels: list[str], max_side: int = 64) -> ImageResult:
    """An image-to-image output: min/max/mean and a PNG thumbnail (min..max mapped to 0..255,
    at most ``max_side`` pixels a side)."""
    a = np.asarray(out, dtype=np.float32)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] not in (1, 3):
        a = a[..., 0]
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    img = thumbnail(scaled, max_side)
    return ImageResult(
        pred=0,
        pred_label=labels[0],
        min=lo,
        max=hi,
        mean=float(a.mean()),
        size=[int(a.shape[0]), int(a.shape[1])],
        png=encode_png(img),
    )
