"""`medge bench`: the benchmarks of bench/ in one run, written as JSON and a Markdown page."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError

__all__ = ["cmd_bench", "register"]


def cmd_bench(a: argparse.Namespace) -> int:
    from medge.bench_suite import BENCHES, ROOT, markdown, run_benches

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
    page = markdown(run)
    (out / "benchmarks.md").write_text(page)
    if a.docs is not None:
        a.docs.write_text(page)
    print(f"medge bench: {len(run.outcomes)} benchmark(s); results in {out}")
    if run.failed:
        print(f"medge bench: failed: {', '.join(run.failed)} (output in {out})", file=sys.stderr)
        return 1
    return 0


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
        f"bench.json, one .txt per benchmark and benchmarks.md in --out. ({listing}.) A "
        "benchmark that fails or runs past its limit is recorded and makes the exit status 1.",
    )
    p.add_argument("--quick", action="store_true", help="small runs, about a minute in all")
    p.add_argument(
        "--only", action="append", metavar="NAME[,NAME]", help="run only these (repeatable)"
    )
    p.add_argument("--out", type=Path, help="where the results go (default: a new temp dir)")
    p.add_argument(
        "--docs", type=Path, metavar="PATH", help="also write the page here (docs/benchmarks.md)"
    )
    common(p)
    p.set_defaults(func=cmd_bench)
