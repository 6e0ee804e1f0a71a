"""Cheap signal-quality checks, one sample at a time, each with a state that does not flap.

Plain numpy functions over one raw sample (as the source gives it, before preprocessing) and
the bundle's reference summary (:class:`edge_agent.bundle.Reference`):

- ``flat_line`` (signals): every channel's std within the sample is below a tenth of the
  1st percentile the reference samples had — an ECG lead off, a dead sensor;
- ``stuck_channel`` (signals of 2+ channels): one channel does not change at all while another
  moves — an IMU axis stuck at one register value;
- ``clipping`` (signals): a share of a channel's values sits at its own maximum or minimum,
  at a level beyond the reference data's 0.1-99.9 % range, more than twice the most any
  reference sample had at its rails (and at least 5 %) — a clipped ECG, a saturated sensor.
  A rail within that range is the sensor's normal one (the WISDM watch saturates at 2 g when
  jogging; the model was validated on such data) and is not a warning;
- ``black_frame`` (images): the frame's mean is within 2 % of the bottom of its range;
- ``frozen_frame`` (images): the frame is identical to the one before.

:class:`Hysteresis` turns each per-sample verdict into a state: a warning starts after ``on``
bad samples in a row and ends after ``off`` good ones in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import ChannelSummary, ImageSummary

__all__ = [
    "BLACK_SHARE",
    "CLIP_FLOOR",
    "FLAT_SHARE",
    "Flag",
    "Hysteresis",
    "as_channels",
    "image_flags",
    "last_frame",
    "rail_shares",
    "signal_flags",
]

FLAT_SHARE = 0.1  # flat: std below this share of the reference's 1st-percentile window std
CLIP_FLOOR = 0.05  # clipping: at least this share of a channel at its rail ...
CLIP_FACTOR = 2.0  # ... and more than this many times the reference's largest share
BLACK_SHARE = 0.02  # black: mean within this share of the range above its low end
_STUCK = 1e-6  # a channel whose peak-to-peak is below this share of its typical std is stuck


@dataclass(frozen=True)
class Flag:
    """One check's verdict on one sample: ``bad``, the measure and the threshold it crossed."""

    bad: bool
    value: float
    threshold: float
    detail: str = ""


def as_channels(x: np.ndarray) -> np.ndarray:
    """A signal sample as (L, C) float64: (L,) is one channel; more axes are flattened."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a[:, None]
    return a.reshape(a.shape[0], -1)


def rail_shares(x: np.ndarray, beyond: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(C,) share of each channel's values at its own maximum or minimum (within 0.1 % of the
    channel's peak-to-peak), whichever is larger; 1.0 for a channel that does not change.
    With ``beyond`` = (low, high) per channel, a maximum counts only above ``high`` and a
    minimum only below ``low``: a rail beyond the range the reference data reached."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    tol = 1e-3 * (hi - lo)
    at_hi = (x >= hi - tol).mean(axis=0)
    at_lo = (x <= lo + tol).mean(axis=0)
    if beyond is not None:
        at_lo = np.where(lo < beyond[0], at_lo, 0.0)
        at_hi = np.where(hi > beyond[1], at_hi, 0.0)
    return np.asarray(np.maximum(at_hi, at_lo), dtype=np.float64)


def signal_flags(x: np.ndarray, channels: list[ChannelSummary]) -> dict[str, Flag]:
    """The signal checks of one (L, C) sample against the reference's channels (the first
    ``min(C, len(channels))`` are compared)."""
    n = min(x.shape[1], len(channels))
    x, ref = x[:, :n], channels[:n]
    std, ptp = x.std(axis=0), np.ptp(x, axis=0)
    floor = np.array([FLAT_SHARE * c.window_std[0] for c in ref])
    typical = np.array([max(c.window_std[1], 1e-12) for c in ref])
    flat = std < floor
    worst = int(np.argmax(std - floor))
    out = {
        "flat_line": Flag(
            bool(flat.all()),
            float(std[worst]),
            float(floor[worst]),
            f"std {std[worst]:.4g} below {floor[worst]:.4g}" + _channel(worst, n),
        )
    }
    stuck = ptp <= _STUCK * typical
    if n >= 2:
        moving = ~flat & ~stuck
        which = np.flatnonzero(stuck)
        out["stuck_channel"] = Flag(
            bool(stuck.any() and moving.any()),
            float(len(which)),
            1.0,
            "channel " + ", ".join(str(i) for i in which) + " does not change",
        )
    beyond = (np.array([c.psi_edges[0] for c in ref]), np.array([c.psi_edges[-1] for c in ref]))
    share = np.where(stuck | flat, 0.0, rail_shares(x, beyond))
    limit = np.array([max(CLIP_FLOOR, CLIP_FACTOR * c.rail_share) for c in ref])
    over = int(np.argmax(share - limit))
    out["clipping"] = Flag(
        bool(share[over] > limit[over]),
        float(share[over]),
        float(limit[over]),
        f"{share[over]:.0%} of the values at the rail" + _channel(over, n),
    )
    return out


def _channel(i: int, n: int) -> str:
    return f" (channel {i})" if n > 1 else ""


def last_frame(sample: np.ndarray, clip: bool) -> np.ndarray:
    """The frame a sample adds: the last of a clip, else the image itself."""
    a = np.asarray(sample)
    return a[-1] if clip and a.ndim >= 3 else a


def image_flags(
    frame: np.ndarray, previous: np.ndarray | None, image: ImageSummary
) -> dict[str, Flag]:
    """The frame checks: black (mean near the low end of the range), frozen (identical to the
    frame before; never for the first)."""
    lo, hi = image.range
    mean = float(np.mean(frame))
    dark = lo + BLACK_SHARE * (hi - lo)
    same = (
        previous is not None
        and previous.shape == frame.shape
        and bool(np.array_equal(previous, frame))
    )
    return {
        "black_frame": Flag(mean < dark, mean, dark, f"mean {mean:.3g} below {dark:.3g}"),
        "frozen_frame": Flag(same, float(same), 1.0, "the frame is identical to the one before"),
    }


class Hysteresis:
    """A check's state: ``warning`` after ``on`` bad samples in a row, ``ok`` again after
    ``off`` good ones in a row. Counts every bad sample and every warning started."""

    def __init__(self, on: int, off: int) -> None:
        self.on, self.off = on, off
        self.warning = False
        self.bad = 0  # bad samples seen
        self.started = 0  # warnings started
        self._run = 0  # bad samples in a row (ok) or good ones in a row (warning)

    @property
    def state(self) -> str:
        return "warning" if self.warning else "ok"

    def update(self, bad: bool) -> str | None:
        """Feed one verdict; ``start`` or ``end`` when the state changes, else None."""
        self.bad += int(bad)
        if bad != self.warning:
            self._run += 1
        else:
            self._run = 0
        if not self.warning and self._run >= self.on:
            self.warning, self._run = True, 0
            self.started += 1
            return "start"
        if self.warning and self._run >= self.off:
            self.warning, self._run = False, 0
            return "end"
        return None
