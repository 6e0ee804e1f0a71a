"""What full int8 buys, side by side in one run, against the issue's targets: artifact size
int8/fp32 (<= 0.29), latency int8/fp32 with XNNPACK at 1 thread (<= 0.5), agreement with the
float model, and the wall time of `medge convert` of the zoo CNN per profile (< 2 min each).

Two models: a CNN over 1M parameters (MobileNetV2, alpha 0.75, 96x96x3, two classes, built
with weights=None — nothing is downloaded — and trained for a few short passes on real
PneumoniaMNIST chest X-rays upsampled to 96x96, so that its outputs mean something), and the
zoo CNN (models/weights/breast_cnn.keras, real BreastMNIST). Latencies are the agent's own
LiteRT backend (XNNPACK, 1 thread), int8 and fp32 timed in alternating rounds.

    python bench/convert_ratios.py [--pneumonia ../shared/data/images/pneumoniamnist_dev.npz]
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

from converter import ConvertRequest, convert
from edge_agent.backends import open_backend
from edge_agent.bundle import Preprocess
from models import breast_cnn

TARGETS = {"size": 0.29, "latency": 0.5, "convert_s": 120.0}
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


def upsampled(src: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A random (seeded) subset of PneumoniaMNIST, 28x28 grey -> 96x96x3 uint8 (bilinear), as
    a MedMNIST-style npz."""
    import cv2

    rng = np.random.default_rng(0)
    with np.load(src) as d:
        parts = {}
        for split, n in (("train", n_train), ("val", n_val)):
            labels = d[f"{split}_labels"].reshape(-1)
            pick = np.sort(rng.permutation(len(labels))[:n])  # the splits are sorted by class
            imgs = d[f"{split}_images"][pick]
            big = np.stack([cv2.resize(i, (96, 96), interpolation=cv2.INTER_LINEAR) for i in imgs])
            parts[f"{split}_images"] = np.repeat(big[..., None], 3, axis=-1)
            parts[f"{split}_labels"] = labels[pick]
    np.savez(out, **parts)
    return out


def fp32_artifact(model: Path, calib: np.ndarray, evalx: np.ndarray, work: Path) -> Path:
    """The same model as a LiteRT fp32 artifact, made by the converter's own child process."""
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", evalx)
    out = work / "model_fp32.tflite"
    job = {"model": str(model), "format": "keras", "task": "classification",
           "calib": str(work / "calib.npy"), "eval": str(work / "eval.npy"),
           "float_out": str(work / "float.npy"), "n_labels": 2, "cam": None,
           "variant": "fp32", "out": str(out), "layers_out": str(work / "layers.json")}  # fmt: skip
    (work / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-m", "converter.litert_child", "variant",
                    str(work / "job.json")], check=True, env=env, capture_output=True)  # fmt: skip
    return out


def latencies(paths: dict[str, Path], rounds: int = 10, per_round: int = 50) -> dict[str, float]:
    """Median ms per invoke, each artifact timed in alternating rounds (1 thread, XNNPACK)."""
    backends = {k: open_backend("litert", p, 1) for k, p in paths.items()}
    inputs = {}
    for k, b in backends.items():
        spec = b.inputs[0]
        inputs[k] = np.zeros(spec.shape, dtype=spec.dtype)
        for _ in range(10):
            b.invoke([inputs[k]])
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, b in backends.items():
            for _ in range(per_round):
                t = time.perf_counter()
                b.invoke([inputs[k]])
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def measure(name: str, model: Path, data: Path, tmp: Path, profile: str = "x86") -> dict:
    out = tmp / f"{name}-{profile}"
    t0 = time.monotonic()
    convert(ConvertRequest(model=model, calib=data, eval=data, out=out, profile=profile,
                           preprocess=Preprocess(kind="scale01"), calib_split="train",
                           eval_split="val", force=True))  # fmt: skip
    seconds = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "seconds": seconds, "report": report}


def ratios(name: str, model: Path, data: Path, tmp: Path) -> dict:
    got = measure(name, model, data, tmp)
    int8 = got["out"] / "model_int8.tflite"
    with np.load(data) as d:
        calib = d["train_images"][:8].astype(np.float32) / 255.0
        evalx = d["val_images"][:8].astype(np.float32) / 255.0
    work = Path(tempfile.mkdtemp(dir=tmp))
    fp32 = fp32_artifact(model, calib, evalx, work)
    lat = latencies({"int8": int8, "fp32": fp32})
    r = got["report"]
    return {
        "model": name,
        "int8_bytes": int8.stat().st_size,
        "fp32_bytes": fp32.stat().st_size,
        "size": int8.stat().st_size / fp32.stat().st_size,
        "int8_ms": lat["int8"],
        "fp32_ms": lat["fp32"],
        "latency": lat["int8"] / lat["fp32"],
        "agreement": r["agreement"]["litert-int8"],
        "float_acc": r["float"]["accuracy"],
        "int8_acc": r["litert-int8"]["accuracy"],
        "n_eval": r["eval"]["n"],
        "convert_s": got["seconds"],
    }


def _ok(value: float, target: float) -> str:
    return "meets" if value <= target else "MISSES"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pneumonia", type=Path,
                    default=ROOT.parent / "shared/data/images/pneumoniamnist_dev.npz")  # fmt: skip
    ap.add_argument("--profiles", default="rpi4,rpi5,jetson,x86")
    ap.add_argument("--train", type=int, default=1024, help="PneumoniaMNIST training images")
    ap.add_argument("--epochs", type=int, default=3, help="training passes over them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medge-bench-") as t:
        tmp = Path(t)
        pneu = upsampled(args.pneumonia, tmp / "pneumonia96.npz", args.train, 256)
        mnet = tmp / "mobilenetv2_075_96.keras"
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", TRAIN, str(pneu), str(mnet), str(args.epochs)],
                           capture_output=True, text=True, check=True)  # fmt: skip
        params = int(r.stdout.strip().splitlines()[-1])
        print(f"MobileNetV2 alpha 0.75 96x96: {params:,} parameters, {args.epochs} pass(es) over "
              f"{args.train} real PneumoniaMNIST images in {time.monotonic() - t0:.0f} s")
        rows = [
            ratios("mobilenetv2-0.75-96 (PneumoniaMNIST)", mnet, pneu, tmp),
            ratios("zoo breast_cnn (BreastMNIST)", breast_cnn.WEIGHTS, breast_cnn.DATA, tmp),
        ]
        for row in rows:
            print(f"\n{row['model']}: eval n={row['n_eval']} (real validation images)")
            print(f"  size int8/fp32    {row['size']:.3f}  (target <= {TARGETS['size']}: "
                  f"{_ok(row['size'], TARGETS['size'])})  "
                  f"[{row['int8_bytes']:,} / {row['fp32_bytes']:,} bytes]")  # fmt: skip
            print(f"  latency int8/fp32 {row['latency']:.3f}  (target <= {TARGETS['latency']}: "
                  f"{_ok(row['latency'], TARGETS['latency'])})  "
                  f"[{row['int8_ms']:.3f} / {row['fp32_ms']:.3f} ms, 1 thread]")  # fmt: skip
            print(f"  agreement with float {row['agreement']:.4f}  "
                  f"(accuracy float {row['float_acc']:.4f}, int8 {row['int8_acc']:.4f})")
        print("\nzoo breast_cnn: wall time of a full conversion (LiteRT int8 + ONNX fp32/int8, "
              "evaluated), per profile")
        for profile in args.profiles.split(","):
            got = measure("zoo", breast_cnn.WEIGHTS, breast_cnn.DATA, tmp, profile)
            s = got["seconds"]
            print(f"  {profile:7s} {s:6.1f} s  (target < {TARGETS['convert_s']:.0f} s: "
                  f"{'meets' if s < TARGETS['convert_s'] else 'MISSES'})")
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
