"""Simulated wrist falls on top of real wrist accelerometer + gyroscope recordings.

There is no freely licensed recording of real wrist falls here, so the fall detector's positive
windows are made by this physical model; every number computed on them is a number on
SIMULATED falls and is reported apart from the real daily-activity data.

Units follow the WISDM 2019 watch files: accelerometer in m/s^2 (a watch at rest reads about
1 g = 9.81 m/s^2, the specific force opposing gravity), gyroscope in rad/s. A simulated fall is
six channels (ax, ay, az, gx, gy, gz) at ``rate_hz`` (20 Hz), in four phases:

1. **Pre-fall**: a piece of the real stream (walking, standing, ... as recorded), given by the
   caller. The wrist's orientation at the start of the fall is the mean direction of the last
   0.5 s of accelerometer there (the gravity direction in the sensor frame, ``u0``).
2. **Free fall**: lasts ``t_ff = sqrt(2 h / g)`` for a drop height ``h`` of 0.45-1.2 m
   (0.30-0.49 s, 6-10 samples at 20 Hz). The measured specific force falls from 1 g to a
   residual ``r`` of 0.05-0.3 g within the first 0.1 s (a fall is not a perfect free fall: the
   body pivots), while the wrist turns: the gravity direction in the sensor frame rotates from
   ``u0`` towards its final direction ``u1`` about an axis ``w`` (unit, perpendicular to
   ``u0``), by an angle of 60-150 degrees, so the gyroscope reads ``w * angle / t_ff``
   (about 2-8 rad/s) plus noise.
3. **Impact**: 1-3 samples (0.05-0.15 s) of peak specific force ``impact_g`` = 3-8 g along a
   varied direction (the final gravity direction mixed with a random unit vector), then one
   rebound sample at about a third of the peak; the gyroscope gets a short jolt (0.5-3 rad/s,
   random direction).
4. **Lying still**: 1 g along ``u1`` (the rotated axis), accelerometer noise 0.01-0.04 g and
   gyroscope noise 0.01-0.05 rad/s, for ``lie_s`` = 1.5-6 s. With probability ``p_recover``
   (0.3) the person gets up: over 1-2 s the orientation turns back to ``u0`` (the gyroscope
   reads that rotation, a small extra acceleration of up to 0.3 g) and the real stream given as
   ``post`` follows.

Every random choice is drawn from the ``numpy.random.Generator`` passed in, so the same seed
gives the same fall (:func:`sample_params`, :func:`simulate_fall`). Nothing here imports
TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FallParams", "G", "rotate", "sample_params", "simulate_fall"]

G = 9.81  # m/s^2

RANGES: dict[str, tuple[float, float]] = {
    "height_m": (0.45, 1.2),
    "residual_g": (0.05, 0.3),
    "rotation_deg": (60.0, 150.0),
    "impact_g": (3.0, 8.0),
    "lie_s": (1.5, 6.0),
    "acc_noise_g": (0.01, 0.04),
    "gyro_noise": (0.01, 0.05),
    "getup_s": (1.0, 2.0),
}
IMPACT_SAMPLES = (1, 3)  # the impact's length in samples at 20 Hz
P_RECOVER = 0.3


@dataclass(frozen=True)
class FallParams:
    """One fall's physical parameters (ranges in :data:`RANGES`, :data:`IMPACT_SAMPLES`)."""

    height_m: float
    residual_g: float
    rotation_deg: float
    axis_seed: float  # angle (rad) of the rotation axis in the plane perpendicular to u0
    impact_g: float
    impact_samples: int
    impact_dir: np.ndarray  # random unit vector mixed into the impact direction
    impact_mix: float  # 0: impact along u1, 1: along impact_dir
    lie_s: float
    acc_noise_g: float
    gyro_noise: float
    recover: bool
    getup_s: float

    @property
    def free_fall_s(self) -> float:
        return float(np.sqrt(2 * self.height_m / G))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def sample_params(rng: np.random.Generator) -> FallParams:
    """Draw one fall's parameters uniformly from :data:`RANGES`."""

    def u(k: str) -> float:
        lo, hi = RANGES[k]
        return float(rng.uniform(lo, hi))

    lo, hi = IMPACT_SAMPLES
    return FallParams(
        height_m=u("height_m"),
        residual_g=u("residual_g"),
        rotation_deg=u("rotation_deg"),
        axis_seed=float(rng.uniform(0, 2 * np.pi)),
        impact_g=u("impact_g"),
        impact_samples=int(rng.integers(lo, hi + 1)),
        impact_dir=_unit(rng.normal(size=3)),
        impact_mix=float(rng.uniform(0.2, 0.8)),
        lie_s=u("lie_s"),
        acc_noise_g=u("acc_noise_g"),
        gyro_noise=u("gyro_noise"),
        recover=bool(rng.random() < P_RECOVER),
        getup_s=u("getup_s"),
    )


def rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """``v`` rotated by ``angle`` (rad) about the unit ``axis`` (Rodrigues)."""
    c, s = np.cos(angle), np.sin(angle)
    return v * c + np.cross(axis, v) * s + axis * np.dot(axis, v) * (1 - c)


def _axis(u0: np.ndarray, seed_angle: float) -> np.ndarray:
    """A unit axis perpendicular to ``u0``, chosen by an angle in that plane."""
    a = np.array([1.0, 0.0, 0.0]) if abs(u0[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(u0, a))
    e2 = np.cross(u0, e1)
    return _unit(np.cos(seed_angle) * e1 + np.sin(seed_angle) * e2)


def simulate_fall(
    pre: np.ndarray,
    rng: np.random.Generator,
    post: np.ndarray | None = None,
    params: FallParams | None = None,
    rate_hz: float = 20.0,
) -> tuple[np.ndarray, int, FallParams]:
    """(signal (n, 6) float32, index of the impact's first sample, the parameters): ``pre``
    (real (m, 6) samples), then free fall, impact, lying still and, when the fall recovers and
    ``post`` is given, getting up and ``post``. ``params`` None: drawn with ``rng``."""
    p = params or sample_params(rng)
    dt = 1.0 / rate_hz
    tail = pre[-max(1, int(0.5 * rate_hz)) :, :3]
    u0 = _unit(tail.mean(axis=0))
    axis = _axis(u0, p.axis_seed)
    angle = np.deg2rad(p.rotation_deg)
    u1 = rotate(u0, axis, angle)
    parts: list[np.ndarray] = [pre.astype(np.float64)]

    # free fall: magnitude 1 g -> residual within 0.1 s, direction u0 -> u1, gyro = w * rate
    n_ff = max(2, round(p.free_fall_s * rate_hz))
    omega = axis * angle / (n_ff * dt)
    ff = np.zeros((n_ff, 6))
    for k in range(n_ff):
        frac = (k + 1) / n_ff
        mag = p.residual_g + (1 - p.residual_g) * max(0.0, 1 - (k + 1) * dt / 0.1)
        ff[k, :3] = mag * G * rotate(u0, axis, angle * frac)
        ff[k, 3:] = omega + rng.normal(0, 0.3, 3)
    parts.append(ff)

    # impact: peak along a varied direction, then a rebound
    direction = _unit((1 - p.impact_mix) * u1 + p.impact_mix * p.impact_dir)
    imp = np.zeros((p.impact_samples + 1, 6))
    for k in range(p.impact_samples):
        imp[k, :3] = p.impact_g * G * direction * (1.0 if k == 0 else rng.uniform(0.5, 0.9))
        imp[k, 3:] = _unit(rng.normal(size=3)) * rng.uniform(0.5, 3.0)
    imp[-1, :3] = u1 * G - direction * p.impact_g * G / 3
    imp[-1, 3:] = rng.normal(0, 0.5, 3)
    impact_at = sum(len(x) for x in parts)
    parts.append(imp)

    # lying still on the rotated axis
    n_lie = round(p.lie_s * rate_hz)
    lie = np.zeros((n_lie, 6))
    lie[:, :3] = u1 * G + rng.normal(0, p.acc_noise_g * G, (n_lie, 3))
    lie[:, 3:] = rng.normal(0, p.gyro_noise, (n_lie, 3))
    parts.append(lie)

    if p.recover and post is not None:
        n_up = max(2, round(p.getup_s * rate_hz))
        back = np.zeros((n_up, 6))
        for k in range(n_up):
            frac = (k + 1) / n_up
            push = 1 + 0.3 * np.sin(np.pi * frac)
            back[k, :3] = push * G * rotate(u1, -axis, angle * frac)
            back[k, 3:] = -axis * angle / (n_up * dt) + rng.normal(0, 0.2, 3)
        parts += [back, post.astype(np.float64)]
    return np.concatenate(parts).astype(np.float32), impact_at, p
