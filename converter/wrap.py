"""A ready third-party LiteRT (.tflite) or ONNX (.onnx) model, wrapped into a bundle as it is.

No conversion and no TensorFlow: the file is copied, its tensors are read with the agent's own
backend (a model the runtime refuses is one clear line), and it is evaluated on the evaluation
data with the agent's own preprocessing and runtime, exactly as a device will run it. There is
no float model to compare with, so a wrapped bundle reports its own metrics only (no
agreement, no --budget). The preprocessing and labels are the user's: they must be the ones
the model was trained with, which only its authors can say.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converter.bundle_writer import (
    provenance,
    publish,
    scalars,
    staging,
    write_bundle_manifest,
    write_reports,
)
from converter.data import prepare
from converter.errors import ConversionError
from converter.layout import RANK_LAYOUTS
from converter.metrics import classification_metrics
from converter.reference import reference_for
from converter.request import ConvertRequest
from converter.scoring import class_scores, run_artifact, stream_outputs
from converter.stream_eval import StreamWindows, event_scalars, score_streams
from edge_agent.backends import open_backend
from edge_agent.bundle import (
    Artifact,
    Bundle,
    Decode,
    Reference,
    file_entry,
)

__all__ = ["RUNTIMES", "artifact_precision", "wrap"]

RUNTIMES = {".tflite": "litert", ".onnx": "onnx"}
_ONNX_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}


def artifact_precision(runtime: str, path: Path, backend: Any) -> str:
    """The manifest precision of a ready model: int8/int16x8 from its input tensor, else
    ``dynamic`` (int8 weights, float activations), ``fp16`` or ``fp32`` from its tensors.
    An ONNX model with Q/DQ nodes keeps float inputs: it reads as ``int8``, as ours do."""
    dtype = backend.inputs[0].dtype
    if dtype in ("int8", "uint8"):
        return "int8"
    if dtype == "int16":
        return "int16x8"
    kinds = _litert_dtypes(path) if runtime == "litert" else _onnx_dtypes(path)
    if "int8" in kinds:
        return "dynamic" if runtime == "litert" else "int8"
    return "fp16" if "float16" in kinds else "fp32"


def _litert_dtypes(path: Path) -> set[str]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # tflite-runtime only: the precision reads fp32
        return set()
    return {np.dtype(t["dtype"]).name for t in Interpreter(str(path)).get_tensor_details()}


def _onnx_dtypes(path: Path) -> set[str]:
    try:
        import onnx
    except ImportError:
        return set()
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = {"int8"} if {n.op_type for n in graph.node} & _ONNX_INT8_OPS else set()
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer):
        kinds.add("float16")
    return kinds


def wrap(
    req: ConvertRequest,
    xc: np.ndarray,
    xe: np.ndarray,
    ye: np.ndarray,
    labels: list[str],
    streams: Sequence[StreamWindows] = (),
    layout: str | None = None,
) -> Bundle:
    """Copy, check, evaluate and sign a ready .tflite/.onnx model as a bundle; with
    ``streams`` (annotated recordings cut into windows), also its event detection.
    ``layout``: the input's (converter.layout); by its rank when None."""
    suffix = req.model.suffix.lower()
    runtime = RUNTIMES[suffix]
    if req.budget:
        raise ConversionError("--budget compares with a float model, which a wrapped model lacks")
    if req.cam:
        raise ConversionError("--cam adds an output to a Keras model; a wrapped model has none")
    backend = open_backend(runtime, req.model)  # the agent's runtime: refuses in one line
    in_spec = backend.inputs[0]
    want = int(np.prod(in_spec.shape[1:]))
    checks = [("calibration", xc), ("evaluation", xe)]
    checks += [(f"{s.recording.name} window", s.x) for s in streams]
    for what, x in checks:
        got = prepare(x[:1], req.preprocess, layout if not what.endswith(" window") else None)
        if int(np.prod(got.shape[1:])) != want:
            raise ConversionError(
                f"{what} samples of shape {tuple(x.shape[1:])} do not fit model input "
                f"{tuple(in_spec.shape)}"
            )
    n_out = backend.outputs[0].shape[-1]
    if n_out != len(labels) and not (n_out == 1 and len(labels) == 2):
        raise ConversionError(f"model has {n_out} outputs but {len(labels)} labels were given")
    precision = artifact_precision(runtime, req.model, backend)
    file = f"model_{precision}{suffix}"
    layout = layout or RANK_LAYOUTS.get(len(in_spec.shape))
    artifact = Artifact(
        file=file,
        runtime=runtime,  # type: ignore[arg-type]  # str: pydantic validates it
        precision=precision,  # type: ignore[arg-type]  # str: pydantic validates it
        inputs=[t.model_copy(update={"layout": layout}) for t in backend.inputs],
        outputs=backend.outputs,
    )
    variant = f"{runtime}-{precision}"
    decode = Decode(
        activation=req.activation,  # type: ignore[arg-type]  # str: pydantic validates it
        threshold=req.threshold,
        events=req.events,
    )
    with staging(req.out) as stage:
        shutil.copyfile(req.model, stage / file)

        def manifest(metrics: dict[str, Any], reference: Reference | None = None) -> None:
            write_bundle_manifest(
                stage,
                req,
                name=req.name or req.model.stem,
                task="classification",
                decode=decode,
                labels=labels,
                artifacts=[artifact],
                metrics=metrics,
                provenance=provenance(file_entry(req.model).sha256, suffix[1:], xc, "wrapped"),
                reference=reference,
            )

        manifest({})
        t0 = time.monotonic()
        Bundle.load(stage)  # the manifest and the file check out before they are scored
        outs, lat = run_artifact(stage / file, runtime, req.preprocess, xe, layout)
        positive = labels.index(req.positive_label) if req.positive_label else None
        scores, pred = class_scores(outs, decode, labels, positive)
        report: dict[str, Any] = {
            "model": req.model.name,
            "profile": req.profile,
            "labels": labels,
            "positive_label": req.positive_label,
            "eval": {"file": req.eval.name, "n": len(xe)},
            "variants": [variant],
            variant: classification_metrics(ye, scores, pred, positive),
            "agreement": {},
            "size_bytes": {variant: (stage / file).stat().st_size},
            "latency_ms": {
                variant: {
                    "p50": float(np.percentile(lat, 50) * 1e3),
                    "p99": float(np.percentile(lat, 99) * 1e3),
                }
            },
            "convert_seconds": round(time.monotonic() - t0, 1),
            "strategy": "wrapped",
            "wrapped": {"source_format": suffix[1:], "runtime": runtime, "precision": precision},
            "warnings": [],
        }
        if streams:
            windows = stream_outputs(stage / file, runtime, req.preprocess, [s.x for s in streams])
            report["events"] = score_streams(
                streams,
                {variant: windows},
                lambda o: class_scores(o, decode, labels, positive)[0],
                req.events,
                labels,
                req.event_tolerance_s,
            )
            report[variant].update(event_scalars(report["events"], variant))
        write_reports(stage, report)
        # the reference's scores: the wrapped model's own (there is no float model)
        on = (np.concatenate(windows), "recordings") if streams else (outs, "evaluation")
        ref = reference_for(
            artifact,
            False,
            xc,
            [s.x for s in streams],
            class_scores(on[0], decode, labels, positive),
            on[1],
            labels,
            positive,
        )
        manifest({variant: scalars(report[variant])}, ref)
        return publish(stage, req, [])
