"""The accuracy-budget search: the cheapest artifact that meets --budget, on the real zoo CNN
and its real BreastMNIST validation data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from zoo_args import BREAST_CNN_ARGS

from converter.budget import RUNGS, misses, rungs
from converter.errors import ConversionError
from edge_agent.bundle import Bundle
from models import breast_cnn

DATA = str(breast_cnn.DATA)
BASE = [
    *BREAST_CNN_ARGS,
    "--no-onnx",
]


def medge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_misses_counts_drops_and_rises_for_lower_is_better_metrics() -> None:
    ref = {"auc": 0.90, "sensitivity": 0.80, "hd95": 2.0}
    assert misses({"auc": 0.01}, ref, {"auc": 0.895}) == []
    assert misses({"auc": 0.01}, ref, {"auc": 0.88}) == ["auc dropped 0.0200 > 0.01"]
    assert misses({"hd95": 0.5}, ref, {"hd95": 2.4}) == []
    assert misses({"hd95": 0.5}, ref, {"hd95": 3.0}) == ["hd95 dropped 1.0000 > 0.5"]
    with pytest.raises(ConversionError, match="undefined"):
        misses({"specificity": 0.1}, ref, {"specificity": 0.5})


def test_the_search_tries_the_cheapest_rung_on_the_target_first() -> None:
    """int16x8 runs on reference kernels on every profile's CPU (35x slower than int8 for a
    wrist CNN here): it is tried after fp32 everywhere, so it can no longer win over a float
    file that meets the budget; fp16 comes before fp32 where the CPU has fp16 arithmetic."""
    from converter.budget import by_cost

    keys = {p: [r.key for r in by_cost(RUNGS, p)] for p in ("x86", "rpi4", "rpi5", "jetson")}
    assert keys["x86"] == ["float-head", "mixed", "fp32", "fp16", "int16x8"]
    assert keys["rpi5"] == keys["jetson"] == ["float-head", "mixed", "fp16", "fp32", "int16x8"]
    assert keys["rpi4"][-1] == "int16x8"


def test_fallback_names_pick_rungs_in_ladder_order() -> None:
    assert rungs(None) == RUNGS
    assert rungs(["none"]) == ()
    assert [r.key for r in rungs(["fp32", "mixed"])] == ["mixed", "fp32"]
    with pytest.raises(ConversionError, match="unknown fallback 'int4'"):
        rungs(["int4"])


@pytest.fixture(scope="module")
def runs(
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """The two budget conversions of this module, started together: test -> (its own
    directory, the finished ``medge convert`` run)."""

    def run(name: str, *budget: str) -> Callable[[], tuple[Path, subprocess.CompletedProcess[str]]]:
        work = tmp_path_factory.mktemp(name)
        return lambda: (
            work,
            medge("convert", str(breast_cnn.WEIGHTS), *BASE, "--out", str(work / "b"), *budget),
        )

    # measured on the 78 validation images (float AUC 0.9282): full int8 loses 0.0129 AUC
    # (output quantization coarsens the scores), float-head 0.0021, mixed 0.0008 — so a 0.0015
    # AUC budget walks int8 -> float-head -> mixed
    started = side_by_side(
        {
            "test_a_budget_int8_misses_falls_back_to_the_cheapest_that_meets_it": run(
                "fallback", "--budget", "auc=0.0015,sensitivity=0.05"
            ),
            "test_an_impossible_budget_exits_nonzero_in_one_line_and_leaves_nothing": run(
                "impossible", "--budget", "auc=0", "--fallback", "mixed"
            ),
        }
    )
    return {name: f.result() for name, f in started.items()}


@pytest.mark.slow
def test_a_budget_int8_misses_falls_back_to_the_cheapest_that_meets_it(
    runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]],
) -> None:
    work, r = runs["test_a_budget_int8_misses_falls_back_to_the_cheapest_that_meets_it"]
    out = work / "b"
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    b = report["budget"]
    first = b["attempts"][0]
    assert first["rung"] == "int8" and first["met"] is False
    assert "auc dropped" in first["reason"]
    tried = [a for a in b["attempts"] if a["met"] is not None]
    assert b["winner"] != "int8" and tried[-1]["met"] is True
    assert all(a["met"] is False for a in tried[:-1])
    # the rungs after the winner, cheapest first on x86, are named as not tried, and why
    untried = [a for a in b["attempts"] if a["met"] is None]
    assert [a["rung"] for a in untried] == ["fp32", "fp16", "int16x8"]
    assert all(a["reason"].startswith(f"not tried: {b['winner']} met") for a in untried)
    assert b["profile"]["name"] == "x86" and b["profile"]["ranking"][-1] == "int16x8"
    # the winner really meets the budget, as the device runs it
    won = f"litert-{b['precision']}"
    assert report["float"]["auc"] - report[won]["auc"] <= 0.0015 + 1e-12
    assert [a["rung"] for a in tried] == ["int8", "float-head", "mixed"]
    # float-head: only the final softmax kept float: a few hundred bytes, most of int8's AUC
    # loss recovered (the 256-level int8 softmax made ties), not all of it here
    int8, head = b["attempts"][0], b["attempts"][1]
    assert 0 < head["bytes"] - int8["bytes"] < 1024 and not head["met"]
    assert int8["metrics"]["auc"] < head["metrics"]["auc"] < report["float"]["auc"]
    m = Bundle.load(out).manifest
    assert (m.artifacts[0].runtime, m.artifacts[0].precision) == ("litert", b["precision"])
    # the full-int8 artifact that missed (int8 input tensor) does not ship; every fallback
    # rung takes float input
    assert m.artifacts[0].inputs[0].dtype == "float32"
    assert f"budget {b['winner']}" in (m.provenance.strategy or "")
    # the mixed rung measured the per-layer error and kept the worst layers float, and the
    # final softmax (whose 256 int8 levels make ties)
    layers = report["per_layer_error"]
    kept = [r["snr_db"] for r in layers if r.get("why") == "among the worst fifth by SNR"]
    rest = [r["snr_db"] for r in layers if not r["kept_float"]]
    assert kept and rest and max(kept) <= min(rest)
    assert layers[-1]["op"] == "SOFTMAX" and layers[-1]["kept_float"]
    md = (out / "report.md").read_text()
    assert "## Accuracy budget" in md and "**missed**" in md and "**met**" in md
    assert "**not tried**" in md and "Tried cheapest first on `x86`" in md
    # the default (--float-artifacts auto): fp16 and fp32 ship beside the winner, whatever the
    # timing on this machine (recorded, not decisive)
    assert [a.precision for a in m.artifacts] == [b["precision"], "fp16", "fp32"]
    for p in ("fp16", "fp32"):
        decided = report["float_artifacts"][p]
        assert decided["shipped"] and decided["speedup_vs_winner"] > 0
        assert report["agreement"][f"litert-{p}"] >= 0.99


@pytest.mark.slow
def test_an_impossible_budget_exits_nonzero_in_one_line_and_leaves_nothing(
    runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]],
) -> None:
    work, r = runs["test_an_impossible_budget_exits_nonzero_in_one_line_and_leaves_nothing"]
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert len(errors) == 1, r.stderr
    assert "accuracy budget not met by any artifact (auc=0.0)" in errors[0]
    assert "int8: auc dropped" in errors[0] and "mixed: auc dropped" in errors[0]
    assert "Traceback" not in r.stderr
    assert list(work.iterdir()) == [], "no bundle or staging directory left"
