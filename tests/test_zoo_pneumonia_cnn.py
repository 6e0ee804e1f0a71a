"""The zoo's PneumoniaMNIST CNN: its committed data and spec (fast, no TensorFlow) and one
conversion of the committed weights (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import pneumonia_cnn
from models.pneumonia_cnn import CALIB_N, CLASS_NAMES, DATA, POSITIVE, SPEC, WEIGHTS


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes(npz: dict[str, np.ndarray]) -> None:
    assert set(npz) == {"calib_images", "calib_labels", "calib_index", "val_images", "val_labels"}
    assert npz["val_images"].shape == (524, 28, 28)
    assert npz["calib_images"].shape == (CALIB_N, 28, 28)
    for split in ("calib", "val"):
        x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
        assert x.dtype == np.uint8 and y.dtype == np.uint8
        assert y.shape == (len(x),) and set(np.unique(y)) == {0, 1}
    assert np.bincount(npz["val_labels"]).tolist() == [135, 389]
    assert DATA.stat().st_size < 1_500_000


def test_calib_is_a_stratified_train_subset(npz: dict[str, np.ndarray]) -> None:
    idx = npz["calib_index"]
    assert len(np.unique(idx)) == CALIB_N and (np.diff(idx) > 0).all()
    assert idx.min() >= 0 and idx.max() < 4690
    # the class ratio of the train split without its 8 val duplicates (1,213 : 3,469)
    assert np.bincount(npz["calib_labels"]).tolist() == [130, 370]


def test_calib_indices_are_seeded_and_stratified() -> None:
    y = np.array([0] * 30 + [1] * 70)
    a = pneumonia_cnn.calib_indices(y, 10, seed=0)
    assert a.tolist() == pneumonia_cnn.calib_indices(y, 10, seed=0).tolist()
    assert np.bincount(y[a]).tolist() == [3, 7]


def test_no_image_in_both_splits(npz: dict[str, np.ndarray]) -> None:
    # MedMNIST has no patient ids: the split is the official one, checked here for repeats only
    calib = {x.tobytes() for x in npz["calib_images"]}
    assert len(calib) == CALIB_N
    assert not calib & {x.tobytes() for x in npz["val_images"]}


def test_not_in_val_drops_exact_duplicates_only() -> None:
    rng = np.random.default_rng(1)
    val = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    train = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    train[2], train[4] = val[0], val[3]
    near = val[1].copy()
    near[0, 0] ^= 1  # one grey level off: not a duplicate
    train[5] = near
    assert pneumonia_cnn.not_in_val(train, val).tolist() == [0, 1, 3, 5]


def _keras_config(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))  # type: ignore[no-any-return]


def test_spec_matches_the_committed_weights() -> None:
    layers = {layer["name"]: layer for layer in _keras_config(WEIGHTS)["config"]["layers"]}
    head = layers["probs"]["config"]
    assert head["units"] == len(SPEC.convert["labels"]) == 2
    assert head["activation"] == "softmax"
    assert "last_conv" in layers and SPEC.convert["cam"] is True
    assert SPEC.convert["labels"] == CLASS_NAMES and SPEC.convert["positive_label"] == POSITIVE
    assert CLASS_NAMES[1] == POSITIVE  # PneumoniaMNIST: 1 = pneumonia
    assert SPEC.convert["budget"] == {"auc": 0.005}
    assert WEIGHTS.stat().st_size < 1_000_000
    assert SPEC.data == DATA and SPEC.weights == WEIGHTS


def test_importing_does_not_import_tensorflow() -> None:
    code = "import sys, models.pneumonia_cnn; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_temperature_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 2))
    z = logits / 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random(4000) < p[:, 1]).astype(int)
    assert abs(pneumonia_cnn._fit_temperature(logits, y) - 2.0) < 0.3


def test_missing_raw_data_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        pneumonia_cnn._load_raw(tmp_path)
    assert "pneumoniamnist_dev.npz is missing" in str(exc.value)


@pytest.mark.slow  # converts the committed weights (cached by content)
def test_converts_within_budget(tmp_path: Path) -> None:
    from conftest import convert_cached

    from edge_agent.bundle import Bundle
    from medge.zoo import request as zoo_request

    # lean: the LiteRT path is what this test is about
    out = convert_cached(zoo_request(SPEC, tmp_path / "pneumonia-cnn", lean=True))
    bundle = Bundle.load(out)
    assert bundle.manifest.labels == CLASS_NAMES
    assert bundle.manifest.cam is not None
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == []
    assert report["budget"]["winner"] == "int8"  # full int8 meets auc=0.005: no float rung
    float_auc, int8_auc = report["float"]["auc"], report["litert-int8"]["auc"]
    assert float_auc > 0.944  # above the MedMNIST v2 ResNet-18 (28) anchor (on val)
    assert float_auc - int8_auc < 0.005
