"""Preprocessing as the manifest says: plain numpy functions, one sample at a time.

A sample has no batch axis: an image is (H, W) or (H, W, C); a signal window is (T, C).
An input whose manifest layout is ``NCHW`` (channels first) gets its images transposed to
(C, H, W) by :func:`to_layout`, the one place that does it, on the device as in the converter.
"""

from __future__ import annotations

import numpy as np

from edge_agent.bundle import Preprocess, Quantization, TensorSpec
from edge_agent.errors import MedgeError

__all__ = ["byte_table", "dequantize", "normalize", "quantize", "to_input", "to_layout"]

_EPS = 1e-6
_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def normalize(spec: Preprocess, sample: np.ndarray) -> np.ndarray:
    """Map a raw sample to the model's real-valued input space (float32)."""
    x = np.asarray(sample, dtype=np.float32)
    if spec.kind == "none":
        return x
    if spec.kind == "scale01":
        return x * np.float32(1.0 / 255.0)
    if spec.kind == "zscore":
        # per window, per channel, over time (axis 0)
        mean = x.mean(axis=0, keepdims=True)
        std = x.std(axis=0, keepdims=True)
        return (x - mean) / (std + np.float32(_EPS))
    if spec.kind == "mean_std":
        if spec.mean is None or spec.std is None:
            raise MedgeError("preprocess mean_std needs both 'mean' and 'std'")
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        return (x - mean) / std
    raise MedgeError(f"unknown preprocess kind '{spec.kind}'")


def quantize(x: np.ndarray, q: Quantization, dtype: str) -> np.ndarray:
    """Real values to integers of ``dtype`` with round-half-to-even and saturation."""
    lo, hi = _INT_RANGE[dtype]
    return np.clip(np.rint(x / q.scale) + q.zero_point, lo, hi).astype(dtype)


def dequantize(x: np.ndarray, q: Quantization | None) -> np.ndarray:
    """Integers back to real values; float tensors pass through."""
    if q is None:
        return np.asarray(x, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)


def to_layout(
    x: np.ndarray, layout: str | None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """An image sample in the axis order of an input of ``layout``: for ``NCHW``, (H, W, C) or
    (H, W) becomes (C, H, W); ``shape`` (the input's, with batch) is checked when given. Any
    other layout: the sample as it is."""
    if layout != "NCHW":
        return x
    if shape is not None and len(shape) == 4 and -1 not in shape[1:]:
        c, h, w = shape[1:]
        if x.shape not in ((h, w, c), (h, w)) or (x.ndim == 2 and c != 1):
            raise MedgeError(
                f"image of shape {tuple(x.shape)} is not (H, W, C) = ({h}, {w}, {c}) for the "
                f"channels-first input {list(shape)}"
            )
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise MedgeError(f"a channels-first input takes images (H, W, C), got {tuple(x.shape)}")
    return np.ascontiguousarray(np.transpose(x, (2, 0, 1)))


def to_input(x: np.ndarray, tensor: TensorSpec) -> np.ndarray:
    """Shape a normalized sample as the input tensor (batch of one) and quantize it if needed.
    A channels-first (``NCHW``) input gets the image transposed first (:func:`to_layout`)."""
    want = tuple(tensor.shape)
    x = to_layout(x, tensor.layout, want)
    if int(np.prod(want)) != x.size:
        raise MedgeError(
            f"sample of shape {tuple(x.shape)} does not fit input '{tensor.name}' of shape {want}"
        )
    x = x.reshape(want)
    if tensor.dtype in _INT_RANGE:
        if tensor.quantization is None:
            raise MedgeError(f"input '{tensor.name}' is {tensor.dtype} without quantization")
        return quantize(x, tensor.quantization, tensor.dtype)
    return x.astype(tensor.dtype)


def byte_table(spec: Preprocess, tensor: TensorSpec) -> np.ndarray | None:
    """For 8-bit samples and an elementwise preprocess: the input value of each of the 256 byte
    values, so preparing a sample is one table lookup (the same values as :func:`normalize`
    then :func:`to_input`, bit for bit, several times faster), for a quantized input or a
    float32 one. None where that does not apply."""
    if spec.kind not in ("none", "scale01"):
        return None
    if tensor.layout == "NCHW" and tensor.shape[1] != 1:
        return None  # a lookup keeps the axis order; a transposing input goes the long way
    levels = normalize(spec, np.arange(256, dtype=np.uint8))
    if tensor.dtype == "float32":
        return levels
    if tensor.dtype not in _INT_RANGE or tensor.quantization is None:
        return None
    return quantize(levels, tensor.quantization, tensor.dtype)
