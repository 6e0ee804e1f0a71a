"""A source model loaded for conversion: Keras 3 ``.keras``, legacy ``.h5`` (Keras 3's reader,
tf_keras as the fallback), or a SavedModel's ``serving_default`` signature. Child processes
only: imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SavedModelSource", "load_model"]


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
