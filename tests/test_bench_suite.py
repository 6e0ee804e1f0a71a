"""``medge bench``: each benchmark its own process, in order; what it printed kept beside the
machine that produced it; a failure or a time-out recorded and turned into exit status 1; what a
benchmark hands over through bench/bench_data.py in bench.json, tabled and plotted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_import_contracts import violations

from medge.bench_markdown import markdown
from medge.bench_plots import NO_MATPLOTLIB, make_plots
from medge.bench_suite import BENCHES, DATA_ENV, Bench, Run, run_benches

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_script_exists_and_quick_runs_leave_out_only_the_long_ones() -> None:
    for b in BENCHES:
        assert (ROOT / "bench" / b.script).is_file(), b.script
    assert {b.name for b in BENCHES if b.quick is None} == {"convert", "footprint"}


def test_outputs_failures_and_time_outs_are_all_kept(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "ok.py").write_text("import sys\nprint('ratio 0.91', sys.argv[1:])\n")
    (bench / "boom.py").write_text("import sys\nprint('half way')\nsys.exit('broke')\n")
    (bench / "slow.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    benches = [
        Bench("ok", "ok.py", "a ratio", "1.0", ("--n", "3")),
        Bench("boom", "boom.py", "a crash", "-", ()),
        Bench("slow", "slow.py", "a hang", "-", (), timeout_s=1.0),
    ]
    out = tmp_path / "out"
    run = run_benches(benches, quick=True, bench_dir=bench, out=out, echo=False)
    assert run.failed == ["boom", "slow"]
    ok, boom, slow = run.outcomes
    assert ok.returncode == 0 and "ratio 0.91 ['--n', '3']" in ok.output
    assert boom.returncode == 1 and "half way" in boom.output and "broke" in boom.output
    assert slow.returncode is None and "[stopped after 1 s]" in slow.output
    saved = json.loads((out / "bench.json").read_text())
    assert saved["machine"]["cores"] and "load_after" in saved["machine"]
    assert [o["name"] for o in saved["outcomes"]] == ["ok", "boom", "slow"]
    assert (out / "boom.txt").read_text() == boom.output
    page = markdown(run)
    assert "| ok | a ratio | 1.0 | ok |" in page and "| slow | a hang | - | timed out |" in page
    assert "**Machine**" in page and "**Load average**" in page


def test_an_unknown_benchmark_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "medge", "bench", "--only", "nope"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("medge: error: unknown benchmark 'nope'")


# A fake benchmark that hands over data the way the real ones do (bench/bench_data.py).
FAKE = """\
from bench_data import figure, record, series
figure("seal", 6.7, "us", target=18.8, better="lower", anchor="the old code, 18.8 us")
figure("first result stored", 2.5, "s", target=2.0, better="lower")
figure("agreement", 0.999, target=0.995, better="higher")
figure("message size", 765, "B")
figure("p|q", 1.0)
series("agent", [0, 15, 30], [83.0, 83.1, 83.2], plot="memory", x_unit="s", y_unit="MB")
series("gateway", [0, 15, 30], [68.0, 71.8, 71.9], plot="memory", x_unit="s", y_unit="MB")
record("config", n=3)
record("config", repeat=1)
print("printed as ever")
"""
PNG = b"\x89PNG\r\n\x1a\n"


def _fake_bench(tmp_path: Path) -> Path:
    """A bench/ folder with bench_data.py beside a script that uses it (as bench/ is)."""
    bench = tmp_path / "bench"
    bench.mkdir(exist_ok=True)
    shutil.copy(ROOT / "bench" / "bench_data.py", bench)
    (bench / "fake.py").write_text(FAKE)
    return bench


def _fake_run(tmp_path: Path) -> Run:
    fake = Bench("fake", "fake.py", "a fake", "its anchors", ())
    return run_benches([fake], True, bench_dir=_fake_bench(tmp_path), echo=False)


def test_what_a_benchmark_hands_over_comes_back_in_bench_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = Bench("fake", "fake.py", "a fake", "its anchors", ())
    run = run_benches([fake], True, bench_dir=_fake_bench(tmp_path), out=out, echo=False)
    assert run.failed == []
    (o,) = json.loads((out / "bench.json").read_text())["outcomes"]
    assert "printed as ever" in o["output"] and o["data_error"] is None
    figs = {f["name"]: f for f in o["data"]["figures"]}
    assert figs["seal"] == {
        "name": "seal", "value": 6.7, "unit": "us", "target": 18.8, "better": "lower",
        "anchor": "the old code, 18.8 us", "met": True,
    }  # fmt: skip
    assert figs["first result stored"]["met"] is False
    assert figs["first result stored"]["anchor"] == "target <= 2 s"
    assert figs["agreement"]["met"] is True and figs["message size"]["met"] is None
    assert o["data"]["series"]["agent"] == {
        "x": [0.0, 15.0, 30.0], "y": [83.0, 83.1, 83.2], "x_unit": "s", "y_unit": "MB",
        "plot": "memory",
    }  # fmt: skip
    assert o["data"]["config"] == {"n": 3, "repeat": 1}  # merged


def test_run_by_hand_bench_data_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "bench_data.py")
    assert spec is not None and spec.loader is not None
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    bench_data.figure("x", 1.0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "d.json"))
    with pytest.raises(ValueError, match="not a finite number"):
        bench_data.figure("x", float("nan"))
    with pytest.raises(ValueError, match="2 x for 1 y"):
        bench_data.series("s", [1, 2], [1])
    assert bench_data.ENV == DATA_ENV


def test_a_data_file_that_is_not_bench_datas_fails_the_benchmark(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bad.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['MEDGE_BENCH_DATA']).write_text('{oops')\n"
    )
    (bench / "odd.py").write_text(
        "import json, os, pathlib\npathlib.Path(os.environ['MEDGE_BENCH_DATA']).write_text("
        "json.dumps({'figures': [{'name': 'x', 'value': 'fast'}]}))\n"
    )
    benches = [Bench("bad", "bad.py", "-", "-", ()), Bench("odd", "odd.py", "-", "-", ())]
    run = run_benches(benches, True, bench_dir=bench, echo=False)
    assert run.failed == ["bad", "odd"]
    bad, odd = run.outcomes
    assert bad.returncode == 0 and "not JSON" in str(bad.data_error)
    assert bad.data == {"unread": "{oops"}
    assert odd.data_error == "bad data: figure 1"
    page = markdown(run)
    assert "| bad | - | - | data file is not JSON" in page
    assert "**Its data file was not read as a whole**: bad data: figure 1" in page


def test_figures_are_tabled_beside_their_anchors_and_plotted(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    run.plots = make_plots(run, tmp_path / "plots")
    assert [(p["file"], p["made"]) for p in run.plots] == [
        ("fake_memory.png", True),
        ("fake_figures.png", True),
    ]
    for p in run.plots:
        png = (tmp_path / "plots" / p["file"]).read_bytes()
        assert png.startswith(PNG) and len(png) > 2000
    page = markdown(run, "benchmarks")
    assert "| fake | a fake | its anchors | ok | 2 of 3 met, **1 not** |" in page
    assert "| figure | value | compared with | met |" in page
    assert "| seal | 6.7 us | the old code, 18.8 us | met |" in page
    assert "| first result stored | 2.5 s | target <= 2 s | **not met** |" in page
    assert "| message size | 765 B | - | - |" in page
    assert "| p\\|q | 1 | - | - |" in page  # a | in a name does not end its cell
    assert "![fake: memory](benchmarks/fake_memory.png)" in page
    assert "- **Plots**: 2 of 2 made" in page


def test_without_matplotlib_the_plots_are_listed_as_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run.plots = make_plots(run, tmp_path / "plots")
    assert [p["made"] for p in run.plots] == [False, False]
    assert {p["why"] for p in run.plots} == {NO_MATPLOTLIB}
    assert not (tmp_path / "plots").exists()
    page = markdown(run)
    assert f"- **Plots**: 0 of 2 made; not made: {NO_MATPLOTLIB}" in page
    assert f"*Plot `fake_memory.png` (fake: memory) not made: {NO_MATPLOTLIB}.*" in page
    assert "| seal | 6.7 us |" in page  # the figures are there all the same


@pytest.mark.parametrize("has_matplotlib", [True, False])
def test_medge_bench_writes_json_markdown_and_plots_into_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    has_matplotlib: bool,
) -> None:  # fmt: skip
    import medge.bench_suite
    from medge.cli_bench import cmd_bench

    script = _fake_bench(tmp_path) / "fake.py"  # an absolute script path: bench/ / it is it
    monkeypatch.setattr(
        medge.bench_suite, "BENCHES", (Bench("fake", str(script), "a fake", "-", ()),)
    )
    if not has_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    (tmp_path / "docs" / "benchmarks").mkdir()
    (tmp_path / "docs" / "benchmarks" / "stale_old.png").write_bytes(PNG)  # an earlier run's
    out = tmp_path / "out"
    ns = argparse.Namespace(only=None, quick=True, out=out, docs=docs)
    assert cmd_bench(ns) == 0
    err = capsys.readouterr().err
    saved = json.loads((out / "bench.json").read_text())
    assert [p["made"] for p in saved["plots"]] == [has_matplotlib] * 2
    assert (out / "benchmarks.md").read_text().count("plots/fake_") == 2 * has_matplotlib
    images = sorted(p.name for p in (tmp_path / "docs" / "benchmarks").iterdir())
    if has_matplotlib:
        assert "matplotlib" not in err
        assert images == ["fake_figures.png", "fake_memory.png"]
        assert "![fake: memory](benchmarks/fake_memory.png)" in docs.read_text()
    else:
        assert [line for line in err.splitlines() if "matplotlib" in line] == [
            f"medge bench: {NO_MATPLOTLIB}: no plots; JSON and Markdown written"
        ]
        assert images == []
        assert "not made" in docs.read_text()


def test_matplotlib_is_imported_by_the_bench_plots_alone() -> None:
    """The device (edge_agent) and the fog node never import it; in medge, only bench_plots."""
    assert violations("edge_agent", ("matplotlib",)) == []
    assert violations("gateway", ("matplotlib",)) == []
    found = [line for line in violations("medge", ("matplotlib",)) if "bench_plots" not in line]
    assert found == []
