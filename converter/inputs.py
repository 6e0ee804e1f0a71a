"""What the converter reads as a model source: its format, its hash, the loaded model.

Formats: Keras 3 ``.keras``; legacy ``.h5``/``.hdf5`` (Keras 2 / tf_keras; Keras 3 reads them,
tf_keras is the fallback); a TensorFlow SavedModel directory (``saved_model.pb`` inside, e.g.
from ``model.export``); ``.onnx``. ``load_model`` runs in the converter's child processes only
(it imports TensorFlow); everything else here is numpy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError

__all__ = [
    "KERAS_FORMATS",
    "SOURCE_FORMATS",
    "SavedModelSource",
    "load_model",
    "source_bytes",
    "source_format",
    "source_sha256",
]

SOURCE_FORMATS = ("keras", "h5", "savedmodel", "onnx", "tflite")
KERAS_FORMATS = ("keras", "h5", "savedmodel")  # converted by TensorFlow (LiteRT + tf2onnx)
_SUFFIX = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".onnx": "onnx", ".tflite": "tflite"}


def source_format(path: Path) -> str:
    """The model's format from its path; one clear line when it is none we read."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ConversionError(f"{path}: a directory without saved_model.pb is not a SavedModel")
    if not path.is_file():
        raise ConversionError(f"{path}: no such model file")
    fmt = _SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ConversionError(
            f"{path.name}: unknown model format '{path.suffix}' "
            "(.keras, .h5, a SavedModel directory, .onnx or .tflite)"
        )
    return fmt


def source_sha256(path: Path) -> str:
    """SHA-256 of the model file, or of a SavedModel directory (every file's relative path
    and bytes, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class _Spec:
    def __init__(self, shape: tuple[int | None, ...], name: str) -> None:
        self.shape = shape
        self.name = name


class SavedModelSource:
    """A SavedModel's ``serving_default`` signature, shaped like the parts of a Keras model
    that the child processes use (inputs, outputs, predict, call); LiteRT converts it with
    ``TFLiteConverter.from_saved_model``."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self.path = str(path)
        loaded = tf.saved_model.load(self.path)
        if "serving_default" not in loaded.signatures:
            have = ", ".join(loaded.signatures) or "none"
            raise ValueError(f"no serving_default signature (signatures: {have})")
        self._keep = loaded
        self.fn = loaded.signatures["serving_default"]
        specs = self.fn.structured_input_signature[1]
        if len(specs) != 1:
            raise ValueError(f"the serving signature takes {len(specs)} inputs; one is handled")
        ((name, spec),) = specs.items()
        self.inputs = [_Spec(tuple(spec.shape), name)]
        self._in_name = name
        self.output_keys = sorted(self.fn.structured_outputs)
        self.outputs = [
            _Spec(tuple(self.fn.structured_outputs[k].shape), k) for k in self.output_keys
        ]

    def __call__(self, x: Any, training: bool = False) -> Any:
        out = self.fn(**{self._in_name: x})
        got = [out[k] for k in self.output_keys]
        return got[0] if len(got) == 1 else got

    def predict(self, x: np.ndarray, batch_size: int = 64, verbose: int = 0) -> Any:
        import tensorflow as tf

        parts: list[list[np.ndarray]] = [[] for _ in self.output_keys]
        for i in range(0, len(x), batch_size):
            out = self.fn(**{self._in_name: tf.constant(x[i : i + batch_size])})
            for j, k in enumerate(self.output_keys):
                parts[j].append(out[k].numpy())
        arrays = [np.concatenate(p) for p in parts]
        return arrays[0] if len(arrays) == 1 else arrays

    def tflite_converter(self) -> Any:
        import tensorflow as tf

        return tf.lite.TFLiteConverter.from_saved_model(
            self.path, signature_keys=["serving_default"]
        )


def load_model(path: str | Path, fmt: str) -> Any:
    """The model, loaded for conversion (child processes only: imports TensorFlow)."""
    if fmt == "savedmodel":
        return SavedModelSource(Path(path))
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as first:
        if fmt != "h5":
            raise
        try:  # a Keras 2 file that Keras 3's legacy reader does not take
            import tf_keras
        except ImportError:
            raise first from None
        try:
            return tf_keras.models.load_model(path, compile=False)
        except Exception:
            raise first from None
