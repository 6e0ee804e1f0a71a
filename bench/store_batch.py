"""The gateway store's batch write (Store.add_results, what the writer does with what arrived
within a few milliseconds), SQLite and PostgreSQL side by side in one run.

    .venv/bin/python bench/store_batch.py [--n 4000] [--batches 1,10,50]

Results of a sealed result's size (a 700-byte raw message), one device per configuration, in
batches of B; results stored per second, and PostgreSQL's rate as a share of SQLite's. A
throwaway PostgreSQL cluster on a free loopback port (tests/pg.py: Debian's postgresql), a
SQLite file in a temp dir (WAL, synchronous=FULL). Measured with this tree's code: to compare
with an earlier version, run it on a checkout of that version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pg import new_database, start_postgres  # noqa: E402  (tests/pg.py)

from edge_agent.envelope import Envelope  # noqa: E402
from gateway import Store  # noqa: E402


def _items(n: int, device: str) -> list[tuple[Envelope, bytes | None]]:
    body = {
        "input": "x#0", "pred": 1, "pred_label": "benign", "scores": [0.1, 0.9],
        "bundle": "b@1#abc", "input_sha256": "0" * 64,
    }  # fmt: skip
    now = time.time()
    return [(Envelope("result", "s", device, i + 1, now, body), b"x" * 700) for i in range(n)]


def rate(target: str, batch: int, n: int) -> float:
    with Store(target) as store:
        items = _items(n, f"d{batch}")
        t = time.perf_counter()
        for i in range(0, n, batch):
            store.add_results(items[i : i + batch])
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="results per configuration")
    ap.add_argument("--batches", default="1,10,50", help="batch sizes")
    a = ap.parse_args()
    sizes = [int(x) for x in a.batches.split(",")]
    print(f"{a.n} results per run; results stored per second")
    print(f"{'batch':>6} {'SQLite':>10} {'PostgreSQL':>11} {'PG/SQLite':>10}")
    with start_postgres() as server:
        for b in sizes:
            lite = rate(str(Path(tempfile.mkdtemp()) / "s.sqlite"), b, a.n)
            pg = rate(new_database(server.url), b, a.n)
            print(f"{b:>6} {lite:>10.0f} {pg:>11.0f} {pg / lite:>9.2f}x")


if __name__ == "__main__":
    main()
