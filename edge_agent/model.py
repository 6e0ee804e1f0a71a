"""A bundle opened on a backend: preprocess, infer and decode as three separate steps.

:class:`Model` is what the pipeline's stages ask of a model; :class:`LoadedModel` (a bundle on
the LiteRT or the ONNX Runtime backend, ``edge_agent.backends``) is the one the agent runs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from edge_agent.backends import Backend, open_backend
from edge_agent.bundle import Artifact, Bundle
from edge_agent.chain import FeatureStage
from edge_agent.decode import Decoded, classify, foreground, image_stats, segment
from edge_agent.errors import BundleError
from edge_agent.preprocess import byte_table, dequantize, normalize, to_input

__all__ = ["LoadedModel", "Model"]


@runtime_checkable
class Model(Protocol):
    """A runnable bundle, as the pipeline's stages use it: three steps, each a plain call."""

    bundle: Bundle

    def prepare(self, sample: np.ndarray) -> np.ndarray:
        """Raw sample -> input tensor, as the manifest's preprocessing says."""
        ...

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Input tensor -> real-valued first output row."""
        ...

    def infer_outputs(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Input tensor -> every output, real-valued (e.g. the CAM's feature map)."""
        ...

    def decode(self, output: np.ndarray) -> Decoded:
        """The first output -> the result the manifest's task asks for."""
        ...


class LoadedModel:
    """The runnable form of a bundle on this device."""

    def __init__(
        self,
        bundle: Bundle,
        runtime: str = "litert",
        threads: int = 1,
        precision: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.artifact: Artifact = bundle.artifact(runtime, precision)
        self.backend: Backend = open_backend(runtime, bundle.path_of(self.artifact), threads)
        _check_matches(self.artifact, self.backend)
        feature = bundle.feature_artifact(self.artifact)
        # a chained bundle: frames through the feature model, their window into this one
        self.feature = None if feature is None else FeatureStage.of(bundle, feature, threads)
        m = bundle.manifest
        self._positive = m.positive_index
        self._input = self.artifact.inputs[0]
        self._output = self.artifact.outputs[0]
        self._table = byte_table(m.preprocess, self._input)
        self._shape = tuple(self._input.shape)
        self._size = int(np.prod(self._shape))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One raw sample's shape as this model takes it (a clip of frames, for a chain)."""
        if self.feature is not None:
            return (self._shape[1], *self.feature.frame_shape)
        return self._shape[1:]

    def prepare(self, sample: np.ndarray) -> np.ndarray:
        """Raw sample -> input tensor (normalized, shaped, quantized); for a chained bundle,
        the clip's frames as the feature model's inputs."""
        if self.feature is not None:
            return self.feature.prepare(sample)
        if self._table is not None and sample.dtype == np.uint8 and sample.size == self._size:
            return self._table[sample].reshape(self._shape)
        return to_input(normalize(self.bundle.manifest.preprocess, sample), self._input)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Input tensor -> real-valued first output row."""
        raw = self.backend.invoke([self._temporal(tensor)])[0]
        return dequantize(raw, self._output.quantization).reshape(-1)

    def infer_outputs(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Input tensor -> every output, real-valued, in the artifact's shapes (e.g. the CAM)."""
        raw = self.backend.invoke([self._temporal(tensor)])
        return [
            dequantize(r, spec.quantization).reshape(r.shape if -1 in spec.shape else spec.shape)
            for r, spec in zip(raw, self.artifact.outputs, strict=True)
        ]

    def _temporal(self, tensor: np.ndarray) -> np.ndarray:
        """For a chained bundle: prepared frames -> their features -> this model's input."""
        if self.feature is None:
            return tensor
        return to_input(self.feature.features(tensor), self._input)

    def decode(self, output: np.ndarray) -> Decoded:
        """The first output (flat or shaped) -> the result the manifest's task asks for."""
        m = self.bundle.manifest
        if m.task == "classification":
            return classify(output, m.decode, m.labels, self._positive)
        out = self._shaped(output)
        if m.task == "segmentation":
            return segment(out, m.decode, m.labels)
        return image_stats(out, m.labels)

    def foreground(self, output: np.ndarray) -> np.ndarray | None:
        """The (H, W) bool mask a segmentation output decodes to; None for other tasks."""
        m = self.bundle.manifest
        return foreground(self._shaped(output), m.decode) if m.task == "segmentation" else None

    def _shaped(self, output: np.ndarray) -> np.ndarray:
        shape = self._output.shape
        return np.asarray(output).reshape(shape) if -1 not in shape else np.asarray(output)

    def predict(self, sample: np.ndarray) -> Decoded:
        return self.decode(self.infer(self.prepare(sample)))


def _check_matches(artifact: Artifact, backend: Backend) -> None:
    pairs = [
        ("input", artifact.inputs, backend.inputs),
        ("output", artifact.outputs, backend.outputs),
    ]
    for what, declared, actual in pairs:
        if len(declared) != len(actual):
            raise BundleError(
                f"{artifact.file}: manifest declares {len(declared)} {what}s, "
                f"model has {len(actual)}"
            )
        for d, a in zip(declared, actual, strict=True):
            if d.shape != a.shape or d.dtype != a.dtype:
                raise BundleError(
                    f"{artifact.file}: {what} '{d.name}' is {d.dtype}{d.shape} in the manifest "
                    f"but {a.dtype}{a.shape} in the model"
                )
            dq, aq = d.quantization, a.quantization
            if (dq is None) != (aq is None) or (
                dq
                and aq
                and (
                    abs(dq.scale - aq.scale) > 1e-9 * max(1.0, aq.scale)
                    or dq.zero_point != aq.zero_point
                )
            ):
                raise BundleError(
                    f"{artifact.file}: {what} '{d.name}' quantization differs from the model"
                )
