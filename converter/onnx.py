"""The ONNX artifacts of a bundle: fp32 (tf2onnx) and QDQ int8 (ONNX Runtime), each made in a
child process, each read back through the agent's own ONNX backend.

A failure here never costs the LiteRT bundle: it comes back as a one-line warning, and the
artifacts made before it are kept (an fp32 model whose int8 quantization failed still ships).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.backends import open_backend
from edge_agent.bundle import Artifact, TensorRTBuild
from edge_agent.errors import MedgeError

__all__ = [
    "FP32_NAME",
    "INT8_NAME",
    "OnnxOutcome",
    "onnx_artifacts",
    "onnx_source_artifacts",
    "tensorrt_build",
]

FP32_NAME = "model_fp32.onnx"
INT8_NAME = "model_int8.onnx"
TRT_WORKSPACE_MIB = 256
CHILD = "converter.child.onnx"

# (job, workdir, module, what, args) -> None; raises ConversionError with one line.
RunChild = Callable[[dict[str, Any], Path, str, str, Sequence[str]], None]


@dataclass
class OnnxOutcome:
    artifacts: list[Artifact] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def tensorrt_build(file: str, precision: str) -> TensorRTBuild:
    """trtexec settings for a Jetson: int8 from the model's Q/DQ nodes, fp16 for a float model.

    ``--int8`` (with ``--fp16`` for the layers left in float) works on TensorRT 8.5 (JetPack 5)
    and 10.x (JetPack 6); ``--memPoolSize=workspace:N`` is in MiB on both.
    """
    flags = "--int8 --fp16" if precision == "int8" else "--fp16"
    return TensorRTBuild(
        precision="int8" if precision == "int8" else "fp16",
        workspace_mib=TRT_WORKSPACE_MIB,
        command=(
            f'trtexec --onnx="$BUNDLE/{file}" --saveEngine="$ENGINE" {flags} '
            f"--memPoolSize=workspace:{TRT_WORKSPACE_MIB}"
        ),
    )


def _artifact(stage: Path, file: str, precision: str, layout: str | None, jetson: bool) -> Artifact:
    backend = open_backend("onnx", stage / file)
    return Artifact(
        file=file,
        runtime="onnx",
        precision=precision,  # type: ignore[arg-type]  # str: pydantic validates it
        inputs=[t.model_copy(update={"layout": layout}) for t in backend.inputs],
        outputs=backend.outputs,
        tensorrt=tensorrt_build(file, precision) if jetson else None,
    )


def onnx_artifacts(
    model: Path,
    calib_npy: Path,
    stage: Path,
    work: Path,
    profile: str,
    layout: str | None,
    run_child: RunChild,
    source_format: str = "keras",
) -> OnnxOutcome:
    """Write model_fp32.onnx and model_int8.onnx into ``stage``; describe what was made."""
    got = OnnxOutcome()
    jetson = profile == "jetson"
    t0 = time.monotonic()
    try:
        run_child(
            {
                "model": str(model),
                "format": source_format,
                "onnx_out": str(stage / FP32_NAME),
                "result_out": str(work / "onnx-export.json"),
            },
            work,
            CHILD,
            "ONNX export",
            ["export"],
        )
        got.info.update(json.loads((work / "onnx-export.json").read_text()))
        got.artifacts.append(_artifact(stage, FP32_NAME, "fp32", layout, jetson))
    except MedgeError as exc:
        (stage / FP32_NAME).unlink(missing_ok=True)
        got.warnings.append(f"ONNX artifacts skipped: {exc}")
        return got
    _quantize(stage, calib_npy, work, layout, jetson, run_child, got)
    got.info["seconds"] = round(time.monotonic() - t0, 1)
    return got


def onnx_source_artifacts(
    model: Path,
    calib_npy: Path,
    stage: Path,
    work: Path,
    profile: str,
    run_child: RunChild,
    layout: str | None = None,
) -> OnnxOutcome:
    """An ONNX model as a source: itself as model_fp32.onnx (read by the agent's ONNX backend,
    which refuses it in one line if it cannot run it) and its QDQ int8 quantization.
    ``layout``: its input's (converter.layout); by the input's rank when None."""
    got = OnnxOutcome()
    jetson = profile == "jetson"
    t0 = time.monotonic()
    shutil.copyfile(model, stage / FP32_NAME)
    backend = open_backend("onnx", stage / FP32_NAME)  # MedgeError: one line, no bundle
    layout = layout or {5: "NTHWC", 4: "NHWC", 3: "NTC", 2: "NC"}.get(len(backend.inputs[0].shape))
    got.artifacts.append(_artifact(stage, FP32_NAME, "fp32", layout, jetson))
    got.info.update(route="source", opset=_opset(stage / FP32_NAME))
    _quantize(stage, calib_npy, work, layout, jetson, run_child, got)
    got.info["seconds"] = round(time.monotonic() - t0, 1)
    return got


def _opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    m = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _quantize(
    stage: Path,
    calib_npy: Path,
    work: Path,
    layout: str | None,
    jetson: bool,
    run_child: RunChild,
    got: OnnxOutcome,
) -> None:
    try:
        run_child(
            {
                "fp32": str(stage / FP32_NAME),
                "int8_out": str(stage / INT8_NAME),
                "calib": str(calib_npy),
                "symmetric": jetson,  # TensorRT takes only symmetric int8 Q/DQ
                "result_out": str(work / "onnx-quantize.json"),
            },
            work,
            CHILD,
            "ONNX int8 quantization",
            ["quantize"],
        )
        got.info.update(json.loads((work / "onnx-quantize.json").read_text()))
        got.artifacts.append(_artifact(stage, INT8_NAME, "int8", layout, jetson))
    except MedgeError as exc:
        (stage / INT8_NAME).unlink(missing_ok=True)
        got.warnings.append(f"ONNX int8 artifact skipped: {exc}")
