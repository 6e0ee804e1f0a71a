"""A chained bundle (``--feature-stage``): a clip model shipped as a per-frame feature model and
a temporal model over the window of features (docs/bundle.md, "feature stage").

One slow conversion of the committed tiny clip model (tests/data/models: TimeDistributed Conv2D
and GAP, then LSTM(8)); then what the device does with it, and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_cached

from converter import ConvertRequest
from converter.errors import ConversionError
from edge_agent.bundle import Bundle, Preprocess, WindowSpec
from edge_agent.errors import BundleError
from edge_agent.model import LoadedModel
from edge_agent.sources.base import Sample
from edge_agent.window import windowed

MODELS = Path(__file__).parent / "data" / "models"


CLIP_WINDOW = WindowSpec(length=4, hop=1, rate_hz=5.0)


def _request(out: Path, window: WindowSpec | None = CLIP_WINDOW) -> ConvertRequest:
    return ConvertRequest(
        model=MODELS / "clip.keras",
        calib=MODELS / "clip.npz",
        eval=MODELS / "clip.npz",
        calib_split="calib",
        eval_split="val",
        out=out,
        preprocess=Preprocess(kind="scale01"),
        window=window,
        feature_stage=True,
        budget={"accuracy": 0.05},
    )


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_cached(_request(tmp_path_factory.mktemp("chain") / "clip-chain"))


def _edit(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_a_clip_model_ships_as_feature_and_temporal_pairs(chained: Path) -> None:
    b = Bundle.load(chained)
    m = b.manifest
    assert m.schema_version == "2.0" and m.feature is not None
    pairs = {(a.precision, b.feature_artifact(a).file) for a in m.artifacts}  # type: ignore[union-attr]
    assert ("int8", "feature_int8.tflite") in pairs
    for a in m.artifacts:
        f = b.feature_artifact(a)
        assert f is not None and f.inputs[0].shape == [1, 16, 16, 1]
        assert a.inputs[0].shape == [1, 4, f.outputs[0].shape[-1]]  # (window, features)
    report = json.loads((chained / "report.json").read_text())
    # the pairs are scored end to end against the whole float model, and the split is exact
    assert report["feature_stage"]["split_max_diff"] < 1e-4
    assert report["agreement"]["litert-int8"] >= 0.9
    assert report["budget"]["winner"] == "int8"
    assert report["feature_stage"]["feature_vs_float"]["litert-int8"]["pearson_r"] > 0.95
    assert "## Feature stage" in (chained / "report.md").read_text()


@pytest.mark.slow
def test_the_device_runs_each_frame_once_and_matches_the_report(chained: Path) -> None:
    """Frames in, a window every frame (hop 1): the feature model runs once per frame, not
    once per frame per window; the scores equal a fresh chain's on each window alone."""
    model = LoadedModel(Bundle.load(chained))
    with np.load(MODELS / "clip.npz") as d:
        clips = d["val_images"][:12]
    frames = clips.reshape(-1, 16, 16, 1)  # 48 frames, one stream
    samples = (Sample(id=str(i), data=f, time=i / 5.0) for i, f in enumerate(frames))
    windows = list(windowed(samples, 4, 1))
    assert len(windows) == len(frames) - 3
    scores = [model.predict(w.data).scores for w in windows]  # type: ignore[attr-defined]
    assert model.feature is not None
    assert model.feature.runs == len(frames)
    assert model.feature.reused == 4 * len(windows) - len(frames)
    fresh = LoadedModel(Bundle.load(chained))
    for w, s in zip(windows[::7], scores[::7], strict=True):
        assert fresh.predict(w.data).scores == s  # type: ignore[attr-defined]
    # the same clip as the report's evaluation: the first val clip gives its scores
    first = LoadedModel(Bundle.load(chained)).predict(clips[0])
    assert len(first.scores) == 3  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_clip_of_the_wrong_frame_size_is_named(chained: Path) -> None:
    model = LoadedModel(Bundle.load(chained))
    with pytest.raises(Exception, match=r"clip of shape \(4, 8, 8, 1\) is not frames"):
        model.prepare(np.zeros((4, 8, 8, 1), np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda d: d.update(schema_version="1.3"), "a feature stage needs schema 2.0"),
        (lambda d: d.update(feature=None), "schema 2.x without a feature stage"),
        (lambda d: d.update(window=None), "a feature stage needs a window"),
        (lambda d: d["window"].update(length=5), r"takes \[4, \d+\] but its feature stage gives"),
        (
            lambda d: [a.update(precision="fp16") for a in d["feature"]["artifacts"]],
            "no feature artifact for litert/int8",
        ),
        (lambda d: d.update(schema_version="3.0"), r"not supported \(this agent reads 1.x and 2.x"),
        (
            lambda d: d.update(cam={"output": 1, "layer": "x", "upsample_to": [16, 16]}),
            r"has no output 1 \(cam\)|a feature stage and a cam output cannot be combined",
        ),
    ],
)
def test_a_chained_manifest_that_does_not_add_up_is_refused(
    chained: Path, tmp_path: Path, edit, said: str
) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "b"
    shutil.copytree(chained, copy)
    _edit(copy, edit)
    with pytest.raises(BundleError, match=said):
        Bundle.load(copy)


def test_feature_stage_needs_a_keras_clip_classifier_with_a_window(tmp_path: Path) -> None:
    """Refused in one line before any TensorFlow work."""
    from converter import convert

    with pytest.raises(ConversionError, match="needs --window"):
        convert(_request(tmp_path / "a", window=None))


@pytest.mark.slow
def test_medge_evaluate_runs_the_chain_and_finds_the_reports_numbers(chained: Path) -> None:
    from converter import evaluate_bundle

    got = evaluate_bundle(chained, MODELS / "clip.npz", split="val")
    report = json.loads((chained / "report.json").read_text())
    assert got["accuracy"] == pytest.approx(report["litert-int8"]["accuracy"])
    assert got["n"] == report["eval"]["n"]


@pytest.mark.slow
def test_the_update_self_test_input_fits_a_chain(chained: Path) -> None:
    """An over-the-air update self-tests a new bundle on a zero input of its sample shape
    (before any sample was seen): for a chain that is a clip of frames, not the temporal
    model's (window, features) input."""
    model = LoadedModel(Bundle.load(chained))
    assert model.sample_shape == (4, 16, 16, 1)
    scores = model.predict(np.zeros(model.sample_shape, np.float32)).scores  # type: ignore[attr-defined]
    assert len(scores) == 3 and abs(sum(scores) - 1.0) < 0.02
