from __future__ import annotations

import itertools

import numpy as np
import pytest

from converter.metrics import (
    auc,
    classification_metrics,
    distance_to,
    event_metrics,
    hd95,
    image_metrics,
    output_snr_db,
    roc_curve,
    segmentation_metrics,
    wilson_ci,
)
from converter.scoring import agreement
from models import breast_cnn


def _auc_brute(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert auc(y, s) == pytest.approx(_auc_brute(y, s))


def test_auc_undefined_with_one_class() -> None:
    assert auc(np.ones(5), np.arange(5)) is None


def test_sensitivity_specificity_for_positive_class_zero() -> None:
    # positive class is 0 (e.g. malignant): 3 positives, 2 found; 4 negatives, 1 false alarm
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0])
    scores = np.eye(2)[pred]
    m = classification_metrics(y, scores, pred, positive=0)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["confusion"] == [[2, 1], [1, 3]]


def test_agreement() -> None:
    assert agreement(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 1])) == 0.75


# ---- intervals, ROC and per-class ------------------------------------------------------------

with np.load(breast_cnn.DATA) as _d:
    VAL_IMAGES = _d["val_images"].astype(np.float64)
    VAL_LABELS = _d["val_labels"].reshape(-1).astype(int)


def _real_scores() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weak but real classifier on real BreastMNIST validation images: the darker the centre
    of the ultrasound, the more malignant (class 0). Enough to exercise every metric."""
    centre = VAL_IMAGES[:, 9:19, 9:19].mean((1, 2)) / 255.0
    p_malignant = 1.0 - centre
    scores = np.column_stack([p_malignant, 1.0 - p_malignant])
    pred = (p_malignant < np.median(p_malignant)).astype(int)
    return VAL_LABELS, scores, pred


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_ci(k, n)
    assert got is not None
    assert got[0] == pytest.approx(lo, abs=1e-4)
    assert got[1] == pytest.approx(hi, abs=1e-4)
    assert wilson_ci(0, 0) is None


def test_classification_intervals_contain_the_estimate_and_are_reproducible() -> None:
    y, scores, pred = _real_scores()
    m = classification_metrics(y, scores, pred, positive=0)
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc"):
        lo, hi = m["ci"][key]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0, key
        assert hi - lo > 0.01, f"{key}: 78 samples cannot give a zero-width interval"
    again = classification_metrics(y, scores, pred, positive=0)
    assert again["ci"] == m["ci"], "fixed seed: the same data gives the same interval"
    # a bigger sample narrows the interval
    big = classification_metrics(np.tile(y, 10), np.tile(scores, (10, 1)), np.tile(pred, 10), 0)
    assert big["ci"]["auc"][1] - big["ci"]["auc"][0] < m["ci"]["auc"][1] - m["ci"]["auc"][0]


def test_per_class_matches_the_positive_class_metrics() -> None:
    y, scores, pred = _real_scores()
    m = classification_metrics(y, scores, pred, positive=0)
    pc = m["per_class"]
    assert set(pc) == {"0", "1"}
    assert pc["0"]["recall"] == pytest.approx(m["sensitivity"])
    assert pc["1"]["recall"] == pytest.approx(m["specificity"])
    assert pc["0"]["precision"] == pytest.approx(m["precision"])
    assert pc["0"]["f1"] == pytest.approx(m["f1"])
    assert pc["0"]["support"] + pc["1"]["support"] == 78
    assert pc["0"]["support"] == int(np.sum(y == 0))


def test_without_a_positive_class_only_accuracy_has_an_interval() -> None:
    y, scores, pred = _real_scores()
    m = classification_metrics(y, scores, pred, positive=None)
    assert set(m["ci"]) == {"accuracy"}
    assert "sensitivity" not in m


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_area_is_the_auc_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.random(80), 1)  # many ties: diagonal steps
    fpr, tpr = roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(fpr) == len(np.unique(s)) + 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(_auc_brute(y, s))


def test_roc_curve_edge_cases() -> None:
    assert roc_curve(np.array([1, 1]), np.array([0.2, 0.3])) == ([], [])
    fpr, tpr = roc_curve(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5]))
    assert (fpr, tpr) == ([0.0, 1.0], [0.0, 1.0])
    fpr, tpr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert (fpr, tpr) == ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0])


# ---- segmentation --------------------------------------------------------------------------


def _disk(r: float, size: int = 64, cx: float = 32, cy: float = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_dice_iou_hand_computed() -> None:
    t = np.zeros((1, 4, 4), bool)
    t[0, :2, :2] = True  # 4 pixels
    p = np.zeros((1, 4, 4))
    p[0, :2, :] = 0.9  # 8 pixels, 4 shared
    m = segmentation_metrics(t, p)
    assert m["dice"] == pytest.approx(2 * 4 / 12)
    assert m["iou"] == pytest.approx(4 / 8)
    assert m["n"] == 1


def test_hd95_of_concentric_disks_is_the_radius_gap() -> None:
    a, b = _disk(10), _disk(14)
    assert hd95(a, a) == 0.0
    assert 3.0 <= hd95(a, b) <= 5.0  # gap of 4 px, up to a pixel of discretisation
    # shifting a disk by 6 px moves its far edges by 6 px: the 95th percentile sees them
    assert 4.0 <= hd95(a, _disk(10, cx=38)) <= 6.5


def test_segmentation_empty_masks_are_defined_and_counted() -> None:
    t = np.stack([_disk(8), np.zeros((64, 64), bool), _disk(8), np.zeros((64, 64), bool)])
    p = np.stack([_disk(8), np.zeros((64, 64)), np.zeros((64, 64)), _disk(5)]).astype(float)
    m = segmentation_metrics(t, p)
    # image 0 perfect, image 1 both empty (dice 1), image 2 missed (0), image 3 false finding (0)
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95"] == 0.0 and m["hd95_n"] == 1
    assert m["hd95_undefined"] == 2


def test_segmentation_on_real_ultrasound_masks() -> None:
    """Masks drawn from real BreastMNIST images (bright tissue >= 50% grey); the 'model' sees
    the same images with real-image-sized noise. Simulated masks, real images."""
    img = VAL_IMAGES[:20] / 255.0
    truth = img >= 0.5
    rng = np.random.default_rng(0)
    m = segmentation_metrics(truth, img + rng.normal(0, 0.05, img.shape))
    assert 0.8 < m["dice"] < 1.0
    assert m["dice_ci"][0] <= m["dice"] <= m["dice_ci"][1]
    assert m["iou"] < m["dice"]
    assert m["hd95"] is not None and m["hd95"] >= 0
    worse = segmentation_metrics(truth, img + rng.normal(0, 0.2, img.shape))
    assert worse["dice"] < m["dice"]
    assert worse["hd95"] > m["hd95"]
    with pytest.raises(ValueError, match="N, H, W"):
        segmentation_metrics(truth, img[:5])


# ---- image to image ------------------------------------------------------------------------


@pytest.mark.slow  # imports TensorFlow for the reference implementation
def test_psnr_and_ssim_match_tensorflow_on_real_images() -> None:
    import tensorflow as tf

    ref = VAL_IMAGES[:12, ..., None] / 255.0
    rng = np.random.default_rng(1)
    noisy = np.clip(ref + rng.normal(0, 0.08, ref.shape), 0, 1)
    m = image_metrics(ref, noisy, data_range=1.0)
    want_ssim = tf.image.ssim(tf.constant(ref), tf.constant(noisy), max_val=1.0).numpy()
    want_psnr = tf.image.psnr(tf.constant(ref), tf.constant(noisy), max_val=1.0).numpy()
    assert m["ssim"] == pytest.approx(float(want_ssim.mean()), abs=1e-6)
    assert m["psnr"] == pytest.approx(float(want_psnr.mean()), abs=1e-4)  # TF: float32
    assert m["n"] == 12
    assert m["psnr_ci"][0] <= m["psnr"] <= m["psnr_ci"][1]
    same = image_metrics(ref[..., 0], ref[..., 0])
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == float("inf")


def test_output_snr_db() -> None:
    ref = np.ones(100)
    assert output_snr_db(ref, ref) == float("inf")
    assert output_snr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert output_snr_db(ref, ref + 1.0) == pytest.approx(0.0)


# ---- events --------------------------------------------------------------------------------


def test_event_metrics_matching_rules() -> None:
    true = [(10.0, 12.0), (30.0, 31.0), (100.0, 105.0)]
    det = [
        (11.0, 11.5),  # event 1
        (11.6, 11.9),  # event 1 again: a second alarm for the same fall counts as false
        (31.5, 32.0),  # event 2, but only within a 1 s tolerance
        (200.0, 201.0),  # nothing
    ]
    strict = event_metrics(true, det, duration_s=3600.0)
    assert (strict["tp"], strict["fp"], strict["fn"]) == (1, 3, 2)
    assert strict["false_alarms_per_hour"] == pytest.approx(3.0)
    loose = event_metrics(true, det, duration_s=1800.0, tolerance_s=1.0)
    assert (loose["tp"], loose["fp"], loose["fn"]) == (2, 2, 1)
    assert loose["sensitivity"] == pytest.approx(2 / 3)
    assert loose["precision"] == pytest.approx(2 / 4)
    assert loose["false_alarms_per_hour"] == pytest.approx(4.0)
    assert loose["n_true"] == 3 and loose["n_detected"] == 4


def test_one_detection_matches_at_most_one_event() -> None:
    # one long detection spans two events: only one is detected; the matching stays maximal
    m = event_metrics([(0, 1), (2, 3)], [(0.5, 2.5)], duration_s=60)
    assert (m["tp"], m["fn"], m["fp"]) == (1, 1, 0)
    # greedy by end must not steal the detection the later event needs
    m = event_metrics([(0, 10), (5, 6)], [(5.5, 5.6), (9, 9.5)], duration_s=60)
    assert m["tp"] == 2
    empty = event_metrics([], [], duration_s=60)
    assert empty["sensitivity"] is None and empty["false_alarms_per_hour"] == 0.0


def test_distance_transform_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    pts = rng.random((23, 31)) < 0.03
    pts[0, 0] = True
    got = distance_to(pts)
    yx = np.argwhere(pts)
    grid = np.argwhere(np.ones_like(pts))
    want = np.sqrt(((grid[:, None, :] - yx[None]) ** 2).sum(-1).min(1)).reshape(pts.shape)
    np.testing.assert_allclose(got, want, atol=1e-12)
