"""Recurrent models through the converter's LiteRT strategies (converter.strategies).

Tiny models (LSTM, GRU, bidirectional LSTM, a TimeDistributed CNN + LSTM on clips), trained for
10 epochs on synthetic but structured data (no number here is about real patients) by
tools/make_test_models.py and committed in tests/data/models/ (README.md there): the subject is
the conversion, not the data. Each conversion must give a bundle whose LiteRT artifact agrees
with the float model on at least 95% of the held-out samples, and the report must say which
strategy won and why the ones before it did not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import convert_cached

from converter import ConversionError, ConvertRequest, convert
from edge_agent.bundle import Bundle, Preprocess

pytestmark = pytest.mark.slow

MODELS = Path(__file__).parent / "data" / "models"
# model -> its npz (splits calib and val): the three recurrent models share one IMU set; the
# untrained bicubic CNN gets the clips' first frames
DATA = {"lstm": "imu", "gru": "imu", "bilstm": "imu", "clip": "clip", "bicubic": "image"}


def _convert(models: Path, name: str, out: Path, cached: bool, **kw: object) -> dict:  # type: ignore[type-arg]
    """Convert one model; ``cached``: through conftest's bundle cache (the tests that read only
    the bundle), else convert() itself (a test of what it raises and leaves behind)."""
    scale = Preprocess(kind="none" if DATA[name] == "imu" else "scale01")
    request = ConvertRequest(
        model=models / f"{name}.keras",
        calib=models / f"{DATA[name]}.npz",
        eval=models / f"{DATA[name]}.npz",
        calib_split="calib",
        eval_split="val",
        out=out,
        preprocess=scale,
        positive_label="fall",
        onnx=False,
        **kw,  # type: ignore[arg-type]
    )
    if cached:
        convert_cached(request)
    else:
        convert(request)
    return json.loads((out / "report.json").read_text())


def _cli_convert(models: Path, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "convert",
            str(models / f"{name}.keras"),
            "--calib",
            str(models / f"{DATA[name]}.npz"),
            "--calib-split",
            "calib",
            "--eval",
            str(models / f"{DATA[name]}.npz"),
            "--eval-split",
            "val",
            "--no-onnx",
            "--preprocess",
            "scale01",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# job -> (its test, model, strategies or "cli"): each conversion once, two at a time (each is
# mostly one single-threaded converter child), the longest first, each in its own directory;
# a test waits for its own conversion only. The jobs whose tests read only the bundle go
# through the bundle cache; "gru-legacy" checks what convert() raises and leaves behind.
JOBS = {
    "bilstm": (
        "test_bidirectional_lstm_through_the_fused_legacy_lstm",
        "bilstm",
        ["full-int8", "legacy-lstm-int8"],
    ),
    "lstm": ("test_keras3_lstm_crashes_full_int8_and_the_unrolled_rebuild_wins", "lstm", None),
    "gru": ("test_gru_fails_full_int8_with_the_converters_error_and_unrolls", "gru", None),
    "clip": (
        "test_cnn_lstm_clip_falls_back_to_dynamic_range",
        "clip",
        ["full-int8", "dynamic-range"],
    ),
    "gru-legacy": (
        "test_a_strategy_that_does_not_apply_is_skipped_with_its_reason",
        "gru",
        ["legacy-lstm-int8"],
    ),
    "bicubic": ("test_unsupported_op_is_one_clear_line", "bicubic", "cli"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed tiny models and their data (tests/data/models)."""
    models = tmp_path_factory.mktemp("recurrent")
    for file in {*(f"{m}.keras" for m in DATA), *(f"{d}.npz" for d in DATA.values())}:
        shutil.copyfile(MODELS / file, models / file)
    return models


@pytest.fixture(scope="module")
def runs(
    models: Path,
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future]:  # type: ignore[type-arg]
    """Job -> Future of (its directory, the report, the error or the CLI run)."""

    def job(key: str) -> Callable[[], tuple[Path, object]]:
        _, name, strategies = JOBS[key]
        work = tmp_path_factory.mktemp(key)

        def run() -> tuple[Path, object]:
            if strategies == "cli":
                return work, _cli_convert(models, name, work / key)
            try:
                cached = key != "gru-legacy"
                return work, _convert(models, name, work / key, cached, strategies=strategies)
            except ConversionError as exc:
                return work, exc

        return run

    started = side_by_side({test: job(key) for key, (test, _, _) in JOBS.items()})
    return {key: started[test] for key, (test, _, _) in JOBS.items() if test in started}


def _result(runs: dict[str, Future], key: str) -> tuple[Path, object]:  # type: ignore[type-arg]
    """The job's conversion, once done: (its bundle directory, the report or what failed)."""
    work, got = runs[key].result()
    return work / key, got


def _report(runs: dict[str, Future], key: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    bundle, got = _result(runs, key)
    assert isinstance(got, dict), f"{key}: {got}"
    return bundle, got


def _outcomes(report: dict) -> dict[str, tuple[str, str | None]]:  # type: ignore[type-arg]
    return {a["strategy"]: (a["outcome"], a["reason"]) for a in report["litert"]["attempts"]}


def test_keras3_lstm_crashes_full_int8_and_the_unrolled_rebuild_wins(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, report = _report(runs, "lstm")
    got = _outcomes(report)
    assert got["full-int8"] == ("crashed", "crashed the converter process (SIGSEGV)")
    assert report["litert"]["strategy"] == "unrolled-int8"
    assert got["unrolled-int8"][0] == "won"
    assert got["legacy-lstm-int8"][0] == "not tried"
    assert report["agreement"]["litert-int8"] >= 0.95
    m = Bundle.load(bundle).manifest
    assert m.provenance.strategy == "litert unrolled-int8"
    assert m.artifacts[0].inputs[0].shape == [1, 32, 3] and m.artifacts[0].inputs[0].layout == "NTC"
    md = (bundle / "report.md").read_text()
    assert "strategy `unrolled-int8` won" in md
    assert "`full-int8` (direct full-int8 (TFLiteConverter)): **crashed** — crashed the" in md


def test_gru_fails_full_int8_with_the_converters_error_and_unrolls(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    _, report = _report(runs, "gru")
    outcome, reason = _outcomes(report)["full-int8"]
    assert outcome == "failed"
    assert reason == (
        "'tf.TensorListReserve' op requires element_shape to be static during TF Lite "
        "transformation pass"
    )
    assert report["litert"]["strategy"] == "unrolled-int8"
    assert report["agreement"]["litert-int8"] >= 0.95


def test_bidirectional_lstm_through_the_fused_legacy_lstm(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """The tf_keras rebuild: two fused LSTM ops. Their state lives in variable tensors that
    LiteRT keeps across invokes; the agent's backend zeroes them per sample, or the second
    sample would start from the first one's state (measured: agreement 35% without)."""
    _, report = _report(runs, "bilstm")
    won = next(a for a in report["litert"]["attempts"] if a["outcome"] == "won")
    assert won["strategy"] == "legacy-lstm-int8"
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in won["ops"] and "WHILE" not in won["ops"]
    assert report["agreement"]["litert-int8"] >= 0.95
    assert report["size_bytes"]["litert-int8"] < report["size_bytes"]["keras"] / 3


def test_cnn_lstm_clip_falls_back_to_dynamic_range(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """The last resort: int8 weights, float activations and float input/output."""
    bundle, report = _report(runs, "clip")
    assert _outcomes(report)["full-int8"][0] == "failed"
    assert report["litert"]["strategy"] == "dynamic-range"
    assert report["agreement"]["litert-dynamic"] >= 0.95
    art = Bundle.load(bundle).manifest.artifacts[0]
    assert (art.file, art.precision) == ("model_dynamic.tflite", "dynamic")
    inp = art.inputs[0]
    assert (inp.shape, inp.dtype, inp.layout) == ([1, 4, 16, 16, 1], "float32", "NTHWC")
    assert inp.quantization is None


def test_a_strategy_that_does_not_apply_is_skipped_with_its_reason(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, got = _result(runs, "gru-legacy")
    assert isinstance(got, ConversionError)
    assert str(got) == (
        "no LiteRT conversion strategy worked — legacy-lstm-int8: skipped "
        "(not applicable: GRU has no fused int8 LiteRT op)"
    )
    assert not bundle.exists()
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "no staging left"


def test_unsupported_op_is_one_clear_line(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, r = _result(runs, "bicubic")
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(
        "medge: error: unsupported op tf.ResizeBicubic: LiteRT has no builtin kernel for it"
    )
    assert "Traceback" not in r.stderr
    assert not bundle.exists()
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "no staging left"
