"""The zoo's ecg_gru against the third-party MIT-BIH beat classifier, on the same beats.

Both models see every beat of the zoo's validation records (MIT-BIH 106 and 123, from
models/data/ecg_gru.npz): ecg_gru its own window (R-270..R+270), the third-party CNN
(../shared/data/models/third_party/classify_heartbeats_cnn.tflite, Apache-2.0; input [1, 260]
z-scored, output N, S, V, F, Q) the 260 samples cut from the same window, R-90..R+170 (the cut
the project's ECG bundles use) and centred R-130..R+130 (its README's). A beat is called a PVC
when V has the highest score. Per-beat PVC sensitivity and PPV with Wilson 95% intervals.

ecg_gru never saw records 106 or 123; the third-party model's authors trained on MIT-BIH and
these records may well have been in its training set, so its numbers here are not held-out.

    python bench/ecg_third_party.py [--bundle DIR]   # DIR: a built ecg_gru bundle, adds its int8
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from converter.metrics import wilson_ci  # noqa: E402
from models import ecg_gru  # noqa: E402

THIRD_PARTY = ROOT.parent / "shared/data/models/third_party/classify_heartbeats_cnn.tflite"
AAMI = ["N", "S", "V", "F", "Q"]


def zscore(x: np.ndarray) -> np.ndarray:
    """Per window over time, as the agent's ``zscore`` preprocessing (edge_agent.preprocess)."""
    x = x.astype(np.float32)
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + np.float32(1e-6))


def tflite_scores(path: Path, x: np.ndarray) -> np.ndarray:
    """Class scores of a LiteRT model, one window at a time (quantized input/output handled)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    out_rows = []
    for w in x:
        v = w.reshape(inp["shape"])
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            v = np.clip(np.rint(v / scale) + zero, *_range(inp["dtype"])).astype(inp["dtype"])
        it.set_tensor(inp["index"], v)
        it.invoke()
        y = it.get_tensor(out["index"]).reshape(-1).astype(np.float32)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y - zero) * scale
        out_rows.append(y)
    return np.stack(out_rows)


def _range(dtype: type) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def keras_scores(x: np.ndarray) -> np.ndarray:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(ecg_gru.WEIGHTS, compile=False)
    return np.asarray(model.predict(x, batch_size=256, verbose=0))


def row(name: str, called: np.ndarray, truth: np.ndarray) -> str:
    tp = int((called & truth).sum())
    pos, calls = int(truth.sum()), int(called.sum())
    sens, ppv = wilson_ci(tp, pos), wilson_ci(tp, calls)
    s = f"{tp / pos:.3f} [{sens[0]:.3f}, {sens[1]:.3f}]" if sens else "n/a"
    p = f"{tp / calls:.3f} [{ppv[0]:.3f}, {ppv[1]:.3f}]" if ppv else "n/a"
    return f"| {name} | {tp}/{pos} | {s} | {tp}/{calls} | {p} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a built ecg_gru bundle: adds its artifact")
    ap.add_argument("--third-party", type=Path, default=THIRD_PARTY)
    a = ap.parse_args()
    if not a.third_party.is_file():
        sys.exit(f"missing {a.third_party} (see ../shared/data/README.md)")
    with np.load(ecg_gru.DATA) as d:
        x, y, rec = d["val_images"][..., 0], d["val_labels"] == 1, d["val_record"]
    r = ecg_gru.BEFORE  # the R peak's index in the committed window
    models: list[tuple[str, Callable[[], np.ndarray], int]] = [
        ("ecg_gru float (Keras)", lambda: keras_scores(zscore(x)[..., None]), 1),
    ]
    if a.bundle is not None:
        int8 = a.bundle / "model_int8.tflite"
        art = int8 if int8.is_file() else sorted(a.bundle.glob("model*.tflite"))[0]
        models.append((f"ecg_gru {art.name}", lambda: tflite_scores(art, zscore(x)), 1))
    for name, before in (("R-90..R+170", 90), ("centred R-130..R+130", 130)):
        cut = zscore(x[:, r - before : r - before + 260])
        models.append(
            (f"third-party CNN, {name}", lambda c=cut: tflite_scores(a.third_party, c), 2)
        )
    print(f"MIT-BIH records {', '.join(map(str, np.unique(rec)))}: {len(y)} beats, {y.sum()} PVC")
    print("| model | TP/PVC | sensitivity [95% CI] | TP/called V | PPV [95% CI] |")
    print("|---|---|---|---|---|")
    for name, scores, v in models:
        s = scores()
        print(row(name, s.argmax(axis=1) == v, y))
    print("third-party: MIT-BIH records may have been in its training set (not held out).")


if __name__ == "__main__":
    main()
