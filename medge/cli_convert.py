"""`medge convert` and `medge evaluate`: trained model into a bundle, bundle against data.

The options of `medge convert` carry the names of the :class:`converter.ConvertRequest` fields
(`dest`), so the request is built from the parsed namespace; the few whose text needs parsing
are listed in ``_PARSE``. The converter is imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError

__all__ = ["cmd_convert", "cmd_evaluate", "register"]

_SHOWN = (
    "accuracy",
    "sensitivity",
    "specificity",
    "auc",
    "dice",
    "hd95",
    "psnr",
    "ssim",
    "mae",
    "rmse",
    "pearson_r",
)


def _preprocess(spec: str) -> Any:
    from edge_agent.bundle import Preprocess

    kind, _, rest = spec.partition(":")
    if kind == "mean_std":
        try:
            mean_s, std_s = rest.split("/")
            mean = [float(v) for v in mean_s.split(",")]
            std = [float(v) for v in std_s.split(",")]
        except ValueError as exc:
            raise MedgeError("--preprocess mean_std:M1,M2,../S1,S2,.. (per channel)") from exc
        return Preprocess(kind="mean_std", mean=mean, std=std)
    if kind not in ("none", "scale01", "zscore") or rest:
        raise MedgeError(f"--preprocess '{spec}': one of none, scale01, zscore, mean_std:M/S")
    return Preprocess.model_validate({"kind": kind})


def _budget(items: list[str]) -> dict[str, float]:
    out = {}
    for item in (part.strip() for arg in items for part in arg.split(",") if part.strip()):
        metric, _, drop = item.partition("=")
        try:
            out[metric] = float(drop)
        except ValueError as exc:
            raise MedgeError(f"--budget '{item}': use METRIC=DROP, e.g. sensitivity=0.005") from exc
    return out


def _pairs(option: str, spec: str) -> dict[str, str]:
    out = {}
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise MedgeError(f"{option} '{spec}': use KEY=VALUE,KEY=VALUE (got '{item}')")
        out[key.strip()] = value.strip()
    return out


def _spec(option: str, model: Any, values: dict[str, Any]) -> Any:
    """A manifest model from option text; a bad or unknown key is one line naming it."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "value"
        raise MedgeError(f"{option}: {where}: {err['msg']}") from None


def _window(spec: str | None) -> Any:
    from edge_agent.bundle import WindowSpec

    if spec is None:
        return None
    values: dict[str, Any] = _pairs("--window", spec)
    values.setdefault("hop", values.get("length", 1))  # default: windows that do not overlap
    return _spec("--window", WindowSpec, values)


def _events(specs: list[str]) -> list[Any]:
    from edge_agent.bundle import EventRule

    rules = []
    for spec in specs:
        values: dict[str, Any] = _pairs("--event", spec)
        if "on" in values:
            values.setdefault("off", values["on"])  # no hysteresis unless asked for
        if "alert" in values:
            values["alert"] = values["alert"].lower() in ("1", "true", "yes", "on")
        rules.append(_spec("--event", EventRule, values))
    return rules


# ConvertRequest fields whose option text needs parsing first; every other option with a
# field's name is passed on as argparse left it
_PARSE: dict[str, Callable[[Any], Any]] = {
    "preprocess": _preprocess,
    "budget": _budget,
    "labels": lambda text: text.split(",") if text else None,
    "fallback": lambda text: text.split(",") if text is not None else None,
    "cam_layer": lambda layer: layer or None,
    "window": _window,
    "events": _events,
}
_NOT_REQUEST = frozenset({"command", "func", "log_level", "json"})  # the CLI's own options


def _convert_request(a: argparse.Namespace, request: Any) -> Any:
    fields = {f.name for f in dataclasses.fields(request)}
    given = vars(a)
    if stray := set(given) - fields - _NOT_REQUEST:
        raise TypeError(f"medge convert options with no ConvertRequest field: {sorted(stray)}")
    values = {k: _PARSE[k](v) if k in _PARSE else v for k, v in given.items() if k in fields}
    values["cam"] = a.cam_layer is not None  # `--cam` alone: on, the layer found from the head
    return request(**values)


def cmd_convert(a: argparse.Namespace) -> int:
    from converter import ConvertRequest, convert, progress

    if not a.json:
        progress.enable()  # a live line per step when stderr is a terminal
    try:
        bundle = convert(_convert_request(a, ConvertRequest))
    finally:
        progress.disable()
    return _print_converted(a, bundle)


def _print_converted(a: argparse.Namespace, bundle: Any) -> int:
    m = bundle.manifest
    if a.json:
        print(
            json.dumps(
                {"bundle": bundle.id, "path": str(bundle.directory), "metrics": m.metrics}, indent=2
            )
        )
    else:
        print(f"wrote {bundle.directory} ({bundle.id})")
        for variant, metrics in m.metrics.items():
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k in _SHOWN and v is not None
            )
            print(f"  {variant:12s} {shown}")
        print(f"  report: {bundle.directory / 'report.md'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from converter import evaluate_bundle
    from converter.evaluate import format_evaluation

    if a.data is None and not a.streams:
        raise MedgeError("medge evaluate needs --data, --stream, or both")
    result = evaluate_bundle(
        a.bundle,
        a.data,
        a.split,
        a.runtime,
        a.precision,
        streams=a.streams,
        tolerance_s=a.event_tolerance_s,
    )
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_evaluation(result))
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `convert` and `evaluate` to the `medge` subcommands."""
    _add_convert(sub, common)
    e = sub.add_parser(
        "evaluate",
        help="measure a bundle on labelled data",
        description="Run a bundle's artifact with the device runtime and its own "
        "preprocessing over labelled data; print the metrics of its task (classification: "
        "accuracy, sensitivity, specificity, precision, F1 and AUC with 95%% intervals). "
        "With --stream, also the events its window and event rules find in annotated "
        "recordings (docs/report.md).",
    )
    e.add_argument("bundle", type=Path, help="bundle directory")
    e.add_argument("--data", type=Path, help="labelled npz (x/y or <split>_images/_labels)")
    _add_stream_options(
        e,
        "annotated recording (signal, rate_hz, events (N,2) seconds, "
        "r_peaks for beat windows): event sensitivity, precision, specificity "
        "and false alarms per hour (repeatable)",
    )
    e.add_argument(
        "--split",
        help="split of a MedMNIST-style npz (default: x/y, else val, "
        "else test; a split the file lacks is an error)",
    )
    e.add_argument(
        "--runtime",
        default="litert",
        choices=["litert", "onnx"],
        help="which runtime's artifact to run (default: litert)",
    )
    e.add_argument(
        "--precision",
        choices=["int8", "fp32", "fp16", "int16x8", "dynamic"],
        help="which artifact of that runtime (default: the first listed)",
    )
    common(e, json_flag=True)
    e.set_defaults(func=cmd_evaluate)


def _add_stream_options(p: argparse.ArgumentParser, stream_help: str) -> None:
    """--stream and --event-tolerance, the same for convert and evaluate."""
    p.add_argument(
        "--stream",
        dest="streams",
        type=Path,
        action="append",
        default=[],
        metavar="REC.npz",
        help=stream_help,
    )
    p.add_argument(
        "--event-tolerance",
        dest="event_tolerance_s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a detection this near an annotated event still matches it (default 0)",
    )


def _add_convert(sub: Any, common: Callable[..., None]) -> None:
    c = sub.add_parser(
        "convert",
        help="quantize a trained model into a verified bundle",
        description="Convert a trained model into a bundle for a device profile: LiteRT full "
        "int8, ONNX fp32 and ONNX int8 (QDQ), each evaluated with the device runtime against the "
        "float model on the evaluation data (report.md / report.json in the bundle), checked "
        "against --budget, and signed with --sign-key. LiteRT conversion strategies are tried "
        "in order until one works; with --budget the cheapest artifact that meets it wins "
        "(full int8, int8 with the worst layers in float, 16x8, fp16, fp32; docs/convert.md). "
        "A ready .tflite (or .onnx) model is wrapped as it is and evaluated with the device "
        "runtime; --onnx-input quantize makes ONNX fp32 + int8 from an .onnx instead.",
    )
    # each option's dest is the ConvertRequest field it fills
    c.add_argument(
        "model",
        type=Path,
        help="trained model: .keras, legacy .h5, a SavedModel directory, or .onnx; "
        "or a ready .tflite to wrap",
    )
    c.add_argument(
        "--calib", type=Path, required=True, help="calibration data: npz with x (or <split>_images)"
    )
    c.add_argument(
        "--eval",
        type=Path,
        required=True,
        help="labelled evaluation data: npz with x/y (or <split>_images/_labels)",
    )
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument(
        "--profile",
        default="x86",
        choices=["rpi4", "rpi5", "jetson", "x86"],
        help="target device profile (default: x86)",
    )
    c.add_argument(
        "--preprocess",
        default="none",
        help="how raw samples become model input: none, scale01 (x/255), zscore "
        "(per window, per channel), mean_std:M1,M2/S1,S2 (default: none)",
    )
    c.add_argument(
        "--labels",
        help="class names in output order, comma-separated (default: the npz's 'labels' array)",
    )
    c.add_argument(
        "--positive",
        dest="positive_label",
        metavar="POSITIVE",
        help="the clinically positive class, for sensitivity",
    )
    c.add_argument(
        "--threshold",
        type=float,
        help="binary models: predict the positive class when its score >= this",
    )
    c.add_argument("--name", help="bundle name (default: the model file's stem)")
    c.add_argument(
        "--calib-split",
        help="split of a MedMNIST-style calibration npz (default: x/y, else train; "
        "a split the file lacks is an error, never another split)",
    )
    c.add_argument(
        "--eval-split",
        help="split of a MedMNIST-style evaluation npz (default: x/y, "
        "else val, else test; never train unless named)",
    )
    c.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="METRIC=DROP",
        help="largest allowed drop from float, e.g. sensitivity=0.005,auc=0.005 "
        "(repeatable; segmentation: dice, iou, hd95 (a rise); image_to_image: psnr, "
        "ssim); the cheapest artifact that meets it wins; none does: no bundle, exit 2",
    )
    c.add_argument(
        "--sign-key",
        type=Path,
        help="Ed25519 key that signs the bundle (a site's bundle-signer.key); "
        "devices refuse unsigned bundles",
    )
    c.add_argument("--force", action="store_true", help="replace an existing --out directory")
    c.add_argument(
        "--cam",
        dest="cam_layer",
        nargs="?",
        const="",
        metavar="LAYER",
        help="add the class activation map as a second output (CNNs with a global-"
        "average-pooling head; LAYER: the feature layer, found from the head by "
        "default)",
    )
    c.add_argument(
        "--strategy",
        dest="strategies",
        action="append",
        metavar="NAME",
        help="LiteRT conversion strategy to try (repeatable, in order; default all: "
        "full-int8, unrolled-int8, legacy-lstm-int8, mixed-int8, dynamic-range)",
    )
    c.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="a LiteRT artifact must agree with float on this fraction of the "
        "evaluation samples, else the next strategy is tried (default 0.9)",
    )
    c.add_argument(
        "--no-onnx", dest="onnx", action="store_false", help="make the LiteRT artifact only"
    )
    c.add_argument(
        "--activation",
        default="softmax",
        choices=["softmax", "sigmoid", "none"],
        help="what the model's last layer applies (default softmax; none = logits)",
    )
    c.add_argument(
        "--float-artifacts",
        default="auto",
        choices=["auto", "none", "fp16", "fp32"],
        help="float LiteRT files beside the int8 one: auto = fp16 and fp32 (the same "
        "files on any machine; each is timed here and the report says how it "
        "compares), none (not even made), or only fp16/fp32 (default auto; a device "
        "picks one with its config's precision)",
    )
    c.add_argument(
        "--fallback",
        metavar="RUNGS",
        help="with --budget: what the search may fall back to when full int8 misses, "
        "in this order: float-head (int8, final softmax/sigmoid float), mixed (int8, "
        "worst layers float too), int16x8, fp16, fp32 "
        "(default all; 'none': full int8 or nothing)",
    )
    c.add_argument(
        "--task",
        default="classification",
        choices=["classification", "segmentation", "image_to_image", "regression"],
        help="what the model does (default classification); segmentation: the npz's "
        "y (or <split>_masks) holds masks, scored by Dice/IoU/HD95; image_to_image: "
        "y (or <split>_targets) holds the wanted images, scored by PSNR/SSIM; "
        "regression: y (or <split>_targets) holds the values, scored by MAE, RMSE, "
        "Pearson r and Bland-Altman limits",
    )
    c.add_argument(
        "--layout",
        choices=["nchw", "nhwc"],
        help="the image input's axis order where the model cannot say it (default: "
        "read from the model: Keras data_format, an ONNX/LiteRT input [N,C,H,W] with "
        "C in 1/3/4; an ambiguous one is an error). Samples are HWC images either "
        "way; nchw transposes them, in calibration, evaluation and on the device",
    )
    c.add_argument(
        "--feature-stage",
        action="store_true",
        help="a clip model whose first layer is TimeDistributed (a CNN per frame) then an "
        "LSTM/GRU head: ship it as two models, the per-frame feature model and the temporal "
        "model over the window of features (schema 2.0; each frame runs once on the device); "
        "both parts are converted and the pair is scored end to end. Needs --window",
    )
    c.add_argument(
        "--mask-threshold",
        type=float,
        default=0.5,
        help="segmentation: a pixel is foreground when its probability >= this (default 0.5)",
    )
    c.add_argument(
        "--onnx-input",
        default="wrap",
        choices=["wrap", "quantize"],
        help="an .onnx model: wrap it as it is (default), or quantize it: ONNX fp32 "
        "(the model) and QDQ int8, both evaluated (no LiteRT artifact: that needs "
        "onnx2tf)",
    )
    c.add_argument(
        "--window",
        metavar="SPEC",
        help="how the device cuts a stream into inputs, written to the manifest: "
        "length=N[,hop=N][,rate_hz=HZ][,centre=beat[,before=N]][,label=last|majority|"
        "max] (hop defaults to length; centre=beat: one window per R peak)",
    )
    c.add_argument(
        "--event",
        dest="events",
        action="append",
        default=[],
        metavar="SPEC",
        help="an event rule for decode.events (repeatable): name=N,label=L,on=P"
        "[,off=P][,min_windows=K][,refractory_s=S][,alert=yes|no]; an event starts "
        "when L's score is >= on for K windows and ends below off (default: on)",
    )
    _add_stream_options(
        c,
        "annotated recording to score event detection on, for float and "
        "every artifact (needs --window and --event; npz: signal, rate_hz, "
        "events (N,2) seconds, r_peaks for beat windows; repeatable; "
        "docs/report.md)",
    )
    common(c, json_flag=True)
    c.set_defaults(func=cmd_convert)
