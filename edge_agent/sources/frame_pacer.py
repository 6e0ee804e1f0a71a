"""A live camera's frames at the rate the model's clips were cut at (``window.rate_hz``).

A camera delivers what it delivers (25, 30, 29.97 fps, or fewer in the dark), and its reader
drops the oldest frame when the model is slow. A clip of K frames is only what the model was
trained on if its frames are 1/rate_hz apart, so a live video source keeps frames by their
time, not by their index:

- a frame is kept when it is due (each kept frame makes the next due 1/rate_hz later; a frame
  a quarter period early still counts, so a camera at exactly the rate loses none);
- a kept frame more than 1.5 periods after the one before (a stall, frames dropped by a slow
  model) starts a fresh clip: ``gap``, counted, so no clip spans the hole;
- a frame time earlier than the last kept one (the wall clock stepped back) starts afresh from
  it: ``clock``, counted, so a clock set back by an hour does not stall the video for an hour;
- a camera that delivers too slowly (the median of the last 8 spacings above 1.2 periods) makes
  clips that span too much time: each of its frames is ``slow``, counted and flagged as a gap
  too, so no clip is made until it delivers again. The first one is told in one line.

A recorded file is checked before it starts (``check_frame_rate``) and is not paced here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["FramePacer", "Kept"]

EARLY = 0.25  # a frame this many periods early is due
GAP = 1.5  # periods between kept frames that break a clip
SLOW = 1.2  # median spacing, in periods, of a camera too slow for the model
RECENT = 8  # spacings the median is over


@dataclass(frozen=True)
class Kept:
    """What to do with one frame: ``keep`` it, and if kept, whether it starts afresh
    (``gap``), and why (``reason``: ``gap``, ``slow`` or empty)."""

    keep: bool
    gap: bool = False
    reason: str = ""
    seconds: float = 0.0  # the spacing that made it a gap


class FramePacer:
    """Decides frame by frame, from the frames' own times (seconds, any origin)."""

    def __init__(self, rate_hz: float) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.period = 1.0 / rate_hz
        self._due: float | None = None
        self._last: float | None = None
        self._spacings: deque[float] = deque(maxlen=RECENT)

    def offer(self, t: float) -> Kept:
        p = self.period
        if self._last is not None and t < self._last:  # the clock stepped back (NTP): resync,
            back = self._last - t  # or every frame would wait for the old time to come again
            self._due, self._last = t + p, t
            self._spacings.clear()
            return Kept(True, True, "clock", back)
        if self._due is not None and t < self._due - EARLY * p:
            return Kept(False)
        last, self._last = self._last, t
        due = self._due
        self._due = t + p if due is None or t > due + p else due + p  # fell behind: resync
        if last is None:
            return Kept(True)
        dt = t - last
        self._spacings.append(dt)
        if dt > GAP * p:
            return Kept(True, True, "gap", dt)
        if len(self._spacings) == RECENT and float(np.median(self._spacings)) > SLOW * p:
            return Kept(True, True, "slow", float(np.median(self._spacings)))
        return Kept(True)
