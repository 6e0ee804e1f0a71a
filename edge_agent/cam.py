"""Class activation maps: a small heatmap of the image regions behind a decision.

A bundle converted with ``medge convert --cam`` carries the map as an extra output of every
artifact (manifest ``cam``: which output, from which layer, at which size to show it). These
are plain numpy functions (no OpenCV); the heatmap is an 8-bit image of the map, never the
input frame. :func:`cam_body` is what a result carries: that heatmap as a small grey PNG.
"""

from __future__ import annotations

import base64
import functools
from typing import Any, cast

import numpy as np

from edge_agent.decode import Decoded
from edge_agent.errors import BundleError
from edge_agent.model import LoadedModel
from edge_agent.png import encode_png

__all__ = ["MAX_CAM_SIDE", "cam_body", "cam_heatmap", "cam_size", "explain", "resize_bilinear"]

MAX_CAM_SIDE = 64
"""The heatmap in a result is at most this many pixels a side."""


def resize_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to (height, width), pixel centres aligned as in OpenCV's
    INTER_LINEAR (half-pixel offsets, edges clamped): two small matrix products with the
    interpolation weights of each axis, computed once per size."""
    a = np.asarray(a, dtype=np.float32)
    return _weights(a.shape[0], size[0]) @ a @ _weights(a.shape[1], size[1]).T


@functools.lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): row i holds the two taps of output pixel i (weights 1 - f and f)."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    f = (pos - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1 - f)
    np.add.at(w, (np.arange(n_out), hi), f)
    w.flags.writeable = False  # shared by every call of this size
    return w


def cam_heatmap(cam: np.ndarray, class_index: int, size: tuple[int, int]) -> np.ndarray:
    """One class's map as a uint8 (height, width) heatmap: ReLU (only evidence for the class),
    bilinear upsampling to ``size``, scaled so its maximum is 255 (all zero: no evidence)."""
    m = np.asarray(cam, dtype=np.float32)
    m = cast(np.ndarray, m.reshape(m.shape[-3:]))  # numpy's stubs take a tuple[int, ...] for ()
    # one sigmoid unit: its map is evidence for class 1, its negative for class 0
    m = (m[..., 0] if class_index else -m[..., 0]) if m.shape[-1] == 1 else m[..., class_index]
    m = resize_bilinear(np.maximum(m, 0.0), size)
    peak = float(m.max())
    if peak <= 0:
        return np.zeros(size, dtype=np.uint8)
    # no clip needed: the taps are non-negative, so 0 <= m <= peak, and rint(255 * m / peak)
    # is 0..255 (a product that rounds a hair past 255 still rounds to 255)
    m *= np.float32(255.0 / peak)
    return np.rint(m, out=m).astype(np.uint8)


def cam_size(
    upsample_to: list[int] | tuple[int, int], limit: int = MAX_CAM_SIDE
) -> tuple[int, int]:
    """The manifest's display size, shrunk (aspect kept) so that no side exceeds ``limit``."""
    h, w = int(upsample_to[0]), int(upsample_to[1])
    k = max(h, w) / limit
    if k <= 1:
        return h, w
    return max(1, round(h / k)), max(1, round(w / k))


def cam_body(
    cam: np.ndarray, class_index: int, label: str, upsample_to: list[int] | tuple[int, int]
) -> dict[str, Any]:
    """The ``cam`` field of a result: the class's heatmap as a base64 grey PNG (white = most
    evidence), at most 64 x 64, and the class it shows."""
    size = cam_size(upsample_to)
    heat = cam_heatmap(cam, class_index, size)
    return {
        "png": base64.b64encode(encode_png(heat)).decode("ascii"),
        "label": label,
        "size": [size[0], size[1]],
    }


def explain(model: LoadedModel, sample: np.ndarray) -> tuple[Decoded, np.ndarray]:
    """Classify one sample and return the heatmap of the predicted class."""
    spec = model.bundle.manifest.cam
    if spec is None:
        raise BundleError(f"{model.bundle.directory}: bundle has no cam output (convert --cam)")
    outputs = model.infer_outputs(model.prepare(sample))
    result = model.decode(outputs[0].reshape(-1))
    h, w = spec.upsample_to
    return result, cam_heatmap(outputs[spec.output], result.pred, (h, w))
