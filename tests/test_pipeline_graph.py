"""The agent's pipeline as a graph: its wiring, windowing chosen by source kind and manifest,
and probation as a stage (real BreastMNIST images, the session's real CNN bundle)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import Bundle, WindowSpec
from edge_agent.decode import Decoded
from edge_agent.graph import Graph
from edge_agent.model import LoadedModel, Model
from edge_agent.model_slot import ModelSlot, Probation
from edge_agent.pipeline import Bind, build_graph
from edge_agent.sources import (
    DicomSettings,
    ImagesSettings,
    ImuSettings,
    NpzSettings,
    VideoSettings,
    open_source,
    window_stage,
)
from edge_agent.telemetry import PipelineStats
from edge_agent.window import Window, WindowSettings, split_window
from models import breast_cnn


def _replay(n: int) -> Any:
    return open_source(NpzSettings(path=breast_cnn.DATA, split="val", rate_hz=0, limit=n))


def test_the_graph_runs_from_the_source_to_the_outbox_in_flow_order(
    loaded_bundle: Bundle,
) -> None:
    model = LoadedModel(loaded_bundle)
    assert isinstance(model, Model), "a loaded model satisfies the stages' protocol"
    source, window = split_window(_replay(4))
    sent: list[tuple[str, dict[str, Any]]] = []
    stats = PipelineStats()
    g = build_graph(source, window, Bind(model), lambda k, b: sent.append((k, b)), stats)
    names = [type(op).__name__ for op in g.operators()]
    assert names == [
        "NpzReplay",
        "Window",
        "Bind",
        "Preprocess",
        "Infer",
        "Decode",
        "Result",
        "Events",
        "Publish",
    ]
    g.run(threading.Event())
    assert [k for k, _ in sent] == ["result"] * 4 and stats.results == 4
    assert sent[0][1]["bundle"] == loaded_bundle.id


def test_a_graph_is_one_chain_from_one_source() -> None:
    def stage(xs: Any) -> Any:
        return iter(xs)

    def other(xs: Any) -> Any:
        return iter(xs)

    g = Graph("t").add_flow([1, 2], stage).add_flow(stage, other)
    with pytest.raises(ValueError, match="already flows"):
        g.add_flow(stage, iter)
    with pytest.raises(ValueError, match="already has an upstream"):
        g.add_flow(other, stage)
    assert g.operators() == [[1, 2], stage, other]
    g2 = Graph("t2").add_flow([1], stage).add_flow([2], other)
    with pytest.raises(ValueError, match="exactly one source"):
        g2.operators()


def test_windowing_is_chosen_by_the_source_kind_and_the_manifest(tmp_path: Path) -> None:
    spec = WindowSpec(length=4, hop=2, label="max")
    clip, said = window_stage(VideoSettings(path=tmp_path / "a.mp4"), spec)
    assert clip == WindowSettings(length=4, hop=2, label="max")
    assert {s.origin for s in said} == {"bundle"}
    # DICOM's 'window' is its VOI window, not windowing: its clips still come from the bundle
    voi, _ = window_stage(DicomSettings(path=tmp_path, window=(40.0, 400.0)), spec)
    assert voi == clip
    assert window_stage(ImagesSettings(path=tmp_path), spec) == (None, [])  # never cut
    own = WindowSettings(length=8, hop=8)
    imu, said = window_stage(ImuSettings(path=tmp_path / "x.txt", window=own), spec)
    assert imu == own and {s.origin for s in said} == {"config"}


class _Broken:
    """A real model whose runtime fails on every input (as a bad update would)."""

    def __init__(self, model: LoadedModel) -> None:
        self.bundle, self._model = model.bundle, model

    def prepare(self, sample: np.ndarray) -> np.ndarray:
        return self._model.prepare(sample)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        raise RuntimeError("delegate failed\nmore detail")

    def infer_outputs(self, tensor: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("delegate failed")

    def decode(self, output: np.ndarray) -> Decoded:
        return self._model.decode(output)


def test_probation_is_a_stage_that_rejects_then_rolls_back(loaded_bundle: Bundle) -> None:
    good = LoadedModel(loaded_bundle)
    told: list[str] = []
    slot = ModelSlot(
        good, lambda old, new: told.append("swap"), lambda bad, back, why: told.append(why), 2, 10
    )
    slot.offer(_Broken(good))  # type: ignore[arg-type]
    stats = PipelineStats()
    sent: list[tuple[str, dict[str, Any]]] = []
    source, window = split_window(_replay(5))
    probation = Probation(slot, stats)
    build_graph(source, window, probation, lambda k, b: sent.append((k, b)), stats).run(
        threading.Event()
    )
    assert stats.errors == {"preprocess": 2}, "each failing sample rejected and counted"
    assert told[0] == "swap" and told[1].startswith("2 run-time failures in the first 2")
    assert told[1].endswith("last: infer: delegate failed")
    assert slot.current is good and not slot.on_probation
    assert [k for k, _ in sent] == ["result"] * 3, "the rest ran on the restored model"


def test_window_stage_passes_samples_through_when_not_cut() -> None:
    xs = [1, 2, 3]
    assert list(Window(None)(xs)) == xs
