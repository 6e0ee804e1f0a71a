"""The zoo's HC18 fetal head U-Net: its committed data and spec (fast, no TensorFlow) and one
conversion of the committed weights (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import hc18_unet
from models.hc18_unet import CALIB_N, DATA, SHAPE, SPEC, WEIGHTS

SPLITS = {"calib": CALIB_N, "val": 50}


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes(npz: dict[str, np.ndarray]) -> None:
    fields = ("images", "masks", "ids", "pixel_mm", "hc_mm")
    assert set(npz) == {f"{s}_{f}" for s in SPLITS for f in fields}
    for split, n in SPLITS.items():
        x, m = npz[f"{split}_images"], npz[f"{split}_masks"]
        assert x.shape == m.shape == (n, *SHAPE)
        assert x.dtype == m.dtype == np.uint8
        assert set(np.unique(m)) == {0, 1} and (m.sum((1, 2)) > 0).all()
        for f in ("pixel_mm", "hc_mm"):
            v = npz[f"{split}_{f}"]
            assert v.shape == (n,) and np.isfinite(v).all() and (v > 0).all()
        # pixel_mm is of the 88x128 grid: the head's outline, in its pixels, fits in the frame
        perimeter_px = npz[f"{split}_hc_mm"] / npz[f"{split}_pixel_mm"]
        assert perimeter_px.min() > 30 and perimeter_px.max() < 2 * sum(SHAPE)
    assert DATA.stat().st_size < 1_500_000


def test_splits_are_disjoint_by_exam(npz: dict[str, np.ndarray]) -> None:
    calib, val = npz["calib_ids"].tolist(), npz["val_ids"].tolist()
    assert all(re.fullmatch(r"\d{3}_HC", i) for i in calib + val)  # one image per exam
    assert len(set(calib)) == CALIB_N and len(set(val)) == 50
    assert not {i[:3] for i in calib} & {i[:3] for i in val}
    assert not {x.tobytes() for x in npz["calib_images"]} & {x.tobytes() for x in npz["val_images"]}


def test_halve_averages_blocks() -> None:
    img = np.array([[[0, 2, 10, 10], [4, 6, 10, 11]]], np.uint8)
    msk = np.array([[[1, 1, 0, 1], [0, 0, 0, 0]]], np.uint8)
    x, m = hc18_unet.halve(img, msk)
    assert x.tolist() == [[[3, 10]]] and x.dtype == np.uint8
    assert m.tolist() == [[[1, 0]]] and m.dtype == np.uint8  # half the block: foreground


def test_calib_indices_are_seeded() -> None:
    a = hc18_unet.calib_indices(250, 64, seed=0)
    assert a.tolist() == hc18_unet.calib_indices(250, 64, seed=0).tolist()
    assert len(np.unique(a)) == 64 and (np.diff(a) > 0).all() and a.max() < 250


def _keras_config(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))  # type: ignore[no-any-return]


def test_spec_matches_the_committed_weights(npz: dict[str, np.ndarray]) -> None:
    cfg = _keras_config(WEIGHTS)["config"]
    layers = {layer["name"]: layer for layer in cfg["layers"]}
    head = layers["mask"]["config"]
    assert head["filters"] == 1 and head["activation"] == SPEC.convert["activation"] == "sigmoid"
    shape = layers["image"]["config"]["batch_shape"]
    assert tuple(shape[1:]) == (*npz["val_images"].shape[1:], 1) == (*SHAPE, 1)
    convs = [c["config"]["filters"] for c in cfg["layers"] if c["class_name"] == "Conv2D"]
    assert max(convs) == hc18_unet.FILTERS[-1] == 64  # a small U-Net
    assert len(SPEC.convert["labels"]) == 2 and SPEC.task == "segmentation"
    assert SPEC.convert["budget"] == {"dice": 0.01}
    assert {SPEC.convert["calib_split"], SPEC.convert["eval_split"]} == set(SPLITS)
    assert WEIGHTS.stat().st_size < 1_000_000
    assert SPEC.data == DATA and SPEC.weights == WEIGHTS and SPEC.family == "U-Net"


def test_importing_does_not_import_tensorflow() -> None:
    code = "import sys, models.hc18_unet; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_missing_raw_data_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        hc18_unet._load_raw(tmp_path)
    assert "hc18_dev.npz is missing" in str(exc.value)


@pytest.mark.slow  # converts the committed weights (cached by content)
def test_converts_within_budget(tmp_path: Path) -> None:
    from conftest import convert_cached

    from medge.zoo import request as zoo_request

    # lean: the LiteRT path is what this test is about
    out = convert_cached(zoo_request(SPEC, tmp_path / "hc18-unet", lean=True))
    report = json.loads((out / "report.json").read_text())
    f, q = report["float"], report["litert-int8"]
    assert f["dice"] > 0.95 and f["dice"] - q["dice"] < 0.01  # validation, 88x128
    assert f["hc_mae_mm"] < 3.0 and q["hc_mae_mm"] < 3.0 and f["hc_unmeasured"] == 0
    assert f["hc_mae_mm_reference"] < 1.0 and len(f["hc_mae_mm_ci"]) == 2
    assert "| hc_mae_mm |" in (out / "report.md").read_text(encoding="utf-8")
