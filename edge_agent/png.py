"""A minimal PNG writer (zlib + struct) for small images in results: heatmaps and thumbnails.

OpenCV is optional on a device, so results never need it to carry a picture. 8-bit grey
(H, W) or RGB (H, W, 3) only; no filtering beyond 'none', which is fine at 64 x 64. Pixel data
of at most :data:`STORED_MAX` bytes is stored, not compressed: setting up deflate costs about
30 us, more than a 28 x 28 image costs to seal and send, and compression saves a few percent of
so few bytes (787 of 812 on the zoo CNN's inputs).
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

__all__ = ["STORED_MAX", "encode_png", "thumbnail"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STORED_MAX = 4096
"""Filtered pixel data of at most this many bytes goes into the PNG uncompressed (a valid
deflate stream of stored blocks): a 28 x 28 image does, a 64 x 64 grey one does not."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


_IEND = _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=64)
def _head(w: int, h: int, colour: int) -> bytes:
    """Signature and IHDR of a (w, h) 8-bit image: the same bytes for every image that size."""
    return _SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) image."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"PNG needs uint8 (H, W) or (H, W, 3), got {a.dtype}{a.shape}")
    h, w = a.shape[:2]
    rows = np.zeros((h, 1 + a[0].size), np.uint8)  # column 0: filter type 0 (none) per row
    rows[:, 1:] = a.reshape(h, -1)
    raw = rows.tobytes()
    idat = zlib.compress(raw, 0 if len(raw) <= STORED_MAX else 9)
    return _head(w, h, 0 if a.ndim == 2 else 2) + _chunk(b"IDAT", idat) + _IEND


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
