"""models.fall_sim: the simulated wrist fall has the physics its docstring claims."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from models.fall_sim import RANGES, G, rotate, sample_params, simulate_fall

DATA = Path(__file__).parent / "data" / "imu"


def _standing() -> np.ndarray:
    """3 s of a real watch at rest (subject 1605 sitting), accelerometer + made-up zero gyro."""
    with gzip.open(DATA / "1605_accel_DE.txt.gz", "rt") as f:
        rows = [line.rstrip().rstrip(";").split(",")[-3:] for line in f.readlines()[:60]]
    acc = np.array(rows, np.float64)
    return np.hstack([acc, np.zeros_like(acc)])


@pytest.mark.parametrize("seed", range(8))
def test_free_fall_impact_and_lying_physics(seed: int) -> None:
    pre = _standing()
    rng = np.random.default_rng(seed)
    sig, impact, p = simulate_fall(pre, rng)
    mag = np.linalg.norm(sig[:, :3], axis=1) / G
    n_ff = round(p.free_fall_s * 20)
    assert 0.29 <= p.free_fall_s <= 0.5 and 6 <= n_ff <= 10
    ff = mag[len(pre) : impact]
    assert len(ff) == n_ff
    assert ff[2:].max() == pytest.approx(p.residual_g, abs=1e-5)  # toward 0 g after 0.1 s
    assert ff[2:].max() <= RANGES["residual_g"][1] + 1e-6
    assert mag[impact] == pytest.approx(p.impact_g, rel=1e-5)  # the peak
    assert 3.0 <= mag[impact] <= 8.0 and mag[impact] == mag.max()
    gyro = np.linalg.norm(sig[len(pre) : impact, 3:], axis=1)
    assert np.median(gyro) > 1.0  # the wrist turns during the fall
    lie = slice(impact + p.impact_samples + 1, impact + p.impact_samples + 1 + 20)
    assert np.abs(mag[lie] - 1).max() < 0.2  # lying: about 1 g ...
    assert np.linalg.norm(sig[lie, 3:], axis=1).mean() < 0.15  # ... and still
    u0 = pre[-10:, :3].mean(0) / np.linalg.norm(pre[-10:, :3].mean(0))
    u1 = sig[lie, :3].mean(0) / np.linalg.norm(sig[lie, :3].mean(0))
    turned = np.degrees(np.arccos(np.clip(u0 @ u1, -1, 1)))
    assert turned == pytest.approx(p.rotation_deg, abs=6)  # the orientation changed
    assert 60 - 6 <= turned <= 150 + 6


def test_same_seed_same_fall_and_another_seed_another() -> None:
    pre = _standing()
    a = simulate_fall(pre, np.random.default_rng(3))[0]
    b = simulate_fall(pre, np.random.default_rng(3))[0]
    c = simulate_fall(pre, np.random.default_rng(4))[0]
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert a.dtype == np.float32 and np.isfinite(a).all()


def test_recovery_turns_back_and_continues_with_the_real_stream() -> None:
    pre = _standing()
    rng = np.random.default_rng(0)
    params = [sample_params(rng) for _ in range(200)]
    assert 0.2 < np.mean([p.recover for p in params]) < 0.4  # P_RECOVER = 0.3
    p = next(p for p in params if p.recover)
    sig, _impact, _ = simulate_fall(pre, rng, post=pre, params=p)
    np.testing.assert_allclose(sig[-len(pre) :], pre.astype(np.float32))
    back = sig[-len(pre) - 1, :3]  # the last get-up sample points along u0 again
    u0 = pre[-10:, :3].mean(0)
    assert np.degrees(np.arccos(back @ u0 / np.linalg.norm(back) / np.linalg.norm(u0))) < 10


def test_rotate_keeps_length_and_turns_by_the_angle() -> None:
    v, axis = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    w = rotate(v, axis, np.pi / 2)
    np.testing.assert_allclose(w, [0.0, -1.0, 0.0], atol=1e-12)
    assert np.linalg.norm(rotate(np.array([1.0, 2.0, 3.0]), axis, 1.0)) == pytest.approx(
        np.sqrt(14)
    )
