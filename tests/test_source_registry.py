"""The source registry: a strict config union on ``kind``; ``open_source`` picks the plug-in."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from edge_agent import sources
from edge_agent.config import load_config
from edge_agent.errors import ConfigError, SourceError
from edge_agent.sources import (
    SOURCE_KINDS,
    DicomSource,
    EcgSource,
    ImagesSource,
    ImuSource,
    MqttSensorSource,
    NpzReplay,
    NpzSettings,
    SerialSource,
    SourceConfig,
    UdpSource,
    VideoSource,
    open_source,
)
from edge_agent.window import WindowedSource, WindowSettings

DATA = Path(__file__).parent / "data"
NPZ = Path(__file__).parents[1] / "models" / "data" / "breastmnist_dev.npz"
ADAPTER: TypeAdapter[Any] = TypeAdapter(SourceConfig)

EXAMPLES: dict[str, dict[str, object]] = {
    "npz": {"path": NPZ, "split": "val", "rate_hz": 0},
    "video": {"kind": "video", "path": DATA / "video/Subject_2-Fall-13.mp4"},
    "images": {"kind": "images", "path": DATA / "video"},
    "dicom": {"kind": "dicom", "path": DATA / "dicom"},
    "imu": {"kind": "imu", "path": DATA / "imu/1601_gyro_DE.txt"},
    "udp": {"kind": "udp", "port": 0},
    "ecg": {"kind": "ecg", "path": DATA / "ecg/100.hea"},
    "mqtt": {"kind": "mqtt", "site": "ward-a", "device": "wrist-01", "sensor": "accel"},
    "serial": {"kind": "serial", "port": "/dev/ttyUSB0"},
}
CLASSES = {
    "npz": NpzReplay,
    "video": VideoSource,
    "images": ImagesSource,
    "dicom": DicomSource,
    "imu": ImuSource,
    "udp": UdpSource,
    "ecg": EcgSource,
    "mqtt": MqttSensorSource,
    "serial": SerialSource,
}


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_each_kind_opens_its_plug_in_and_counts_errors(kind: str) -> None:
    cfg = ADAPTER.validate_python(EXAMPLES[kind])
    src = open_source(cfg)
    assert isinstance(src, CLASSES[kind]) and src.name
    assert src.errors == {}
    if isinstance(src, UdpSource):
        src.close()


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_kind_is_strict_and_describes_every_field(kind: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ADAPTER.validate_python({**EXAMPLES[kind], "colour": "red"})
    model = type(ADAPTER.validate_python(EXAMPLES[kind]))
    assert isinstance(model, type) and issubclass(model, BaseModel)
    for m in (model, WindowSettings):
        missing = [n for n, f in m.model_fields.items() if not f.description]
        assert missing == [], f"{m.__name__}: {missing}"


def test_a_source_without_kind_is_still_the_npz_replay() -> None:
    cfg = ADAPTER.validate_python({"path": NPZ, "split": "val", "rate_hz": 0, "limit": 3})
    assert isinstance(cfg, NpzSettings) and cfg.rate_hz == 0
    src = open_source(cfg)
    assert [s.id for s in src.stream(threading.Event())] == [
        f"{NPZ.stem}:val#{i}" for i in range(3)
    ]
    assert NpzSettings(path=NPZ).rate_hz == 5.0  # the defaults of old


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="unknown source kind; one of: npz, video"):
        ADAPTER.validate_python({"kind": "fax", "path": "x"})


def test_windowing_is_wrapped_from_config_but_dicom_window_is_a_voi_window() -> None:
    imu = open_source(
        ADAPTER.validate_python({**EXAMPLES["imu"], "window": {"length": 8, "hop": 4}})
    )
    assert isinstance(imu, WindowedSource) and isinstance(imu.inner, ImuSource)
    dcm = open_source(ADAPTER.validate_python({**EXAMPLES["dicom"], "window": [40, 400]}))
    assert isinstance(dcm, DicomSource)


def _agent_yaml(source: str) -> str:
    return f"site: ward-a\ndevice: us-01\nbundle: b\nidentity: id\nsource:\n{source}"


def test_load_config_resolves_paths_of_any_kind_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        _agent_yaml("  kind: video\n  path: clips/a.mp4\n  labels: clips/a.csv\n  step: 2\n")
    )
    src = load_config(cfg).source
    assert src.kind == "video" and src.path == tmp_path / "clips/a.mp4"
    assert src.labels == tmp_path / "clips/a.csv"
    cfg.write_text(_agent_yaml("  kind: video\n  camera: 0\n"))
    assert load_config(cfg).source.camera == 0
    cfg.write_text(_agent_yaml("  kind: udp\n  port: 9000\n  window: {length: 40, hop: 20}\n"))
    assert load_config(cfg).source.window.length == 40


def test_load_config_points_at_the_line_of_a_bad_source_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(_agent_yaml("  kind: video\n  path: a.mp4\n  step: 0\n"))
    with pytest.raises(ConfigError, match=r"agent.yaml:8: source.step: Input should be greater"):
        load_config(cfg)
    cfg.write_text(_agent_yaml("  kind: ecg\n  path: r.hea\n  mode: sliding\n"))
    with pytest.raises(ConfigError, match=r"agent.yaml:8: source.mode: Input should be 'fixed'"):
        load_config(cfg)


def test_public_names() -> None:
    assert sorted(sources.__all__) == sorted(set(sources.__all__))
    assert [n for n in sources.__all__ if not hasattr(sources, n)] == []


def test_the_manifest_window_makes_clips_of_frames_and_leaves_the_voi_window_alone() -> None:
    from edge_agent.bundle import WindowSpec

    spec = WindowSpec(length=4, hop=2, label="max", rate_hz=15)  # the video's ~15 fps
    dcm = open_source(ADAPTER.validate_python({**EXAMPLES["dicom"], "window": [40, 400]}), spec)
    assert isinstance(dcm, WindowedSource) and isinstance(dcm.inner, DicomSource)
    assert (dcm.settings.length, dcm.settings.hop, dcm.settings.label) == (4, 2, "max")
    assert dcm.inner.cfg.window == (40.0, 400.0)
    video = open_source(ADAPTER.validate_python(EXAMPLES["video"]), spec)
    assert isinstance(video, WindowedSource) and isinstance(video.inner, VideoSource)
    own = open_source(
        ADAPTER.validate_python({**EXAMPLES["video"], "clip": {"length": 8, "hop": 8}}), spec
    )
    assert isinstance(own, WindowedSource) and own.settings.length == 8
    assert isinstance(open_source(ADAPTER.validate_python(EXAMPLES["images"]), spec), ImagesSource)
    fast = WindowSpec(length=4, hop=2, rate_hz=50)  # more frames/s than the file has
    with pytest.raises(SourceError, match="re-encode the video"):
        open_source(ADAPTER.validate_python(EXAMPLES["video"]), fast)
