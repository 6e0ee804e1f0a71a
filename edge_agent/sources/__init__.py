"""Data sources: each yields :class:`Sample` objects and nothing else.

A source is a plug-in chosen by the ``kind`` key of its config: :func:`open_source` builds it.
Each plug-in module holds its own config model (``<Kind>Settings``) and its source class, which
has a ``name``, an ``errors`` count by problem kind (for telemetry) and ``stream(stop)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Tag

from edge_agent.bundle import WindowSpec
from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, Source, SourceSettings
from edge_agent.sources.dicom import DicomSettings, DicomSource
from edge_agent.sources.ecg import EcgSettings, EcgSource, ecg_window
from edge_agent.sources.images import ImagesSettings, ImagesSource
from edge_agent.sources.imu import ImuSettings, ImuSource
from edge_agent.sources.mqtt import MqttSensorSettings, MqttSensorSource
from edge_agent.sources.npz import NpzReplay, NpzSettings, load_labelled
from edge_agent.sources.serial import SerialSettings, SerialSource
from edge_agent.sources.udp import UdpSettings, UdpSource
from edge_agent.sources.video import VideoSettings, VideoSource
from edge_agent.window import (
    Setting,
    WindowedSource,
    WindowSettings,
    source_window,
    warn_overrides,
)

__all__ = [
    "SOURCE_KINDS",
    "DicomSettings",
    "DicomSource",
    "EcgSettings",
    "EcgSource",
    "ImagesSettings",
    "ImagesSource",
    "ImuSettings",
    "ImuSource",
    "MqttSensorSettings",
    "MqttSensorSource",
    "NpzReplay",
    "NpzSettings",
    "Plugin",
    "Problems",
    "Sample",
    "SerialSettings",
    "SerialSource",
    "Source",
    "SourceConfig",
    "SourceSettings",
    "UdpSettings",
    "UdpSource",
    "VideoSettings",
    "VideoSource",
    "check_frame_rate",
    "check_rate",
    "ecg_from_manifest",
    "load_labelled",
    "open_source",
    "window_plan",
    "window_stage",
]

SOURCE_KINDS = ("npz", "video", "images", "dicom", "imu", "udp", "ecg", "mqtt", "serial")


def _kind(v: Any) -> str | None:
    """The discriminator; a source without ``kind`` is an npz replay, as it always was."""
    if isinstance(v, dict):
        return str(v.get("kind", "npz"))
    return getattr(v, "kind", None)


SourceConfig = Annotated[
    Union[  # noqa: UP007 -- Tag annotations inside X | Y read worse
        Annotated[NpzSettings, Tag("npz")],
        Annotated[VideoSettings, Tag("video")],
        Annotated[ImagesSettings, Tag("images")],
        Annotated[DicomSettings, Tag("dicom")],
        Annotated[ImuSettings, Tag("imu")],
        Annotated[UdpSettings, Tag("udp")],
        Annotated[EcgSettings, Tag("ecg")],
        Annotated[MqttSensorSettings, Tag("mqtt")],
        Annotated[SerialSettings, Tag("serial")],
    ],
    Discriminator(
        _kind,
        custom_error_type="source_kind",
        custom_error_message=f"unknown source kind; one of: {', '.join(SOURCE_KINDS)}",
    ),
]


Windowing = Literal["none", "clip", "window", "ecg"]
"""How a kind's input is cut for a model that takes sequences: ``clip``: frames into (K, H, W, C)
clips (its config key ``clip``); ``window``: sensor samples into (L, C) windows (key
``window``); ``ecg``: by the source itself (beats or fixed windows); ``none``: never (images)."""


@dataclass(frozen=True)
class Plugin:
    """A source kind: how to open it, and how its input is windowed."""

    make: Callable[[Any], Source]
    windowing: Windowing


_PLUGINS: dict[type[SourceSettings], Plugin] = {
    VideoSettings: Plugin(VideoSource, "clip"),
    ImagesSettings: Plugin(ImagesSource, "none"),
    DicomSettings: Plugin(DicomSource, "clip"),  # its 'window' is the VOI window
    ImuSettings: Plugin(ImuSource, "window"),
    UdpSettings: Plugin(UdpSource, "window"),
    EcgSettings: Plugin(EcgSource, "ecg"),
    MqttSensorSettings: Plugin(MqttSensorSource, "window"),
    SerialSettings: Plugin(SerialSource, "window"),
}


def open_source(
    cfg: SourceSettings, window: WindowSpec | None = None, labels: Sequence[str] | None = None
) -> Source:
    """The source plug-in for ``cfg.kind``, wrapped in windowing as its kind's windowing and
    the bundle's manifest ``window`` say (:func:`window_stage`; an ECG source takes the
    manifest's length, hop and ``centre`` itself). A manifest ``rate_hz`` that differs from
    the source's rate is refused in one line (:class:`SourceError`). ``labels``: the bundle's
    class names, which an ECG source's beat labels are mapped to by name (a PVC is ``V``)
    unless its config names its own ``classes``.
    """
    if isinstance(cfg, NpzSettings):  # an npz holds ready inputs: never windowed
        return NpzReplay(cfg.path, cfg.split, cfg.rate_hz, cfg.loop, cfg.limit)
    plugin = _plugin(cfg)
    settings: list[Setting] = []
    if isinstance(cfg, EcgSettings):
        cfg, settings = ecg_window(cfg, window)
    if isinstance(cfg, EcgSettings) and cfg.classes is None and labels:
        cfg = cfg.model_copy(update={"classes": list(labels)})
    src = plugin.make(cfg)
    if isinstance(src, EcgSource):
        warn_overrides(src.name, settings)
        if window is not None and window.rate_hz is not None:
            check_rate(src.name, src.record.fs, window.rate_hz)
        return src
    own, settings = window_stage(cfg, window)
    warn_overrides(src.name, settings)
    if own is None:
        return src
    rate = getattr(cfg, "rate_hz", None)
    if plugin.windowing == "window" and window is not None and window.rate_hz is not None and rate:
        check_rate(src.name, float(rate), window.rate_hz)
    if isinstance(src, VideoSource) and window is not None and window.rate_hz is not None:
        check_frame_rate(src, window.rate_hz)
    return WindowedSource(src, own)


def check_frame_rate(src: VideoSource, model_hz: float) -> None:
    """Refuse a recorded video whose kept frames (fps / step) do not come at the rate the
    model's clips were cut at: a clip of the right length would span the wrong time. 5 %
    tolerance: recordings say 29.97 or 29.3 fps where 30 was meant. A camera's rate is what it
    delivers: its frames are kept by time at ``model_hz`` as they come
    (edge_agent.sources.frame_pacer), and a camera too slow for it is counted, clip by clip."""
    fps = src.recorded_fps()
    if fps is None:
        src.pace_hz = model_hz
        return
    step = src.cfg.step
    if abs(fps / step - model_hz) > 0.05 * model_hz:
        fits = round(fps / model_hz)
        fix = (
            f"set step: {fits}"
            if fits >= 1 and abs(fps / fits - model_hz) <= 0.05 * model_hz
            else "re-encode the video at a multiple of that rate"
        )
        raise SourceError(
            f"{src.name}: {fps:g} fps with step {step} gives {fps / step:.3g} frames/s, but the "
            f"model's clips are at rate_hz {model_hz:g} (bundle manifest); {fix}"
        )


def _plugin(cfg: SourceSettings) -> Plugin:
    plugin = _PLUGINS.get(type(cfg))
    if plugin is None:
        raise TypeError(f"no source plug-in for {type(cfg).__name__}")
    return plugin


def window_stage(
    cfg: SourceSettings, window: WindowSpec | None
) -> tuple[WindowSettings | None, list[Setting]]:
    """The window stage of a ``clip`` or ``window`` kind: the config's own settings when it
    has them, else the manifest's; with each setting's origin. (None, []) for other kinds."""
    kind = "none" if isinstance(cfg, NpzSettings) else _plugin(cfg).windowing
    if kind not in ("clip", "window"):
        return None, []
    given = getattr(cfg, kind)
    return source_window(given, window)


def window_plan(cfg: SourceSettings, window: WindowSpec | None) -> list[Setting]:
    """How ``open_source`` will cut this source's input, each setting with its origin (bundle,
    config or default), without opening the source: what ``medge agent check-config`` shows."""
    if isinstance(cfg, EcgSettings):
        return ecg_window(cfg, window)[1]
    return window_stage(cfg, window)[1]


def check_rate(name: str, rate_hz: float, model_hz: float) -> None:
    """Refuse a source whose sampling rate is not the one the model was trained at (1%)."""
    if abs(rate_hz - model_hz) > 0.01 * model_hz:
        raise SourceError(
            f"{name}: source rate {rate_hz:g} Hz does not match the model's window rate_hz "
            f"{model_hz:g} Hz (bundle manifest); resample the input or set the source's rate"
        )


def ecg_from_manifest(cfg: EcgSettings, window: WindowSpec) -> EcgSettings:
    """The ECG settings with the manifest's window for what the config leaves unset."""
    return ecg_window(cfg, window)[0]
