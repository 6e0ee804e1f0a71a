"""Windowing in plain numpy: sliding (L, C) windows over (C,) samples; (K, H, W, C) frame clips.

The array functions work on a whole recording; :class:`Windower` does the same one sample at a
time for a live stream; :func:`windowed` turns a stream of samples into a stream of windows.
Windows are never dropped: every ``hop`` samples one comes out, once ``length`` are in.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # edge_agent.sources imports this module: no import cycle at run time
    from edge_agent.bundle import WindowSpec
    from edge_agent.sources.base import Sample, Source

__all__ = [
    "LabelRule",
    "Setting",
    "Window",
    "WindowSettings",
    "WindowedSource",
    "Windower",
    "beat_starts",
    "clips",
    "sliding_windows",
    "source_window",
    "split_window",
    "warn_overrides",
    "window_label",
    "windowed",
]

log = logging.getLogger("medge.agent.window")

LabelRule = Literal["last", "majority", "max"]


def sliding_windows(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """(T, ...) -> (N, length, ...) windows starting at 0, hop, 2*hop, ... (a read-only view).

    N = 1 + (T - length) // hop, or 0 when T < length; a short tail is left out.
    """
    if length < 1 or hop < 1:
        raise ValueError(f"length and hop must be >= 1, got {length} and {hop}")
    x = np.asarray(x)
    if x.shape[0] < length:
        return np.empty((0, length, *x.shape[1:]), dtype=x.dtype)
    view = np.lib.stride_tricks.sliding_window_view(x, length, axis=0)[::hop]
    return np.moveaxis(view, -1, 1)  # sliding_window_view puts the window axis last


def beat_starts(r_peaks: Iterable[int], total: int, length: int, before: int) -> list[int]:
    """Start sample of the window of each R peak (``before`` samples before it); a beat too near
    either end of a ``total``-sample recording for a whole ``length`` window is left out (the
    caller counts them as ``len(r_peaks) - len(result)``)."""
    starts = [int(r) - before for r in r_peaks]
    return [s for s in starts if s >= 0 and s + length <= total]


def window_label(labels: Iterable[int | None], rule: LabelRule = "last") -> int | None:
    """One label for a window: its last sample's, the most common (ties: smallest), or the max
    (for 0/1 labels: positive if any sample is). None when any sample has no label."""
    ys = list(labels)
    if not ys or any(y is None for y in ys):
        return None
    vals = [int(y) for y in ys if y is not None]
    if rule == "last":
        return vals[-1]
    if rule == "max":
        return max(vals)
    if rule == "majority":
        counts = np.bincount(np.asarray(vals) - min(vals))
        return int(np.argmax(counts)) + min(vals)
    raise ValueError(f"unknown label rule '{rule}'")


class Windower:
    """Push samples one at a time; every ``hop`` samples, once ``length`` are in, get a window
    stacked on a new first axis: (C,) -> (L, C), (H, W, C) -> (L, H, W, C)."""

    def __init__(self, length: int, hop: int) -> None:
        if length < 1 or hop < 1:
            raise ValueError(f"length and hop must be >= 1, got {length} and {hop}")
        self.length, self.hop = length, hop
        self._buf: deque[np.ndarray] = deque(maxlen=length)
        self._since, self._fresh = 0, True

    def reset(self) -> None:
        """Forget what was pushed (after a gap: no window spans it)."""
        self._buf.clear()
        self._since, self._fresh = 0, True

    def push(self, x: np.ndarray) -> np.ndarray | None:
        x = np.asarray(x)
        if self._buf and x.shape != self._buf[0].shape:
            raise ValueError(f"sample of shape {x.shape} after samples of {self._buf[0].shape}")
        self._buf.append(x)
        self._since += 1
        if len(self._buf) == self.length and (self._fresh or self._since >= self.hop):
            self._since, self._fresh = 0, False
            return np.stack(self._buf)
        return None


def windowed(
    samples: Iterable[Sample],
    length: int,
    hop: int,
    label: LabelRule = "last",
    reset_on_gap: bool = True,
) -> Iterator[Sample]:
    """Samples in, windows out. A sample whose ``meta['gap']`` is set starts a fresh window when
    ``reset_on_gap``; the window's label follows ``label`` (see :func:`window_label`)."""
    from edge_agent.sources.base import Sample

    win = Windower(length, hop)
    held: deque[Sample] = deque(maxlen=length)
    for s in samples:
        if reset_on_gap and s.meta.get("gap"):
            win.reset()
            held.clear()
        held.append(s)
        data = win.push(s.data)
        if data is None:
            continue
        first, last = held[0], held[-1]
        meta: dict[str, Any] = {"first": first.id, "last": last.id}
        if "loop" in first.meta:  # the first window of a looped recording's new pass
            meta["loop"] = first.meta["loop"]
        dicom = last.dicom if first.dicom == last.dicom else None  # one source image
        if dicom is not None and "frame" in last.meta:  # a clip's result names its last frame
            meta["frame"] = last.meta["frame"]
        yield Sample(
            id=f"{first.id}+{length}",
            data=data,
            label=window_label((h.label for h in held), label),
            time=first.time,
            meta=meta,
            dicom=dicom,
        )


def clips(
    samples: Iterable[Sample], frames: int, hop: int, label: LabelRule = "max"
) -> Iterator[Sample]:
    """K consecutive frames -> one (K, H, W, C) clip, for CNN-LSTM models; a new clip every ``hop``
    frames. The clip's label is positive when any frame is (``max``) unless told otherwise."""
    return windowed(samples, frames, hop, label, reset_on_gap=True)


class WindowSettings(BaseModel):
    """Windowing done at the source, for models that take (L, C) windows or (K, H, W, C) clips."""

    model_config = ConfigDict(extra="forbid")

    length: int = Field(ge=1, description="Samples (or frames) per window.")
    hop: int = Field(ge=1, description="Samples between the starts of two windows.")
    label: LabelRule = Field(
        default="last",
        description="Window label: the last sample's, the majority, or the max (any positive).",
    )
    reset_on_gap: bool = Field(
        default=True, description="Start a fresh window after a gap the source reported."
    )


class Window:
    """Stage: samples in, windows out, as ``settings`` say (:func:`windowed`); with None the
    samples go through as they are (a source whose kind is not cut, or that is cut already)."""

    def __init__(self, settings: WindowSettings | None) -> None:
        self.settings = settings

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        s = self.settings
        if s is None:
            return iter(samples)
        return windowed(samples, s.length, s.hop, s.label, s.reset_on_gap)


def split_window(source: Source) -> tuple[Source, Window]:
    """A source and its windowing, as two stages of the graph."""
    if isinstance(source, WindowedSource):
        return source.inner, Window(source.settings)
    return source, Window(None)


class WindowedSource:
    """A source whose samples are windows of another's (``Window`` at its output)."""

    def __init__(self, inner: Source, settings: WindowSettings) -> None:
        self.inner, self.settings = inner, settings
        self.name = f"{inner.name}[{settings.length}/{settings.hop}]"

    @property
    def errors(self) -> dict[str, int]:
        return self.inner.errors

    @property
    def ports(self) -> list[Any]:
        """The inner source's queues (``edge_agent.ports``), for telemetry."""
        return list(getattr(self.inner, "ports", None) or [])

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        return Window(self.settings)(self.inner.stream(stop))


# -- where each window setting comes from: the bundle, the config, or the agent's default ----

Origin = Literal["bundle", "config", "default"]


@dataclass(frozen=True)
class Setting:
    """One clinical setting as the agent will use it: its value, where it comes from, and the
    bundle's value for it (None when the bundle says nothing). ``overrides`` is true when the
    config sets it to something else than the bundle does."""

    name: str
    value: Any
    origin: Origin
    bundle: Any = None

    @property
    def overrides(self) -> bool:
        return self.origin == "config" and self.bundle is not None and self.value != self.bundle

    def describe(self) -> str:
        """``before 90 (bundle)`` or ``before 130 (config; the bundle says 90)``."""
        if self.overrides:
            return f"{self.name} {self.value} (config; the bundle says {self.bundle})"
        return f"{self.name} {self.value} ({self.origin})"


def source_window(
    own: WindowSettings | None, spec: WindowSpec | None
) -> tuple[WindowSettings | None, list[Setting]]:
    """A sensor's ``window`` (or a frame source's ``clip``): the config's own when it has one
    (every field of it), else the bundle's; with the settings and their origins."""
    if own is None and spec is None:
        return None, []
    if own is None:
        assert spec is not None
        own = WindowSettings(length=spec.length, hop=spec.hop, label=spec.label)
        origin: Origin = "bundle"
    else:
        origin = "config"
    ref = {"length": spec.length, "hop": spec.hop, "label": spec.label} if spec else {}
    settings = [Setting(k, getattr(own, k), origin, ref.get(k)) for k in ("length", "hop", "label")]
    return own, settings


def warn_overrides(name: str, settings: Sequence[Setting]) -> int:
    """One warning line per setting the config changes from the bundle's: a clinical setting is
    never changed silently. Returns how many."""
    n = 0
    for s in settings:
        if s.overrides:
            log.warning(
                "%s: the config overrides the bundle's window %s: bundle %s, config %s",
                name,
                s.name,
                s.bundle,
                s.value,
            )
            n += 1
    return n
