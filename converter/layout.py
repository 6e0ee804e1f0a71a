"""Which axis of an image input holds the channels: read from the model where it is known,
declared with ``--layout`` otherwise, never guessed.

Samples are always images as a device's sources give them: (H, W, C) or (H, W). A
channels-first model (input ``[N, C, H, W]``, manifest layout ``NCHW``) gets them transposed
to (C, H, W) by the same function in calibration, evaluation and on the device
(:func:`edge_agent.preprocess.to_layout`). How a model says its layout:

- Keras (``.keras``, ``.h5``): channels-last unless a layer's config says
  ``data_format: channels_first`` (read from the file, without TensorFlow);
- ONNX, LiteRT: from the input's shape ``[N, a, b, c]``: channels-first when only ``a`` looks
  like channels (1, 3 or 4, with ``b`` and ``c`` > 4), channels-last when only ``c`` does;
  otherwise channels-last only when the data can be read no other way; else an error asking
  for ``--layout``;
- a SavedModel: channels-last (TensorFlow's convention), unless ``--layout`` says otherwise.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from converter.errors import ConversionError

__all__ = ["CHANNELS", "LAYOUT_CHOICES", "RANK_LAYOUTS", "keras_channels_first", "resolve_layout"]

RANK_LAYOUTS = {5: "NTHWC", 4: "NHWC", 3: "NTC", 2: "NC"}
LAYOUT_CHOICES = ("nchw", "nhwc")
CHANNELS = (1, 3, 4)  # what an image's channel axis holds: grey, RGB, RGBA
_MIN_SIDE = 4  # an image side is longer than this


def keras_channels_first(path: Path, fmt: str) -> bool:
    """Whether a Keras file's config has a 2-D layer with ``data_format: channels_first``."""
    config = _keras_config(path, fmt)
    return config is not None and _has_channels_first(json.loads(config))


def _keras_config(path: Path, fmt: str) -> str | None:
    if fmt == "keras":
        try:
            with zipfile.ZipFile(path) as z:
                return z.read("config.json").decode("utf-8", "replace")
        except (OSError, KeyError, zipfile.BadZipFile):
            return None
    if fmt == "h5":
        try:
            import h5py
        except ImportError:
            return None
        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
        except OSError:
            return None
        return raw.decode() if isinstance(raw, bytes) else raw
    return None


def _has_channels_first(node: object) -> bool:
    if isinstance(node, dict):
        if node.get("data_format") == "channels_first":
            return True
        return any(_has_channels_first(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_channels_first(v) for v in node)
    return False


def resolve_layout(
    name: str,
    fmt: str,
    shape: Sequence[int] | None,
    declared: str | None,
    samples: Sequence[tuple[int, ...]],
    channels_first: bool = False,
) -> str | None:
    """The manifest layout of the model's input (``NCHW``, ``NHWC``, ``NTC``, ...); None when
    its rank is not known here (the converted artifact's rank says it later).

    ``shape``: the input's shape with batch, when the model file says it here (ONNX, LiteRT);
    ``declared``: ``--layout`` (nchw/nhwc) or None; ``samples``: the shapes of one sample of
    each data set (calibration, evaluation), checked against the layout;
    ``channels_first``: a Keras config said so."""
    if declared is not None and declared not in LAYOUT_CHOICES:
        raise ConversionError(f"unknown layout '{declared}' (nchw or nhwc)")
    if shape is not None and len(shape) != 4:
        if declared == "nchw":
            raise ConversionError(
                f"--layout nchw is for image inputs [N, C, H, W]; {name}'s input is {list(shape)}"
            )
        return RANK_LAYOUTS.get(len(shape))
    layout = _image_layout(name, fmt, shape, declared, samples, channels_first)
    _check_samples(name, layout, shape, samples)
    return layout


def _image_layout(
    name: str,
    fmt: str,
    shape: Sequence[int] | None,
    declared: str | None,
    samples: Sequence[tuple[int, ...]],
    channels_first: bool,
) -> str:
    """NCHW or NHWC of an image input: declared, from a Keras config, or from the shape."""
    if declared is not None:
        return declared.upper()
    if fmt in ("keras", "h5"):
        return "NCHW" if channels_first else "NHWC"
    if shape is None:  # a SavedModel: TensorFlow's convention
        return "NHWC"
    return _from_shape(name, list(shape), samples)


def _check_samples(
    name: str, layout: str, shape: Sequence[int] | None, samples: Sequence[tuple[int, ...]]
) -> None:
    """Every sample fits an image input of this layout (and of this shape, when known)."""
    for s in samples:
        if shape is not None and layout == "NCHW":
            _check_hwc(name, s, list(shape))
        elif shape is not None:
            _check_as_is(name, s, list(shape))
        elif layout == "NCHW" and len(s) not in (2, 3):
            raise ConversionError(
                f"{name} is channels-first: samples must be images (H, W, C) or (H, W), got {s}"
            )


def _looks(shape: list[int], channel: int, sides: tuple[int, int]) -> bool:
    return shape[channel] in CHANNELS and all(shape[i] > _MIN_SIDE for i in sides)


def _from_shape(name: str, shape: list[int], samples: Sequence[tuple[int, ...]]) -> str:
    first, last = _looks(shape, 1, (2, 3)), _looks(shape, 3, (1, 2))
    if first != last:
        return "NCHW" if first else "NHWC"
    a, b, c = shape[1:]
    as_is = {(a, b, c)} | ({(a, b)} if c == 1 else set())
    transposed = {(b, c, a)} | ({(b, c)} if a == 1 else set())
    if samples and all(s in as_is and s not in transposed for s in samples):
        return "NHWC"  # the data fit the input as it is, and no other way
    raise ConversionError(
        f"{name}: cannot tell whether input {shape} is channels-first or channels-last; "
        "give --layout nchw or --layout nhwc"
    )


def _fits(sample: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """``sample`` has the shape ``want`` (a -1 there: any size)."""
    return len(sample) == len(want) and all(
        w in (-1, s) for s, w in zip(sample, want, strict=False)
    )


def _check_hwc(name: str, sample: tuple[int, ...], shape: list[int]) -> None:
    c, h, w = shape[1:]
    if _fits(sample, (h, w, c)) or (c == 1 and _fits(sample, (h, w))):
        return
    looks_chw = (
        " (it looks channels-first: store images as (H, W, C))" if sample == (c, h, w) else ""
    )
    raise ConversionError(
        f"{name} takes channels-first input {shape}: samples must be images (H, W, C) = "
        f"({h}, {w}, {c}), got {sample}{looks_chw}"
    )


def _check_as_is(name: str, sample: tuple[int, ...], shape: list[int]) -> None:
    """A channels-last input takes images in its own axis order, not merely of its size."""
    a, b, c = shape[1:]
    if len(sample) not in (2, 3) or _fits(sample, (a, b, c)) or (c == 1 and _fits(sample, (a, b))):
        return
    hint = "; is it channels-first? --layout nchw" if sample == (b, c, a) else ""
    raise ConversionError(
        f"{name} takes channels-last input {shape}: samples must be images ({a}, {b}, {c}), "
        f"got {sample}{hint}"
    )
