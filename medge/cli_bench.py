"""`medge bench`: the benchmarks of bench/ in one run, written as JSON and a Markdown page."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import MedgeError

if TYPE_CHECKING:
    from medge.bench_suite import Run

__all__ = ["cmd_bench", "register"]


def cmd_bench(a: argparse.Namespace) -> int:
    from medge.bench_markdown import markdown
    from medge.bench_plots import copy_plots
    from medge.bench_suite import BENCHES, ROOT, run_benches, save

    if not (ROOT / "bench").is_dir():
        raise MedgeError("medge bench runs the scripts of bench/: run it from a source checkout")
    known = {b.name: b for b in BENCHES}
    names = [n for part in a.only or [] for n in part.split(",") if n]
    bad = [n for n in names if n not in known]
    if bad:
        raise MedgeError(f"unknown benchmark '{bad[0]}' (one of {', '.join(known)})")
    chosen = [known[n] for n in names] if names else list(BENCHES)
    skipped = [b.name for b in chosen if a.quick and b.quick is None]
    chosen = [b for b in chosen if not (a.quick and b.quick is None)]
    if skipped:
        print(f"medge bench: --quick leaves out {', '.join(skipped)}", file=sys.stderr)
    out = a.out or Path(tempfile.mkdtemp(prefix="medge-bench-"))
    run = run_benches(chosen, a.quick, out=out)
    broken = _plot(run, out / "plots")
    save(run, out)
    (out / "benchmarks.md").write_text(markdown(run, "plots"))
    if a.docs is not None:
        images = a.docs.parent / a.docs.stem  # docs/benchmarks.md -> docs/benchmarks/*.png
        copy_plots(run.plots, out / "plots", images)
        a.docs.write_text(markdown(run, images.name))
    made = sum(p["made"] for p in run.plots)
    print(f"medge bench: {len(run.outcomes)} benchmark(s), {made} plot(s); results in {out}")
    if run.failed:
        print(f"medge bench: failed: {', '.join(run.failed)} (output in {out})", file=sys.stderr)
    return 1 if run.failed or broken else 0


def _plot(run: Run, where: Path) -> bool:
    """Draw the run's plots into ``where`` (run.plots says which were made); say in one line
    that matplotlib is missing, and in one line per reason why others were not made. True if
    any was not made for a reason other than the missing extra (a fault: exit status 1)."""
    from medge.bench_plots import NO_MATPLOTLIB, make_plots

    run.plots = make_plots(run, where)
    unmade = [p for p in run.plots if not p["made"]]
    if any(p["why"] == NO_MATPLOTLIB for p in unmade):
        print(f"medge bench: {NO_MATPLOTLIB}: no plots; JSON and Markdown written", file=sys.stderr)
    broken = [p for p in unmade if p["why"] != NO_MATPLOTLIB]
    for why in dict.fromkeys(p["why"] for p in broken):
        files = ", ".join(p["file"] for p in broken if p["why"] == why)
        print(f"medge bench: plot(s) not made ({files}): {why}", file=sys.stderr)
    return bool(broken)


def register(sub: Any, common: Callable[..., None]) -> None:
    from medge.bench_suite import BENCHES

    listing = "; ".join(
        f"{b.name}: {b.what}" + ("" if b.quick is not None else " (full runs only)")
        for b in BENCHES
    )
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (a source checkout) and write JSON and a Markdown page",
        description="Run the benchmarks of bench/ one after the other on this machine, each "
        "as its own process, and write what each printed beside what it is compared with: "
        f"bench.json (with the figures and series each hands over through bench/bench_data.py), "
        "one .txt per benchmark, PNG plots in plots/ (matplotlib, the bench extra) and "
        f"benchmarks.md in --out. ({listing}.) A benchmark that fails or runs past its limit "
        "is recorded and makes the exit status 1.",
    )
    p.add_argument("--quick", action="store_true", help="small runs, about a minute in all")
    p.add_argument(
        "--only", action="append", metavar="NAME[,NAME]", help="run only these (repeatable)"
    )
    p.add_argument("--out", type=Path, help="where the results go (default: a new temp dir)")
    p.add_argument(
        "--docs",
        type=Path,
        metavar="PATH",
        help="also write the page here (docs/benchmarks.md), its plots in a folder beside it "
        "named after it (docs/benchmarks/)",
    )
    common(p)
    p.set_defaults(func=cmd_bench)
