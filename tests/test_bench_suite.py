"""``medge bench``: each benchmark its own process, in order; what it printed kept beside the
machine that produced it; a failure or a time-out recorded and turned into exit status 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from medge.bench_suite import BENCHES, Bench, markdown, run_benches

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
