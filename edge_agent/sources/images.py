"""A folder of images (PNG, JPEG, BMP, TIFF), sorted by path, with labels from subfolders.

With ``labels: folder`` the first subfolder below ``path`` names the class (``benign/x.png``);
``classes`` fixes their order (the bundle's labels), else the subfolder names sorted. A file
that cannot be read is counted and told in one line; the stream goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, Size, SourceSettings, pace, require

__all__ = ["IMAGE_SUFFIXES", "ImagesSettings", "ImagesSource"]

log = logging.getLogger("medge.agent.source.images")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImagesSettings(SourceSettings):
    kind: Literal["images"] = Field(default="images", description="Source plug-in: image folder.")
    path: Path = Field(description="Folder of images (searched recursively).")
    suffixes: list[str] = Field(
        default=list(IMAGE_SUFFIXES), description="File name endings to read (case-insensitive)."
    )
    color: Literal["grey", "rgb", "unchanged"] = Field(
        default="rgb",
        description="HxW grey or HxWx3 RGB uint8; unchanged keeps depth/channels as stored.",
    )
    size: Size | None = Field(
        default=None, description="Resize every image to (height, width); none keeps it."
    )
    labels: Literal["none", "folder"] = Field(
        default="none", description="folder: the first subfolder's name is the class."
    )
    classes: list[str] | None = Field(
        default=None, description="Class names in label order; default: subfolders sorted."
    )
    rate_hz: float = Field(default=0.0, ge=0, description="Images per second; 0: as fast as can.")
    loop: bool = Field(default=False, description="Start again after the last image.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many images.")


class ImagesSource:
    def __init__(self, cfg: ImagesSettings) -> None:
        if not cfg.path.is_dir():
            raise SourceError(f"{cfg.path}: no such folder")
        self.cfg = cfg
        self.name = cfg.path.name
        ends = tuple(s.lower() for s in cfg.suffixes)
        self.files = sorted(
            p for p in cfg.path.rglob("*") if p.is_file() and p.name.lower().endswith(ends)
        )
        self.classes: list[str] = []
        if cfg.labels == "folder":
            found = sorted({p.relative_to(cfg.path).parts[0] for p in self.files if _depth(cfg, p)})
            self.classes = cfg.classes if cfg.classes is not None else found
            unknown = sorted(set(found) - set(self.classes))
            if unknown:
                raise SourceError(f"{cfg.path}: subfolders {unknown} are not in classes")
        self._problems = Problems(self.name, log)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def label_of(self, path: Path) -> int | None:
        if self.cfg.labels != "folder" or not _depth(self.cfg, path):
            return None
        return self.classes.index(path.relative_to(self.cfg.path).parts[0])

    def read(self, path: Path) -> np.ndarray | None:
        """One image as configured, or None (counted, told) when it cannot be read."""
        cv2 = require("cv2")
        flag = {
            "grey": cv2.IMREAD_GRAYSCALE,
            "rgb": cv2.IMREAD_COLOR,
            "unchanged": cv2.IMREAD_UNCHANGED,
        }[self.cfg.color]
        try:
            buf = np.fromfile(path, np.uint8)
            img = cv2.imdecode(buf, flag) if buf.size else None
        except OSError as exc:
            self._problems.add("unreadable", "%s: cannot read (%s); skipped", path.name, exc)
            return None
        if img is None:
            self._problems.add("unreadable", "%s: not a decodable image; skipped", path.name)
            return None
        if img.ndim == 3 and img.shape[2] >= 3:  # OpenCV's BGR(A) -> RGB(A)
            img = np.ascontiguousarray(img[..., [2, 1, 0, *range(3, img.shape[2])]])
        if self.cfg.size is not None and img.shape[:2] != self.cfg.size:
            h, w = self.cfg.size
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        return img

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c, emitted, start = self.cfg, 0, time.monotonic()
        period = 1.0 / c.rate_hz if c.rate_hz > 0 else 0.0
        try:
            while not stop.is_set():
                for path in self.files:
                    if stop.is_set():
                        return
                    img = self.read(path)
                    if img is None:
                        continue
                    if period and not pace(stop, start, emitted * period):
                        return
                    rel = path.relative_to(c.path).as_posix()
                    yield Sample(f"{self.name}/{rel}", img, self.label_of(path), meta={"file": rel})
                    emitted += 1
                    if c.limit is not None and emitted >= c.limit:
                        return
                if not c.loop:
                    return
        finally:
            self._problems.summary()


def _depth(cfg: ImagesSettings, path: Path) -> bool:
    """True when the image lies in a subfolder (which names its class)."""
    return len(path.relative_to(cfg.path).parts) > 1
