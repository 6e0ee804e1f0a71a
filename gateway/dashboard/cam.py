"""CAM heatmap thumbnails carried in result bodies: what is accepted, and nothing else.

A device may add ``"cam": {"png": "<base64 PNG>", "label": "<class>"}`` to a result body. The
gateway keeps it only if :func:`check_cam` accepts it (counted by reason otherwise, and the
rest of the result is stored as usual); the dashboard checks it again before it puts it into
the page as ``<img src="data:image/png;base64,...">`` (its CSP allows ``img-src data:`` and
nothing else from data: URLs). Pure standard library: the gateway service imports it.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Any

__all__ = ["CAM_MAX_BYTES", "CAM_MAX_SIDE", "check_cam", "check_png"]

CAM_MAX_BYTES = 16 * 1024  # decoded PNG
CAM_MAX_SIDE = 128  # pixels, width and height
_LABEL_MAX = 64
_PNG = b"\x89PNG\r\n\x1a\n"
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def check_cam(cam: Any) -> tuple[dict[str, str] | None, str | None]:
    """(the thumbnail as it may be shown, None), or (None, why it is dropped): ``malformed``,
    ``too_large`` or ``not_png``. Only a strict-base64 PNG of at most ``CAM_MAX_BYTES`` bytes
    and ``CAM_MAX_SIDE`` pixels a side passes; the label is text of at most 64 characters."""
    if not isinstance(cam, dict):
        return None, "malformed"
    _, why = check_png(cam.get("png"))
    if why is not None:
        return None, why
    label = cam.get("label")
    shown = label[:_LABEL_MAX] if isinstance(label, str) else ""
    return {"png": cam["png"], "label": shown}, None


def check_png(b64: Any) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for strict base64 of a PNG of at most ``CAM_MAX_BYTES`` bytes
    and ``CAM_MAX_SIDE`` pixels a side (a CAM, a result's input thumbnail); else (None, why):
    ``malformed``, ``too_large`` or ``not_png``."""
    if not isinstance(b64, str):
        return None, "malformed"
    if len(b64) > (CAM_MAX_BYTES + 2) // 3 * 4:
        return None, "too_large"
    png = _decode(b64)
    if png is None:
        return None, "malformed"
    if len(png) < 24 or not png.startswith(_PNG) or png[12:16] != b"IHDR":
        return None, "not_png"
    width, height = struct.unpack(">II", png[16:24])
    if not (0 < width <= CAM_MAX_SIDE and 0 < height <= CAM_MAX_SIDE):
        return None, "too_large"
    return (width, height), None


def _decode(b64: str) -> bytes | None:
    if not _B64.fullmatch(b64):
        return None
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
