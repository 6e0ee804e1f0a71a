"""The converter and `medge evaluate`, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from zoo_args import BREAST_CNN_ARGS

from edge_agent.bundle import Bundle
from models import breast_cnn

pytestmark = pytest.mark.slow

DATA = str(breast_cnn.DATA)


def medge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_int8_keeps_the_float_models_clinical_performance(bundle_dir: Path) -> None:
    report = json.loads((bundle_dir / "report.json").read_text())
    fl, q = report["float"], report["litert-int8"]
    assert report["eval"]["n"] == 78
    assert report["agreement"]["litert-int8"] >= 0.97
    for metric in ("accuracy", "sensitivity", "specificity"):
        assert fl[metric] - q[metric] <= 0.03, metric
    assert fl["auc"] - q["auc"] <= 0.03
    assert q["auc"] > 0.8, "the zoo CNN must actually detect malignancy"
    assert report["size_bytes"]["litert-int8"] < 0.5 * report["size_bytes"]["keras"]
    md = (bundle_dir / "report.md").read_text()
    assert "| sensitivity |" in md and "Confusion matrix" in md


def test_evaluate_cli_reproduces_the_bundles_own_int8_metrics(bundle_dir: Path) -> None:
    r = medge("evaluate", str(bundle_dir), "--data", DATA, "--split", "val", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = Bundle.load(bundle_dir).manifest.metrics["litert-int8"]
    assert got["n"] == 78 and got["artifact"] == "litert-int8"
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_evaluate_reads_plain_x_y_npz(bundle_dir: Path, tmp_path: Path) -> None:
    with np.load(DATA) as d:
        np.savez(tmp_path / "xy.npz", x=d["val_images"][:20], y=d["val_labels"][:20])
    r = medge("evaluate", str(bundle_dir), "--data", str(tmp_path / "xy.npz"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 20


def _budget_not_met(work: Path) -> subprocess.CompletedProcess[str]:
    return medge(
        "convert",
        str(breast_cnn.WEIGHTS),
        *BREAST_CNN_ARGS,
        "--out",
        str(work / "b"),
        "--budget",
        "auc=0",
        "--budget",
        "accuracy=0.5",
        "--fallback",
        "none",
    )


BAD_INPUTS = [
    ("corrupt-model", "bad.keras is not a Keras model: not a zip archive"),
    ("wrong-shape", "do not fit model input"),
    ("wrong-labels", "model has 2 outputs but 3 labels"),
]


def _bad_input(work: Path, make: str) -> subprocess.CompletedProcess[str]:
    model, calib, labels = str(breast_cnn.WEIGHTS), DATA, "malignant,benign"
    if make == "corrupt-model":
        bad = work / "bad.keras"
        bad.write_bytes(breast_cnn.WEIGHTS.read_bytes()[:5000])
        model = str(bad)
    elif make == "wrong-shape":
        np.savez(work / "c.npz", x=np.zeros((8, 30, 30), np.uint8))
        calib = str(work / "c.npz")
    else:
        labels = "a,b,c"
    return medge(
        "convert",
        model,
        "--calib",
        calib,
        "--eval",
        DATA,
        "--eval-split",
        "val",
        "--labels",
        labels,
        "--out",
        str(work / "out"),
        "--preprocess",
        "scale01",
    )


@pytest.fixture(scope="module", autouse=True)
def cli_runs(
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future]:  # type: ignore[type-arg]
    """This module's ``medge convert`` runs, started when the module starts (two at a time)
    so that they work while the tests on the shared bundle run: test -> Future of
    (its own directory, the finished run)."""

    def run(name: str, job) -> Callable[[], tuple[Path, subprocess.CompletedProcess[str]]]:  # type: ignore[no-untyped-def]
        work = tmp_path_factory.mktemp(name)

        def go() -> tuple[Path, subprocess.CompletedProcess[str]]:
            return work, job(work)

        return go

    jobs = {
        "test_budget_not_met_exits_nonzero_and_leaves_no_bundle": run("budget", _budget_not_met)
    }
    for make, message in BAD_INPUTS:  # keyed by the test id: [make-message]
        jobs[f"test_bad_input_is_one_clear_line[{make}-{message}]"] = run(
            make, lambda work, make=make: _bad_input(work, make)
        )
    return side_by_side(jobs)


def test_budget_not_met_exits_nonzero_and_leaves_no_bundle(
    cli_runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    work, r = cli_runs["test_budget_not_met_exits_nonzero_and_leaves_no_bundle"].result()
    # int8 output quantization coarsens the scores, so AUC cannot stay exactly equal, and the
    # search may not fall back to anything but full int8
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert len(errors) == 1, r.stderr
    assert "accuracy budget not met by any artifact" in errors[0]
    assert "int8: auc dropped" in errors[0]
    assert not (work / "b").exists()
    assert list(work.iterdir()) == [], "no partial bundle or staging directory left"


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_line(
    cli_runs: dict[str, Future],  # type: ignore[type-arg]
    make: str,
    message: str,
) -> None:
    work, r = cli_runs[f"test_bad_input_is_one_clear_line[{make}-{message}]"].result()
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (work / "out").exists()
