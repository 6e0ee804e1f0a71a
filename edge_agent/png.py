"""A minimal PNG writer (zlib + struct) for small images in results: heatmaps and thumbnails.

OpenCV is optional on a device, so results never need it to carry a picture. 8-bit grey
(H, W) or RGB (H, W, 3) only; no filtering beyond 'none', which is fine at 64 x 64.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_png", "thumbnail"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) image."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"PNG needs uint8 (H, W) or (H, W, 3), got {a.dtype}{a.shape}")
    h, w = a.shape[:2]
    colour = 0 if a.ndim == 2 else 2
    rows = np.ascontiguousarray(a).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def thumbnail(a: np.ndarray, max_side: int = 64) -> np.ndarray:
    """A real-valued (H, W) or (H, W, C) image as uint8, shrunk (area average over whole
    blocks) until no side exceeds ``max_side``; values are clipped to 0..255."""
    x = np.asarray(a, dtype=np.float32)
    h, w = x.shape[:2]
    k = max(1, -(-max(h, w) // max_side))  # ceil: the block side
    if k > 1:
        hh, ww = -(-h // k) * k, -(-w // k) * k
        pad = [(0, hh - h), (0, ww - w)] + [(0, 0)] * (x.ndim - 2)
        x = np.pad(x, pad, mode="edge")
        x = x.reshape(hh // k, k, ww // k, k, *x.shape[2:]).mean(axis=(1, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
