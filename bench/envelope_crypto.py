"""Cost of the sealed envelope, side by side in one run: per-message seal and open within an
epoch (AES-256-GCM), the first message of an epoch (HPKE + ECDSA), for both KEM suites, and
the bytes each adds; and the same per-message seal and open with the envelope code of release
commit 62caf5d (before the encode-once rewrite), loaded from git
(tests/envelope_previous.py), on the same keys and bodies.

    python bench/envelope_crypto.py [--n 5000] [--repeat 3]

Each old/new pair runs ``--repeat`` times interleaved; the median is printed with new/old.
Before it times anything it checks that the two codes are byte-compatible: every message one
seals the other opens, and within one epoch both seal exactly the same bytes. Under
``medge bench`` each per-message time is also a figure beside the old code's (met: not slower
than it), and the per-epoch times and sizes are figures with no anchor (bench/bench_data.py).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_agent import envelope as new_envelope
from edge_agent.envelope import Envelope, Sealer
from edge_agent.identity import DeviceIdentity
from gateway.site import DeviceRegistry, init_site, opener_for, provision_device, recipients

# the old code comes from git through the helper the interop test uses too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_data import figure
from envelope_previous import OLD_COMMIT, load_old_envelope

BODY = {
    "input": "breastmnist_dev:val#12",
    "pred": 1,
    "pred_label": "benign",
    "scores": [0.041, 0.959],
    "label": 1,
    "label_name": "benign",
    "latency_ms": 0.41,
    "bundle": "breast-cnn@20261125.203014#4be2df058e2d",
    "input_sha256": "ab" * 32,
}


def _per_call(fn: Callable[[int], Any], n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def same_epoch(old: Any, new: Sealer) -> None:
    """Give the old sealer the new one's epoch (key, sealed key, signature)."""
    old._epoch, old._aead, old._ek, old._es, old._used = (
        new._epoch,
        new._aead,
        new._ek,
        new._es,
        0,
    )


def run(suite: str, n: int, repeat: int, tmp: Path, old: ModuleType | None) -> None:
    site = tmp / suite
    init_site(site, "bench", suite)  # type: ignore[arg-type]
    ident = DeviceIdentity.load(provision_device(site, "d1", tmp / f"{suite}-id"), "bench", "d1")
    epochs = itertools.count(1)
    sealer = Sealer("bench", "d1", ident.key, ident.recipient, lambda: next(epochs), 10**9)
    opener = opener_for(site)
    env = [Envelope("result", "bench", "d1", i + 1, time.time(), BODY) for i in range(n)]
    payloads = [sealer.seal(e) for e in env]
    k = min(200, n)  # epochs rotated (each seals one of the n messages)
    rotate_us = _per_call(lambda i: sealer.rotate(), k)
    fresh = []
    for i in range(k):
        sealer.rotate()
        fresh.append(sealer.seal(env[i]))
    first_open_us = _per_call(lambda i: opener.open(fresh[i]), k)
    if old is None:
        seal_us = _per_call(lambda i: sealer.seal(env[i]), n)
        open_us = _per_call(lambda i: opener.open(payloads[i]), n)
        print(
            f"{suite:16s} seal {seal_us:6.1f} us  open {open_us:6.1f} us  "
            "(no git history: old code not loaded)"
        )
        for op, new_us in (("seal", seal_us), ("open", open_us)):
            figure(f"{suite} {op}, per message", new_us, "us", anchor="old code not loaded")
    else:
        old_sealer = old.Sealer("bench", "d1", ident.key, ident.recipient, lambda: 1, 10**9)
        same_epoch(old_sealer, sealer)
        old_opener = old.Opener(recipients(site), DeviceRegistry(site).key_for)
        old_env = [old.Envelope("result", "bench", "d1", e.seq, e.time, BODY) for e in env]
        old_payloads = [old_sealer.seal(e) for e in old_env]
        # byte-compatible: same bytes within an epoch; each opens what the other sealed
        assert old_payloads == [sealer.seal(e) for e in env], "old and new seal different bytes"
        assert old_opener.open(payloads[0]).body == opener.open(old_payloads[0]).body == BODY
        cases: dict[str, Callable[[int], Any]] = {
            "seal old": lambda i: old_sealer.seal(old_env[i]),
            "seal new": lambda i: sealer.seal(env[i]),
            "open old": lambda i: old_opener.open(payloads[i]),
            "open new": lambda i: opener.open(payloads[i]),
        }
        times: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(repeat):
            for name, fn in cases.items():
                times[name].append(_per_call(fn, n))
        us = {c: statistics.median(v) for c, v in times.items()}
        seal_us, open_us = us["seal new"], us["open new"]
        print(
            f"{suite:16s} seal {us['seal old']:6.1f} -> {seal_us:6.1f} us "
            f"({us['seal old'] / seal_us:.2f}x faster)  "
            f"open {us['open old']:6.1f} -> {open_us:6.1f} us "
            f"({us['open old'] / open_us:.2f}x faster)"
        )
        for op, new_us in (("seal", seal_us), ("open", open_us)):
            old_us = us[f"{op} old"]
            figure(
                f"{suite} {op}, per message",
                new_us,
                "us",
                target=old_us,
                better="lower",
                anchor=f"{old_us:.1f} us, the {OLD_COMMIT[:7]} envelope in the same run",
            )
    plain = len(new_envelope.canonical(BODY))
    figure(f"{suite} new epoch (HPKE seal + ECDSA sign)", rotate_us, "us")
    figure(f"{suite} first open of an epoch", first_open_us, "us")
    figure(f"{suite} message size, {plain} B body", len(payloads[0]), "B")
    print(
        f"{'':16s} new epoch (HPKE seal + ECDSA sign) {rotate_us:6.1f} us  "
        f"first open of an epoch {first_open_us:6.1f} us  "
        f"message {len(payloads[0])} B for a {plain} B body"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="messages per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of old and new")
    args = ap.parse_args()
    old = load_old_envelope()
    print(
        f"per message, median of {args.repeat} interleaved runs of {args.n}; "
        f"old = edge_agent/envelope.py at {OLD_COMMIT[:7]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for suite in ("x25519", "mlkem768-x25519"):
            run(suite, args.n, args.repeat, Path(tmp), old)


if __name__ == "__main__":
    main()
