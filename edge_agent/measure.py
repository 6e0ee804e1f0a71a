"""Measurements read off a segmentation mask: plain numpy functions (OpenCV when installed).

Head circumference (HC18): an ellipse fitted to the outline of the mask's largest component,
its perimeter by Ramanujan's second approximation, times the pixel size in millimetres. The
outline runs through the centres of the mask's edge pixels (HC18's masks are the annotated
outline filled, outline included: its reference masks give the published HC within 0.4 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.mask import components, cv2_or_none, trace_contour

__all__ = ["Ellipse", "ellipse_perimeter", "fit_ellipse", "head_circumference_mm"]


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in pixels of the mask: centre (x right, y down), full axis lengths (major >=
    minor) and the major axis' angle in degrees from the x axis towards y, in [0, 180)."""

    cx: float
    cy: float
    major: float
    minor: float
    angle: float

    @property
    def perimeter(self) -> float:
        return ellipse_perimeter(self.major / 2, self.minor / 2)

    def body(self) -> dict[str, Any]:
        return {
            "center": [round(self.cx, 2), round(self.cy, 2)],
            "axes": [round(self.major, 2), round(self.minor, 2)],
            "angle": round(self.angle, 2),
        }


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation of the perimeter of an ellipse with semi-axes a, b
    (relative error below 1e-9 up to an axis ratio of 3; exact for a circle)."""
    a, b = abs(float(a)), abs(float(b))
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def _outline(mask: np.ndarray) -> np.ndarray | None:
    """[x, y] centres of the outer edge pixels of the largest 8-connected component."""
    lab, n = components(mask)
    if n == 0:
        return None
    blob = lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    cv2 = cv2_or_none()
    if cv2 is not None:
        found, _ = cv2.findContours(blob.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        return np.asarray(max(found, key=len), dtype=np.float64).reshape(-1, 2)
    return np.asarray(trace_contour(blob), dtype=np.float64).reshape(-1, 2)


def _fit_numpy(pts: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """Direct least-squares ellipse fit (Fitzgibbon, in Halir and Flusser's stable form):
    (cx, cy, major, minor, angle in degrees), None when the points fit no ellipse."""
    mean = pts.mean(0)
    x, y = (pts - mean).T
    d1 = np.stack([x * x, x * y, y * y], 1)
    d2 = np.stack([x, y, np.ones_like(x)], 1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
        m = s1 + s2 @ t
        m = np.array([m[2] / 2, -m[1], m[0] / 2])
        _, vecs = np.linalg.eig(m)
    except np.linalg.LinAlgError:
        return None
    vecs = np.real(vecs)
    ok = 4 * vecs[0] * vecs[2] - vecs[1] ** 2 > 0
    if not ok.any():
        return None
    a1 = vecs[:, int(np.argmax(ok))]
    a_, b_, c_ = a1
    d_, e_, f_ = t @ a1
    den = b_ * b_ - 4 * a_ * c_
    cx = (2 * c_ * d_ - b_ * e_) / den
    cy = (2 * a_ * e_ - b_ * d_) / den
    f0 = a_ * cx * cx + b_ * cx * cy + c_ * cy * cy + d_ * cx + e_ * cy + f_  # value at centre
    lam, rot = np.linalg.eigh(np.array([[a_, b_ / 2], [b_ / 2, c_]]))
    semi = np.sqrt(np.maximum(-f0 / lam, 0.0))
    k = int(np.argmax(semi))
    angle = math.degrees(math.atan2(rot[1, k], rot[0, k])) % 180.0
    return cx + mean[0], cy + mean[1], 2 * semi[k], 2 * semi[1 - k], angle


def fit_ellipse(mask: np.ndarray) -> Ellipse | None:
    """The ellipse fitted to the outline of the largest component of a boolean (H, W) mask
    (cv2.fitEllipse, or the same least-squares fit in numpy); None when the component has fewer
    than 5 outline points."""
    pts = _outline(np.asarray(mask, dtype=bool))
    if pts is None or len(pts) < 5:
        return None
    cv2 = cv2_or_none()
    if cv2 is not None:
        (cx, cy), (w, h), ang = cv2.fitEllipse(pts.astype(np.float32))
        # OpenCV: w lies along ang, h across it
        major, minor, angle = (w, h, ang) if w >= h else (h, w, ang + 90.0)
        fit = (float(cx), float(cy), float(major), float(minor), float(angle) % 180.0)
    else:
        got = _fit_numpy(pts)
        if got is None:
            return None
        fit = got
    cx, cy, major, minor, angle = fit
    return Ellipse(cx, cy, major, minor, angle)


def head_circumference_mm(mask: np.ndarray, pixel_mm: float) -> float | None:
    """The perimeter of :func:`fit_ellipse` in millimetres (square pixels of ``pixel_mm``);
    None for a mask with no component to fit."""
    e = fit_ellipse(mask)
    return None if e is None else e.perimeter * float(pixel_mm)
