"""The LiteRT artifacts of a Keras, h5 or SavedModel source, made in child processes
(converter.child.litert): the first conversion strategy that works (converter.strategies), then
with ``--budget`` the cheapest rung that meets it (converter.budget), and the float fp16/fp32
files that ship beside the winner. Each one is evaluated as the device runs it (``evaluate``,
converter.scoring) and described from what the agent's own backend reads in it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter import budget as B
from converter import progress
from converter.layout import RANK_LAYOUTS
from converter.request import ConvertRequest
from converter.runner import CHILD_TIMEOUT_S, run_child
from converter.scoring import Scored
from converter.strategies import LITERT_CHILD, convert_litert
from edge_agent.backends import open_backend
from edge_agent.bundle import Artifact, CamSpec

__all__ = ["LitertBuild", "build_litert", "litert_artifact"]


@dataclass
class LitertBuild:
    artifacts: list[Artifact]  # the winner first, then the float files shipped beside it
    runs: dict[str, Scored]  # litert-<precision> -> evaluated
    float_outs: np.ndarray  # the float model's outputs on the evaluation samples
    float_metrics: dict[str, Any]
    report: dict[str, Any]  # litert, budget, per_layer_error, float_artifacts
    strategy: str
    cam: CamSpec | None


def litert_artifact(stage: Path, file: str, precision: str, layout: str | None) -> Artifact:
    """The manifest entry of a LiteRT file in ``stage``, its tensors read by the agent."""
    backend = open_backend("litert", stage / file)
    layout = layout or RANK_LAYOUTS.get(len(backend.inputs[0].shape))
    return Artifact(
        file=file,
        runtime="litert",
        precision=precision,  # type: ignore[arg-type]  # str: pydantic validates it
        inputs=[t.model_copy(update={"layout": layout}) for t in backend.inputs],
        outputs=backend.outputs,
    )


def build_litert(
    req: ConvertRequest,
    job: dict[str, Any],
    layout: str | None,
    stage: Path,
    work: Path,
    evaluate: Callable[[Path], Scored],
    score_float: Callable[[], tuple[np.ndarray, dict[str, Any]]],
) -> LitertBuild:
    """Make, evaluate and stage the LiteRT artifacts. ``job``: the child's inputs (model,
    calibration and evaluation samples in ``work``); ``score_float``: the float model's outputs
    and metrics, once the first child has written them."""
    keys = req.strategy_keys
    with progress.step(f"LiteRT conversion (strategies: {', '.join(keys)})"):
        litert = convert_litert(
            {
                **job,
                "tflite_out": str(work / "model.tflite"),
                "min_agreement": req.min_agreement,
                "extras": {p: str(work / f"extra-{p}.tflite") for p in ("fp16", "fp32")}
                if req.float_artifacts != "none"
                else {},
            },
            work,
            keys,
            CHILD_TIMEOUT_S,
        )
    float_outs, float_m = score_float()
    precision, path = litert.winner.precision, work / "model.tflite"
    scored = evaluate(path)
    report: dict[str, Any] = {"litert": litert.as_report()}
    if req.budget:

        def make(rung: B.Rung) -> tuple[Path, list[dict[str, Any]]]:
            ready = work / f"extra-{rung.key}.tflite"  # fp16/fp32: made with the int8 one
            if ready.exists():
                return ready, []
            out, layers = work / f"rung-{rung.key}.tflite", work / "layers.json"
            run_child(
                {**job, "variant": rung.key, "out": str(out), "layers_out": str(layers)},
                work,
                LITERT_CHILD,
                f"LiteRT {rung.key} conversion",
                ["variant"],
            )
            per_layer = rung.key in ("mixed", "float-head")
            return out, json.loads(layers.read_text()) if per_layer else []

        outcome = B.search(
            req.budget,
            float_m,
            (precision, path, scored),
            make,
            evaluate,
            B.rungs(req.fallback),
            req.profile,
        )
        precision, path, scored = outcome.precision, outcome.path, outcome.scored
        report["budget"] = B.describe(outcome, req.budget, req.profile)
        if outcome.per_layer:
            report["per_layer_error"] = outcome.per_layer
    file = f"model_{precision}.tflite"
    shutil.copyfile(path, stage / file)
    artifacts = [litert_artifact(stage, file, precision, layout)]
    runs = {f"litert-{precision}": scored}
    extras, decisions = B.float_extras(precision, scored, work, evaluate, req.float_artifacts)
    report["float_artifacts"] = decisions
    for extra, extra_scored in extras:
        shutil.copyfile(work / f"extra-{extra}.tflite", stage / f"model_{extra}.tflite")
        artifacts.append(litert_artifact(stage, f"model_{extra}.tflite", extra, layout))
        runs[f"litert-{extra}"] = extra_scored
    cam = None
    if req.cam:
        info = json.loads((work / "cam.json").read_text())
        cam = CamSpec(output=1, layer=info["layer"], upsample_to=info["size"])
    strategy = f"litert {litert.winner.key}"
    if report.get("budget", {}).get("winner", "int8") != "int8":
        strategy += f" -> budget {report['budget']['winner']}"
    return LitertBuild(artifacts, runs, float_outs, float_m, report, strategy, cam)
