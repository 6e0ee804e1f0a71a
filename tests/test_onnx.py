"""ONNX artifacts (fp32 and QDQ int8) and the ONNX Runtime backend, on the real zoo bundle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from zoo_args import BREAST_CNN_ARGS

from converter.onnx import tensorrt_build
from edge_agent.backends import open_backend
from edge_agent.bundle import Bundle, file_entry
from edge_agent.errors import BackendError
from edge_agent.model import LoadedModel
from models import breast_cnn

DATA = str(breast_cnn.DATA)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def _edit_manifest(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shadow(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which ``import module`` fails, as on a machine without it."""
    pkg = tmp_path / "shadow" / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    return dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))


def _float_shipped(bundle_dir: Path) -> list[str]:
    """The float LiteRT artifacts the converter shipped beside int8 (report.json
    float_artifacts: the fixtures ask for none, the default ships both; the tests read the
    decision rather than assume it)."""
    report = json.loads((bundle_dir / "report.json").read_text())
    decided = report.get("float_artifacts") or {}
    return [p for p in ("fp16", "fp32") if decided.get(p, {}).get("shipped")]


def test_bundle_carries_onnx_fp32_and_int8_with_verified_hashes(bundle_dir: Path) -> None:
    b = Bundle.load(bundle_dir)  # verifies every file's SHA-256 and size
    m = b.manifest
    assert [(a.runtime, a.precision) for a in m.artifacts] == [
        ("litert", "int8"),
        *[("litert", p) for p in _float_shipped(bundle_dir)],
        ("onnx", "fp32"),
        ("onnx", "int8"),
    ]
    for precision in ("fp32", "int8"):
        art = b.artifact("onnx", precision)
        assert m.files[art.file] == file_entry(bundle_dir / art.file)
        # QDQ keeps float graph inputs/outputs: nothing to quantize on the way in or out
        assert art.inputs[0].shape == [1, 28, 28, 1] and art.inputs[0].dtype == "float32"
        assert art.inputs[0].layout == "NHWC" and art.inputs[0].quantization is None
        assert art.outputs[0].shape == [1, 2]
        assert art.tensorrt is None, "engine settings are for the jetson profile only"
    assert {"onnx-fp32", "onnx-int8"} <= set(m.metrics)
    assert "tf2onnx" in (m.provenance.strategy or "")


def test_onnx_fp32_matches_the_keras_model(bundle_dir: Path) -> None:
    report = json.loads((bundle_dir / "report.json").read_text())
    assert report["agreement"]["onnx-fp32"] >= 0.99
    for metric in ("accuracy", "sensitivity", "specificity", "auc"):
        assert report["onnx-fp32"][metric] == pytest.approx(report["float"][metric], abs=1e-6)


def test_onnx_int8_keeps_the_float_models_performance(bundle_dir: Path) -> None:
    report = json.loads((bundle_dir / "report.json").read_text())
    assert report["agreement"]["onnx-int8"] >= 0.95
    assert abs(report["float"]["auc"] - report["onnx-int8"]["auc"]) <= 0.03
    assert report["onnx-int8"]["auc"] > 0.8
    extra = {f"litert-{p}" for p in _float_shipped(bundle_dir)}
    assert set(report["latency_ms"]) == {"litert-int8", "onnx-fp32", "onnx-int8"} | extra
    assert report["warnings"] == []
    md = (bundle_dir / "report.md").read_text()
    assert "| onnx-int8 |" in md and "Confusion matrix, onnx-fp32" in md


def test_onnx_int8_file_is_less_than_half_the_fp32_one(bundle_dir: Path) -> None:
    # Measured on the zoo CNN (35k parameters): 55,764 / 143,974 bytes = 0.39. The QDQ model
    # keeps one scale and zero point per channel and per activation, which a model this small
    # notices; the ratio approaches 0.25 as the weights grow.
    sizes = json.loads((bundle_dir / "report.json").read_text())["size_bytes"]
    assert sizes["onnx-int8"] < 0.5 * sizes["onnx-fp32"]


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_onnx_int8_metrics(bundle_dir: Path) -> None:
    r = _run(
        "-m",
        "medge",
        "evaluate",
        str(bundle_dir),
        "--data",
        DATA,
        "--split",
        "val",
        "--runtime",
        "onnx",
        "--precision",
        "int8",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = Bundle.load(bundle_dir).manifest.metrics["onnx-int8"]
    assert got["artifact"] == "onnx-int8" and got["n"] == 78
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc"):
        assert got[k] == want[k], k


def test_evaluate_cli_names_a_missing_artifact(bundle_dir: Path) -> None:
    r = _run(
        "-m",
        "medge",
        "evaluate",
        str(bundle_dir),
        "--data",
        DATA,
        "--split",
        "val",
        "--runtime",
        "onnx",
        "--precision",
        "fp16",
    )
    assert r.returncode == 2
    has = ", ".join(
        [
            "litert/int8",
            *[f"litert/{p}" for p in _float_shipped(bundle_dir)],
            "onnx/fp32",
            "onnx/int8",
        ]
    )
    assert f"no onnx fp16 artifact (has {has})" in r.stderr


def test_backend_reads_its_tensors_from_the_model(bundle_dir: Path) -> None:
    backend = open_backend("onnx", bundle_dir / "model_int8.onnx", threads=2)
    assert backend.name == "onnx"
    assert [(t.name, t.shape, t.dtype) for t in backend.inputs] == [
        ("image", [1, 28, 28, 1], "float32")
    ]
    out = backend.invoke([np.zeros((1, 28, 28, 1), np.float32)])
    assert len(out) == 1 and out[0].shape == (1, 2)
    assert float(out[0].sum()) == pytest.approx(1.0, abs=1e-5), "the final Softmax stays float"


def test_corrupt_onnx_with_matching_hash_is_one_clear_line(bundle_copy: Path) -> None:
    model = bundle_copy / "model_int8.onnx"
    model.write_bytes(b"this is not a protobuf")
    entry = file_entry(model)
    _edit_manifest(
        bundle_copy, lambda d: d["files"].update({"model_int8.onnx": entry.model_dump()})
    )
    with pytest.raises(BackendError, match="ONNX Runtime cannot load model_int8.onnx") as info:
        LoadedModel(Bundle.load(bundle_copy), "onnx", precision="int8")
    assert "\n" not in str(info.value)


def test_missing_onnxruntime_is_an_install_hint(bundle_dir: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""\
        from pathlib import Path
        from edge_agent.backends import open_backend
        open_backend("onnx", Path({str(bundle_dir / "model_fp32.onnx")!r}))
        """)
    r = _run("-c", code, env=_shadow(tmp_path, "onnxruntime"))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edge_agent.errors.BackendError: ONNX Runtime not installed")
    assert "pip install 'medge[device-onnx]'" in last


def _imported(stderr: str) -> set[str]:
    return {
        m.group(1).strip().split(".")[0]
        for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S.*)$", stderr, re.M)
    }


@pytest.mark.parametrize(("runtime", "loads_ort"), [("litert", False), ("onnx", True)])
def test_onnxruntime_is_imported_only_when_asked(
    bundle_dir: Path, runtime: str, loads_ort: bool
) -> None:
    code = textwrap.dedent(f"""\
        import numpy as np
        import edge_agent
        from edge_agent.bundle import Bundle
        from edge_agent.model import LoadedModel
        model = LoadedModel(Bundle.load({str(bundle_dir)!r}), {runtime!r})
        print(model.predict(np.zeros((28, 28), np.uint8)).pred)
        """)
    r = _run("-X", "importtime", "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = _imported(r.stderr)
    assert "edge_agent" in imported
    assert ("onnxruntime" in imported) is loads_ort
    assert ("ai_edge_litert" in imported) is not loads_ort
    assert not imported & {"tensorflow", "keras", "tf2onnx", "onnx", "converter"}


def test_jetson_int8_is_symmetric_as_tensorrt_requires(bundle_dir: Path, tmp_path: Path) -> None:
    """The jetson profile's quantization (S8S8, every zero point 0), run on the bundle's fp32
    model: TensorRT accepts only symmetric int8 Q/DQ, and ONNX Runtime must still agree."""
    import onnx
    from onnx import numpy_helper

    from converter.calibrate import quantize_onnx_int8 as quantize_int8

    with np.load(DATA) as d:
        calib = d["train_images"].astype(np.float32) / 255.0
        val = d["val_images"].astype(np.float32) / 255.0
    out = tmp_path / "sym.onnx"
    scheme = quantize_int8(bundle_dir / "model_fp32.onnx", out, calib, symmetric=True)
    assert scheme.startswith("QDQ S8S8 symmetric")
    graph = onnx.load(str(out)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [
        init[n.input[2]]
        for n in graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in init
    ]
    assert zero_points, "activations are quantized"
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    fp32 = open_backend("onnx", bundle_dir / "model_fp32.onnx")
    sym = open_backend("onnx", out)
    agree = np.mean(
        [
            fp32.invoke([x.reshape(1, 28, 28, 1)])[0].argmax()
            == sym.invoke([x.reshape(1, 28, 28, 1)])[0].argmax()
            for x in val
        ]
    )
    assert agree >= 0.95


def test_tensorrt_build_settings_are_a_trtexec_line() -> None:
    int8 = tensorrt_build("model_int8.onnx", "int8")
    assert int8.precision == "int8" and int8.workspace_mib == 256
    assert int8.command == (
        'trtexec --onnx="$BUNDLE/model_int8.onnx" --saveEngine="$ENGINE" --int8 --fp16 '
        "--memPoolSize=workspace:256"
    )
    assert tensorrt_build("model_fp32.onnx", "fp32").precision == "fp16"


def _convert_without_tf2onnx(work: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        "-m",
        "medge",
        "convert",
        str(breast_cnn.WEIGHTS),
        *BREAST_CNN_ARGS,
        "--profile",
        "jetson",
        "--out",
        str(work / "b"),
        "--json",
        "--float-artifacts",
        "none",
        env=_shadow(work, "tf2onnx"),
    )


@pytest.fixture(scope="module", autouse=True)
def conversions(
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future]:  # type: ignore[type-arg]
    """The one conversion of this module, started with the module so that it works while the
    tests on the shared bundle run: test -> Future of (its directory, the finished run)."""
    work = tmp_path_factory.mktemp("no-tf2onnx")
    return side_by_side(
        {
            "test_onnx_failure_keeps_the_litert_bundle": lambda: (
                work,
                _convert_without_tf2onnx(work),
            )
        }
    )


@pytest.mark.slow
def test_onnx_failure_keeps_the_litert_bundle(
    conversions: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """Without tf2onnx the ONNX export fails: the LiteRT bundle still ships, with one warning."""
    work, r = conversions["test_onnx_failure_keeps_the_litert_bundle"].result()
    out = work / "b"
    assert r.returncode == 0, r.stderr
    b = Bundle.load(out)
    assert [(a.runtime, a.precision) for a in b.manifest.artifacts] == [("litert", "int8")]
    assert set(b.manifest.metrics) == {"float", "litert-int8"}
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == [
        "ONNX artifacts skipped: tf2onnx not installed (No module named 'tf2onnx'): "
        "pip install 'medge[convert]'"
    ]
    assert not list(out.glob("*.onnx"))
    assert "ONNX artifacts skipped" in (out / "report.md").read_text()
