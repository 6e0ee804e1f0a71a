"""Event detection over real recordings, the way `medge convert --stream` scores it: the
third-party MIT-BIH beat classifier (tests/data/third_party, Apache-2.0) wrapped with a
``pvc_run`` rule (two or more consecutive beats called V), over the nine 30-minute MIT-BIH
records in ../shared/data/ecg/mitbih (4.5 h). Each annotated run of >= 2 PVCs is one true event,
from its first PVC's R peak to its last. Real data throughout; the classifier's authors trained
on MIT-BIH, so this is not a held-out result.

    python bench/event_detection_mitbih.py [--records DIR] [--on 0.5] [--min-windows 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from converter import ConvertRequest, convert
from edge_agent.bundle import EventRule, Preprocess, WindowSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mitbih_runs import annotated_recording  # noqa: E402  (the tests' own truth)

MODEL = ROOT / "tests" / "data" / "third_party" / "classify_heartbeats_cnn.tflite"
BEATS = ROOT / "tests" / "data" / "ecg_beats.npz"
AAMI = ["N", "S", "V", "F", "Q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=Path, default=ROOT.parent / "shared/data/ecg/mitbih")
    ap.add_argument("--on", type=float, default=0.5)
    ap.add_argument("--min-windows", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recs = []
        for src in sorted(a.records.glob("*.npz")):
            annotated_recording(src, work / src.name)
            recs.append(work / src.name)
        rule = EventRule(name="pvc_run", label="V", on=a.on, off=a.on, min_windows=a.min_windows)
        bundle = convert(
            ConvertRequest(
                model=MODEL,
                calib=BEATS,
                eval=BEATS,
                out=work / "b",
                labels=AAMI,
                positive_label="V",
                preprocess=Preprocess(kind="zscore"),
                events=[rule],
                window=WindowSpec(length=260, hop=1, rate_hz=360, centre="beat", before=90),
                streams=recs,
            )
        )
        ev = json.loads((bundle.directory / "report.json").read_text())["events"]
    m = ev["variants"]["litert-fp32"]["pvc_run"]
    print(
        f"{len(recs)} records, {ev['hours']:.2f} h, "
        f"{sum(r['windows'] for r in ev['recordings'])} beat windows (real MIT-BIH)"
    )
    print(f"rule pvc_run: on {a.on}, min_windows {a.min_windows}")
    print(f"{'record':10s} {'runs':>5s} {'found':>6s} {'missed':>7s} {'false':>6s}")
    for info, r in zip(ev["recordings"], m["recordings"], strict=True):
        print(
            f"{info['file']:10s} {info['events']['pvc_run']:5d} {r['tp']:6d} {r['fn']:7d} "
            f"{r['fp']:6d}"
        )
    ci = m["sensitivity_ci"]
    print(
        f"sensitivity {m['sensitivity']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}), precision "
        f"{m['precision']:.3f}, false alarms/h {m['false_alarms_per_hour']:.1f}, "
        f"window specificity {m['specificity']:.3f}"
    )


if __name__ == "__main__":
    main()
