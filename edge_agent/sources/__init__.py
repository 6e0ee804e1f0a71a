"""Data sources: each yields :class:`Sample` objects and nothing else.

A source is a plug-in chosen by the ``kind`` key of its config: :func:`open_source` builds it.
Each plug-in module holds its own config model (``<Kind>Settings``) and its source class, which
has a ``name``, an ``errors`` count by problem kind (for telemetry) and ``stream(stop)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from edge_agent.sources.base import Problems, Sample, Source, SourceSettings
from edge_agent.sources.dicom import DicomSettings, DicomSource
from edge_agent.sources.ecg import EcgSettings, EcgSource
from edge_agent.sources.images import ImagesSettings, ImagesSource
from edge_agent.sources.imu import ImuSettings, ImuSource
from edge_agent.sources.npz import NpzReplay, NpzSettings, load_labelled
from edge_agent.sources.udp import UdpSettings, UdpSource
from edge_agent.sources.video import VideoSettings, VideoSource
from edge_agent.window import WindowedSource, WindowSettings

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
    "NpzReplay",
    "NpzSettings",
    "Problems",
    "Sample",
    "Source",
    "SourceConfig",
    "SourceSettings",
    "UdpSettings",
    "UdpSource",
    "VideoSettings",
    "VideoSource",
    "load_labelled",
    "open_source",
]

SOURCE_KINDS = ("npz", "video", "images", "dicom", "imu", "udp", "ecg")


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
    ],
    Discriminator(
        _kind,
        custom_error_type="source_kind",
        custom_error_message=f"unknown source kind; one of: {', '.join(SOURCE_KINDS)}",
    ),
]


_PLUGINS: dict[type[SourceSettings], Callable[[Any], Source]] = {
    VideoSettings: VideoSource,
    ImagesSettings: ImagesSource,
    DicomSettings: DicomSource,
    ImuSettings: ImuSource,
    UdpSettings: UdpSource,
    EcgSettings: EcgSource,
}


def open_source(cfg: SourceSettings) -> Source:
    """The source plug-in for ``cfg.kind``, wrapped in windowing when its config asks
    (``window`` for sensors, ``clip`` for frames)."""
    if isinstance(cfg, NpzSettings):
        return NpzReplay(cfg.path, cfg.split, cfg.rate_hz, cfg.loop, cfg.limit)
    make = _PLUGINS.get(type(cfg))
    if make is None:
        raise TypeError(f"no source plug-in for {type(cfg).__name__}")
    src = make(cfg)
    for key in ("window", "clip"):  # dicom's 'window' is a VOI window, not windowing
        windows = getattr(cfg, key, None)
        if isinstance(windows, WindowSettings):
            return WindowedSource(src, windows)
    return src
