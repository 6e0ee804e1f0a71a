"""What ``medge convert`` is asked to do: one validated :class:`ConvertRequest`.

A pydantic dataclass: the field types are checked by pydantic, the choices and the rules
between fields by the validator below, which raises :class:`ConversionError` with the same one
line the CLI prints. What needs the files themselves (the model's format, the signing key, an
output directory that already holds something) is checked by ``convert`` before its long work.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from converter import budget as B
from converter.errors import ConversionError
from converter.strategies import MIN_AGREEMENT, STRATEGIES
from edge_agent.bundle import EventRule, Preprocess, WindowSpec

__all__ = ["FLOAT_ARTIFACTS", "ONNX_INPUTS", "PROFILES", "TASKS", "ConvertRequest"]

PROFILES = ("rpi4", "rpi5", "jetson", "x86")
TASKS = tuple(B.TASK_METRICS)
FLOAT_ARTIFACTS = ("auto", "none", "fp16", "fp32")
ONNX_INPUTS = ("wrap", "quantize")


def _no_preprocessing() -> Preprocess:
    return Preprocess(kind="none")


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class ConvertRequest:
    model: Path = Field(description="the trained model: .keras, .h5, a SavedModel, .onnx, .tflite")
    calib: Path = Field(description="calibration data (npz)")
    eval: Path = Field(description="evaluation data (npz)")
    out: Path = Field(description="the bundle directory to write")
    profile: str = Field(default="x86", description=f"device profile: {', '.join(PROFILES)}")
    preprocess: Preprocess = Field(
        default_factory=_no_preprocessing, description="the device's preprocessing (manifest)"
    )
    labels: list[str] | None = Field(
        default=None, description="class names (default: from the data)"
    )
    positive_label: str | None = Field(default=None, description="the positive class")
    threshold: float | None = Field(
        default=None, description="decision threshold of the positive class"
    )
    name: str | None = Field(default=None, description="bundle name (default: the model's)")
    calib_split: str | None = Field(default=None, description="the calibration split of the npz")
    eval_split: str | None = Field(default=None, description="the evaluation split of the npz")
    force: bool = Field(default=False, description="replace a non-empty output directory")
    budget: dict[str, float] = Field(
        default_factory=dict, description="metric -> allowed drop from float (--budget)"
    )
    sign_key: Path | None = Field(
        default=None, description="Ed25519 private key that signs the bundle"
    )
    cam: bool = Field(
        default=False,
        description="add the class activation map as a second output (GAP -> Dense heads)",
    )
    cam_layer: str | None = Field(
        default=None, description="the CAM feature layer (None: found from the head)"
    )
    strategies: list[str] | None = Field(
        default=None, description="LiteRT strategies to try, in order (default: all)"
    )
    min_agreement: float = Field(
        default=MIN_AGREEMENT, description="a LiteRT artifact must agree with float this often"
    )
    onnx: bool = Field(default=True, description="also make the ONNX artifacts (Keras models only)")
    activation: str = Field(
        default="softmax", description="what the model's last layer applies: softmax, sigmoid, none"
    )
    task: str = Field(default="classification", description=f"one of {', '.join(TASKS)}")
    onnx_input: str = Field(
        default="wrap", description="an .onnx model: wrap it as it is, or quantize it (fp32 + int8)"
    )
    mask_threshold: float = Field(
        default=0.5, description="segmentation: a pixel is foreground at >= this"
    )
    fallback: list[str] | None = Field(
        default=None, description="--budget rungs after int8 (None: all; []: none)"
    )
    float_artifacts: str = Field(
        default="auto", description="float LiteRT files beside int8: auto (both), none, fp16, fp32"
    )
    window: WindowSpec | None = Field(
        default=None, description="how the agent cuts a stream into inputs (manifest)"
    )
    events: list[EventRule] = Field(default_factory=list, description="decode.events (manifest)")
    streams: list[Path] = Field(
        default_factory=list, description="annotated recordings: event metrics"
    )
    event_tolerance_s: float = Field(
        default=0.0, description="a detection this near an annotated event still matches it"
    )
    layout: str | None = Field(
        default=None, description="nchw | nhwc: an image input's axes, where the model cannot say"
    )
    feature_stage: bool = Field(
        default=False,
        description="split a clip model's TimeDistributed front into a per-frame feature stage",
    )

    @model_validator(mode="after")
    def _check(self) -> ConvertRequest:
        _one_of("profile", self.profile, PROFILES)
        _one_of("task", self.task, TASKS)
        if self.float_artifacts not in FLOAT_ARTIFACTS:
            raise ConversionError(
                f"float artifacts '{self.float_artifacts}' is not one of "
                f"{', '.join(FLOAT_ARTIFACTS)}"
            )
        allowed = B.budget_metrics(self.task, [r.name for r in self.events])
        unknown = sorted(set(self.budget) - set(allowed))
        if unknown:
            raise ConversionError(
                f"budget metric '{unknown[0]}' is not one of {', '.join(allowed)} ({self.task})"
            )
        B.rungs(self.fallback)  # unknown names fail here
        if (self.events or self.streams) and self.task != "classification":
            raise ConversionError(
                "events come from class scores: --event/--stream need --task classification"
            )
        if not self.streams and any(k.startswith("event_") for k in self.budget):
            raise ConversionError("an event metric in --budget needs --stream recordings to score")
        if self.streams and not (self.window and self.events):
            raise ConversionError(
                "--stream needs --window (how to cut it) and at least one --event"
            )
        if self.event_tolerance_s < 0:
            raise ConversionError(f"event tolerance must be >= 0 s, got {self.event_tolerance_s}")
        if self.onnx_input not in ONNX_INPUTS:
            raise ConversionError(f"unknown onnx input mode '{self.onnx_input}' (wrap or quantize)")
        known = {s.key for s in STRATEGIES}
        bad = sorted(set(self.strategies or []) - known)
        if bad:
            raise ConversionError(
                f"unknown strategy '{bad[0]}' (one of {', '.join(sorted(known))})"
            )
        return self

    @property
    def strategy_keys(self) -> list[str]:
        """The LiteRT strategies to try, in order."""
        return self.strategies or [s.key for s in STRATEGIES]


def _one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConversionError(f"unknown {what} '{value}' (one of {', '.join(choices)})")
