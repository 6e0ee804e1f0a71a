"""Calibration and evaluation data as the converter and ``medge evaluate`` read them, refusing
what cannot be scored right instead of scoring it:

- a split that is named (``--calib-split``, ``--eval-split``, ``medge evaluate --split``) and
  missing is an error naming the file and the splits it has — never another split;
- with no split named, a file's ``x``/``y`` keys, else calibration takes ``train`` and
  evaluation ``val`` (else ``test``): evaluation never silently takes the training split, and
  calibration never the held-out ones;
- NaN or Inf in samples or targets is one line naming the file, split and count.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from converter.errors import ConversionError
from edge_agent.errors import SourceError
from edge_agent.sources.npz import load_labelled

__all__ = ["DEFAULT_SPLITS", "load_samples", "pick_split", "require_finite"]

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
