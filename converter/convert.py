"""Keras model + calibration and evaluation data -> a verified bundle: LiteRT (full int8 by the
first conversion strategy that works, converter.strategies), plus ONNX fp32 and QDQ int8 for
ONNX Runtime / TensorRT (converter.onnx_artifacts). A ready .tflite or .onnx model is wrapped
instead (converter.wrap).

TensorFlow runs only in child processes (converter.litert_child, converter.onnx_child); this
process prepares the data with the agent's own preprocessing, evaluates every artifact with
the agent's own runtime, and writes the bundle into a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.metrics import agreement, classification_metrics
from converter.onnx_artifacts import OnnxOutcome, onnx_artifacts
from converter.report import write_markdown
from converter.strategies import MIN_AGREEMENT, STRATEGIES, convert_litert
from edge_agent.backends import open_backend
from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    CamSpec,
    Decode,
    Manifest,
    Preprocess,
    Provenance,
    file_entry,
    sign_bundle,
    write_manifest,
)
from edge_agent.keys import load_signer_key
from edge_agent.model import LoadedModel
from edge_agent.preprocess import normalize
from edge_agent.sources.npz import load_labelled

__all__ = ["ConvertRequest", "convert", "publish"]

log = logging.getLogger("medge.convert")

PROFILES = ("rpi4", "rpi5", "jetson", "x86")
LAYOUTS = {5: "NTHWC", 4: "NHWC", 3: "NTC", 2: "NC"}
WRAPPED = (".tflite", ".onnx")  # ready artifacts: wrapped as they are (converter.wrap)
MIN_CALIBRATION = 100
CHILD_TIMEOUT_S = 600
BUDGET_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


@dataclass
class ConvertRequest:
    model: Path
    calib: Path
    eval: Path
    out: Path
    profile: str = "x86"
    preprocess: Preprocess = field(default_factory=lambda: Preprocess(kind="none"))
    labels: list[str] | None = None
    positive_label: str | None = None
    threshold: float | None = None
    name: str | None = None
    calib_split: str | None = None
    eval_split: str | None = None
    force: bool = False
    budget: dict[str, float] = field(default_factory=dict)
    sign_key: Path | None = None
    cam: bool = False  # add the class activation map as a second output (GAP -> Dense heads)
    cam_layer: str | None = None  # the feature layer; found from the head when None
    strategies: list[str] | None = None  # LiteRT strategies to try, in order (default: all)
    min_agreement: float = MIN_AGREEMENT  # a LiteRT artifact must agree with float this often
    onnx: bool = True  # also make the ONNX artifacts (Keras models only)
    activation: str = "softmax"  # what the model's last layer applies: softmax, sigmoid, none


def _medge_version() -> str:
    try:
        return version("medge")
    except PackageNotFoundError:
        return "0+unknown"


def _sha256_bytes(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _prepare(x: np.ndarray, spec: Preprocess) -> np.ndarray:
    return np.stack([normalize(spec, s) for s in x]).astype(np.float32)


def _run_child(
    job: dict[str, Any],
    workdir: Path,
    module: str = "converter.litert_child",
    what: str = "LiteRT int8 conversion",
    args: Sequence[str] = (),
) -> None:
    job_file = workdir / f"job-{module.rsplit('.', 1)[-1]}{''.join('-' + a for a in args)}.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, str(job_file)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"{what} timed out after {CHILD_TIMEOUT_S} s") from exc
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise ConversionError(f"{what} crashed the converter process ({sig})")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    raise ConversionError(lines[-1] if lines else f"{what} failed ({proc.returncode})")


def convert(req: ConvertRequest) -> Bundle:
    """Convert, evaluate and write one bundle; return it, loaded and verified."""
    if req.profile not in PROFILES:
        raise ConversionError(f"unknown profile '{req.profile}' (one of {', '.join(PROFILES)})")
    if not req.model.is_file():
        raise ConversionError(f"{req.model}: no such model file")
    unknown = sorted(set(req.budget) - set(BUDGET_METRICS))
    if unknown:
        raise ConversionError(
            f"budget metric '{unknown[0]}' is not one of {', '.join(BUDGET_METRICS)}"
        )
    if req.sign_key is not None:
        load_signer_key(req.sign_key)  # fail before the long work, not after
    if req.out.exists() and any(req.out.iterdir()) and not req.force:
        raise ConversionError(f"{req.out} exists and is not empty (use --force to replace it)")
    keys = req.strategies or [s.key for s in STRATEGIES]
    known = {s.key for s in STRATEGIES}
    if set(keys) - known:
        bad = sorted(set(keys) - known)[0]
        raise ConversionError(f"unknown strategy '{bad}' (one of {', '.join(sorted(known))})")
    xc, _, _ = load_labelled(req.calib, req.calib_split, prefer=("train", "val", "test"))
    xe, ye, names = load_labelled(req.eval, req.eval_split)
    if ye is None:
        raise ConversionError(f"{req.eval}: evaluation data needs labels (y or <split>_labels)")
    labels = req.labels or names
    if not labels:
        n = int(ye.max()) + 1
        labels = [str(i) for i in range(n)]
    if req.positive_label is not None and req.positive_label not in labels:
        raise ConversionError(f"positive label '{req.positive_label}' is not one of {labels}")
    if int(ye.max()) >= len(labels) or int(ye.min()) < 0:
        raise ConversionError(
            f"evaluation labels run 0..{int(ye.max())} but {len(labels)} class names were given"
        )
    warnings: list[str] = []
    if req.model.suffix.lower() in WRAPPED:
        from converter.wrap import wrap

        return wrap(req, xc, xe, ye, labels)
    if len(xc) < MIN_CALIBRATION:
        warnings.append(
            f"calibration set has only {len(xc)} samples (< {MIN_CALIBRATION}); "
            "int8 ranges may not represent the data"
        )

    req.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{req.out.name}.", dir=req.out.parent))
    work = Path(tempfile.mkdtemp(prefix="medge-convert-"))
    try:
        calib, evalx = _prepare(xc, req.preprocess), _prepare(xe, req.preprocess)
        np.save(work / "calib.npy", calib)
        np.save(work / "eval.npy", evalx)
        t0 = time.monotonic()
        litert = convert_litert(
            {
                "model": str(req.model),
                "calib": str(work / "calib.npy"),
                "eval": str(work / "eval.npy"),
                "tflite_out": str(work / "model.tflite"),
                "float_out": str(work / "float.npy"),
                "n_labels": len(labels),
                "min_agreement": req.min_agreement,
                "cam": {"layer": req.cam_layer} if req.cam else None,
                "cam_model_out": str(work / "model_cam.keras"),
                "cam_info_out": str(work / "cam.json"),
            },
            work,
            keys,
            CHILD_TIMEOUT_S,
        )
        convert_s = time.monotonic() - t0
        precision = litert.winner.precision
        artifact_name = f"model_{precision}.tflite"
        shutil.copyfile(work / "model.tflite", stage / artifact_name)
        float_scores = np.load(work / "float.npy")
        backend = open_backend("litert", stage / artifact_name)
        layout = LAYOUTS.get(len(backend.inputs[0].shape))
        inputs = [t.model_copy(update={"layout": layout}) for t in backend.inputs]
        artifact = Artifact(
            file=artifact_name,
            runtime="litert",
            precision=precision,  # type: ignore[arg-type]
            inputs=inputs,
            outputs=backend.outputs,
        )
        cam = None
        if req.cam:
            info = json.loads((work / "cam.json").read_text())
            cam = CamSpec(output=1, layer=info["layer"], upsample_to=info["size"])
        onnx = OnnxOutcome()
        if req.onnx:
            source = work / "model_cam.keras" if req.cam else req.model
            onnx = onnx_artifacts(
                source, work / "calib.npy", stage, work, req.profile, layout, _run_child
            )
        warnings += onnx.warnings
        artifacts = [artifact, *onnx.artifacts]
        if cam is not None and any(len(a.outputs) <= cam.output for a in onnx.artifacts):
            warnings.append("ONNX artifacts skipped: their export lost the cam output")
            for a in onnx.artifacts:
                (stage / a.file).unlink(missing_ok=True)
            artifacts = [artifact]
        strategy = f"litert {litert.winner.key}"
        if onnx.artifacts:
            strategy += f"; onnx fp32 ({onnx.info['route']}, opset {onnx.info['opset']})"
        if "scheme" in onnx.info:
            strategy += f"; onnx int8 ({onnx.info['scheme']})"
        positive = labels.index(req.positive_label) if req.positive_label else None
        decode = Decode(
            kind="classification",
            activation=req.activation,  # type: ignore[arg-type]
            threshold=req.threshold,
        )

        def manifest(metrics: dict[str, Any]) -> Manifest:
            files = {
                p.name: file_entry(p)
                for p in sorted(stage.iterdir())
                if p.is_file() and p.name != "manifest.json"
            }
            return Manifest(
                schema_version=SCHEMA_VERSION,
                name=req.name or req.model.stem,
                version=datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S"),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                task="classification",
                profile=req.profile,
                preprocess=req.preprocess,
                decode=decode,
                labels=labels,
                positive_label=req.positive_label,
                artifacts=artifacts,
                files=files,
                metrics=metrics,
                provenance=Provenance(
                    source_sha256=file_entry(req.model).sha256,
                    source_format="keras",
                    converter_version=_medge_version(),
                    calibration_sha256=_sha256_bytes(xc),
                    calibration_count=len(xc),
                    strategy=strategy,
                ),
                cam=cam,
            )

        write_manifest(stage, manifest({}))
        staged = Bundle.load(stage)
        model = LoadedModel(staged)
        # every artifact, run by the agent's own code: variant -> (scores, predictions, latencies)
        runs = {
            f"{a.runtime}-{a.precision}": _run_variant(
                LoadedModel(staged, a.runtime, precision=a.precision), xe
            )
            for a in artifacts
        }
        files = {f"{a.runtime}-{a.precision}": a.file for a in artifacts}
        float_pred = np.array([model.decode(row).pred for row in float_scores])
        float_m = classification_metrics(ye, _class_scores(float_scores), float_pred, positive)
        variant_m = {
            k: classification_metrics(ye, scores, pred, positive)
            for k, (scores, pred, _) in runs.items()
        }
        report = {
            "model": req.model.name,
            "profile": req.profile,
            "labels": labels,
            "positive_label": req.positive_label,
            "eval": {"file": req.eval.name, "n": len(xe)},
            "variants": ["float", *runs],
            "float": float_m,
            **variant_m,
            "agreement": {k: agreement(float_pred, pred) for k, (_, pred, _) in runs.items()},
            "size_bytes": {
                "keras": req.model.stat().st_size,
                **{k: (stage / f).stat().st_size for k, f in files.items()},
            },
            "latency_ms": {
                k: {
                    "p50": float(np.percentile(lat, 50) * 1e3),
                    "p99": float(np.percentile(lat, 99) * 1e3),
                }
                for k, (_, _, lat) in runs.items()
            },
            "convert_seconds": round(convert_s, 1),
            "litert": litert.as_report(),
            "onnx": onnx.info,
            "warnings": warnings,
        }
        _check_budget(req.budget, float_m, variant_m[f"litert-{precision}"])
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(stage / "report.md", report)
        summary = {k: _scalars(report[k]) for k in report["variants"]}
        write_manifest(stage, manifest(summary))
        return publish(stage, req, warnings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, req: ConvertRequest, warnings: list[str]) -> Bundle:
    """Sign the staged bundle, check it as a device would, and rename it into place."""
    trusted = None
    if req.sign_key is not None:
        key = load_signer_key(req.sign_key)
        sign_bundle(stage, key)
        trusted = [key.public_key()]
    else:
        log.warning("bundle is not signed (no --sign-key): devices will refuse it")
    Bundle.load(stage, trusted)  # the bundle we ship must pass the device's own checks
    if req.out.exists():
        shutil.rmtree(req.out)
    stage.rename(req.out)
    for w in warnings:
        log.warning("%s", w)
    return Bundle.load(req.out)


def _check_budget(budget: dict[str, float], ref: dict[str, Any], got: dict[str, Any]) -> None:
    for metric, allowed in budget.items():
        a, b = ref.get(metric), got.get(metric)
        if a is None or b is None:
            raise ConversionError(f"budget metric '{metric}' is undefined on this data")
        if a - b > allowed + 1e-12:
            raise ConversionError(
                f"accuracy budget not met: {metric} dropped {a - b:.4f} > {allowed} "
                f"(float {a:.4f}, int8 {b:.4f}); no bundle written"
            )


def _run_variant(
    model: LoadedModel, samples: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Predict every sample one at a time, as a device does; time each whole prediction."""
    scores, pred, latencies = [], [], []
    for s in samples:
        t = time.perf_counter()
        c = model.predict(s)
        latencies.append(time.perf_counter() - t)
        scores.append(c.scores)
        pred.append(c.pred)
    return np.array(scores), np.array(pred), latencies


def _class_scores(probs: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - probs[:, 0], probs[:, 0]]) if probs.shape[1] == 1 else probs


def _scalars(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, float | int | None) and not isinstance(v, bool)
    }
