"""The input thumbnail a result of an image model carries (edge_agent.thumbnail): a small grey
or RGB PNG of the input, bounded in size, accepted by the body schema, left out on request and
for models that do not take images. Real BreastMNIST images (models/data, CC BY 4.0) through
tiny ONNX models (tests/test_decode.py's)."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from test_decode import cam_graph, images, onnx_bundle, seg_graph

from edge_agent.bundle import CamSpec
from edge_agent.decode import Classification
from edge_agent.errors import EnvelopeError
from edge_agent.model import LoadedModel
from edge_agent.pictures import PictureCap
from edge_agent.pipeline import run_pipeline
from edge_agent.schemas import MAX_THUMBNAIL_CHARS, check_body
from edge_agent.sources import NpzSettings, open_source
from edge_agent.telemetry import PipelineStats
from edge_agent.thumbnail import MAX_THUMBNAIL_SIDE, input_thumbnail
from gateway.dashboard.cam import check_cam
from models import breast_cnn


def png_of(thumb: dict[str, Any]) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(thumb["png"]), np.uint8), -1)
    assert img is not None, "not a PNG"
    return np.asarray(img)


def run(
    model: LoadedModel,
    n: int,
    thumbnails: bool = True,
    pictures_max_hz: float | None = None,
    stats: PipelineStats | None = None,
) -> list[dict[str, Any]]:
    src = open_source(NpzSettings(path=breast_cnn.DATA, split="val", rate_hz=0, limit=n))
    sent: list[dict[str, Any]] = []
    run_pipeline(
        src.stream(threading.Event()),
        model,
        lambda k, b: sent.append(b),
        stats or PipelineStats(),
        thumbnails=thumbnails,
        pictures_max_hz=pictures_max_hz,
    )
    return sent


@pytest.fixture
def key(site_dir: Path) -> Path:
    return site_dir / "bundle-signer.key"


@pytest.mark.parametrize(
    ("shape", "dtype", "want", "channels"),
    [
        ((28, 28), np.uint8, (28, 28), 1),  # BreastMNIST: as it is
        ((512, 384), np.int16, (64, 48), 1),  # a CT slice: shrunk, aspect kept
        ((480, 640, 3), np.uint8, (48, 64), 3),  # a colour frame: RGB
        ((200, 200, 1), np.float32, (50, 50), 1),  # one channel: grey
        ((96, 96, 4), np.uint8, (48, 48), 3),  # alpha is dropped
    ],
)
def test_thumbnail_shape_and_size_bound(
    shape: tuple[int, ...], dtype: Any, want: tuple[int, int], channels: int
) -> None:
    rng = np.random.default_rng(7)
    data = (rng.random(shape) * 250).astype(dtype)  # noise: the hardest case for zlib
    thumb = input_thumbnail(data)
    assert thumb is not None
    img = png_of(thumb)
    assert img.shape[:2] == want == (thumb["height"], thumb["width"])
    assert (img.shape[2] if img.ndim == 3 else 1) == channels
    assert max(want) <= MAX_THUMBNAIL_SIDE
    assert len(thumb["png"]) <= MAX_THUMBNAIL_CHARS
    assert check_cam({"png": thumb["png"]})[1] is None, "the dashboard's PNG check passes it"
    assert check_body("result", {"thumbnail": thumb})


def test_thumbnail_values_and_odd_inputs() -> None:
    img = images(1)[0]
    thumb = input_thumbnail(img)
    assert thumb is not None
    assert np.array_equal(png_of(thumb), img), "an 8-bit input at most 64 px is kept exactly"
    flat = input_thumbnail(np.full((10, 10), 3.5, np.float32))
    assert flat is not None and int(png_of(flat).max()) == 0
    wide = input_thumbnail(np.linspace(-1, 1, 200, dtype=np.float32)[None, :].repeat(4, 0))
    assert wide is not None and (wide["width"], wide["height"]) == (50, 1)  # 4x4 blocks
    assert int(png_of(wide).min()) <= 5 and int(png_of(wide).max()) >= 250  # min..max stretched
    assert input_thumbnail(np.zeros((4, 4, 4, 4))) is None
    assert input_thumbnail(np.zeros(16)) is None


def test_schema_bounds_the_thumbnail() -> None:
    good = input_thumbnail(images(1)[0])
    assert good is not None
    for bad in (
        "iVBOR",
        {**good, "png": "A" * (MAX_THUMBNAIL_CHARS + 4)},
        {**good, "width": 0},
        {**good, "height": 10_000},
        {**good, "width": 2.5},
        {"width": 28, "height": 28},
    ):
        with pytest.raises(EnvelopeError):
            check_body("result", {"thumbnail": bad})


def test_results_of_image_models_carry_the_input_thumbnail(tmp_path: Path, key: Path) -> None:
    seg = onnx_bundle(tmp_path / "s", seg_graph(1), "segmentation", ["tissue", "lesion"], key)
    sent = run(LoadedModel(seg, "onnx"), 3)
    assert len(sent) == 3
    for img, r in zip(images(3), sent, strict=True):
        assert (r["thumbnail"]["width"], r["thumbnail"]["height"]) == (28, 28)
        assert np.array_equal(png_of(r["thumbnail"]), img)
        assert r["mask"]["size"] == [28, 28], "the contour's frame is the thumbnail's"
        assert len(r["thumbnail"]["png"]) < 2000
    assert all("thumbnail" not in r for r in run(LoadedModel(seg, "onnx"), 2, thumbnails=False))

    cam = CamSpec(output=1, layer="maps", upsample_to=[28, 28])
    clf = onnx_bundle(
        tmp_path / "c", cam_graph(), "classification", ["dark", "bright"], key, cam=cam
    )
    [r] = run(LoadedModel(clf, "onnx"), 1)
    assert {"thumbnail", "cam", "scores"} <= set(r)
    assert check_body("result", r) is r


def test_the_picture_cap_leaves_routine_results_bare_and_counts_them(
    tmp_path: Path, key: Path
) -> None:
    """pictures_max_hz: at most that many pictured results a second; a change of class always
    gets its pictures; every result is counted made or capped, and the rest is unchanged."""
    cam = CamSpec(output=1, layer="maps", upsample_to=[28, 28])
    clf = onnx_bundle(
        tmp_path / "c", cam_graph(), "classification", ["dark", "bright"], key, cam=cam
    )
    model = LoadedModel(clf, "onnx")
    n = 40
    every = run(model, n)
    stats = PipelineStats()
    # one routine picture per 1000 s: only the first
    capped = run(model, n, pictures_max_hz=1e-3, stats=stats)
    assert len(capped) == len(every) == n
    preds = [r["pred"] for r in every]
    want = [i == 0 or preds[i] != preds[i - 1] for i in range(n)]
    assert 0 < sum(want) < n, "the recording has runs of one class and changes"
    assert [("cam" in r, "thumbnail" in r) for r in capped] == [(w, w) for w in want]
    assert stats.snapshot()["pictures"] == {"made": sum(want), "capped": n - sum(want)}
    bare = ("cam", "thumbnail", "latency_ms")
    for a, b in zip(every, capped, strict=True):
        assert {k: v for k, v in a.items() if k not in bare} == {
            k: v for k, v in b.items() if k not in bare
        }


def test_a_positive_always_gets_its_pictures(tmp_path: Path, key: Path) -> None:
    clf = onnx_bundle(tmp_path / "c", cam_graph(), "classification", ["dark", "bright"], key)
    manifest = clf.manifest.model_copy(update={"positive_label": "bright"})
    model = SimpleNamespace(bundle=SimpleNamespace(id=clf.id, manifest=manifest))
    now = [0.0]
    stats = PipelineStats()
    cap = PictureCap(2.0, stats, clock=lambda: now[0])
    dark, bright = Classification(0, "dark", [0.9, 0.1]), Classification(1, "bright", [0.1, 0.9])
    took = []
    for t, c in [(0.0, dark), (0.1, dark), (0.2, bright), (0.3, bright), (0.4, dark), (0.6, dark)]:
        now[0] = t
        took.append(cap.take(c, model))  # type: ignore[arg-type]
    # first; capped (0.1 s < 0.5 s); positive; positive again; class change; 0.2 s after it
    assert took == [True, False, True, True, True, False]
    assert stats.pictures == {"made": 4, "capped": 2}
    with pytest.raises(ValueError, match="pictures_max_hz"):
        PictureCap(0.0, stats)
