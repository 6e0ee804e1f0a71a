"""Head circumference from a mask (edge_agent.measure): ellipse fits on synthetic ellipses of
known perimeter, with and without OpenCV, and on the committed HC18 val masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from converter.metrics import segmentation_metrics
from converter.report import write_markdown
from converter.scoring import task_metrics
from edge_agent import mask as mask_mod
from edge_agent import measure
from edge_agent.bundle import Decode
from models.hc18_unet import DATA


def _ellipse_mask(
    shape: tuple[int, int], cx: float, cy: float, a: float, b: float, angle_deg: float
) -> np.ndarray:
    """The ellipse with semi-axes a (along angle) and b drawn as HC18 draws its masks: the
    outline (one pixel wide) filled, outline included, so the mask reaches half a pixel beyond
    the ellipse: pixels whose centre lies within semi-axes a + 0.5, b + 0.5."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    t = math.radians(angle_deg)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (u / (a + 0.5)) ** 2 + (v / (b + 0.5)) ** 2 <= 1.0


def _exact_perimeter(a: float, b: float) -> float:
    """4 a E(e): the complete elliptic integral by the arithmetic-geometric mean."""
    x, y, s, p = 1.0, b / a, 0.0, 1.0
    c2 = 1 - (b / a) ** 2
    s = c2 / 2
    while abs(x - y) > 1e-15:
        p *= 2
        x, y, c = (x + y) / 2, math.sqrt(x * y), (x - y) / 2
        s += p * c * c / 2
    return 2 * math.pi * a * (1 - s) / x


def test_ramanujan_perimeter() -> None:
    assert measure.ellipse_perimeter(5, 5) == pytest.approx(2 * math.pi * 5, rel=1e-12)
    for a, b in ((10, 7), (80, 40), (30, 10)):
        assert measure.ellipse_perimeter(a, b) == pytest.approx(_exact_perimeter(a, b), rel=1e-6)
    assert measure.ellipse_perimeter(0, 0) == 0.0


CASES = [  # centre, semi-axes, angle (degrees): large and small, round and elongated
    (128.3, 88.1, 100.0, 70.0, 20.0),
    (60.0, 45.0, 40.0, 28.0, 125.0),
    (64.5, 44.2, 24.0, 18.0, 0.0),
    (100.0, 80.0, 70.0, 69.0, 90.0),
]


@pytest.mark.parametrize("cv2", [True, False], ids=["opencv", "numpy"])
@pytest.mark.parametrize("case", CASES)
def test_fit_recovers_a_synthetic_ellipse(
    monkeypatch: pytest.MonkeyPatch, cv2: bool, case: tuple[float, ...]
) -> None:
    if not cv2:  # as on a device without opencv-python-headless
        monkeypatch.setattr(measure, "cv2_or_none", lambda: None)
        monkeypatch.setattr(mask_mod, "cv2_or_none", lambda: None)
    else:
        assert mask_mod.cv2_or_none() is not None, "the dev extra installs OpenCV"
    cx, cy, a, b, angle = case
    mask = _ellipse_mask((176, 256), cx, cy, a, b, angle)
    mask[5:8, 5:8] = True  # a small blob elsewhere: only the largest component is fitted
    e = measure.fit_ellipse(mask)
    assert e is not None
    assert e.perimeter == pytest.approx(_exact_perimeter(a, b), rel=0.005)
    assert (e.cx, e.cy) == (pytest.approx(cx, abs=0.5), pytest.approx(cy, abs=0.5))
    assert e.major / 2 == pytest.approx(a, rel=0.02) and e.minor / 2 == pytest.approx(b, rel=0.02)
    if a / b > 1.1:
        assert abs((e.angle - angle + 90) % 180 - 90) < 2.0
    assert measure.head_circumference_mm(mask, 0.5) == pytest.approx(0.5 * e.perimeter)


def test_nothing_to_fit() -> None:
    assert measure.fit_ellipse(np.zeros((20, 20), bool)) is None
    assert measure.head_circumference_mm(np.zeros((20, 20), bool), 0.3) is None
    one = np.zeros((20, 20), bool)
    one[4, 4] = True
    assert measure.fit_ellipse(one) is None


def test_body_is_plain_json() -> None:
    e = measure.Ellipse(10.123, 20.0, 30.0, 20.0, 45.0)
    assert e.body() == {"center": [10.12, 20.0], "axes": [30.0, 20.0], "angle": 45.0}


def test_reference_masks_reproduce_the_published_hc() -> None:
    with np.load(DATA, allow_pickle=False) as d:
        masks, px, hc = d["val_masks"], d["val_pixel_mm"], d["val_hc_mm"]
    got = np.array([measure.head_circumference_mm(m, s) for m, s in zip(masks, px, strict=True)])
    rel = np.abs(got - hc) / hc
    assert rel.max() < 0.02  # the data README: the reference masks give hc_mm within 2 %
    assert np.abs(got - hc).mean() < 1.0  # mm, at half resolution


def _discs(radii: list[float], size: int = 64) -> np.ndarray:
    return np.stack([_ellipse_mask((size, size), 32.0, 32.0, r, r, 0.0) for r in radii])


def test_segmentation_metrics_score_head_circumference() -> None:
    truth = _discs([20.0, 15.0, 10.0, 12.0])
    pred = _discs([22.0, 15.0, 9.0, 0.0]).astype(float)
    pred[3] = 0.0  # nothing found: no circumference to measure
    px = np.array([0.5, 0.5, 1.0, 1.0])
    hc = np.array([2 * math.pi * r for r in (20.0, 15.0, 10.0, 12.0)]) * px
    m = segmentation_metrics(truth, pred, 0.5, px, hc)
    assert m["hc_n"] == 3 and m["hc_unmeasured"] == 1
    got = [
        measure.head_circumference_mm(p >= 0.5, s) for p, s in zip(pred[:3], px[:3], strict=True)
    ]
    assert m["hc_mae_mm"] == pytest.approx(np.abs(np.array(got) - hc[:3]).mean())
    assert m["hc_mae_mm"] == pytest.approx((2 * math.pi * 2 * 0.5 + 2 * math.pi) / 3, abs=0.5)
    lo, hi = m["hc_mae_mm_ci"]
    assert lo <= m["hc_mae_mm"] <= hi
    assert m["hc_mae_mm_reference"] < 0.5  # the reference masks' own fit
    assert "hc_mae_mm" not in segmentation_metrics(truth, pred)  # no pixel sizes: not scored


def test_task_metrics_and_report_carry_the_hc(tmp_path: Path) -> None:
    truth = _discs([20.0, 14.0])
    px = np.array([0.4, 0.6])
    hc = np.array([2 * math.pi * 20.0 * 0.4, 2 * math.pi * 14.0 * 0.6])
    spec = Decode(kind="segmentation", activation="sigmoid")
    got = task_metrics(
        "segmentation", truth.astype(float), truth, spec, ["bg", "head"], None, (px, hc)
    )
    assert got["hc_mae_mm"] is not None and got["hc_mae_mm"] < 0.5
    rep = {
        "model": "hc",
        "profile": "rpi5",
        "eval": {"file": "hc.npz", "n": 2},
        "variants": ["float", "litert-int8"],
        "float": got,
        "litert-int8": {**got, "hc_mae_mm": got["hc_mae_mm"] + 0.5},
        "size_bytes": {},
        "latency_ms": {},
    }
    write_markdown(tmp_path / "r.md", rep)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| hc_mae_mm |"))
    assert row.endswith("| 0.5000 |")  # the rise in error is the drop
    assert "| hc_mae_mm_reference |" in md


def test_a_segmentation_result_carries_the_fitted_ellipse() -> None:
    """The device sends the ellipse with the mask, so the dashboard draws it as an outline."""
    from edge_agent.decode import segment

    mask = _ellipse_mask((88, 128), 64.0, 44.0, 30.0, 20.0, 30.0)
    logits = np.where(mask, 6.0, -6.0)[..., None].astype(np.float32)
    body = segment(logits, Decode(kind="segmentation", activation="sigmoid"), ["bg", "head"]).body()
    e = body["ellipse"]
    assert e["center"] == pytest.approx([64.0, 44.0], abs=0.6)
    assert e["axes"] == pytest.approx([60.0, 40.0], abs=1.5)
    assert e["angle"] == pytest.approx(30.0, abs=2.0)
    empty = segment(np.full((8, 8, 1), -6.0, np.float32), Decode(kind="segmentation"), ["bg"])
    assert empty.body()["ellipse"] is None
