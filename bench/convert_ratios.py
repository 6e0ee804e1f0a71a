"""What full int8 buys, side by side in one run, against the issue's targets: artifact size
int8/fp32 (<= 0.29), latency int8/fp32 with XNNPACK at 1 thread (<= 0.5), top-1 agreement with
the float model (>= 99.5%), clinical-metric drop (<= 0.5 points), and the wall time of
`medge convert` of the zoo CNN per profile (< 2 min each).

Three models (--models picks):
- mnv2-0.75-96: a CNN over 1M parameters (MobileNetV2, alpha 0.75, 96x96x3, two classes,
  weights=None — nothing is downloaded — trained for a few short passes on real
  PneumoniaMNIST chest X-rays upsampled to 96x96, so that its outputs mean something),
  converted by `medge convert` and evaluated on 256 real validation images;
- mnv2-1.0-224: the standard MobileNetV2 (alpha 1.0, 224x224x3, 1000 classes, 3.5M
  parameters), weights=None and untrained (training it is hours on 2 cores): size and latency
  only, its agreement says nothing about quantization of a trained model and is not judged.
  Converted by the converter's own child (strategy full-int8), calibrated on 128 real
  PneumoniaMNIST images upsampled to 224x224;
- zoo: the zoo CNN (models/weights/breast_cnn.keras, real BreastMNIST), under 1M parameters.
Latencies are the agent's own LiteRT backend (XNNPACK, 1 thread), int8 and fp32 invoked in
alternation (one int8 call, one fp32 call, ...) in --latency-sets sets; each set gives a ratio
of medians and the spread over the sets is printed. The size of each int8 file is broken down
(bench/tflite_breakdown.py) so the ratio reads as a sum of parts. Under ``medge bench`` each
judged number is also a figure beside its target (bench/bench_data.py).

    python bench/convert_ratios.py [--pneumonia ../shared/data/images/pneumoniamnist_dev.npz]
                                   [--models mnv2-0.75-96,mnv2-1.0-224,zoo]
                                   [--profiles rpi4,rpi5,jetson,x86] [--train 1024] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import figure
from tflite_breakdown import breakdown, format_breakdown

from converter import ConvertRequest, convert
from edge_agent.backends import open_backend
from edge_agent.bundle import Preprocess
from models import breast_cnn

TARGETS = {"size": 0.29, "latency": 0.5, "agreement": 0.995, "drop_points": 0.5, "convert_s": 120.0}
CLINICAL = ("sensitivity", "specificity", "auc")  # the drops judged against drop_points
MODELS = ("mnv2-0.75-96", "mnv2-1.0-224", "zoo")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
keras.utils.set_random_seed(0)
d = np.load(sys.argv[1])
x = d["train_images"].astype("float32") / 255.0
y = d["train_labels"].astype("int64")
model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.75, weights=None,
                                       classes=2, classifier_activation="softmax")
for layer in model.layers:  # one short pass: let BatchNorm's moving statistics catch up
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = 0.9
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=int(sys.argv[3]), batch_size=32, verbose=0)
model.save(sys.argv[2])
print(model.count_params())
"""
STANDARD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
keras.utils.set_random_seed(0)
model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=1.0, weights=None)
model.save(sys.argv[1])
print(model.count_params())
"""


def upsampled(src: Path, out: Path, n_train: int, n_val: int, size: int = 96) -> Path:
    """A random (seeded) subset of PneumoniaMNIST, 28x28 grey -> size x size x 3 uint8
    (bilinear), as a MedMNIST-style npz."""
    import cv2

    rng = np.random.default_rng(0)
    with np.load(src) as d:
        parts = {}
        for split, n in (("train", n_train), ("val", n_val)):
            labels = d[f"{split}_labels"].reshape(-1)
            pick = np.sort(rng.permutation(len(labels))[:n])  # the splits are sorted by class
            imgs = d[f"{split}_images"][pick]
            big = np.stack(
                [cv2.resize(i, (size, size), interpolation=cv2.INTER_LINEAR) for i in imgs]
            )
            parts[f"{split}_images"] = np.repeat(big[..., None], 3, axis=-1)
            parts[f"{split}_labels"] = labels[pick]
    np.savez(out, **parts)
    return out


def _child(args: list[str]) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run(
        [sys.executable, "-m", "converter.child.litert", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
        raise RuntimeError(f"converter.child.litert {args[0]}: {lines[-1]}")


def _job(model: Path, calib: np.ndarray, evalx: np.ndarray, work: Path, **extra: object) -> Path:
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", evalx)
    job = {
        "model": str(model),
        "format": "keras",
        "task": "classification",
        "calib": str(work / "calib.npy"),
        "eval": str(work / "eval.npy"),
        "float_out": str(work / "float.npy"),
        "n_labels": None,
        "cam": None,
        **extra,
    }
    path = work / f"job-{len(list(work.glob('job-*')))}.json"
    path.write_text(json.dumps(job))
    return path


def fp32_artifact(model: Path, calib: np.ndarray, evalx: np.ndarray, work: Path) -> Path:
    """The same model as a LiteRT fp32 artifact, made by the converter's own child process."""
    out = work / "model_fp32.tflite"
    job = _job(
        model,
        calib,
        evalx,
        work,
        variant="fp32",
        out=str(out),
        layers_out=str(work / "layers.json"),
    )
    _child(["variant", str(job)])
    return out


def int8_artifact(model: Path, calib: np.ndarray, evalx: np.ndarray, work: Path) -> Path:
    """Full int8 by the converter's own child (strategy full-int8, as `medge convert` runs it),
    without the agreement gate: for an untrained model agreement is not the question."""
    out = work / "model_int8.tflite"
    job = _job(
        model, calib, evalx, work, tflite_out=str(out), strategies=["full-int8"], min_agreement=0.0
    )
    _child([str(job)])
    return out


def latencies(paths: dict[str, Path], sets: int = 3, pairs: int = 150) -> dict[str, object]:
    """Median ms per invoke and the int8/fp32 ratio per set. Within a set the artifacts are
    invoked in strict alternation (a, b, a, b, ...), so a neighbour's load falls on both."""
    backends = {k: open_backend("litert", p, 1) for k, p in paths.items()}
    inputs = {}
    for k, b in backends.items():
        spec = b.inputs[0]
        inputs[k] = np.zeros(spec.shape, dtype=spec.dtype)
        for _ in range(10):
            b.invoke([inputs[k]])
    per_set: list[dict[str, float]] = []
    for _ in range(sets):
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(pairs):
            for k, b in backends.items():
                t = time.perf_counter()
                b.invoke([inputs[k]])
                times[k].append(time.perf_counter() - t)
        per_set.append({k: float(np.median(v) * 1e3) for k, v in times.items()})
    ratios = [s["int8"] / s["fp32"] for s in per_set]
    return {
        "int8": float(np.median([s["int8"] for s in per_set])),
        "fp32": float(np.median([s["fp32"] for s in per_set])),
        "ratio": float(np.median(ratios)),
        "ratios": ratios,
    }


def delegation(path: Path) -> str:
    """What XNNPACK (LiteRT's default CPU delegate) takes, and the ops left outside it: an op
    is inside a partition when it lies between the partition's inputs and its outputs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    ops = it._get_ops_details()  # every node: the original ops, then the delegate nodes
    parts = [o for o in ops if o["op_name"] == "DELEGATE"]
    plain = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): i for i, o in enumerate(plain) for t in o["outputs"]}
    inside: set[int] = set()
    for part in parts:
        stop = {int(t) for t in part["inputs"]}
        stack = [int(t) for t in part["outputs"]]
        while stack:
            t = stack.pop()
            i = producer.get(t)
            if t in stop or i is None or i in inside:
                continue
            inside.add(i)
            stack.extend(int(x) for x in plain[i]["inputs"] if x >= 0)
    left = [o["op_name"] for i, o in enumerate(plain) if i not in inside]
    if not parts:
        return f"not delegated ({len(plain)} ops on the builtin kernels)"
    tail = f"; left to builtin kernels: {', '.join(left)}" if left else "; all ops"
    return f"XNNPACK, {len(parts)} partition(s) over {len(inside)} of {len(plain)} ops{tail}"


PNEUMONIA_LABELS = (["normal", "pneumonia"], "pneumonia")  # PneumoniaMNIST: 1 = pneumonia
ZOO_LABELS = (list(breast_cnn.CLASS_NAMES), breast_cnn.POSITIVE)


def measure(
    name: str,
    model: Path,
    data: Path,
    tmp: Path,
    labels: tuple[list[str], str],
    profile: str = "x86",
) -> dict:
    out = tmp / f"{name}-{profile}"
    t0 = time.monotonic()
    convert(
        ConvertRequest(
            model=model,
            calib=data,
            eval=data,
            out=out,
            profile=profile,
            preprocess=Preprocess(kind="scale01"),
            calib_split="train",
            eval_split="val",
            labels=labels[0],
            positive_label=labels[1],
            force=True,
        )
    )
    seconds = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "seconds": seconds, "report": report}


def _row(name: str, int8: Path, fp32: Path, sets: int) -> dict:
    lat = latencies({"int8": int8, "fp32": fp32}, sets)
    return {
        "model": name,
        "int8_bytes": int8.stat().st_size,
        "fp32_bytes": fp32.stat().st_size,
        "size": int8.stat().st_size / fp32.stat().st_size,
        "parts": breakdown(int8),
        "int8_ms": lat["int8"],
        "fp32_ms": lat["fp32"],
        "latency": lat["ratio"],
        "latency_sets": lat["ratios"],
        "delegated": {"int8": delegation(int8), "fp32": delegation(fp32)},
    }


def ratios(
    name: str, model: Path, data: Path, tmp: Path, labels: tuple[list[str], str], sets: int
) -> dict:
    """A trained model through `medge convert` (its int8 artifact and report), fp32 beside."""
    got = measure(name, model, data, tmp, labels)
    with np.load(data) as d:
        calib = d["train_images"][:8].astype(np.float32) / 255.0
        evalx = d["val_images"][:8].astype(np.float32) / 255.0
    work = Path(tempfile.mkdtemp(dir=tmp))
    row = _row(
        name, got["out"] / "model_int8.tflite", fp32_artifact(model, calib, evalx, work), sets
    )
    r = got["report"]
    drops = {
        m: 100.0 * (r["float"][m] - r["litert-int8"][m])
        for m in ("accuracy", *CLINICAL)
        if r["float"].get(m) is not None and r["litert-int8"].get(m) is not None
    }
    row.update(
        agreement=r["agreement"]["litert-int8"],
        float_acc=r["float"]["accuracy"],
        int8_acc=r["litert-int8"]["accuracy"],
        drops=drops,
        n_eval=r["eval"]["n"],
        convert_s=got["seconds"],
    )
    return row


def standard_ratios(pneumonia: Path, tmp: Path, sets: int) -> dict:
    """The standard MobileNetV2 (1000 classes, untrained): size, breakdown and latency."""
    model = tmp / "mobilenetv2_100_224.keras"
    r = subprocess.run(
        [sys.executable, "-c", STANDARD, str(model)], capture_output=True, text=True, check=True
    )
    params = int(r.stdout.strip().splitlines()[-1])
    data = upsampled(pneumonia, tmp / "pneumonia224.npz", 128, 32, size=224)
    with np.load(data) as d:
        calib = d["train_images"].astype(np.float32) / 255.0
        evalx = d["val_images"].astype(np.float32) / 255.0
    work = Path(tempfile.mkdtemp(dir=tmp))
    int8 = int8_artifact(model, calib, evalx, work)
    fp32 = fp32_artifact(model, calib[:8], evalx[:8], work)
    row = _row(
        f"MobileNetV2 alpha 1.0 224x224, 1000 classes, {params:,} parameters "
        "(weights=None, untrained)",
        int8,
        fp32,
        sets,
    )
    row.update(agreement=None, n_eval=0)
    return row


def _ok(value: float, target: float, higher: bool = False) -> str:
    return "meets" if (value >= target if higher else value <= target) else "MISSES"


def _figures(row: dict) -> None:
    """One model's judged numbers as figures for medge bench (bench_data), as report_row
    judges them."""
    name = row["model"].split(",")[0]  # "MobileNetV2 alpha 0.75 96x96", "zoo breast_cnn (...)"
    t = TARGETS
    figure(f"{name}: size int8/fp32", row["size"], target=t["size"], better="lower")
    figure(f"{name}: latency int8/fp32", row["latency"], target=t["latency"], better="lower")
    if row.get("agreement") is None:
        return  # untrained: not judged (report_row says so)
    figure(
        f"{name}: agreement with float", row["agreement"], target=t["agreement"], better="higher"
    )
    clinical = [d for m, d in row["drops"].items() if m in CLINICAL]
    if clinical:
        figure(
            f"{name}: worst clinical-metric drop",
            max(clinical),
            "points",
            target=t["drop_points"],
            better="lower",
        )


def report_row(row: dict) -> None:
    """Print one model's numbers, each against its target, and the size breakdown."""
    print(f"\n{row['model']}")
    spread = ", ".join(f"{x:.2f}" for x in row["latency_sets"])
    verdicts = {
        "size": _ok(row["size"], TARGETS["size"]),
        "latency": _ok(row["latency"], TARGETS["latency"]),
    }
    print(
        f"  size int8/fp32       {row['size']:.3f}  (target <= {TARGETS['size']}: "
        f"{verdicts['size']})  [{row['int8_bytes']:,} / {row['fp32_bytes']:,} "
        "bytes]"
    )
    print(
        f"  latency int8/fp32    {row['latency']:.3f}  (target <= {TARGETS['latency']}: "
        f"{verdicts['latency']})  [{row['int8_ms']:.3f} / {row['fp32_ms']:.3f} ms, 1 thread; "
        f"per set {spread}]"
    )
    print(f"  delegation           int8: {row['delegated']['int8']}")
    print(f"                       fp32: {row['delegated']['fp32']}")
    if row.get("agreement") is None:
        print("  agreement            not judged: untrained weights (size and latency only)")
    else:
        verdicts["agreement"] = _ok(row["agreement"], TARGETS["agreement"], higher=True)
        print(
            f"  agreement with float {row['agreement']:.4f}  (target >= {TARGETS['agreement']}:"
            f" {verdicts['agreement']})  on {row['n_eval']} real validation images "
            f"(one image = {100 / row['n_eval']:.2f} accuracy points)"
        )
        clinical = {m: d for m, d in row["drops"].items() if m in CLINICAL}
        worst = max(clinical.values()) if clinical else None
        shown = ", ".join(f"{m} {d:+.2f}" for m, d in row["drops"].items())
        if worst is not None:
            verdicts["clinical"] = _ok(worst, TARGETS["drop_points"])
            big = max(row["drops"], key=lambda m: abs(row["drops"][m]))
            print(
                f"  clinical-metric drop {worst:.2f} points (target <= "
                f"{TARGETS['drop_points']}: {verdicts['clinical']})  float - int8, points: "
                f"{shown}; accuracy float {row['float_acc']:.4f}, "
                f"int8 {row['int8_acc']:.4f}"
            )
            if abs(row["drops"][big]) > TARGETS["drop_points"] >= worst:
                print(
                    f"                       (int8 is not worse, but not the same model either: "
                    f"{big} moved {abs(row['drops'][big]):.2f} points)"
                )
    p = row["parts"]
    print(
        f"  int8 file, part by part ({p['per_channel_tensors']} per-channel tensors, "
        f"{p['channels']:,} channels; share of the fp32 file adds up to the size ratio):"
    )
    for line in format_breakdown(p, row["fp32_bytes"]):
        print("    " + line)
    floor = (p["int8 weights"] + p["int32 biases"]) / row["fp32_bytes"]
    print(f"    weights and biases alone would be {floor:.3f} of fp32")
    _figures(row)
    met = [k for k, v in verdicts.items() if v == "meets"]
    missed = [k for k, v in verdicts.items() if v != "meets"]
    print(f"  targets met: {', '.join(met) or 'none'}; missed: {', '.join(missed) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pneumonia", type=Path, default=ROOT.parent / "shared/data/images/pneumoniamnist_dev.npz"
    )
    ap.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    ap.add_argument(
        "--profiles",
        default="rpi4,rpi5,jetson,x86",
        help="profiles to time a full conversion of the zoo CNN for ('' for none)",
    )
    ap.add_argument("--train", type=int, default=1024, help="PneumoniaMNIST training images")
    ap.add_argument("--epochs", type=int, default=3, help="training passes over them")
    ap.add_argument(
        "--latency-sets",
        type=int,
        default=3,
        help="sets of alternating int8/fp32 invokes; the spread is printed",
    )
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model {', '.join(unknown)} (one of {', '.join(MODELS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medge-bench-") as t:
        tmp = Path(t)
        if "mnv2-0.75-96" in models:
            pneu = upsampled(args.pneumonia, tmp / "pneumonia96.npz", args.train, 256)
            mnet = tmp / "mobilenetv2_075_96.keras"
            t0 = time.monotonic()
            cmd = [sys.executable, "-c", TRAIN, str(pneu), str(mnet), str(args.epochs)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            params = int(r.stdout.strip().splitlines()[-1])
            print(
                f"MobileNetV2 alpha 0.75 96x96: {params:,} parameters, {args.epochs} pass(es) "
                f"over {args.train} real PneumoniaMNIST images in "
                f"{time.monotonic() - t0:.0f} s"
            )
            name = (
                f"MobileNetV2 alpha 0.75 96x96, 2 classes, {params:,} parameters "
                f"(trained {args.epochs} passes, PneumoniaMNIST)"
            )
            rows.append(ratios(name, mnet, pneu, tmp, PNEUMONIA_LABELS, args.latency_sets))
        if "mnv2-1.0-224" in models:
            rows.append(standard_ratios(args.pneumonia, tmp, args.latency_sets))
        if "zoo" in models:
            rows.append(
                ratios(
                    "zoo breast_cnn (BreastMNIST)",
                    breast_cnn.WEIGHTS,
                    breast_cnn.DATA,
                    tmp,
                    ZOO_LABELS,
                    args.latency_sets,
                )
            )
        for row in rows:
            report_row(row)
        profiles = [p for p in args.profiles.split(",") if p]
        if profiles:
            print(
                "\nzoo breast_cnn: wall time of a full conversion (LiteRT int8 + ONNX "
                "fp32/int8, evaluated), per profile"
            )
        for profile in profiles:
            got = measure("zoo", breast_cnn.WEIGHTS, breast_cnn.DATA, tmp, ZOO_LABELS, profile)
            s = got["seconds"]
            print(
                f"  {profile:7s} {s:6.1f} s  (target < {TARGETS['convert_s']:.0f} s: "
                f"{'meets' if s < TARGETS['convert_s'] else 'MISSES'})"
            )
            limit = TARGETS["convert_s"]
            figure(
                f"medge convert of the zoo CNN, {profile}",
                s,
                "s",
                target=limit,
                better="lower",
                met=s < limit,
                anchor=f"< {limit:.0f} s (issue target)",
            )
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
