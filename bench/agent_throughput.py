"""Agent pipeline throughput vs a bare LiteRT invoke() loop, side by side in one run.

    python bench/agent_throughput.py [--bundle DIR] [--n 3000]

Same artifact, same real BreastMNIST images, one thread. Prints samples/s and the ratios.
The last line includes sealing (AES-GCM) and the durable SQLite write (WAL, synchronous=FULL)
per result.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from edge_agent import Bundle, LoadedModel, Outbox
from edge_agent.envelope import Sealer
from edge_agent.identity import DeviceIdentity
from edge_agent.pipeline import run_pipeline
from edge_agent.sources import NpzReplay
from edge_agent.telemetry import PipelineStats


def _throwaway_sealer(tmp: Path, box: Outbox) -> Sealer:
    from gateway.site import init_site, provision_device

    init_site(tmp / "site", "b")
    ident = DeviceIdentity.load(provision_device(tmp / "site", "d", tmp / "id"), "b", "d")
    return Sealer("b", "d", ident.key, ident.recipient, box.next_epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle dir (default: the zoo CNN, built once)")
    ap.add_argument("--n", type=int, default=3000, help="samples per measurement")
    args = ap.parse_args()
    if args.bundle:
        bundle = Bundle.load(args.bundle)
    else:
        from medge.zoo import breast_cnn_bundle

        bundle = breast_cnn_bundle()
    from models import breast_cnn

    model = LoadedModel(bundle)
    source = NpzReplay(breast_cnn.DATA, "val", rate_hz=0, loop=True, limit=args.n)
    tensors = [model.prepare(s) for s in source.x]

    t = time.perf_counter()
    for i in range(args.n):
        model.backend.invoke([tensors[i % len(tensors)]])
    bare = args.n / (time.perf_counter() - t)

    stats = PipelineStats()
    t = time.perf_counter()
    run_pipeline(source.stream(threading.Event()), model, lambda k, b: None, stats)
    pipe = args.n / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp, Outbox(Path(tmp) / "o.sqlite", "b", "d") as box:
        box.sealer = _throwaway_sealer(Path(tmp), box)
        t = time.perf_counter()
        run_pipeline(source.stream(threading.Event()), model, box.put, PipelineStats())
        durable = args.n / (time.perf_counter() - t)

    print(f"bundle {bundle.id}, {args.n} samples, 1 thread")
    print(f"{'bare invoke() loop':34s} {bare:9.0f} /s   1.00x")
    print(f"{'pipeline (pre+infer+decode)':34s} {pipe:9.0f} /s   {pipe / bare:.2f}x")
    print(f"{'pipeline + seal + durable outbox':34s} {durable:9.0f} /s   {durable / bare:.2f}x")
    lat = stats.snapshot()["latency_ms"]
    print("stage p50 ms: " + ", ".join(f"{k} {v['p50']:.3f}" for k, v in lat.items()))


if __name__ == "__main__":
    main()
