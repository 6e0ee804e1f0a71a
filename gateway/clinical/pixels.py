"""Pixels of the DICOM objects a result becomes (gateway.clinical.dicom_objects): a result's
mask outline filled on the source image's grid, a CAM heatmap in colour over the input
thumbnail, and the PNGs a result carries read back into arrays."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["fill_contour", "heat_overlay", "png_pixels"]


def png_pixels(data: Any) -> np.ndarray:
    """A result's base64 PNG -> uint8 pixels, grey (H, W) or RGB (H, W, 3); ValueError says
    why it is none."""
    from PIL import Image  # highdicom's own dependency

    if not isinstance(data, str):
        raise ValueError("no PNG")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            return np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16") else "RGB"))
    except (ValueError, OSError) as exc:
        raise ValueError(f"not a PNG ({exc})") from exc


def fill_contour(
    contour: Sequence[Sequence[int]], size: Sequence[int], shape: tuple[int, int]
) -> np.ndarray:
    """The polygon ``contour`` ([x, y] vertices at pixel centres of a mask of ``size`` [h, w])
    filled on a grid of ``shape`` (rows, columns), as uint8 0/1. A source pixel is in when its
    centre, mapped into the mask's pixel grid (half-pixel aligned: u = (c + 0.5) w / C - 0.5),
    lies inside the polygon or within half a mask pixel of its outline, which is where the mask
    pixels on the outline reach."""
    h, w = (int(v) for v in size)
    rows, cols = shape
    pts = np.asarray(contour, dtype=np.float64).reshape(-1, 2)
    if h < 1 or w < 1 or len(pts) == 0:
        raise ValueError(f"contour of {len(pts)} points on a {h} x {w} mask")
    u = (np.arange(cols) + 0.5) * (w / cols) - 0.5
    v = (np.arange(rows) + 0.5) * (h / rows) - 0.5
    x, y = np.meshgrid(u, v)
    inside = np.zeros(x.shape, dtype=bool)
    near = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)  # even-odd rule, a ray towards +x
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy or 1.0), 0.0, 1.0)
        near |= (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2 <= 0.25
    return (inside | near).astype(np.uint8)


def _colour(heat: np.ndarray) -> np.ndarray:
    """uint8 heat -> RGB, a 'jet' map: 0 dark blue, 73 cyan, 146 yellow, 255 pure red."""
    t = heat.astype(np.float32) * np.float32(3.5 / 255.0)  # 0..3.5
    rgb = np.stack([np.clip(1.5 - np.abs(t - k), 0, 1) for k in (3.0, 2.0, 1.0)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def heat_overlay(heat: np.ndarray, thumb: np.ndarray | None, side: int = 256) -> np.ndarray:
    """The SC's pixels (RGB uint8): the heatmap in colour, alone or, with the input thumbnail,
    [thumbnail | heatmap blended 50/50 over it], each panel resized (bilinear) to the
    thumbnail's aspect with its longer side ``side`` pixels."""
    from PIL import Image

    ref = thumb if thumb is not None else heat
    k = side / max(ref.shape[:2])
    size = (max(1, round(ref.shape[1] * k)), max(1, round(ref.shape[0] * k)))  # (w, h)

    def resized(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))

    hot = _colour(resized(heat))
    if thumb is None:
        return hot
    t = resized(thumb)
    t = np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t
    blend = np.rint(0.5 * t.astype(np.float32) + 0.5 * hot).astype(np.uint8)
    return np.concatenate([t, blend], axis=1)
