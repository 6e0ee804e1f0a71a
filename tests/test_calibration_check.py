"""Calibration pitfalls on real BreastMNIST data and the zoo CNN (it has 4 BatchNorm layers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.calibration_check import (
    check_calibration,
    class_coverage,
    distribution_shift,
    has_batchnorm,
)
from converter.child.batchnorm import bn_mismatch, bn_statistics
from models import breast_cnn

pytestmark = pytest.mark.slow  # runs the zoo CNN with Keras

with np.load(breast_cnn.DATA) as _d:
    TRAIN = _d["train_images"].astype(np.float32)  # 0..255, as stored
    VAL = _d["val_images"].astype(np.float32)
    TRAIN_Y = _d["train_labels"].reshape(-1)


@pytest.mark.slow  # loads the zoo CNN with Keras
def test_properly_scaled_data_raise_no_warning() -> None:
    # the model was trained on x / 255: calibrating on that is right
    assert check_calibration(TRAIN / 255, VAL / 255, TRAIN_Y, n_classes=2) == []
    assert bn_mismatch(breast_cnn.WEIGHTS, TRAIN / 255) == []


@pytest.mark.slow  # loads the zoo CNN with Keras
def test_bn_statistics_margins_on_real_data() -> None:
    """The numbers docs/report.md quotes: well inside the thresholds when scaled as in
    training, hundreds of standard deviations off at 0-255."""
    for x in (TRAIN / 255, VAL / 255):
        stats = bn_statistics(breast_cnn.WEIGHTS, x)
        assert isinstance(stats, list) and len(stats) == 4
        assert max(s["shift"].max() for s in stats) < 0.6
        assert min(s["ratio"].min() for s in stats) > 0.8
        assert max(s["ratio"].max() for s in stats) < 2.0
        assert all(s["n_off"] == 0 for s in stats)
    raw = bn_statistics(breast_cnn.WEIGHTS, TRAIN)
    assert isinstance(raw, list)
    assert min(float(np.median(s["shift"])) for s in raw) > 100


@pytest.mark.slow  # loads the zoo CNN with Keras
def test_0_255_calibration_data_warn_twice() -> None:
    w = check_calibration(TRAIN, VAL / 255) + bn_mismatch(breast_cnn.WEIGHTS, TRAIN)
    assert len(w) == 2, w
    assert all("\n" not in line for line in w)
    assert "unlike the evaluation data" in w[0] and "0-255" in w[0]
    assert "BatchNormalization" in w[1] and "4 of 4 layers" in w[1]


@pytest.mark.slow  # loads the zoo CNN with Keras
@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda x: x, id="0-255 on both sides (forgot --preprocess scale01)"),
        pytest.param(lambda x: (x - x.mean()) / x.std(), id="z-scored unlike training"),
    ],
)
def test_batchnorm_flags_data_normalized_unlike_training(wrong) -> None:  # type: ignore[no-untyped-def]
    # calibration and evaluation agree with each other: only the BN check can see this
    assert distribution_shift(wrong(TRAIN), wrong(VAL)) == []
    w = bn_mismatch(breast_cnn.WEIGHTS, wrong(TRAIN))
    assert len(w) == 1 and "BatchNormalization" in w[0]


@pytest.mark.slow  # loads the zoo CNN with Keras
def test_batchnorm_check_says_when_shapes_do_not_fit() -> None:
    w = bn_mismatch(breast_cnn.WEIGHTS, TRAIN[:, :20, :20] / 255)
    assert len(w) == 1 and "skipped" in w[0] and "(28, 28, 1)" in w[0]


def test_small_and_class_missing_calibration_sets() -> None:
    benign_only = TRAIN_Y == 1
    w = check_calibration(TRAIN[benign_only][:60] / 255, None, TRAIN_Y[benign_only][:60], 2)
    assert len(w) == 2
    assert "only 60 samples" in w[0]
    assert "no samples of class 0 (of 2 classes)" in w[1]
    assert class_coverage(TRAIN_Y, 2) == []


def test_distribution_shift_on_real_splits_is_quiet_and_per_channel() -> None:
    assert distribution_shift(TRAIN / 255, VAL / 255) == []
    rgb_c = np.stack([TRAIN / 255] * 3, axis=-1)
    rgb_e = np.stack([VAL / 255, VAL / 255, VAL / 255 + 0.5], axis=-1)  # channel 2 offset
    w = distribution_shift(rgb_c, rgb_e)
    assert len(w) == 1 and "channel 2" in w[0] and "channel 0" not in w[0]


def test_the_bn_child_runs_only_for_models_with_batchnorm(tmp_path: Path) -> None:
    """The converter skips the TensorFlow child when a .keras file's config has no
    BatchNormalization; it cannot tell for other formats, so it runs the check there."""
    import zipfile

    assert has_batchnorm(breast_cnn.WEIGHTS) is True  # the zoo CNN has BN layers
    plain = tmp_path / "plain.keras"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr(
            "config.json",
            json.dumps(
                {
                    "class_name": "Sequential",
                    "config": {"layers": [{"class_name": "Conv2D"}, {"class_name": "Dense"}]},
                }
            ),
        )
    assert has_batchnorm(plain) is False
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    (tmp_path / "m.h5").write_bytes(b"")
    assert has_batchnorm(tmp_path / "broken.keras") is None
    assert has_batchnorm(tmp_path / "m.h5") is None
    # the child's job, as the converter runs it: a warning list, nothing else
    np.save(tmp_path / "calib.npy", TRAIN[:50])  # 0-255 data: the BN layers see a shift
    job = {
        "model": str(breast_cnn.WEIGHTS),
        "calib": str(tmp_path / "calib.npy"),
        "out": str(tmp_path / "w.json"),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    child = [sys.executable, "-m", "converter.child.batchnorm", str(tmp_path / "job.json")]
    subprocess.run(child, check=True, timeout=120, capture_output=True)
    [warning] = json.loads((tmp_path / "w.json").read_text())
    assert warning.startswith("BatchNormalization statistics do not match")
