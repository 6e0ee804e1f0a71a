"""Cost of the sealed envelope, side by side in one run: per-message seal and open within an
epoch (AES-256-GCM), the first message of an epoch (HPKE + ECDSA), for both KEM suites, and
the bytes each adds.

    python bench/envelope_crypto.py [--n 5000]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from edge_agent.envelope import Envelope, Sealer
from edge_agent.identity import DeviceIdentity
from gateway.site import init_site, opener_for, provision_device

BODY = {"input": "breastmnist_dev:val#12", "pred": 1, "pred_label": "benign",
        "scores": [0.041, 0.959], "label": 1, "label_name": "benign", "latency_ms": 0.41,
        "bundle": "breast-cnn@20261125.203014#4be2df058e2d", "input_sha256": "ab" * 32}


def _per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def run(suite: str, n: int, tmp: Path) -> None:
    site = tmp / suite
    init_site(site, "bench", suite)  # type: ignore[arg-type]
    ident = DeviceIdentity.load(provision_device(site, "d1", tmp / f"{suite}-id"), "bench", "d1")
    epochs = itertools.count(1)
    sealer = Sealer("bench", "d1", ident.key, ident.recipient, lambda: next(epochs), 10**9)
    opener = opener_for(site)
    env = [Envelope("result", "bench", "d1", i + 1, time.time(), BODY) for i in range(n)]
    seal_us = _per_call(lambda i: sealer.seal(env[i]), n)
    payloads = [sealer.seal(e) for e in env]
    open_us = _per_call(lambda i: opener.open(payloads[i]), n)
    k = 200
    rotate_us = _per_call(lambda i: sealer.rotate(), k)
    fresh = []
    for i in range(k):
        sealer.rotate()
        fresh.append(sealer.seal(env[i]))
    first_open_us = _per_call(lambda i: opener.open(fresh[i]), k)
    plain = len(repr(BODY))
    print(f"{suite:16s} seal {seal_us:7.1f} us  open {open_us:7.1f} us  "
          f"new epoch (HPKE seal + ECDSA sign) {rotate_us:7.1f} us  "
          f"first open of an epoch {first_open_us:7.1f} us  "
          f"message {len(payloads[0])} B for a {plain} B body")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for suite in ("x25519", "mlkem768-x25519"):
            run(suite, args.n, Path(tmp))


if __name__ == "__main__":
    main()
