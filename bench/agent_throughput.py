"""Agent pipeline throughput vs a bare invoke() loop, side by side in one run.

    python bench/agent_throughput.py [--bundle DIR] [--runtime litert] [--precision P]
                                     [--n 3000] [--repeat 3] [--batch-max 64] [--batch-ms 50]

Same artifact, same real BreastMNIST images (the zoo's validation split), one thread. Each
configuration runs ``--repeat`` times, interleaved, and the median is printed with its ratio to
the bare loop. The outbox lines include sealing (AES-GCM) and the durable SQLite write (WAL,
synchronous=FULL): once with a transaction per result (the old behaviour), once with group
commit (the agent's default); the clock stops when every result is committed on disk. The
group-commit line runs twice: sealing with the envelope code of release 62caf5d (loaded from
git history, before the encode-once rewrite) and with the current one.

Then (unless ``--no-breakdown``) it times each per-result step alone, in microseconds per
result, so the gap between the bare loop and the full pipeline can be read off step by step.

Measured on the 2-core development VM (zoo CNN int8, 0.25-0.33 ms per invoke; the machine is
shared by other work, so compare ratios within one run only), ``--repeat 5``:
    bare 1.00x, pipeline 0.65x, + seal + group commit 0.58x (62caf5d envelope: 0.50x);
    per result: invoke 255 us, prepare 40, dequantize 13, decode 15, result_body 10,
    seal 24 (62caf5d: 55). The 0.9x target leaves 28 us per result for everything around a
    0.26 ms invoke: the envelope alone (one JSON encoding of the body + AES-GCM) takes most
    of that, so 0.9x needs a heavier model (``--wide``) or a cheaper per-sample Python path.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from envelope_crypto import OLD_COMMIT, load_old_envelope  # bench/, next to this file

from edge_agent import Bundle, LoadedModel, Outbox
from edge_agent.envelope import Envelope, Sealer
from edge_agent.identity import DeviceIdentity
from edge_agent.pipeline import result_body, run_pipeline
from edge_agent.sources import NpzReplay
from edge_agent.telemetry import PipelineStats

log = logging.getLogger("medge.bench")


def _throwaway_identity(tmp: Path) -> DeviceIdentity:
    from gateway.site import init_site, provision_device

    init_site(tmp / "site", "b")
    return DeviceIdentity.load(provision_device(tmp / "site", "d", tmp / "id"), "b", "d")


def _wide_cnn_bundle() -> Bundle:
    """A heavier model than the zoo CNN (about 70 M multiply-adds vs well under 1 M), with
    random weights: what it predicts means nothing, how long it takes is the point."""
    from converter import ConvertRequest, convert
    from edge_agent.bundle import Preprocess
    from medge.zoo import cache_dir
    from models import breast_cnn

    out = cache_dir() / "bundles" / "bench-wide-cnn-v1"
    from edge_agent.errors import MedgeError

    try:
        return Bundle.load(out)
    except MedgeError:  # not built yet (or half built): build it
        log.info("building the wide CNN bundle once (cached in %s)", out)
    import keras

    keras.utils.set_random_seed(0)
    x = inp = keras.Input((28, 28, 1), name="image")
    for width in (64, 64):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    for width in (128, 128):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))
    src = Path(tempfile.mkdtemp(prefix="medge-wide-")) / "wide.keras"
    model.save(src)
    return convert(
        ConvertRequest(
            model=src,
            calib=breast_cnn.DATA,
            eval=breast_cnn.DATA,
            out=out,
            preprocess=Preprocess(kind="scale01"),
            labels=breast_cnn.CLASS_NAMES,
            calib_split="train",
            eval_split="val",
            name="bench-wide-cnn",
            force=True,
            min_agreement=0.0,
            onnx=False,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle dir (default: the zoo CNN, built once)")
    ap.add_argument(
        "--wide",
        action="store_true",
        help="a heavier model instead: a wider CNN on the same 28x28 inputs (random weights, "
        "int8, built once with the converter; for the throughput ratio only)",
    )
    ap.add_argument("--runtime", default="litert", help="litert or onnx")
    ap.add_argument("--precision", default=None, help="which artifact (default: the first)")
    ap.add_argument("--n", type=int, default=3000, help="samples per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
    ap.add_argument("--batch-max", type=int, default=64, help="group commit: results per batch")
    ap.add_argument("--batch-ms", type=float, default=50.0, help="group commit: max batch age")
    ap.add_argument(
        "--no-breakdown", action="store_true", help="skip timing each per-result step alone"
    )
    args = ap.parse_args()
    if args.bundle:
        bundle = Bundle.load(args.bundle)
    elif args.wide:
        bundle = _wide_cnn_bundle()
    else:
        from medge.zoo import breast_cnn_bundle

        bundle = breast_cnn_bundle()
    from models import breast_cnn

    model = LoadedModel(bundle, args.runtime, 1, args.precision)
    source = NpzReplay(breast_cnn.DATA, "val", rate_hz=0, loop=True, limit=args.n)
    tensors = [model.prepare(s) for s in source.x]
    tmp = Path(tempfile.mkdtemp(prefix="medge-bench-"))
    ident = _throwaway_identity(tmp)

    def bare() -> float:
        t = time.perf_counter()
        for i in range(args.n):
            model.backend.invoke([tensors[i % len(tensors)]])
        return time.perf_counter() - t

    def pipeline() -> float:
        t = time.perf_counter()
        run_pipeline(source.stream(threading.Event()), model, lambda k, b: None, PipelineStats())
        return time.perf_counter() - t

    def durable(batch_max: int, sealer_cls: Any = Sealer) -> Callable[[], float]:
        def run() -> float:
            path = Path(tempfile.mkdtemp(dir=tmp)) / "o.sqlite"
            with Outbox(path, "b", "d", batch_max=batch_max, batch_ms=args.batch_ms) as box:
                box.sealer = sealer_cls("b", "d", ident.key, ident.recipient, box.next_epoch)
                t = time.perf_counter()
                run_pipeline(source.stream(threading.Event()), model, box.put, PipelineStats())
                box.flush()  # every result on disk before the clock stops
                took = time.perf_counter() - t
                assert box.depth() == args.n, "every result is in the outbox"
                commits = box.commits
            runs_commits[batch_max] = commits
            return took

        return run

    runs_commits: dict[int, int] = {}
    cases: dict[str, Callable[[], float]] = {
        "bare invoke() loop": bare,
        "pipeline (pre+infer+decode)": pipeline,
        "+ seal + outbox, 1 commit/result": durable(1),
        f"+ seal + outbox, group commit {args.batch_max}/{args.batch_ms:g}ms": durable(
            args.batch_max
        ),
    }
    old = load_old_envelope()
    if old is not None:
        cases[f"  same, sealed by the {OLD_COMMIT[:7]} envelope"] = durable(
            args.batch_max, old.Sealer
        )
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            times[name].append(fn())
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    base = rate["bare invoke() loop"]
    print(
        f"bundle {bundle.id} ({model.artifact.file}, {args.runtime}), {args.n} real samples, "
        f"1 thread, median of {args.repeat} interleaved runs"
    )
    for name, r in rate.items():
        print(f"{name:44s} {r:9.0f} /s   {r / base:.2f}x")
    print(
        f"commits: {runs_commits.get(1)} with one per result, "
        f"{runs_commits.get(args.batch_max)} with group commit (last run)"
    )
    print(f"bare invoke(): {1000.0 / base:.3f} ms per sample")
    if not args.no_breakdown:
        breakdown(model, source, ident, old, args.n)


def breakdown(
    model: LoadedModel, source: NpzReplay, ident: DeviceIdentity, old: Any, n: int
) -> None:
    """Each per-result step alone, in us per result, on the same samples."""
    samples = list(itertools.islice(source.stream(threading.Event()), n))
    tensors = [model.prepare(s.data) for s in samples]
    ys = [model.infer(t) for t in tensors]
    decoded = [model.decode(y) for y in ys]
    lat = {"preprocess": 1e-5, "infer": 3e-4, "decode": 1e-5, "total": 3.2e-4}
    bodies = [
        result_body(s, c.pred, c.pred_label, c.scores, model, lat)  # type: ignore[attr-defined]
        for s, c in zip(samples, decoded, strict=True)
    ]
    sealer = Sealer("b", "d", ident.key, ident.recipient, lambda: 1, 10**9)
    envs = [Envelope("result", "b", "d", i + 1, time.time(), b) for i, b in enumerate(bodies)]
    steps: dict[str, Callable[[int], Any]] = {
        "invoke() alone": lambda i: model.backend.invoke([tensors[i]]),
        "prepare (normalize + quantize)": lambda i: model.prepare(samples[i].data),
        "infer() around invoke (dequantize)": lambda i: model.infer(tensors[i]),
        "decode (classify)": lambda i: model.decode(ys[i]),
        "result_body": lambda i: result_body(
            samples[i],
            decoded[i].pred,
            decoded[i].pred_label,
            decoded[i].scores,
            model,
            lat,  # type: ignore[attr-defined]
        ),
        "  of which input_sha256": lambda i: hashlib.sha256(
            np.ascontiguousarray(samples[i].data).tobytes()
        ).hexdigest(),
        "  of which scores rounding": lambda i: [round(x, 6) for x in decoded[i].scores],  # type: ignore[attr-defined]
        "seal (current envelope)": lambda i: sealer.seal(envs[i]),
    }
    if old is not None:
        old_sealer = old.Sealer("b", "d", ident.key, ident.recipient, lambda: 1, 10**9)
        steps[f"seal ({OLD_COMMIT[:7]} envelope)"] = lambda i: old_sealer.seal(envs[i])
    print(f"per-result steps alone, us per result (mean of {n}):")
    for name, fn in steps.items():
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        print(f"  {name:40s} {(time.perf_counter() - t) / n * 1e6:8.1f}")


if __name__ == "__main__":
    main()
