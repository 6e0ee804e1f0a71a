"""What ``medge demo`` runs: one scenario per modality, each a zoo model on its stream.

A scenario names its zoo model, the prefix of its devices' names and the source each device
replays (recorded data shipped in models/data). ``medge demo`` runs every scenario whose
model is in the zoo, one device each; ``--scenario NAME`` runs one.

Image scenarios show ``rate_hz`` images a second (``--rate``); stream scenarios (wrist, ecg)
play their recording in real time, at its own rate, and ``--rate`` does not apply to them.
Every source loops. The streams are made by tools/make_demo_streams.py
(models/data/ATTRIBUTION-demo-streams.md says what is real and what is simulated)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "Scenario", "scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # the zoo model (medge zoo list)
    prefix: str  # device names: PREFIX-01, PREFIX-02, ...
    summary: str
    # (rate_hz, data override) -> the agent's `source:` section
    source: Callable[[float, Path | None], dict[str, Any]]
    realtime: bool = False  # plays at its recording's rate: rate_hz (--rate) does not apply


def _images(model: str) -> Callable[[float, Path | None], dict[str, Any]]:
    def source(rate_hz: float, data: Path | None) -> dict[str, Any]:
        import models

        path = data or models.spec(model).data
        return {"path": path, "split": "val", "rate_hz": rate_hz, "loop": True}

    return source


def _data(name: str) -> Path:
    import models

    return Path(models.__file__).parent / "data" / name


def _wrist(rate_hz: float, data: Path | None) -> dict[str, Any]:
    """The watch's accelerometer and gyroscope files (``data``: another accelerometer file,
    its gyroscope file named alike with ``gyro``), paired at 20 Hz, in real time. Labels: none
    (``activities`` empty): the files' letters are WISDM activities and X for simulated
    samples, not the model's classes; the fall times are in the attribution file."""
    accel = data or _data("demo_wrist_accel.txt.gz")
    gyro = accel.with_name(accel.name.replace("accel", "gyro"))
    return {
        "kind": "imu",
        "path": accel,
        "gyro": gyro,
        "rate_hz": 20.0,
        "realtime": True,
        "loop": True,
        "activities": "",
    }


def _ecg(rate_hz: float, data: Path | None) -> dict[str, Any]:
    """The record, one window per beat as the bundle's window says, each sent when the
    recording reaches its end (real time); beats labelled N / V from its annotations."""
    path = data or _data("demo_ecg_106.npz")
    return {"kind": "ecg", "path": path, "realtime": True, "loop": True}


def _ward(rate_hz: float, data: Path | None) -> dict[str, Any]:
    path = data or _data("video_fall_clip_s3_19.mp4")
    return {
        "kind": "video",
        "path": path,
        "color": "grey",
        "size": [48, 64],
        "step": 3,  # 15 fps -> the model's 5 fps
        "realtime": True,
        "loop": True,
    }


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "ultrasound",
        "breast_cnn",
        "us",
        "breast ultrasound images through the CNN, with CAM heatmaps",
        _images("breast_cnn"),
    ),
    Scenario(
        "xray",
        "pneumonia_cnn",
        "xr",
        "paediatric chest X-rays through the pneumonia CNN, with CAM heatmaps",
        _images("pneumonia_cnn"),
    ),
    Scenario(
        "fetal",
        "hc18_unet",
        "fh",
        "fetal head ultrasound frames (HC18) through the U-Net: the head's mask outline and "
        "fitted ellipse, whose perimeter is the head circumference",
        _images("hc18_unet"),
    ),
    Scenario(
        "despeckle",
        "us_denoise_gan",
        "dn",
        "fetal ultrasound frames (HC18) with SIMULATED speckle through the GAN denoiser: "
        "image-to-image, a thumbnail of each cleaned frame",
        _images("us_denoise_gan"),
    ),
    Scenario(
        "wrist",
        "wrist_fall_lstm",
        "wr",
        "a smartwatch (real WISDM 2019 accel+gyro of subject 1605, 210 s) with 4 SIMULATED "
        "falls (at 6, 56, 109, 159 s) through the fall LSTM: fall events and critical alerts; "
        "real time at 20 Hz, --rate does not apply",
        _wrist,
        realtime=True,
    ),
    Scenario(
        "ward",
        "video_fall_cnnlstm",
        "cam",
        "a ward camera (a real 5 s GMDCSA24 fall clip, subject 3, one the model was trained on: "
        "it shows the device path, not accuracy) through the CNN-LSTM: fall events and alerts; "
        "real time at 15 fps, --rate does not apply",
        _ward,
        realtime=True,
    ),
    Scenario(
        "ecg",
        "ecg_gru",
        "ecg",
        "a Holter lead (real MIT-BIH record 106, 24:00-29:00: 43 annotated PVC runs, the first "
        "7 s in) through the PVC CNN-GRU: a result per beat, pvc_run events and alerts; real "
        "time at 360 Hz, --rate does not apply",
        _ecg,
        realtime=True,
    ),
)


def scenario(name: str) -> Scenario:
    from edge_agent.errors import MedgeError

    for s in SCENARIOS:
        if s.name == name:
            return s
    raise MedgeError(
        f"no demo scenario {name!r}; there are: {', '.join(s.name for s in SCENARIOS)}"
    )
