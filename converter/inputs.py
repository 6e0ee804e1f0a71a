"""What the converter reads as a model source: its format, its hash, the loaded model.

Formats: Keras 3 ``.keras``; legacy ``.h5``/``.hdf5`` (Keras 2 / tf_keras; Keras 3 reads them,
tf_keras is the fallback); a TensorFlow SavedModel directory (``saved_model.pb`` inside, e.g.
from ``model.export``); ``.onnx``. Loading one is the child processes' work
(converter.child.models: it imports TensorFlow); everything here is numpy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from converter.errors import ConversionError

__all__ = [
    "KERAS_FORMATS",
    "SOURCE_FORMATS",
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
