"""DICOM images and multi-frame cine through pydicom, one :class:`Sample` per frame.

Uncompressed, deflated and RLE data decode with pydicom alone; JPEG baseline/extended and
JPEG 2000 (unsigned) fall back to OpenCV's codecs when pydicom has no plug-in for them; anything
else is told in one line naming its transfer syntax, and the file is skipped. Colour comes out
RGB (YBR and palette converted). Rescale and windowing happen only when configured. Sample ids
and meta carry no patient identifier: the id is a hash of the SOPInstanceUID and a frame number;
the study/series/instance UIDs ride in ``Sample.dicom``, which leaves the device only sealed to
the fog node (edge_agent.source_ids).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.source_ids import SourceUids
from edge_agent.sources.base import Problems, Sample, Size, SourceSettings, pace, require
from edge_agent.window import WindowSettings

__all__ = ["DicomSettings", "DicomSource", "apply_window", "to_rgb_grey"]

log = logging.getLogger("medge.agent.source.dicom")

# transfer syntaxes OpenCV can decode when pydicom lacks a plug-in (JPEG, JPEG 2000)
_CV2_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


class DicomSettings(SourceSettings):
    kind: Literal["dicom"] = Field(default="dicom", description="Source plug-in: DICOM files.")
    path: Path = Field(description="A DICOM file, or a folder searched with 'pattern'.")
    pattern: str = Field(default="**/*.dcm", description="Glob for files in a folder, sorted.")
    rescale: bool = Field(
        default=False, description="Apply RescaleSlope/Intercept (modality LUT): float32 out."
    )
    window: Literal["file"] | tuple[float, float] | None = Field(
        default=None,
        description="Window grey images to uint8: 'file' (its WindowCenter/Width) or "
        "[center, width]; applied after rescale, as the standard orders.",
    )
    color: Literal["keep", "grey", "rgb"] = Field(
        default="keep", description="keep: HxW grey / HxWx3 RGB; grey or rgb: convert all."
    )
    size: Size | None = Field(
        default=None, description="Resize every frame to (height, width) (needs OpenCV)."
    )
    realtime: bool = Field(
        default=False, description="Replay cine frames at their FrameTime; else as fast as can."
    )
    rate_hz: float = Field(default=0.0, ge=0, description="Frames per second otherwise; 0: max.")
    loop: bool = Field(default=False, description="Start again after the last file.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many frames.")
    clip: WindowSettings | None = Field(
        default=None, description="Assemble (K, H, W, C) clips of K=length frames every hop."
    )


def apply_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) to uint8 0..255."""
    x = np.asarray(x, dtype=np.float64)
    if width <= 1:
        return np.where(x > center - 0.5, 255, 0).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def to_rgb_grey(x: np.ndarray, color: str) -> np.ndarray:
    """Convert a frame to the configured layout: 'grey' -> HxW, 'rgb' -> HxWx3, 'keep'."""
    if color == "grey" and x.ndim == 3:
        y = x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.rint(y).astype(x.dtype) if x.dtype.kind in "ui" else y
    if color == "rgb" and x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=2)
    return x


class _Skip(Exception):
    """This file cannot be used: why, in one line, and under which problem kind."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


class DicomSource:
    def __init__(self, cfg: DicomSettings) -> None:
        self.cfg = cfg
        self.pydicom = require("pydicom", "device-dicom")
        _quiet_pydicom()
        if cfg.path.is_dir():
            self.files = sorted(p for p in cfg.path.glob(cfg.pattern) if p.is_file())
        elif cfg.path.is_file():
            self.files = [cfg.path]
        else:
            raise SourceError(f"{cfg.path}: no such DICOM file or folder")
        self.name = cfg.path.name
        self._problems = Problems(self.name, log)

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        emitted, start = 0, time.monotonic()
        period = 1.0 / self.cfg.rate_hz if self.cfg.rate_hz > 0 else 0.0
        try:
            while not stop.is_set():
                for path in self.files:
                    for t, sample in self._file(path):
                        if stop.is_set():
                            return
                        at = t if self.cfg.realtime and t is not None else emitted * period
                        if (self.cfg.realtime or period) and not pace(stop, start, at):
                            return
                        yield sample
                        emitted += 1
                        if self.cfg.limit is not None and emitted >= self.cfg.limit:
                            return
                    start = time.monotonic() if self.cfg.realtime else start
                if not self.cfg.loop:
                    return
        finally:
            self._problems.summary()

    def _file(self, path: Path) -> Iterator[tuple[float | None, Sample]]:
        """The frames of one file; a problem is told in one line and ends this file only."""
        try:
            ds = self._read(path)
            frames = self._pixels(ds)
            n = int(ds.get("NumberOfFrames", 1) or 1)
            uid = str(ds.get("SOPInstanceUID", "")) or path.name
            key = hashlib.sha256(uid.encode()).hexdigest()[:16]
            ft = ds.get("FrameTime")
            frame_s = float(ft) / 1000.0 if ft and n > 1 else None
            meta = {
                "frames": n,
                "modality": str(ds.get("Modality", "")),
                "photometric": str(ds.get("PhotometricInterpretation", "")),
                "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
            }
            ids = self._uids(ds, path)
            for i, raw in enumerate(frames):
                t = i * frame_s if frame_s is not None else None
                data = self._finish(ds, raw)
                yield t, Sample(f"dicom:{key}#{i}", data, None, t, {"frame": i, **meta}, ids)
        except _Skip as exc:
            self._problems.add(exc.kind, "%s: %s; skipped", path.name, exc)

    def _uids(self, ds: Any, path: Path) -> SourceUids | None:
        """The file's study/series/instance UIDs, for the fog's DICOM objects; a file without
        valid ones gives results that no DICOM object can reference (told once per file)."""
        try:
            return SourceUids(
                str(ds.get("StudyInstanceUID", "")),
                str(ds.get("SeriesInstanceUID", "")),
                str(ds.get("SOPInstanceUID", "")),
                str(ds.get("SOPClassUID", "")),
            )
        except ValueError as exc:
            self._problems.add("uids", "%s: %s; its results name no source image", path.name, exc)
            return None

    def _read(self, path: Path) -> Any:
        pd = self.pydicom
        try:
            ds = pd.dcmread(path)
        except pd.errors.InvalidDicomError as exc:
            raise _Skip("not_dicom", "not a DICOM file") from exc
        except (OSError, EOFError, ValueError, KeyError, struct.error) as exc:
            raise _Skip("truncated", f"unreadable, truncated? ({exc})") from exc
        if "PixelData" not in ds:
            if _has_pixel_tag(path):  # pydicom drops an element that the file's end cuts short
                raise _Skip("truncated", "truncated: the file ends inside its pixel data")
            sop = getattr(ds.get("SOPClassUID"), "name", "unknown SOP class")
            raise _Skip("no_pixels", f"no pixel data ({sop}): not an image, or cut short")
        return ds

    def _pixels(self, ds: Any) -> Iterator[np.ndarray]:
        ts = ds.file_meta.TransferSyntaxUID
        if not ts.is_encapsulated:
            need = _native_bytes(ds)
            if len(ds.PixelData) < need:
                raise _Skip(
                    "truncated", f"truncated: pixel data has {len(ds.PixelData)} of {need} bytes"
                )
        from pydicom.pixels import iter_pixels

        it = iter_pixels(ds)
        try:
            first = next(it)
        except StopIteration:
            return iter(())
        except RuntimeError as exc:  # no plug-in for this transfer syntax
            if str(ts) in _CV2_SYNTAXES and not (str(ts) in _J2K and ds.PixelRepresentation):
                return self._cv2_frames(ds)
            raise _Skip(
                "undecodable", f"cannot decode transfer syntax '{ts.name}' ({_HINT})"
            ) from exc
        except (ValueError, EOFError, KeyError, NotImplementedError) as exc:
            raise _Skip("undecodable", f"{ts.name}: {exc}") from exc
        return _chain(first, it, ds)

    def _cv2_frames(self, ds: Any) -> Iterator[np.ndarray]:
        cv2 = require("cv2")
        from pydicom.encaps import generate_frames

        n = int(ds.get("NumberOfFrames", 1) or 1)
        name = ds.file_meta.TransferSyntaxUID.name
        try:
            for i, frag in enumerate(generate_frames(ds.PixelData, number_of_frames=n)):
                a = cv2.imdecode(np.frombuffer(frag, np.uint8), cv2.IMREAD_UNCHANGED)
                if a is None:
                    raise _Skip("undecodable", f"OpenCV cannot decode '{name}' frame {i} ({_HINT})")
                yield np.ascontiguousarray(a[..., ::-1]) if a.ndim == 3 else a
        except (ValueError, EOFError, StopIteration) as exc:
            raise _Skip("truncated", f"encapsulated pixel data ends early ({exc})") from exc

    def _finish(self, ds: Any, x: np.ndarray) -> np.ndarray:
        from pydicom.pixels import apply_color_lut, apply_modality_lut

        c = self.cfg
        if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            x = apply_color_lut(x, ds)
            x = (x >> 8).astype(np.uint8) if x.dtype == np.uint16 else x
        grey = x.ndim == 2
        if grey and (c.rescale or c.window is not None):
            x = apply_modality_lut(x, ds).astype(np.float32)
        if grey and c.window is not None:
            if c.window == "file":
                center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
                if center is None or width is None:
                    raise _Skip("no_window", "window 'file' but the file has no WindowCenter/Width")
            else:
                center, width = c.window
            x = apply_window(x, center, width)
        x = to_rgb_grey(x, c.color)
        if c.size is not None and x.shape[:2] != c.size:
            cv2 = require("cv2")
            x = cv2.resize(x, (c.size[1], c.size[0]), interpolation=cv2.INTER_AREA)
        return x


def _chain(first: np.ndarray, rest: Iterator[np.ndarray], ds: Any) -> Iterator[np.ndarray]:
    yield first
    try:
        yield from rest
    except (ValueError, EOFError) as exc:
        raise _Skip("truncated", f"frame data ends early ({exc})") from exc


def _has_pixel_tag(path: Path) -> bool:
    """Whether the bytes hold a (7FE0,0010) Pixel Data tag, little or big endian."""
    try:
        raw = path.read_bytes()
    except OSError:
        return False
    return b"\xe0\x7f\x10\x00" in raw or b"\x7f\xe0\x00\x10" in raw


def _quiet_pydicom() -> None:
    """pydicom both logs and warns when a file ends early; our one line says it instead."""
    msg = "End of file reached before delimiter"
    warnings.filterwarnings("ignore", message=msg, module=r"pydicom\.")
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _EndOfFileFilter) for f in logger.filters):
        logger.addFilter(_EndOfFileFilter())


class _EndOfFileFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("End of file reached before delimiter")


def _native_bytes(ds: Any) -> int:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    px = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * n
    return (px * bits + 7) // 8


def _first(v: Any) -> float | None:
    """The first value of a possibly multi-valued DS element, as float."""
    if isinstance(v, Sequence) and not isinstance(v, str | bytes):
        v = v[0] if len(v) else None
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
