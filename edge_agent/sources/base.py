"""What every source shares: the :class:`Sample` it yields, its config base, its problems."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveInt

from edge_agent.source_ids import SourceUids

__all__ = ["Problems", "Sample", "Size", "Source", "SourceSettings", "pace", "require"]

Size = tuple[PositiveInt, PositiveInt]  # (height, width), as numpy shapes read


@dataclass(frozen=True)
class Sample:
    """One unit of input: an image or a signal window, with its ground truth when replayed.

    ``time`` is seconds into the recording (replay) or epoch seconds (live), when known;
    ``meta`` holds small, non-identifying facts (frame index, a gap before this sample, ...).
    ``dicom``: the source image's study/series/instance UIDs (a DICOM source); they identify a
    patient's study, so they leave the device only sealed to the fog node's source key
    (:mod:`edge_agent.source_ids`), never in ``id`` or ``meta``.
    """

    id: str
    data: np.ndarray
    label: int | None = None
    time: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dicom: SourceUids | None = None


class Source(Protocol):
    """A plug-in: a name, problems counted by kind for telemetry, and a stream of samples."""

    name: str

    @property
    def errors(self) -> dict[str, int]: ...

    def stream(self, stop: threading.Event) -> Iterator[Sample]: ...


class SourceSettings(BaseModel):
    """Base of each source's config model: strict, and told where relative paths start."""

    model_config = ConfigDict(extra="forbid")

    def resolve(self, base: Path) -> SourceSettings:
        """A copy with every relative ``Path`` field made relative to ``base``."""
        update = {k: base / v for k, v in self.__dict__.items() if isinstance(v, Path)}
        return self.model_copy(update=update)


class Problems:
    """Problems a source met, counted by kind (thread-safe), each told in one log line.

    ``every=False`` logs only the first of its kind (per-sample problems such as NaNs);
    :meth:`summary` then gives the totals in one line at the end of the stream.
    """

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name, self.log = name, log
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, msg: str, *args: object, every: bool = True, count: int = 1) -> int:
        with self._lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + count
        if every or n == count:
            more = "" if every else " (further ones counted, not logged)"
            self.log.warning("%s: " + msg + " [%s #%d%s]", self.name, *args, kind, n, more)
        return n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def summary(self) -> None:
        counts = self.snapshot()
        if counts:
            told = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            self.log.warning("%s: stream ended with problems: %s", self.name, told)


def mark_pass(sample: Sample, passes: int) -> Sample:
    """The first sample of a looped recording's pass ``passes`` (>= 1: it started again):
    ``meta['loop']`` says so and ``meta['gap']`` makes windowing start afresh, so no window
    spans the seam, and the events stage knows that its time going back is the loop."""
    sample.meta["loop"] = passes
    sample.meta["gap"] = True
    return sample


def pace(stop: threading.Event, start: float, at: float) -> bool:
    """Wait until ``start + at`` (monotonic seconds); False when ``stop`` was set meanwhile."""
    delay = start + at - time.monotonic()
    return not (delay > 0 and stop.wait(delay))


def require(module: str, extra: str = "device") -> Any:
    """Import an optional dependency where it is used, or say how to install it."""
    import importlib

    from edge_agent.errors import SourceError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = {"cv2": "opencv-python-headless", "serial": "pyserial"}.get(module, module)
        hint = pkg if module == "cv2" else f"'medge[{extra}]'"
        raise SourceError(f"this source needs {pkg}: pip install {hint}") from exc
