"""The BatchNormalization check of converter.calibration_check, with Keras (child process).

    python -m converter.child.batchnorm JOB.json   # {model, calib (.npy), out}: a JSON list

Each top-level BatchNormalization layer's input is measured on the calibration data and compared
with the layer's moving mean and variance; a layer is off when more than BN_CHANNEL_FRACTION of
its channels are beyond BN_SHIFT or BN_VAR_RATIO (docs/report.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from converter.calibration_check import BN_CHANNEL_FRACTION, BN_SHIFT, BN_VAR_RATIO, MAX_SAMPLES

__all__ = ["bn_mismatch", "bn_statistics", "main"]


def bn_statistics(model_path: str | Path, calib_x: np.ndarray) -> list[dict[str, Any]] | str:
    """Per top-level BatchNormalization layer, how its input on ``calib_x`` compares with its
    moving statistics: ``shift`` (|batch mean - moving mean| / moving std) and ``ratio`` (batch
    variance / moving variance) per channel, and ``off``, the share of channels beyond
    BN_SHIFT or BN_VAR_RATIO (``n_off`` of them). A string says why the check cannot run."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(model_path, compile=False)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return []
    shape = tuple(model.inputs[0].shape[1:])
    x = np.asarray(calib_x[:MAX_SAMPLES], dtype=np.float32)
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        return (
            f"BatchNormalization check skipped: calibration samples of shape {x.shape[1:]} do "
            f"not fit the model input {shape}"
        )
    probe = keras.Model(model.inputs, [layer.input for layer in bns])
    acts = probe.predict(x.reshape(len(x), *shape), batch_size=64, verbose=0)
    if len(bns) == 1:
        acts = [acts]
    stats = []
    for layer, act in zip(bns, acts, strict=True):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        a = np.moveaxis(np.asarray(act, dtype=np.float64), axis, -1)
        a = a.reshape(-1, a.shape[-1])
        mm = np.asarray(layer.moving_mean, dtype=np.float64)
        mv = np.asarray(layer.moving_variance, dtype=np.float64) + layer.epsilon
        shift = np.abs(a.mean(0) - mm) / np.sqrt(mv)
        ratio = (a.var(0) + layer.epsilon) / mv
        off = (shift > BN_SHIFT) | (ratio > BN_VAR_RATIO) | (ratio < 1 / BN_VAR_RATIO)
        stats.append(
            {
                "layer": layer.name,
                "shift": shift,
                "ratio": ratio,
                "off": float(off.mean()),
                "n_off": int(off.sum()),
            }
        )
    return stats


def bn_mismatch(model_path: str | Path, calib_x: np.ndarray) -> list[str]:
    """One warning when BatchNormalization layers' moving statistics do not match the
    statistics of their input on ``calib_x`` in more than BN_CHANNEL_FRACTION of their
    channels. Layers of the top-level model are checked (not those inside nested sub-models)."""
    stats = bn_statistics(model_path, calib_x)
    if isinstance(stats, str):
        return [stats]
    bad = [
        f"'{s['layer']}' {s['n_off']}/{len(s['shift'])} channels off "
        f"(median mean shift {np.median(s['shift']):.3g} std, median variance ratio "
        f"{np.median(s['ratio']):.3g})"
        for s in stats
        if s["off"] > BN_CHANNEL_FRACTION
    ]
    if not bad:
        return []
    return [
        f"BatchNormalization statistics do not match the calibration data in {len(bad)} of "
        f"{len(stats)} layers: "
        + "; ".join(bad[:3])
        + (" ..." if len(bad) > 3 else "")
        + ": the data are normalized unlike the training data, or BN was not updated after "
        "fine-tuning"
    ]


def main(job_file: str) -> None:
    """Child-process entry: job {model, calib (.npy), out}; writes the warnings as a JSON list
    to ``out``."""
    job: dict[str, Any] = json.loads(Path(job_file).read_text())
    Path(job["out"]).write_text(json.dumps(bn_mismatch(job["model"], np.load(job["calib"]))))


if __name__ == "__main__":
    main(sys.argv[1])
