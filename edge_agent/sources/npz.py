"""Labelled arrays in an npz file: ``x``/``y`` or MedMNIST-style ``<split>_images``/``_labels``.

The one reader of this format: the converter's calibration and evaluation sets, ``medge
evaluate`` and the agent's replay source all go through :func:`load_labelled`.
"""

from __future__ import annotations

import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Sample, SourceSettings

__all__ = ["NpzReplay", "NpzSettings", "load_labelled"]

_PREFERRED = ("val", "test", "train")


class NpzSettings(SourceSettings):
    kind: Literal["npz"] = Field(
        default="npz", description="Source plug-in: labelled arrays in an npz (the default)."
    )
    path: Path = Field(description="Recorded data to replay.")
    split: str | None = Field(default=None, description="MedMNIST split (val, test, train).")
    rate_hz: float = Field(default=5.0, ge=0, description="Replay rate; 0 = as fast as possible.")
    loop: bool = Field(default=False, description="Start again at the end.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many samples.")


def load_labelled(
    path: str | Path, split: str | None = None, prefer: tuple[str, ...] = _PREFERRED
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Return (x, y, class names) from an npz; y and names may be absent (None).

    ``split`` picks ``<split>_images``/``<split>_labels``; without it, ``x``/``y`` if present,
    else the first of ``prefer`` that the file has.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = set(data.files)
            names = [str(s) for s in data["labels"].tolist()] if "labels" in keys else None
            if split is None and "x" in keys:
                xk, yk = "x", "y"
            else:
                splits = sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))
                if split is None:
                    split = next((s for s in prefer if s in splits), splits[0] if splits else None)
                if split is None or f"{split}_images" not in keys:
                    have = ", ".join(splits) or "none"
                    raise SourceError(f"{p}: no split '{split}' (splits: {have}; or use x/y keys)")
                xk, yk = f"{split}_images", f"{split}_labels"
            x = np.asarray(data[xk])
            y = np.asarray(data[yk]).reshape(len(x), -1) if yk in keys else None
    except FileNotFoundError as exc:
        raise SourceError(f"{p}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SourceError(f"{p}: not a readable npz ({exc})") from exc
    if y is not None:
        if y.shape[1] != 1:
            raise SourceError(f"{p}: labels must be one class index per sample, got {y.shape}")
        y = y[:, 0].astype(np.int64)
    return x, y, names


class NpzReplay:
    """Replays the samples of an npz as a stream at ``rate_hz`` (0: as fast as possible)."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        rate_hz: float = 0.0,
        loop: bool = False,
        limit: int | None = None,
    ) -> None:
        self.x, self.y, _ = load_labelled(path, split)
        self.name = Path(path).stem + (f":{split}" if split else "")
        self.rate_hz, self.loop, self.limit = rate_hz, loop, limit
        self.errors: dict[str, int] = {}  # nothing to count: the whole file is checked up front

    def __len__(self) -> int:
        return len(self.x)

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        emitted, next_at = 0, time.monotonic()
        while not stop.is_set():
            for i in range(len(self.x)):
                if stop.is_set() or (self.limit is not None and emitted >= self.limit):
                    return
                if period:
                    next_at += period
                    delay = next_at - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        return
                label = int(self.y[i]) if self.y is not None else None
                yield Sample(id=f"{self.name}#{i}", data=self.x[i], label=label)
                emitted += 1
            if not self.loop:
                return
