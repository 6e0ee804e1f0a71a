"""Agent pipeline throughput vs a bare invoke() loop, side by side in one run.

    python bench/agent_throughput.py [--models zoo,mid,wide] [--bundle DIR] [--runtime litert]
                                     [--precision P] [--n 3000] [--repeat 3] [--no-breakdown]

Three models on the same real BreastMNIST images (the zoo's validation split), one thread:
``zoo``, the zoo CNN (real weights, about 0.04 ms an invoke here); ``mid`` and ``wide``, wider
CNNs with random weights (int8, built once with the converter and cached) that take about
0.25 ms and 1.4 ms: the issue's "0.25 ms model" and "2 ms model". Their predictions mean
nothing, so they change class rarely and few of their results carry pictures; the zoo CNN's
real predictions change often (a third of its results are pictured under the cap). Each
configuration runs ``--repeat`` times, interleaved, after one untimed warm-up of the bare loop,
and the median is printed with its ratio to the bare loop:
the pipeline alone (pictures capped at the agent's default pictures_max_hz, then on every
result), then with sealing (AES-GCM) and the durable outbox (SQLite WAL, synchronous=FULL):
one transaction per result, and the agent's group commit (the target line; the clock stops
when every result is committed on disk), also with pictures on every result and with the
envelope code of release 62caf5d. Then (unless ``--no-breakdown``) each per-result step alone,
in microseconds, so the gap can be read off step by step.

Measured on the 2-core development VM (quiet; ratios within one run only), ``--n 2000
--repeat 3``, durable group-commit line: zoo 0.29x (0.041 ms invoke; no target: 6x faster
than the issue's anchor), mid 0.81x (0.218 ms; target >= 0.75x: met), wide 0.96x (1.38 ms;
target >= 0.9x: met); with pictures on every result 0.21x / 0.71x / 0.94x. What is left
around a fast invoke is Python per result: the pipeline's stages (~40 us), the seal (~25 us:
one canonical JSON of the body + AES-GCM) and the outbox's thread hand-off (~20 us); a
0.04 ms model would need micro-batches (several samples per Python step) to come near 0.75x.
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
from bench_data import figure  # bench/, next to this file
from envelope_crypto import OLD_COMMIT, load_old_envelope

from edge_agent import Bundle, LoadedModel, Outbox
from edge_agent.agent import FLOAT_CHECK_BUDGET
from edge_agent.config import AgentConfig, OutboxConfig
from edge_agent.drift import WatchInputs
from edge_agent.envelope import Envelope, Sealer
from edge_agent.errors import MedgeError
from edge_agent.identity import DeviceIdentity
from edge_agent.pipeline import result_body, run_pipeline
from edge_agent.shadow import ShadowRun
from edge_agent.sources import NpzReplay
from edge_agent.telemetry import PipelineStats

log = logging.getLogger("medge.bench")

_AGENT = {  # the agent's defaults
    k: f.default_factory() if f.default_factory else f.default  # type: ignore[call-arg]
    for k, f in AgentConfig.model_fields.items()
}
_OUTBOX = OutboxConfig()


def _throwaway_identity(tmp: Path) -> DeviceIdentity:
    from gateway.site import init_site, provision_device

    init_site(tmp / "site", "b")
    return DeviceIdentity.load(provision_device(tmp / "site", "d", tmp / "id"), "b", "d")


WIDTHS = {"mid": (48, 48, 96, 96), "wide": (128, 128, 256, 256)}
"""Conv widths of the heavier stand-ins: 'mid' about 0.25 ms an invoke on the development VM
(the issue's '0.25 ms zoo CNN'), 'wide' about 2 ms (its '2 ms model')."""


def _synthetic_cnn_bundle(kind: str) -> Bundle:
    """A heavier model than the zoo CNN on the same 28 x 28 inputs, with random weights: what
    it predicts means nothing, how long it takes is the point. Built once, int8."""
    from converter import ConvertRequest, convert
    from edge_agent.bundle import Preprocess
    from medge.zoo import cache_dir
    from models import breast_cnn

    out = cache_dir() / "bundles" / f"bench-{kind}-cnn-v3"
    from edge_agent.errors import MedgeError

    try:
        return Bundle.load(out)
    except MedgeError:  # not built yet (or half built): build it
        log.info("building the %s CNN bundle once (cached in %s)", kind, out)
    import keras

    keras.utils.set_random_seed(0)
    a, b, c, d = WIDTHS[kind]
    x = inp = keras.Input((28, 28, 1), name="image")
    for width in (a, b):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    for width in (c, d):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))
    src = Path(tempfile.mkdtemp(prefix=f"medge-{kind}-")) / f"{kind}.keras"
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
            name=f"bench-{kind}-cnn",
            force=True,
            min_agreement=0.0,
            onnx=False,
        )
    )


TARGETS = {"zoo": None, "mid": 0.75, "wide": 0.9}
"""The issue's targets for the durable line: >= 0.75x for a 0.25 ms model, >= 0.9x for 2 ms."""


def _bundle(kind: str) -> Bundle:
    if kind == "zoo":
        from medge.zoo import breast_cnn_bundle

        return breast_cnn_bundle()
    return _synthetic_cnn_bundle(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="one bundle dir instead of --models")
    ap.add_argument(
        "--models",
        default="zoo,mid,wide",
        help="comma-separated: zoo (the zoo CNN, real weights), mid (~0.25 ms), wide (~2 ms); "
        "mid and wide are wider CNNs on the same 28x28 inputs with random weights, int8, "
        "built once with the converter, for the throughput ratio only",
    )
    ap.add_argument("--runtime", default="litert", help="litert or onnx")
    ap.add_argument("--precision", default=None, help="which artifact (default: the first)")
    ap.add_argument("--n", type=int, default=3000, help="samples per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
    ap.add_argument(
        "--batch-max", type=int, default=_OUTBOX.batch_max, help="group commit: results per batch"
    )
    ap.add_argument(
        "--batch-ms", type=float, default=_OUTBOX.batch_ms, help="group commit: max batch age"
    )
    ap.add_argument(
        "--no-breakdown", action="store_true", help="skip timing each per-result step alone"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medge-bench-"))
    ident = _throwaway_identity(tmp)
    if args.bundle:
        measure("bundle", Bundle.load(args.bundle), args, tmp, ident)
        return
    for kind in args.models.split(","):
        measure(kind, _bundle(kind), args, tmp, ident)
        print()


def _float_check(
    bundle: Bundle, model: LoadedModel, args: argparse.Namespace
) -> Callable[[], ShadowRun] | None:
    """A fresh float check per run, as the agent makes one (its fp32 artifact at the default
    share and budget), or None when the bundle has no other fp32 artifact."""
    share = _AGENT["float_check_share"]
    for art in bundle.manifest.artifacts:
        if art.precision == "fp32" and art is not model.artifact and share > 0:
            try:
                fp32 = LoadedModel(bundle, art.runtime, 1, "fp32")
            except MedgeError:
                continue
            return lambda: ShadowRun(fp32, share, FLOAT_CHECK_BUDGET, kind="float_check")
    return None


def measure(kind: str, bundle: Bundle, args: argparse.Namespace, tmp: Path, ident: Any) -> None:
    from models import breast_cnn

    model = LoadedModel(bundle, args.runtime, 1, args.precision)
    source = NpzReplay(breast_cnn.DATA, "val", rate_hz=0, loop=True, limit=args.n)
    tensors = [model.prepare(s) for s in source.x]
    cap = _AGENT["pictures_max_hz"]
    pictured: dict[str, dict[str, int]] = {}

    def bare() -> float:
        t = time.perf_counter()
        for i in range(args.n):
            model.backend.invoke([tensors[i % len(tensors)]])
        return time.perf_counter() - t

    def pipeline(max_hz: float | None) -> Callable[[], float]:
        def run() -> float:
            stats = PipelineStats()
            t = time.perf_counter()
            run_pipeline(
                source.stream(threading.Event()),
                model,
                lambda k, b: None,
                stats,
                pictures_max_hz=max_hz,
            )
            took = time.perf_counter() - t
            pictured[f"{max_hz}"] = stats.pictures
            return took

        return run

    float_check = _float_check(bundle, model, args)

    def durable(
        batch_max: int, sealer_cls: Any = Sealer, max_hz: float | None = cap, watched: bool = True
    ) -> Callable[[], float]:
        def run() -> float:
            path = Path(tempfile.mkdtemp(dir=tmp)) / "o.sqlite"
            with Outbox(path, "b", "d", batch_max=batch_max, batch_ms=args.batch_ms) as box:
                box.sealer = sealer_cls("b", "d", ident.key, ident.recipient, box.next_epoch)
                # the agent's defaults: inputs watched (drift, quality), the float check
                watch = WatchInputs(box.put, _AGENT["drift"]) if watched else None
                runs = [float_check()] if watched and float_check is not None else []
                t = time.perf_counter()
                run_pipeline(
                    source.stream(threading.Event()),
                    model,
                    box.put,
                    PipelineStats(),
                    pictures_max_hz=max_hz,
                    compare=(lambda: runs) if runs else None,
                    watch=watch,
                )
                box.flush()  # every result on disk before the clock stops
                took = time.perf_counter() - t
                assert box.depth() == args.n, "every result is in the outbox"
                commits = box.commits
            runs_commits[batch_max] = commits
            return took

        return run

    runs_commits: dict[int, int] = {}
    group = f"group commit {args.batch_max}/{args.batch_ms:g}ms"
    target_line = f"+ seal + outbox, {group}"
    cases: dict[str, Callable[[], float]] = {
        "bare invoke() loop": bare,
        f"pipeline, pictures <= {cap:g}/s (default)": pipeline(cap),
        "pipeline, pictures on every result": pipeline(None),
        "+ seal + outbox, 1 commit/result": durable(1),
        target_line: durable(args.batch_max),
        "  same, pictures on every result": durable(args.batch_max, max_hz=None),
        "  same, inputs not watched, no float check": durable(args.batch_max, watched=False),
    }
    old = load_old_envelope()
    if old is not None:
        cases[f"  same, sealed by the {OLD_COMMIT[:7]} envelope"] = durable(
            args.batch_max, old.Sealer
        )
    times: dict[str, list[float]] = {k: [] for k in cases}
    bare()  # warm-up, untimed: the first invokes (XNNPACK packing, caches) would go to bare
    for _ in range(args.repeat):
        for name, fn in cases.items():
            times[name].append(fn())
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    base = rate["bare invoke() loop"]
    print(
        f"[{kind}] bundle {bundle.id} ({model.artifact.file}, {args.runtime}), {args.n} real "
        f"samples, 1 thread, median of {args.repeat} interleaved runs; bare invoke() "
        f"{1000.0 / base:.3f} ms per sample"
    )
    for name, r in rate.items():
        print(f"{name:48s} {r:9.0f} /s   {r / base:.2f}x")
    print(
        f"commits: {runs_commits.get(1)} with one per result, "
        f"{runs_commits.get(args.batch_max)} with group commit (last run); results pictured "
        f"with the cap: {pictured.get(str(cap), {})}"
    )
    ratio = rate[target_line] / base
    target = TARGETS.get(kind)
    figure(
        f"{kind}: durable pipeline / bare invoke()",
        round(ratio, 3),
        "x",
        target=target,
        better="higher",
        anchor=f"issue target >= {target}x" if target else "no target (faster than 0.25 ms)",
    )
    figure(f"{kind}: bare invoke()", round(1000.0 / base, 4), "ms")
    if target is not None:
        verdict = "met" if ratio >= target else "NOT met"
        print(f"target >= {target}x of bare invoke() for the durable line: {ratio:.2f}x, {verdict}")
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
