"""Tasks beyond classification (manifest schema 1.2): a tiny U-Net (segmentation) and a tiny
denoiser (image_to_image), trained for a few seconds at test time on SIMULATED images (bright
blobs on noise), converted, evaluated with Dice/HD95 and PSNR/SSIM, and run by the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from converter import ConvertRequest, convert
from converter.errors import ConversionError
from edge_agent.bundle import Bundle, Preprocess
from edge_agent.model import LoadedModel

pytestmark = pytest.mark.slow

SIZE = 32


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated images: 1-2 bright discs on Gaussian noise; (noisy uint8, mask, clean float)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    clean = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(6, SIZE - 6, 2)
            r = rng.uniform(3, 6)
            clean[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.6, 0.9)
    noisy = np.clip(clean + rng.normal(0.15, 0.08, clean.shape), 0, 1)
    return (noisy * 255).astype(np.uint8), clean > 0, clean


TRAIN = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
from keras import layers
data, out = np.load(sys.argv[1]), sys.argv[2]
for task, name in (("segmentation", "unet"), ("image_to_image", "denoise")):
    keras.utils.set_random_seed(0)
    key = "train_masks" if task == "segmentation" else "train_targets"
    x = data["train_images"][..., None].astype("float32") / 255.0
    y = data[key][..., None].astype("float32")
    inp = keras.Input((32, 32, 1), name="image")
    a = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    b = layers.Conv2D(16, 3, padding="same", activation="relu")(layers.MaxPooling2D()(a))
    u = layers.Concatenate()([a, layers.UpSampling2D()(b)])
    c = layers.Conv2D(8, 3, padding="same", activation="relu")(u)
    act = "sigmoid" if task == "segmentation" else "linear"
    model = keras.Model(inp, layers.Conv2D(1, 1, activation=act, name="out")(c), name="tiny_unet")
    loss = "binary_crossentropy" if task == "segmentation" else "mse"
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
    model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    model.save(os.path.join(out, f"{name}.keras"))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    tx, tm, tc = blobs(192, 1)
    vx, vm, vc = blobs(48, 2)
    np.savez(
        d / "blobs.npz",
        train_images=tx,
        train_masks=tm,
        train_targets=tc,
        val_images=vx,
        val_masks=vm,
        val_targets=vc,
    )
    return d / "blobs.npz"


def _request(model: Path, data: Path, out: Path, task: str, **kw: object) -> ConvertRequest:
    return ConvertRequest(
        model=model,
        calib=data,
        eval=data,
        out=out,
        task=task,
        preprocess=Preprocess(kind="scale01"),
        calib_split="train",
        eval_split="val",
        activation="sigmoid" if task == "segmentation" else "none",
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundles(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Both tiny models trained in one child (one TensorFlow start), then converted two at a
    time: task -> (bundle, its directory), or the error. LiteRT only (the tests here are not
    about ONNX) and no float artifact beside int8 (the file list must not depend on timing)."""
    work = tmp_path_factory.mktemp("task-models")
    r = subprocess.run(
        [sys.executable, "-c", TRAIN, str(data), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = {
        "segmentation": ("unet", {"budget": {"dice": 0.05}}),
        "image_to_image": ("denoise", {}),
    }

    def run(task: str) -> object:
        name, kw = jobs[task]
        out = work / f"{task}-bundle"
        try:
            req = _request(
                work / f"{name}.keras", data, out, task, onnx=False, float_artifacts="none", **kw
            )
            return convert(req), out
        except ConversionError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(run, jobs), strict=True))


def _bundle(bundles: dict[str, object], task: str) -> tuple[Bundle, Path]:
    got = bundles[task]
    assert isinstance(got, tuple), f"{task}: {got}"
    return got


def test_segmentation_bundle_keeps_dice_and_runs_on_the_agent(
    data: Path, bundles: dict[str, object]
) -> None:
    b, out = _bundle(bundles, "segmentation")
    m = b.manifest
    assert m.task == "segmentation" and m.decode.kind == "segmentation"
    assert m.labels == ["background", "foreground"]
    assert (m.artifacts[0].runtime, m.artifacts[0].precision) == ("litert", "int8")
    report = json.loads((out / "report.json").read_text())
    fl, q = report["float"], report["litert-int8"]
    assert fl["dice"] > 0.7, "the tiny U-Net must actually find the simulated blobs"
    assert fl["dice"] - q["dice"] <= 0.05 and q["hd95"] is not None
    assert report["agreement"]["litert-int8"] >= 0.95
    assert report["budget"]["winner"] == "int8"
    assert m.metrics["litert-int8"]["dice"] == pytest.approx(q["dice"])
    # the agent decodes the bundle's output into a mask summary
    _, masks, _ = blobs(48, 2)
    with np.load(data) as d:
        sample = d["val_images"][0]
    seg = LoadedModel(Bundle.load(out)).predict(sample)
    assert seg.area_px == pytest.approx(int(masks[0].sum()), rel=0.5)


def test_image_to_image_bundle_reports_psnr_and_ssim(
    data: Path, bundles: dict[str, object]
) -> None:
    b, out = _bundle(bundles, "image_to_image")
    m = b.manifest
    assert m.task == "image_to_image" and m.decode.kind == "image_to_image"
    report = json.loads((out / "report.json").read_text())
    fl, q = report["float"], report["litert-int8"]
    with np.load(data) as d:
        noisy = d["val_images"].astype(np.float64) / 255.0
        clean = d["val_targets"].astype(np.float64)
    input_psnr = float(
        np.mean(10 * np.log10(np.ptp(clean) ** 2 / ((noisy - clean) ** 2).mean((1, 2))))
    )
    assert fl["psnr"] > input_psnr + 3, "the denoiser must actually denoise"
    assert fl["psnr"] - q["psnr"] <= 3.0 and q["ssim"] > 0.5
    assert report["output_snr_db"]["litert-int8"] > 15


def test_segmentation_needs_masks(data: Path, tmp_path: Path) -> None:
    np.savez(
        tmp_path / "nomask.npz",
        val_images=np.zeros((4, SIZE, SIZE), np.uint8),
        val_labels=np.zeros(4, np.int64),
    )
    (tmp_path / "m.keras").write_bytes(b"not read: the data is checked first")
    with pytest.raises(ConversionError, match="segmentation data needs x/y or <split>_images"):
        convert(
            _request(tmp_path / "m.keras", tmp_path / "nomask.npz", tmp_path / "o", "segmentation")
        )
