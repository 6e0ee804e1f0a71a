"""The gateway store's batch write (Store.add_results, what the writer does with what arrived
within a few milliseconds), SQLite and PostgreSQL side by side in one run.

    .venv/bin/python bench/store_batch.py [--n 4000] [--batches 1,10,50] [--fast-pg]

Results of a sealed result's size (a 700-byte raw message), four devices, in batches of B;
results stored per second (wall clock) and the storing thread's CPU per result, for:
SQLite (a file in a temp dir, WAL, synchronous=FULL); PostgreSQL as the store writes it (one
statement per batch, its own transaction: gateway/store.py ``_PG_STORE``); and PostgreSQL
running the statements written for SQLite (BEGIN, device rows, multi-row INSERT ... RETURNING,
counters, COMMIT: what the store did on PostgreSQL before), for comparison. The PostgreSQL
cluster is a throwaway one on a free loopback port (tests/pg.py: Debian's postgresql), durable
like SQLite (fsync and synchronous_commit on) unless ``--fast-pg``. Configurations alternate
batch by batch, so a load spike on a shared machine hits them alike.

Measured 2026-12-05, ``--n 2000``, a 2-core VM shared with other work (rates vary run to run
by +-30 %; the CPU per result is the steadier figure):

    batch  results/s: SQLite  PG  PG old  PG/SQLite  PG/old   CPU us/result: SQLite  PG  PG old
    durable PostgreSQL (fsync, synchronous_commit on)
        1              2714  1534   983     0.57x    1.56x                    239   258   483
       10             12316  8458  4206     0.69x    2.01x                     62    42   129
       50             32040 20337 11075     0.63x    1.84x                     24    16    53
    --fast-pg (fsync, synchronous_commit off: what this script measured before)
        1              2689  2044  1107     0.76x    1.85x                    242   260   504
       10             13874 12639  5190     0.91x    2.44x                     53    35   113
       50             29864 23782 10833     0.80x    2.20x                     26    17    59

PostgreSQL pays a loopback round trip and a server process per commit that SQLite, in
process, does not: one statement per batch halves what that costs, and needs a third to a half
of the client CPU per result of the old statements (less than SQLite from 10 results on).
"""

from __future__ import annotations

import argparse
import itertools
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

BODY = {
    "input": "x#0", "pred": 1, "pred_label": "benign", "scores": [0.1, 0.9],
    "bundle": "b@1#abc", "input_sha256": "0" * 64,
}  # fmt: skip


def _store_as_sqlite(store: Store, items: list[tuple[Envelope, bytes | None]]) -> None:
    """The statements written for SQLite, on whatever engine ``store`` has."""
    now = time.time()
    store._write(lambda db: store._store_batch(db, items, now))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="results per configuration")
    ap.add_argument("--batches", default="1,10,50", help="batch sizes")
    ap.add_argument(
        "--fast-pg", action="store_true", help="PostgreSQL with fsync and synchronous_commit off"
    )
    a = ap.parse_args()
    sizes = [int(x) for x in a.batches.split(",")]
    durable = "fast: fsync off" if a.fast_pg else "durable: fsync, synchronous_commit on"
    print(f"{a.n} results per configuration; PostgreSQL {durable}; SQLite WAL, FULL")
    print(
        f"{'batch':>6} {'results/s:':>10} {'SQLite':>7} {'PG':>7} {'PG old':>7} {'PG/SQLite':>9}"
        f" {'PG/old':>7}   {'CPU us/result:':>14} {'SQLite':>6} {'PG':>6} {'PG old':>6}"
    )
    seq = itertools.count(1)
    with start_postgres(durable=not a.fast_pg) as server:
        for b in sizes:
            stores = {
                "sqlite": Store(Path(tempfile.mkdtemp()) / "s.sqlite"),
                "pg": Store(new_database(server.url)),
                "pg_old": Store(new_database(server.url)),
            }
            wall = dict.fromkeys(stores, 0.0)
            cpu = dict.fromkeys(stores, 0.0)
            for _ in range(0, a.n, b):
                now = time.time()
                items: list[tuple[Envelope, bytes | None]] = [
                    (Envelope("result", "s", f"d{i % 4}", next(seq), now, BODY), b"x" * 700)
                    for i in range(b)
                ]
                for name, store in stores.items():
                    t, c = time.perf_counter(), time.thread_time()
                    if name == "pg_old":
                        _store_as_sqlite(store, items)
                    else:
                        store.add_results(items)
                    wall[name] += time.perf_counter() - t
                    cpu[name] += time.thread_time() - c
            for store in stores.values():
                store.close()
            rate = {k: a.n / v for k, v in wall.items()}
            us = {k: v * 1e6 / a.n for k, v in cpu.items()}
            print(
                f"{b:>6} {'':>10} {rate['sqlite']:>7.0f} {rate['pg']:>7.0f} {rate['pg_old']:>7.0f}"
                f" {rate['pg'] / rate['sqlite']:>8.2f}x {rate['pg'] / rate['pg_old']:>6.2f}x"
                f"   {'':>14} {us['sqlite']:>6.0f} {us['pg']:>6.0f} {us['pg_old']:>6.0f}"
            )


if __name__ == "__main__":
    main()
