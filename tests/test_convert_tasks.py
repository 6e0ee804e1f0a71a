"""Tasks beyond classification (manifest schema 1.2): a tiny U-Net (segmentation) and a tiny
denoiser (image_to_image), trained for a few seconds on SIMULATED images (bright blobs on noise)
by tools/make_test_models.py and committed in tests/data/models/, converted, evaluated with
Dice/HD95 and PSNR/SSIM, and run by the agent."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_cached

from converter import ConvertRequest, convert
from converter.errors import ConversionError
from edge_agent.bundle import Bundle, Preprocess
from edge_agent.model import LoadedModel

pytestmark = pytest.mark.slow

MODELS = Path(__file__).parent / "data" / "models"
SIZE = 32


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed tiny models and their data (tests/data/models/README.md)."""
    d = tmp_path_factory.mktemp("task-models")
    for name in ("unet.keras", "denoise.keras", "blobs.npz"):
        shutil.copyfile(MODELS / name, d / name)
    return d


@pytest.fixture(scope="module")
def data(work: Path) -> Path:
    return work / "blobs.npz"


def _request(model: Path, data: Path, out: Path, task: str, **kw: object) -> ConvertRequest:
    return ConvertRequest(
        model=model,
        calib=data,
        eval=data,
        out=out,
        task=task,
        preprocess=Preprocess(kind="scale01"),
        calib_split="calib",
        eval_split="val",
        activation="sigmoid" if task == "segmentation" else "none",
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundles(data: Path, work: Path) -> dict[str, object]:
    """Both tiny models converted two at a time (through the bundle cache): task -> (bundle,
    its directory), or the error. LiteRT only (the tests here are not about ONNX) and no float
    artifact beside int8 (the file list must not depend on timing)."""
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
            return Bundle.load(convert_cached(req)), out
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
    with np.load(data) as d:
        sample, mask = d["val_images"][0], d["val_masks"][0]
    seg = LoadedModel(Bundle.load(out)).predict(sample)
    assert seg.area_px == pytest.approx(int(mask.sum()), rel=0.5)


def test_a_segmentation_shadow_reports_the_dice_of_its_masks(
    data: Path, bundles: dict[str, object], tmp_path: Path
) -> None:
    """A U-Net's shadow run (and float check) compares masks, not only labels: the same
    model gives Dice 1.0 on every sample; a candidate that thresholds its probabilities
    lower (the same weights, the manifest's mask_threshold 0.5 -> 0.1) draws larger masks
    under the same labels, and its Dice is the overlap numpy finds on the raw outputs."""
    from edge_agent.bundle import MANIFEST_NAME, Manifest, write_manifest
    from edge_agent.graph import Work
    from edge_agent.shadow import ShadowRun
    from edge_agent.sources import Sample

    _, out = _bundle(bundles, "segmentation")
    current = LoadedModel(Bundle.load(out))
    tight = tmp_path / "tight"
    shutil.copytree(out, tight)
    m = Manifest.model_validate_json((tight / MANIFEST_NAME).read_text())
    assert m.decode.activation == "sigmoid" and m.decode.mask_threshold == 0.5
    write_manifest(
        tight, m.model_copy(update={"decode": m.decode.model_copy(update={"mask_threshold": 0.1})})
    )
    candidate = LoadedModel(Bundle.load(tight))
    with np.load(data) as d:
        images = d["val_images"][:24]
    same, other = ShadowRun(current, 1.0, 1000.0), ShadowRun(candidate, 1.0, 1000.0)
    expected = []
    for i, x in enumerate(images):
        w = Work(Sample(f"s{i}", x), current)
        w.y = current.infer(current.prepare(x))
        w.decoded = current.decode(w.y)
        w.latency["infer"] = 0.001
        same.observe(w)
        other.observe(w)
        a = w.y >= 0.5  # the probabilities, flat: one channel, sigmoid
        b = candidate.infer(candidate.prepare(x)) >= 0.1
        total = int(a.sum() + b.sum())
        expected.append(1.0 if total == 0 else 2 * int((a & b).sum()) / total)
    assert same.snapshot()["dice"] == {"mean": 1.0, "min": 1.0, "n": 24}
    got = other.snapshot()
    assert got["dice"]["n"] == 24
    assert got["dice"]["mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert got["dice"]["min"] == pytest.approx(min(expected), abs=1e-6)
    assert got["dice"]["mean"] < 0.99 and got["dice"]["min"] < 0.95, "larger masks at 0.1"
    assert got["agreement"] > got["dice"]["mean"], "labels alone hide the difference"


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
