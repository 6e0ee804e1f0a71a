"""The zoo from the command line and docs/models.md: `medge zoo list`, the table generated from
the kept reports (tools/models_table.py), and the errors a missing file gives."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import models
from edge_agent.errors import MedgeError
from medge import zoo

ROOT = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("models_table", ROOT / "tools/models_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_models_md_is_what_the_kept_reports_give() -> None:
    tool = _tool()
    assert (ROOT / "docs/models.md").read_text(encoding="utf-8") == tool.render(
        tool.kept_reports()
    ), "docs/models.md is stale: run python tools/models_table.py and commit it"


def test_every_zoo_model_has_a_kept_report_of_its_own_weights() -> None:
    for spec in models.zoo():
        kept = json.loads((models.REPORTS_DIR / f"{spec.name}.json").read_text())
        assert kept["zoo"]["name"] == spec.name
        assert kept["size_bytes"]["keras"] == spec.weights.stat().st_size, (
            f"{spec.name}: the kept report is of other weights; rebuild it "
            "(python tools/models_table.py --build NAME)"
        )
        assert "roc" not in kept and kept["params"] > 0


def _report(
    task: str, metrics: dict[str, object], events: dict[str, object] | None = None
) -> dict[str, object]:
    r: dict[str, object] = {
        "task": task,
        "variants": ["float", "litert-int8"],
        "float": metrics,
        "litert-int8": metrics,
        "size_bytes": {"litert-fp32": 40960, "litert-int8": 10240},
        "latency_ms": {"litert-fp32": {"p50": 0.5}, "litert-int8": {"p50": 0.25}},
        "eval": {"n": 50},
        "params": 1234,
        "zoo": {
            "name": "x",
            "summary": "s",
            "family": "U-Net",
            "task": task,
            "data_kind": "real",
            "split": "by exam",
            "anchor": "",
        },
    }
    if events:
        r["events"] = events
    return r


def test_a_row_shows_each_tasks_metrics_with_intervals_and_events() -> None:
    tool = _tool()
    seg = tool.render([_report("segmentation", {"dice": 0.91, "dice_ci": [0.88, 0.93]})])
    assert "dice 0.910 (0.880–0.930) → 0.910 (0.880–0.930)" in seg
    assert "40 KB / 10 KB" in seg and "0.500 ms / 0.250 ms" in seg and "1,234" in seg
    ev = {
        "hours": 1.8,
        "variants": {"litert-int8": {"fall": {"sensitivity": 0.9, "false_alarms_per_hour": 0.5}}},
    }
    cls = tool.render([_report("classification", {"auc": 0.9}, ev)])
    want = "fall events (int8, 1.80 h of recordings): sensitivity 0.900, false_alarms_per_hour 0.50"
    assert want in cls


def test_zoo_list_json_names_each_models_data_and_anchor() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "medge", "zoo", "list", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(models.names()) and "breast_cnn" in rows
    assert rows["breast_cnn"]["data_kind"] == "real"
    assert rows["breast_cnn"]["train"] == "python -m models.breast_cnn"
    assert "0.901" in rows["breast_cnn"]["anchor"]


def test_a_missing_weights_file_is_named_with_the_command_that_makes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = dataclasses.replace(models.spec("breast_cnn"), weights=tmp_path / "gone.keras")
    monkeypatch.setattr(zoo, "find", lambda name: spec)
    with pytest.raises(MedgeError, match=r"gone\.keras is missing \(python -m models\.breast_cnn"):
        zoo.build("breast_cnn", out=tmp_path / "b")


def test_an_unknown_name_lists_the_zoo() -> None:
    with pytest.raises(MedgeError, match="no zoo model 'nope'; there are: .*breast_cnn"):
        zoo.find("nope")
