"""Keras model + calibration and evaluation data -> a verified full-int8 LiteRT bundle.

TensorFlow runs only in a child process (converter.litert_child); this process prepares the
data with the agent's own preprocessing, evaluates the result with the agent's own runtime,
and writes the bundle into a temporary directory that is renamed into place only when complete.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.metrics import agreement, classification_metrics
from converter.report import write_markdown
from edge_agent.backends import open_backend
from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    Decode,
    Manifest,
    Preprocess,
    Provenance,
    file_entry,
    write_manifest,
)
from edge_agent.model import LoadedModel
from edge_agent.preprocess import normalize
from edge_agent.sources.npz import load_labelled

__all__ = ["ConvertRequest", "convert"]

log = logging.getLogger("medge.convert")

PROFILES = ("rpi4", "rpi5", "jetson", "x86")
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


def _run_child(job: dict[str, Any], workdir: Path) -> None:
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "converter.litert_child", str(job_file)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(
            f"LiteRT int8 conversion timed out after {CHILD_TIMEOUT_S} s"
        ) from exc
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise ConversionError(f"LiteRT int8 conversion crashed the converter process ({sig})")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    raise ConversionError(lines[-1] if lines else f"LiteRT conversion failed ({proc.returncode})")


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
    if req.out.exists() and any(req.out.iterdir()) and not req.force:
        raise ConversionError(f"{req.out} exists and is not empty (use --force to replace it)")
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
        artifact_name = "model_int8.tflite"
        t0 = time.monotonic()
        _run_child(
            {
                "model": str(req.model),
                "calib": str(work / "calib.npy"),
                "eval": str(work / "eval.npy"),
                "tflite_out": str(stage / artifact_name),
                "float_out": str(work / "float.npy"),
                "n_labels": len(labels),
            },
            work,
        )
        convert_s = time.monotonic() - t0
        float_scores = np.load(work / "float.npy")
        backend = open_backend("litert", stage / artifact_name)
        layout = {4: "NHWC", 3: "NTC", 2: "NC"}.get(len(backend.inputs[0].shape))
        inputs = [t.model_copy(update={"layout": layout}) for t in backend.inputs]
        artifact = Artifact(
            file=artifact_name,
            runtime="litert",
            precision="int8",
            inputs=inputs,
            outputs=backend.outputs,
        )
        positive = labels.index(req.positive_label) if req.positive_label else None
        decode = Decode(kind="classification", activation="softmax", threshold=req.threshold)

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
                artifacts=[artifact],
                files=files,
                metrics=metrics,
                provenance=Provenance(
                    source_sha256=file_entry(req.model).sha256,
                    source_format="keras",
                    converter_version=_medge_version(),
                    calibration_sha256=_sha256_bytes(xc),
                    calibration_count=len(xc),
                    strategy="litert full-int8 (TFLiteConverter)",
                ),
            )

        write_manifest(stage, manifest({}))
        model = LoadedModel(Bundle.load(stage))
        int8_scores, int8_pred, latencies = [], [], []
        for s in xe:
            t = time.perf_counter()
            c = model.predict(s)
            latencies.append(time.perf_counter() - t)
            int8_scores.append(c.scores)
            int8_pred.append(c.pred)
        float_pred = np.array([model.decode(row).pred for row in float_scores])
        float_m = classification_metrics(ye, _class_scores(float_scores), float_pred, positive)
        int8_m = classification_metrics(ye, np.array(int8_scores), np.array(int8_pred), positive)
        report = {
            "model": req.model.name,
            "profile": req.profile,
            "labels": labels,
            "positive_label": req.positive_label,
            "eval": {"file": req.eval.name, "n": len(xe)},
            "float": float_m,
            "litert-int8": int8_m,
            "agreement": {"litert-int8": agreement(float_pred, int8_pred)},
            "size_bytes": {
                "keras": req.model.stat().st_size,
                "litert-int8": (stage / artifact_name).stat().st_size,
            },
            "latency_ms": {
                "litert-int8": {
                    "p50": float(np.percentile(latencies, 50) * 1e3),
                    "p99": float(np.percentile(latencies, 99) * 1e3),
                }
            },
            "convert_seconds": round(convert_s, 1),
            "warnings": warnings,
        }
        _check_budget(req.budget, float_m, int8_m)
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(stage / "report.md", report)
        summary = {k: _scalars(report[k]) for k in ("float", "litert-int8")}
        write_manifest(stage, manifest(summary))
        Bundle.load(stage)  # the bundle we ship must pass the device's own checks
        if req.out.exists():
            shutil.rmtree(req.out)
        stage.rename(req.out)
        for w in warnings:
            log.warning("%s", w)
        return Bundle.load(req.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


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


def _class_scores(probs: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - probs[:, 0], probs[:, 0]]) if probs.shape[1] == 1 else probs


def _scalars(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, float | int | None) and not isinstance(v, bool)
    }
