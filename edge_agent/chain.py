"""A bundle's feature stage on the device: each frame of a clip through the per-frame model
once, the window of feature vectors into the temporal model (docs/bundle.md, "feature stage").

A sliding window of clips (hop 1) shares all but one frame with the one before it, so the
features of the last few frames are kept, keyed by the frame's prepared bytes: a frame already
seen is not run again. What the cache saves is counted (``runs``, ``reused``), so a test (and
the telemetry of a curious user) can see that each frame ran once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from edge_agent.backends import Backend, open_backend
from edge_agent.bundle import Artifact, Bundle, Preprocess
from edge_agent.errors import BundleError, MedgeError
from edge_agent.preprocess import byte_table, dequantize, normalize, to_input

__all__ = ["FeatureStage"]


class FeatureStage:
    """The per-frame model of a chained bundle, opened on a backend, with its feature cache."""

    def __init__(
        self, path: Path, artifact: Artifact, preprocess: Preprocess, frames: int, threads: int = 1
    ) -> None:
        """``path``: the feature artifact's file; ``frames``: frames per window (the cache
        keeps twice as many)."""
        self.artifact = artifact
        self.backend: Backend = open_backend(artifact.runtime, path, threads)
        self._input = artifact.inputs[0]
        self._output = artifact.outputs[0]
        self._preprocess = preprocess
        self._table = byte_table(preprocess, self._input)
        self._frame_shape = tuple(self._input.shape)
        self._frame_size = int(np.prod(self._frame_shape))
        self.keep = 2 * frames
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.runs = 0  # frames that went through the feature model
        self.reused = 0  # frames whose features were in the cache
        declared = tuple(self._output.shape)
        actual = tuple(self.backend.outputs[0].shape)
        if declared != actual or tuple(self.backend.inputs[0].shape) != self._frame_shape:
            raise BundleError(
                f"{artifact.file}: the feature model's shapes differ from the manifest's"
            )

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame as the source gives it: the input's shape without the batch axis."""
        return self._frame_shape[1:]

    @classmethod
    def of(cls, bundle: Bundle, artifact: Artifact, threads: int = 1) -> FeatureStage:
        """The feature stage of a chained bundle (``artifact``: its feature artifact)."""
        m = bundle.manifest
        frames = m.window.length if m.window else 1
        return cls(bundle.path_of(artifact), artifact, m.preprocess, frames, threads)

    def prepare(self, clip: np.ndarray) -> np.ndarray:
        """(T, H, W, C) raw frames -> (T, 1, H, W, C) feature-model inputs."""
        clip = np.asarray(clip)
        if clip.ndim < 2 or clip[0].size != self._frame_size:
            raise MedgeError(
                f"clip of shape {tuple(clip.shape)} is not frames of {list(self.frame_shape)}"
            )
        if self._table is not None and clip.dtype == np.uint8:
            return self._table[clip].reshape((len(clip), *self._frame_shape))
        return np.stack([to_input(normalize(self._preprocess, f), self._input) for f in clip])

    def features(self, frames: np.ndarray) -> np.ndarray:
        """(T, 1, H, W, C) prepared frames -> (T, features) real values, each new frame run
        once; the cache keeps the last ``keep`` frames."""
        out = []
        for frame in frames:
            key = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()
            got = self._cache.get(key)
            if got is None:
                raw = self.backend.invoke([frame])[0]
                got = dequantize(raw, self._output.quantization).reshape(-1)
                self._cache[key] = got
                if len(self._cache) > self.keep:
                    self._cache.popitem(last=False)
                self.runs += 1
            else:
                self._cache.move_to_end(key)
                self.reused += 1
            out.append(got)
        return np.stack(out)
