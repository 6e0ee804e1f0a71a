"""Rebuild the small real-data fixtures here from the shared data set (see ATTRIBUTION.md).

    .venv/bin/python tests/data/make_test_data.py [SHARED_DATA_DIR]

Deterministic slices and copies; nothing here is synthetic except the re-encoding of the video.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def video(src: Path) -> None:
    """GMDCSA24 Subject_2-Fall-13, every frame, re-encoded at 160x120 (mp4v), and its CSV row."""
    import cv2

    out = HERE / "video"
    out.mkdir(exist_ok=True)
    cap = cv2.VideoCapture(str(src / "video/gmdcsa24/Subject_2-Fall-13.mp4"))
    fps = cap.get(cv2.CAP_PROP_FPS)
    writer = cv2.VideoWriter(
        str(out / "Subject_2-Fall-13.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (160, 120)
    )
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, (160, 120), interpolation=cv2.INTER_AREA))
    writer.release()
    lines = (src / "video/gmdcsa24/Subject_2-Fall.csv").read_text(encoding="utf-8").splitlines()
    keep = [lines[0], *[ln for ln in lines if ln.startswith("13.mp4,")]]
    (out / "Subject_2-Fall.csv").write_text("\n".join(keep) + "\n", encoding="utf-8")
    shutil.copyfile(src / "video/gmdcsa24/LICENSE", out / "LICENSE")


def dicom(src: Path) -> None:
    out = HERE / "dicom"
    out.mkdir(exist_ok=True)
    for name in (
        "us_cine_30frames_ybr.dcm",
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "ExplVR_BigEnd.dcm",
        "examples_palette.dcm",
        "LICENSE",
    ):
        shutil.copyfile(src / "formats/dicom" / name, out / name)


def imu(src: Path) -> None:
    """Two slices that cross an activity change, where the real recording's clock jumps."""
    out = HERE / "imu"
    out.mkdir(exist_ok=True)
    wisdm = src / "wearable/wisdm2019_watch"
    with gzip.open(wisdm / "data_1600_accel_watch.txt.gz", "rt") as f:
        rows = f.read().splitlines()
    text = "\n".join(rows[3405:3805]) + "\n"  # A->B: the clock goes back 400 s
    with gzip.GzipFile(out / "1600_accel_AB.txt.gz", "wb", mtime=0) as g:  # reproducible bytes
        g.write(text.encode())
    with gzip.open(wisdm / "data_1601_gyro_watch.txt.gz", "rt") as f:
        rows = f.read().splitlines()
    (out / "1601_gyro_DE.txt").write_text("\n".join(rows[14306:14506]) + "\n")  # D->E: +36 s


def ecg(src: Path) -> None:
    """60 s of MIT-BIH 106 from 1:30 (npz, 42 PVCs) and the first 60 s of record 100 (WFDB)."""
    out = HERE / "ecg"
    out.mkdir(exist_ok=True)
    n, a = 60 * 360, 90 * 360
    with np.load(src / "ecg/mitbih/106.npz") as d:
        r, v = d["r_peaks"], d["pvc_peaks"]
        np.savez_compressed(
            out / "106_90s-150s.npz",
            signal=d["signal"][a : a + n],
            fs=d["fs"],
            r_peaks=r[(r >= a) & (r < a + n)] - a,
            pvc_peaks=v[(v >= a) & (v < a + n)] - a,
            start_sample=a,
        )
    wfdb = src / "ecg/wfdb"
    raw = (wfdb / "100.dat").read_bytes()[: 3 * n]  # format 212, 2 signals: 3 bytes a frame
    (out / "100.dat").write_bytes(raw)
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
    s0 = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
    s1 = b[:, 2] | ((b[:, 1] & 0xF0) << 4)
    sums = [int((s - 4096 * (s > 2047)).sum()) & 0xFFFF for s in (s0, s1)]
    sums = [v - 65536 if v >= 32768 else v for v in sums]  # a 16-bit two's complement sum
    head = (wfdb / "100.hea").read_text().splitlines()
    head = [ln for ln in head if ln.strip() and not ln.startswith("# unnecessary")]
    head[0] = f"100 2 360 {n}"
    for i, total in enumerate(sums, start=1):
        f = head[i].split()
        f[6] = str(total)
        head[i] = " ".join(f)
    (out / "100.hea").write_text("\n".join(head) + "\n")
    (out / "100.atr").write_bytes(_cut_annotations((wfdb / "100.atr").read_bytes(), n))


# (record, first beat, beats): 300 beats of 106 and 100 of 108 (its beat 0 is too early)
ECG_BEATS = (("106", 900, 300), ("108", 1, 100))


def ecg_beats(src: Path) -> None:
    """Beat windows for the wrapped ECG beat classifier (tests/test_wrap.py): lead MLII from
    R-90 to R+170 samples (the window its authors trained on), in mV as float16 (MIT-BIH's
    resolution is 0.005 mV). Labels: 2 (V) for the PVC peaks, 0 (N) for every other beat;
    the data set here marks PVCs only, so S, F and Q beats (if any) are labelled N."""
    xs, ys, recs, peaks = [], [], [], []
    for rec, first, n in ECG_BEATS:
        with np.load(src / f"ecg/mitbih/{rec}.npz") as d:
            sig, r, v = d["signal"], d["r_peaks"], set(d["pvc_peaks"].tolist())
        for p in r[first : first + n]:
            xs.append(sig[p - 90 : p + 170])
            ys.append(2 if int(p) in v else 0)
            recs.append(int(rec))
            peaks.append(int(p))
    np.savez_compressed(
        HERE / "ecg_beats.npz",
        x=np.asarray(xs, np.float16),
        y=np.asarray(ys, np.int64),
        labels=np.array(["N", "S", "V", "F", "Q"]),
        record=np.asarray(recs, np.int16),
        r_peak=np.asarray(peaks, np.int64),
    )


def _cut_annotations(data: bytes, n: int) -> bytes:
    """The MIT annotation stream up to the first annotation at or after sample ``n``, ended."""
    words = np.frombuffer(data, "<u2").tolist()
    t, i = 0, 0
    while i < len(words):
        code, value = words[i] >> 10, words[i] & 0x3FF
        if code == 0 and value == 0:
            break
        if code == 59:
            t += (words[i + 1] << 16) | words[i + 2]
            i += 3
            continue
        if code == 63:
            i += 1 + (value + 1) // 2
            continue
        if code in (60, 61, 62):
            i += 1
            continue
        if t + value >= n:
            break
        t += value
        i += 1
    return np.asarray([*words[:i], 0], "<u2").tobytes()


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared/data")
    video(src)
    dicom(src)
    imu(src)
    ecg(src)
    ecg_beats(src)


if __name__ == "__main__":
    main()
