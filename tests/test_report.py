"""The human report: Markdown and self-contained HTML built from real metrics on real data."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.metrics import (
    classification_metrics,
    event_metrics,
    roc_curve,
    segmentation_metrics,
)
from converter.report import render_html, write_html, write_markdown
from converter.scoring import agreement
from models import breast_cnn

pytestmark = pytest.mark.slow  # the fixture runs the zoo CNN with Keras

EVIL = "<script>alert('x')</script>"


class _Page(HTMLParser):
    """Collects what the tests look at: tags, polylines, confusion-table cells, links."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.polylines: list[dict[str, str | None]] = []
        self.cm_cells: list[str] = []
        self.urls: list[str] = []
        self._in_cm = self._in_td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "polyline":
            self.polylines.append(a)
        if tag == "table" and a.get("class") == "cm":
            self._in_cm = True
        self._in_td = tag == "td" and self._in_cm
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_cm = False
        if tag == "td":
            self._in_td = False

    def handle_data(self, data: str) -> None:
        if self._in_td:
            self.cm_cells.append(data.strip())


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """The zoo CNN (float) and the same network with its weights rounded to float16, run on
    the real BreastMNIST validation images; every metric computed by converter.metrics."""
    import keras

    with np.load(breast_cnn.DATA) as d:
        x = d["val_images"][..., None].astype("float32") / 255.0
        y = d["val_labels"].reshape(-1).astype(int)
    model = keras.models.load_model(breast_cnn.WEIGHTS, compile=False)
    float_scores = model.predict(x, verbose=0)
    model.set_weights([w.astype(np.float16).astype(np.float32) for w in model.get_weights()])
    half_scores = model.predict(x, verbose=0)
    positive = 0  # malignant
    runs = {"float": float_scores, "fp16-weights": half_scores}
    rep: dict[str, Any] = {
        "model": "breast_cnn.keras",
        "profile": "x86",
        "labels": [EVIL, "benign"],
        "positive_label": EVIL,
        "eval": {"file": "breastmnist_dev.npz", "n": len(y)},
        "variants": list(runs),
        "agreement": {"fp16-weights": agreement(float_scores.argmax(1), half_scores.argmax(1))},
        "size_bytes": {"keras": breast_cnn.WEIGHTS.stat().st_size},
        "latency_ms": {},
        "warnings": [f"label {EVIL} is suspicious"],
        "per_layer_error": [
            {"layer": "conv2d", "op": "CONV_2D", "snr_db": 41.5, "kept_float": False},
            {"layer": "probs", "op": "SOFTMAX", "snr_db": 14.0, "kept_float": True},
        ],
        "roc": {},
    }
    for name, s in runs.items():
        rep[name] = classification_metrics(y, s, s.argmax(1), positive)
        fpr, tpr = roc_curve(y == positive, s[:, positive])
        rep["roc"][name] = {"fpr": fpr, "tpr": tpr}
    return rep


def test_html_is_one_parseable_self_contained_page(report: dict[str, Any], tmp_path: Path) -> None:
    write_html(tmp_path / "report.html", report)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.tags[0] == "html" and "svg" in page.tags and "style" in page.tags
    assert "script" not in page.tags, "no script, and the hostile label must not become one"
    assert page.urls == [], "no external assets"
    assert "&lt;script&gt;" in text
    assert EVIL not in text


def test_html_has_a_roc_polyline_per_variant(report: dict[str, Any]) -> None:
    page = _Page()
    page.feed(render_html(report))
    assert [p["data-variant"] for p in page.polylines] == ["float", "fp16-weights"]
    for p, name in zip(page.polylines, ["float", "fp16-weights"], strict=True):
        points = (p["points"] or "").split()
        assert len(points) == len(report["roc"][name]["fpr"])
        # (0,0) is bottom-left and (1,1) top-right of the plot
        x0, y0 = map(float, points[0].split(","))
        x1, y1 = map(float, points[-1].split(","))
        assert x1 > x0 and y1 < y0


def test_html_shows_the_confusion_counts_and_intervals(report: dict[str, Any]) -> None:
    page = _Page()
    text = render_html(report)
    page.feed(text)
    want = [str(c) for v in report["variants"] for row in report[v]["confusion"] for c in row]
    assert page.cm_cells == want
    assert sum(int(c) for c in want) == 2 * 78
    lo, hi = report["float"]["ci"]["sensitivity"]
    assert f"{lo:.3f}–{hi:.3f}" in text
    assert "14.0000" in text and 'class="bad"' in text  # the weak layer is shaded


def test_markdown_shows_intervals(report: dict[str, Any], tmp_path: Path) -> None:
    write_markdown(tmp_path / "report.md", report)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| sensitivity |"))
    sens = report["float"]["sensitivity"]
    assert lines[i].startswith(f"| sensitivity | {sens:.4f} |")  # the value cell stays plain
    lo, hi = report["float"]["ci"]["sensitivity"]
    assert lines[i + 1].startswith(f"| *95% CI* | {lo:.3f}–{hi:.3f} |")
    assert "Confusion matrix" in md and "| probs | SOFTMAX | 14.0000 | yes |" in md


def test_segmentation_and_event_sections(tmp_path: Path) -> None:
    with np.load(breast_cnn.DATA) as d:
        img = d["val_images"][:10].astype(float) / 255.0
    seg = segmentation_metrics(img >= 0.5, img)
    rep = {
        "model": "seg <b>",
        "profile": "rpi5",
        "labels": ["foreground"],
        "eval": {"file": "masks.npz", "n": 10},
        "variants": ["float"],
        "float": seg,
        "events": {
            "tolerance_s": 0.5,
            "hours": 1.0,
            "recordings": [
                {
                    "file": "ward <i>.npz",
                    "duration_s": 3600.0,
                    "windows": 100,
                    "skipped": {"invalid": 2},
                    "events": {"fall": 2},
                }
            ],
            "variants": {
                "float": {"fall": event_metrics([(1, 2), (5, 6)], [(1.5, 1.7)], duration_s=3600)}
            },
        },
        "size_bytes": {},
        "latency_ms": {},
    }
    text = render_html(rep)
    assert ">dice<" in text and ">hd95<" in text and "seg &lt;b&gt;" in text
    assert ">false_alarms_per_hour<" in text and "ward &lt;i&gt;" not in text
    assert "1 recording(s), 1.000 h, 100 windows (2 left out), 2 annotated event(s)" in text
    assert '<td class="l">float</td><td class="l">fall</td><td>0.5000' in text
    assert "polyline" not in text  # no ROC data, no curve
    write_markdown(tmp_path / "r.md", rep)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| dice | 1.0000" in md and "## Event detection over recorded streams" in md
    assert "| float | fall | 0.5000 (" in md  # sensitivity with its interval
