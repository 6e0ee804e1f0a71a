"""The zoo's ultrasound despeckling GAN: its committed data (real HC18 frames, simulated speckle)
and spec agree with the committed generator (fast, no TensorFlow) and one conversion (slow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from converter.metrics import image_metrics
from models import us_denoise_gan as m

H, W = m.SIZE
# measured on the committed val split by python -m models.us_denoise_gan (validation numbers)
NOISY_PSNR, NOISY_SSIM = 23.986, 0.7423


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(m.DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes_and_finite(npz: dict[str, np.ndarray]) -> None:
    assert set(npz) == {
        "val_images",
        "val_targets",
        "val_looks",
        "val_sigma",
        "val_ids",
        "calib_images",
        "calib_ids",
    }
    for key, n in (("val_images", 50), ("val_targets", 50), ("calib_images", m.CALIB_N)):
        assert npz[key].shape == (n, H, W) and npz[key].dtype == np.uint8
    assert m.CALIB_N >= 100  # the converter warns below 100 calibration samples
    for key in ("val_looks", "val_sigma"):
        assert npz[key].shape == (50,) and np.isfinite(npz[key]).all()
    assert (npz["val_looks"] >= m.LOOKS[0]).all() and (npz["val_looks"] <= m.LOOKS[1]).all()
    assert (npz["val_sigma"] >= m.SIGMA[0]).all() and (npz["val_sigma"] <= m.SIGMA[1]).all()
    assert m.DATA.stat().st_size < 1_800_000


def test_split_is_disjoint_by_exam(npz: dict[str, np.ndarray]) -> None:
    val, calib = npz["val_ids"].tolist(), npz["calib_ids"].tolist()
    assert len(set(val)) == 50 and len(set(calib)) == m.CALIB_N
    assert not set(val) & set(calib)
    assert all(s.endswith("_HC") for s in val + calib)  # HC18 file stems, one frame per exam


def test_val_inputs_are_the_targets_with_speckle(npz: dict[str, np.ndarray]) -> None:
    noisy, clean = npz["val_images"].astype(float), npz["val_targets"].astype(float)
    got = image_metrics(clean, noisy)  # the "before" numbers, as the converter scores them
    assert got["psnr"] == pytest.approx(NOISY_PSNR, abs=0.01)
    assert got["ssim"] == pytest.approx(NOISY_SSIM, abs=0.001)
    # multiplicative: black (zero) target pixels stay near black (additive noise only)
    dark = clean == 0
    assert dark.mean() > 0.05 and noisy[dark].mean() < 3


def test_speckle_model_is_seeded_with_unit_mean_square() -> None:
    clean = np.full((4, 64, 64), 0.25)
    a, looks, _ = m.speckle(clean, np.random.default_rng(7), sigma=np.zeros(4))
    b, _, _ = m.speckle(clean, np.random.default_rng(7), sigma=np.zeros(4))
    assert np.array_equal(a, b)
    assert ((looks >= m.LOOKS[0]) & (looks <= m.LOOKS[1])).all()
    assert np.allclose(a * 255, np.round(a * 255))  # whole grey levels
    assert np.mean((a / 0.25) ** 2) == pytest.approx(1.0, abs=0.03)  # E[n^2] = 1
    # L = 1 is Rayleigh amplitude: std/mean = sqrt(4/pi - 1) ~ 0.523
    one, _, _ = m.speckle(np.full((1, 200, 200), 0.25), np.random.default_rng(0), np.ones(1))
    assert one.std() / one.mean() == pytest.approx(0.523, abs=0.02)


def test_baselines_and_downsize_keep_shapes(npz: dict[str, np.ndarray]) -> None:
    x = npz["val_images"][:3]
    for name, out in m.baselines(x).items():
        assert out.shape == x.shape and out.dtype == np.uint8, name
    frames = np.zeros((2, 2 * H, 2 * W), np.uint8)
    assert m.downsize(frames).shape == (2, H, W)


def _keras(path: Path) -> tuple[dict[str, Any], int]:
    """The saved model's config and its parameter count (from the weights file)."""
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read("config.json"))
        weights = io.BytesIO(z.read("model.weights.h5"))
    sizes: list[int] = []
    with h5py.File(weights, "r") as f:
        f.visititems(lambda _, o: sizes.append(o.size) if isinstance(o, h5py.Dataset) else None)
    return config, sum(sizes)


def test_spec_matches_the_committed_generator() -> None:
    config, params = _keras(m.WEIGHTS)
    layers = {layer["name"]: layer["config"] for layer in config["config"]["layers"]}
    assert layers["image"]["batch_shape"] == [None, H, W, 1]
    # grey levels in and out: preprocessing 'none', the scaling is inside the model
    assert layers["to_unit"]["scale"] == pytest.approx(1 / 255)
    assert layers["to_grey_levels"]["scale"] == 255.0
    assert layers["residual"]["filters"] == 1 and layers["residual"]["activation"] == "linear"
    assert "patch_logits" not in layers  # the generator only
    assert params < 100_000
    c = m.SPEC.convert
    assert m.SPEC.task == "image_to_image" and m.SPEC.family == "GAN"
    assert c["preprocess"] == {"kind": "none"} and c["activation"] == "none"
    assert c["labels"] == ["image"] and (c["calib_split"], c["eval_split"]) == ("calib", "val")
    assert c["budget"] == {"psnr": 0.5}
    assert m.SPEC.data_kind == "real + simulated" and "SIMULATED" in m.SPEC.split
    assert m.WEIGHTS.stat().st_size < 1_000_000
    assert m.SPEC.data == m.DATA and m.SPEC.weights == m.WEIGHTS


def test_importing_does_not_import_tensorflow() -> None:
    code = "import sys, models.us_denoise_gan; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_missing_raw_data_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        m._load_raw(tmp_path)
    assert "hc18_dev.npz is missing" in str(exc.value)


@pytest.mark.slow  # converts the committed generator (cached by content)
def test_converts_within_budget(tmp_path: Path, npz: dict[str, np.ndarray]) -> None:
    from conftest import convert_cached

    from edge_agent.bundle import Bundle
    from edge_agent.decode import ImageResult
    from edge_agent.model import LoadedModel
    from medge.zoo import request as zoo_request

    # lean: the LiteRT path is what this test is about
    out = convert_cached(zoo_request(m.SPEC, tmp_path / "us-denoise-gan", lean=True))
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == []
    assert report["budget"]["winner"] == "int8"  # full int8 meets psnr=0.5
    fl, q = report["float"], report["litert-int8"]
    assert fl["psnr"] > NOISY_PSNR + 3 and fl["ssim"] > NOISY_SSIM + 0.05  # it denoises
    assert fl["psnr"] - q["psnr"] < 0.5
    # the agent runs the bundle on a noisy frame and summarises the denoised image
    res = LoadedModel(Bundle.load(out)).predict(npz["val_images"][0])
    assert isinstance(res, ImageResult)
    assert res.size == [H, W] and 0 <= res.mean <= 255
