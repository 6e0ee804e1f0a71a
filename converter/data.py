"""The data ``medge convert`` and ``medge evaluate`` read, loaded and checked, refusing what
cannot be scored right instead of scoring it:

- a split that is named (``--calib-split``, ``--eval-split``, ``medge evaluate --split``) and
  missing is an error naming the file and the splits it has — never another split;
- with no split named, a file's ``x``/``y`` keys, else calibration takes ``train`` and
  evaluation ``val`` (else ``test``): evaluation never silently takes the training split, and
  calibration never the held-out ones;
- NaN or Inf in samples or targets is one line naming the file, split and count;
- labels that are measurements are not classes; dense tasks read masks or reference images.

:func:`load_data` gives a conversion request's calibration and evaluation data, its labels and
decoding, with the model file checked (converter.model_check) and its input layout resolved
(converter.layout). :func:`prepare` turns raw samples into model inputs exactly as the device
does: the bundle's preprocessing, then the input's axis order (HWC images transposed for a
channels-first model).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from converter.layout import keras_channels_first, resolve_layout
from converter.model_check import check_model_file, input_shape, output_width
from converter.scoring import class_scores, task_metrics
from converter.stream_eval import StreamWindows, cut, event_scalars, load_recording, score_streams
from edge_agent.bundle import Decode, EventRule, Preprocess
from edge_agent.errors import BundleError, SourceError
from edge_agent.events import EventTracker
from edge_agent.preprocess import normalize, to_layout
from edge_agent.sources.npz import load_labelled

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_SPLITS",
    "Data",
    "class_outputs",
    "load_data",
    "load_samples",
    "load_targets",
    "pick_split",
    "prepare",
    "require_finite",
]

DEFAULT_SPLITS = {"calibration": ("train",), "evaluation": ("val", "test")}
_OPTION = {"calibration": "--calib-split", "evaluation": "--eval-split"}


def _keys(path: Path) -> set[str]:
    try:
        with np.load(path, allow_pickle=False) as d:
            return set(d.files)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConversionError(f"{path}: not a readable npz ({exc})") from exc


def pick_split(
    path: str | Path, split: str | None, role: str, option: str | None = None
) -> str | None:
    """The split to read for ``role`` (calibration or evaluation); None: the x/y keys."""
    p = Path(path)
    keys = _keys(p)
    splits = sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))
    have = ", ".join(splits) or "none"
    flag = option or _OPTION[role]
    if split is not None:
        if split not in splits:
            xy = "; and x/y keys" if "x" in keys else ""
            raise ConversionError(
                f"{p}: no split '{split}' ({flag}); the file has splits: {have}{xy}"
            )
        return split
    if "x" in keys:
        return None
    for s in DEFAULT_SPLITS[role]:
        if s in splits:
            return s
    wanted = " or ".join(f"'{s}'" for s in DEFAULT_SPLITS[role])
    raise ConversionError(
        f"{p}: no {wanted} split for {role} and no x/y keys (splits: {have}); name the one to "
        f"use with {flag}"
    )


def require_finite(x: np.ndarray, path: str | Path, split: str | None, what: str) -> None:
    """One line naming the file, split (``x/y`` for those keys; None: a file without splits)
    and count when ``x`` holds NaN or Inf."""
    a = np.asarray(x)
    if a.dtype.kind not in "fc":
        return
    nan, inf = np.isnan(a), np.isinf(a)
    n_nan, n_inf = int(nan.sum()), int(inf.sum())
    if not n_nan and not n_inf:
        return
    rows = int((nan | inf).reshape(len(a), -1).any(axis=1).sum()) if a.ndim else 1
    name = Path(path).name
    where = f"{name} (x/y)" if split == "x/y" else f"{name} (split {split})" if split else name
    found = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    raise ConversionError(
        f"{where}: {found} values in {rows} of {len(a)} {what}; they cannot be scored or "
        "calibrated on (remove or repair those samples)"
    )


def load_samples(
    path: str | Path, split: str | None, role: str, option: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, str | None]:
    """(x, y, class names, split) of ``role``'s data, every value finite."""
    chosen = pick_split(path, split, role, option)
    try:
        x, y, names = load_labelled(path, chosen)
    except SourceError as exc:
        raise ConversionError(str(exc)) from None
    require_finite(x, path, chosen or "x/y", f"{role} samples")
    _class_indices(Path(path), chosen, option or _OPTION[role])
    return x, y, names, chosen


def _class_indices(path: Path, split: str | None, option: str) -> None:
    """Labels that are measurements (not whole numbers) are not classes: one line saying so."""
    key = "y" if split is None else f"{split}_labels"
    with np.load(path, allow_pickle=False) as d:
        if key not in d.files:
            return
        y = np.asarray(d[key])
    if y.dtype.kind != "f":
        return
    require_finite(y, path, split or "x/y", "labels")
    frac = y[np.round(y) != y]
    if frac.size:
        raise ConversionError(
            f"{path.name}: labels {key} hold values such as {float(frac.flat[0]):g}, not class "
            "indices; a model that outputs a measurement is scored with --task regression "
            "(targets in y or <split>_targets)"
        )


def load_targets(
    path: Path, split: str | None, task: str, role: str = "evaluation", option: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(x, targets) of a dense or regression task's npz: ``x``/``y``, or ``<split>_images`` with
    ``<split>_masks`` (segmentation) / ``<split>_targets`` (image_to_image, regression). The
    split is chosen as :func:`pick_split` says (a named split that is missing is an error);
    samples and targets must be finite."""
    key = "masks" if task == "segmentation" else "targets"
    split = pick_split(path, split, role, option)
    try:
        with np.load(path, allow_pickle=False) as d:
            keys = set(d.files)
            xk, yk = ("x", "y") if split is None else (f"{split}_images", f"{split}_{key}")
            if xk not in keys or yk not in keys:
                raise ConversionError(
                    f"{path}: {task} data needs x/y or <split>_images/<split>_{key} "
                    f"(has {', '.join(sorted(keys))})"
                )
            x, y = np.asarray(d[xk]), np.asarray(d[yk])
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConversionError(f"{path}: not a readable npz ({exc})") from exc
    if len(x) != len(y):
        raise ConversionError(f"{path}: {len(x)} samples but {len(y)} {key}")
    require_finite(x, path, split or "x/y", f"{role} samples")
    require_finite(y, path, split or "x/y", f"{role} {key}")
    return x, y


DEFAULT_LABELS = {
    "segmentation": ["background", "foreground"],
    "image_to_image": ["image"],
    "regression": ["value"],
}


@dataclass
class Data:
    """What the evaluation needs: the samples, their targets and how outputs decode."""

    task: str
    xc: np.ndarray
    xe: np.ndarray
    y: np.ndarray
    labels: list[str]
    positive: int | None
    decode: Decode
    yc: np.ndarray | None = None  # calibration labels, when the data has them
    streams: list[StreamWindows] = field(default_factory=list)  # recordings cut into windows
    layout: str | None = None  # the model input's layout, when known before conversion (NCHW)
    hc: tuple[np.ndarray, np.ndarray] | None = None  # segmentation: pixel mm, head circumference

    def metrics(self, outs: np.ndarray) -> dict[str, Any]:
        return task_metrics(
            self.task, outs, self.y, self.decode, self.labels, self.positive, self.hc
        )

    def event_metrics(self, streams: list[np.ndarray], tolerance_s: float) -> dict[str, Any]:
        """``event_<rule>_<metric>`` of one variant's raw outputs over the recordings."""
        section = score_streams(
            self.streams,
            {"v": streams},
            lambda o: class_outputs(self, o)[0],
            self.decode.events,
            self.labels,
            tolerance_s,
        )
        return event_scalars(section, "v")


def class_outputs(data: Data, outs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return class_scores(outs, data.decode, data.labels, data.positive)


def prepare(x: np.ndarray, spec: Preprocess, layout: str | None = None) -> np.ndarray:
    """Raw samples -> model inputs as the device makes them: normalized, then in the input's
    axis order (converter.layout); every value finite."""
    out = np.stack([to_layout(normalize(spec, s), layout) for s in x]).astype(np.float32)
    if not np.isfinite(out).all():
        raise ConversionError(
            f"preprocessing '{spec.kind}' turned finite samples into NaN/Inf "
            f"({int((~np.isfinite(out)).sum())} values): check its mean/std"
        )
    return out


def load_data(req: Any, fmt: str) -> Data:
    """The request's data, checked, with the model's input layout (``req``: a ConvertRequest)."""
    decode = Decode(
        kind=req.task,
        activation=req.activation,
        threshold=req.threshold,
        mask_threshold=req.mask_threshold,
        events=req.events,
    )
    data = _dense(req, decode) if req.task != "classification" else _classification(req, decode)
    data.layout = _layout(req, fmt, data)
    if data.task == "classification":
        _check_classes(req, fmt, data)
    return data


def _check_classes(req: Any, fmt: str, data: Data) -> None:
    """A classifier's output width against its labels, where the model file says it here."""
    width = output_width(req.model, fmt)
    n = len(data.labels)
    if width is None or width == n or (width == 1 and n == 2):
        return
    hint = "; a model that outputs a measurement: --task regression" if width == 1 else ""
    raise ConversionError(
        f"{req.model.name} outputs {width} values per sample but {n} labels were given "
        f"({', '.join(data.labels[:5])}{', ...' if n > 5 else ''}){hint}"
    )


def _layout(req: Any, fmt: str, data: Data) -> str | None:
    check_model_file(req.model, fmt)
    shape = input_shape(req.model, fmt)
    first = keras_channels_first(req.model, fmt)
    samples = [tuple(data.xc.shape[1:]), tuple(data.xe.shape[1:])]
    layout = resolve_layout(req.model.name, fmt, shape, req.layout, samples, first)
    return layout if shape is not None or layout == "NCHW" else None


def _dense(req: Any, decode: Decode) -> Data:
    xe, y = load_targets(req.eval, req.eval_split, req.task, "evaluation")
    try:
        xc = load_targets(req.calib, req.calib_split, req.task, "calibration")[0]
    except ConversionError as exc:  # calibration needs no targets: the samples alone will do
        if "data needs x/y" not in str(exc):
            raise
        xc = load_samples(req.calib, req.calib_split, "calibration")[0]
    if req.task == "regression":
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    labels = req.labels or DEFAULT_LABELS[req.task]
    data = Data(req.task, xc, xe, y, labels, None, decode)
    if req.task == "segmentation":
        data.hc = _head_circumference(req.eval, req.eval_split, len(xe))
    return data


def _head_circumference(
    path: Path, split: str | None, n: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``<split>_pixel_mm`` and ``<split>_hc_mm`` of a segmentation's evaluation split, when the
    file has both (one finite value per sample): the report then scores head circumference."""
    split = pick_split(path, split, "evaluation")
    keys = (f"{split}_pixel_mm", f"{split}_hc_mm")
    if split is None or not set(keys) <= _keys(Path(path)):
        return None
    with np.load(path, allow_pickle=False) as d:
        px, hc = (np.asarray(d[k], dtype=np.float64).reshape(-1) for k in keys)
    for k, v in zip(keys, (px, hc), strict=True):
        if len(v) != n:
            raise ConversionError(f"{path}: {k} has {len(v)} values for {n} samples")
        require_finite(v, path, split, k)
    return px, hc


def _classification(req: Any, decode: Decode) -> Data:
    xc, yc, _, _ = load_samples(req.calib, req.calib_split, "calibration")
    xe, ye, names, _ = load_samples(req.eval, req.eval_split, "evaluation")
    if ye is None:
        raise ConversionError(f"{req.eval}: evaluation data needs labels (y or <split>_labels)")
    labels = _class_labels(req, ye, names)
    positive = labels.index(req.positive_label) if req.positive_label else None
    if yc is not None and (int(yc.max()) >= len(labels) or int(yc.min()) < 0):
        yc = None  # not class indices of these labels: class coverage is not checked
    if req.events:
        _check_events(req.events, labels)
    streams = []
    if req.streams and req.window is not None:
        streams = _streams(req)
    return Data("classification", xc, xe, ye, labels, positive, decode, yc, streams)


def _class_labels(req: Any, ye: np.ndarray, names: list[str] | None) -> list[str]:
    """The class names (given, from the data, or 0..max), checked against the labels."""
    labels = req.labels or names
    if not labels:
        labels = [str(i) for i in range(int(ye.max()) + 1)]
    if req.positive_label is not None and req.positive_label not in labels:
        raise ConversionError(f"positive label '{req.positive_label}' is not one of {labels}")
    if int(ye.max()) >= len(labels) or int(ye.min()) < 0:
        raise ConversionError(
            f"evaluation labels run 0..{int(ye.max())} but {len(labels)} class names were given"
        )
    return labels


def _check_events(rules: Sequence[EventRule], labels: list[str]) -> None:
    """The --event rules pass the agent's own checks and have distinct names."""
    try:
        EventTracker(rules, labels)  # the agent's own checks: names and labels
    except BundleError as exc:
        raise ConversionError(f"{exc} (labels: {', '.join(labels)})") from None
    rule_names = [r.name for r in rules]
    if len(set(rule_names)) != len(rule_names):
        raise ConversionError("two --event rules share a name")


def _streams(req: Any) -> list[StreamWindows]:
    """The windows of each recorded stream, every sample finite."""
    streams = [cut(load_recording(p, req.events), req.window) for p in req.streams]
    for p, s in zip(req.streams, streams, strict=True):
        require_finite(s.x, Path(p), None, "recording windows")
    return streams
