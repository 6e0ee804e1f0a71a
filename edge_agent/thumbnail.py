"""A small picture of the model's input for the clinician: what a result's ``thumbnail`` holds.

Results of image models (classification and segmentation of 2-D images) may carry the input
they were computed on, shrunk to at most 64 pixels a side: 8-bit grey for one channel, RGB for
colour, as a PNG (``edge_agent.png``), inside the sealed body like every other field. Agent
config ``thumbnails: false`` leaves it out. Plain numpy functions: the pipeline's ``Result``
stage calls :func:`input_thumbnail` when :func:`takes_images` says the bundle takes images.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from edge_agent.bundle import Manifest
from edge_agent.png import encode_png, thumbnail

__all__ = ["MAX_THUMBNAIL_SIDE", "input_thumbnail", "takes_images"]

MAX_THUMBNAIL_SIDE = 64
"""The input thumbnail in a result is at most this many pixels a side."""

_TASKS = ("classification", "segmentation")


def takes_images(manifest: Manifest) -> bool:
    """True for a classification or segmentation bundle whose input is one 2-D image (a
    rank-4 tensor: NHWC or NCHW); signal windows (NTC) and clips (NTHWC) are not images."""
    if manifest.task not in _TASKS or not manifest.artifacts:
        return False
    inputs = manifest.artifacts[0].inputs
    return bool(inputs) and len(inputs[0].shape) == 4


def input_thumbnail(data: np.ndarray, max_side: int = MAX_THUMBNAIL_SIDE) -> dict[str, Any] | None:
    """``{"png": base64 PNG, "width", "height"}`` of an image sample ((H, W) or (H, W, C), as
    sources give it), shrunk so that no side exceeds ``max_side``: grey for one channel (or
    two: the first), RGB for three or more (the first three). 8-bit samples keep their values;
    any other type is stretched from its min..max to 0..255. None for what is not an image."""
    a = np.asarray(data)
    if a.ndim == 3 and a.shape[-1] != 1:
        a = a[..., :3] if a.shape[-1] >= 3 else a[..., 0]
    elif a.ndim == 3:
        a = a[..., 0]
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 1 or a.size == 0:
        return None
    if a.dtype == np.uint8 and max(a.shape[:2]) <= max_side:  # as it is: no resampling
        return _body(a)
    if a.dtype == np.uint8:
        x = a.astype(np.float32)
    else:
        x = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return _body(thumbnail(x, max_side))


def _body(small: np.ndarray) -> dict[str, Any]:
    return {
        "png": base64.b64encode(encode_png(small)).decode("ascii"),
        "width": int(small.shape[1]),
        "height": int(small.shape[0]),
    }
