"""The bundle: one directory holding everything a device needs to run a model, and nothing else.

The format has one definition, here; the converter writes it and the agent reads it.
See docs/bundle.md. A device refuses a bundle whose schema major version, hashes or file list
do not check out, and says which.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import BundleError, one_line
from edge_agent.keys import key_id

__all__ = [
    "CHAIN_SCHEMA_VERSION",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "Artifact",
    "Bundle",
    "CamSpec",
    "ChannelSummary",
    "Decode",
    "EventRule",
    "FeatureStage",
    "FileEntry",
    "ImageSummary",
    "Manifest",
    "Preprocess",
    "Provenance",
    "Quantization",
    "Reference",
    "ScoreSummary",
    "TensorRTBuild",
    "TensorSpec",
    "WindowSpec",
    "file_entry",
    "sign_bundle",
    "write_manifest",
]

# 1.1 added the optional artifact.tensorrt and cam fields; 1.2 the segmentation and
# image-to-image tasks, decode.events and window; 1.3 decode.events[].severity; 1.4 reference
# (all optional, defaults as before)
SCHEMA_VERSION = "1.4"
# a bundle with a feature stage (a per-frame model in front of the artifacts) says 2.0, so an
# agent that does not know the stage refuses it by its version instead of feeding raw frames
# to the temporal model; this agent reads both
CHAIN_SCHEMA_VERSION = "2.0"
READS_MAJORS = ("1", "2")
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"

DType = Literal["float32", "float16", "int8", "uint8", "int16", "int32"]


class _Model(BaseModel):
    # Minor schema versions only add optional fields; an older agent ignores what it does not know.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Quantization(_Model):
    """Affine quantization of a tensor: real = scale * (q - zero_point)."""

    scale: float = Field(gt=0, description="Real value of one quantization step.")
    zero_point: int = Field(description="Integer that represents real 0.")


class TensorSpec(_Model):
    """One model input or output as the artifact sees it."""

    name: str = Field(description="Tensor name in the artifact.")
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        min_length=1,
        max_length=8,
        description="Shape including the batch axis, e.g. [1, 28, 28, 1]; -1 = dynamic.",
    )
    dtype: DType = Field(description="Element type the artifact takes or gives.")
    layout: str | None = Field(default=None, description="Axis names, e.g. NHWC or NTC.")
    quantization: Quantization | None = Field(
        default=None, description="Scale and zero point of an integer tensor; null for float."
    )


class Preprocess(_Model):
    """How a raw sample becomes the model's real-valued input (before quantization).

    kinds: ``none`` (cast to float32), ``scale01`` (x / 255), ``zscore`` (per window, per
    channel over the time axis), ``mean_std`` (fixed per-channel (x - mean) / std).
    """

    kind: Literal["none", "scale01", "zscore", "mean_std"] = Field(
        description="What the agent does to an input before the model."
    )
    mean: list[float] | None = Field(default=None, description="mean_std: per-channel mean.")
    std: list[float] | None = Field(default=None, description="mean_std: per-channel std.")


# regression (one real value per output; optional like the 1.2 tasks, an older agent refuses it)
Task = Literal["classification", "segmentation", "image_to_image", "regression"]


class EventRule(_Model):
    """Turns a stream of per-window scores into events (schema 1.2): one fall is one event.

    An event starts when the score of ``label`` has been >= ``on`` for ``min_windows``
    consecutive windows, ends when it drops below ``off`` (hysteresis: off <= on), and no new
    event of this rule starts within ``refractory_s`` of the last one's start.
    """

    name: str = Field(min_length=1, description="Event name, e.g. 'fall' or 'pvc_run'.")
    label: str = Field(description="The class whose score signals the event.")
    on: float = Field(ge=0, le=1, description="Score that starts an event.")
    off: float = Field(ge=0, le=1, description="Score below which an event ends.")
    min_windows: int = Field(default=1, ge=1, description="Consecutive windows >= on to start.")
    refractory_s: float = Field(default=0.0, ge=0, description="Dead time after an event starts.")
    alert: bool = Field(default=True, description="Mark the event message as an alert.")
    severity: Literal["critical", "warning", "info"] = Field(
        default="critical",
        description="How urgent the gateway's alert is (schema 1.3; a gateway rule may override).",
    )


class Decode(_Model):
    """How the model's output becomes a result."""

    kind: Task = Field(default="classification", description="The task; equals the manifest's.")
    activation: Literal["softmax", "sigmoid", "none"] = Field(
        default="softmax", description="What the model's last layer already applied."
    )
    threshold: float | None = Field(
        default=None,
        description="For two classes: the positive class is predicted when its score >= threshold.",
    )
    mask_threshold: float = Field(
        default=0.5, ge=0, le=1, description="Segmentation: a pixel is foreground at >= this."
    )
    events: list[EventRule] = Field(
        default_factory=list, description="Classification over a stream: events from scores."
    )


class WindowSpec(_Model):
    """How the agent cuts a stream into the model's inputs (schema 1.2, optional).

    ``length`` samples (or frames, for clips) per window, one window every ``hop``; a source's
    own ``window``/``clip`` setting overrides it. ``rate_hz`` is the rate the model was trained
    at; ``centre`` = ``beat`` asks an ECG source for windows centred on each R peak.
    """

    length: int = Field(ge=1, description="Samples (frames, for clips) per window.")
    hop: int = Field(ge=1, description="Samples from one window's start to the next.")
    rate_hz: float | None = Field(default=None, gt=0, description="Rate the model was trained at.")
    label: Literal["last", "majority", "max"] = Field(
        default="last", description="Which sample labels give the window's label in evaluation."
    )
    centre: Literal["none", "beat"] = Field(
        default="none", description="beat: windows centred on each R peak (ECG sources)."
    )
    before: int | None = Field(
        default=None,
        ge=0,
        description="centre beat: samples before the R peak (default length // 2).",
    )


class FileEntry(_Model):
    """One file of the bundle as the manifest pins it: a device refuses a file that differs."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file, hex.")
    bytes: int = Field(ge=0, description="Size of the file.")


class TensorRTBuild(_Model):
    """How a Jetson builds a TensorRT engine from an ONNX artifact, on the device itself.

    An engine is specific to its GPU and TensorRT version, so a bundle never ships one; the
    engine goes outside the bundle directory (an unlisted file would fail verification).
    """

    precision: Literal["int8", "fp16", "fp32"] = Field(
        description="Engine precision; int8 comes from the artifact's own Q/DQ nodes."
    )
    workspace_mib: int = Field(gt=0, description="Builder workspace memory pool, MiB.")
    command: str = Field(
        description="trtexec command line; $BUNDLE is the bundle directory, $ENGINE the engine."
    )


class Artifact(_Model):
    """One runnable model file in the bundle."""

    file: str = Field(description="Path of the model file inside the bundle.")
    runtime: Literal["litert", "onnx"] = Field(description="The runtime that executes it.")
    precision: Literal["fp32", "fp16", "int8", "int16x8", "dynamic"] = Field(
        description="Numeric precision of its weights and activations."
    )
    inputs: list[TensorSpec] = Field(min_length=1, description="Its input tensors, in order.")
    outputs: list[TensorSpec] = Field(min_length=1, description="Its output tensors, in order.")
    tensorrt: TensorRTBuild | None = Field(
        default=None, description="Jetson profile, ONNX artifacts: how to build the engine."
    )


class FeatureStage(_Model):
    """A per-frame model in front of the artifacts (schema 2.0, optional).

    Each frame of a clip goes through one of these artifacts once (the one of the same runtime
    and precision as the artifact the device runs); the window of their feature vectors,
    ``(1, window.length, features)``, is that artifact's input. ``preprocess`` applies to the
    frames. A new frame in a sliding window is the only one whose features are computed.
    """

    artifacts: list[Artifact] = Field(
        min_length=1, description="Per-frame feature models: (1, H, W, C) -> (1, features)."
    )


class CamSpec(_Model):
    """An artifact output that holds the class activation map (schema 1.x, optional).

    The output is (1, h, w, classes): for each class c, sum_k A[h, w, k] * W[k, c] over the
    feature maps A of ``layer`` and the classifier's weights W; ReLU and upsampling are the
    device's (edge_agent.cam.cam_heatmap).
    """

    output: int = Field(ge=1, description="Index of the CAM among every artifact's outputs.")
    layer: str = Field(description="The model layer whose feature maps the map weighs.")
    upsample_to: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=2, max_length=2, description="Input height and width the map is shown at."
    )


class Provenance(_Model):
    """Where the artifacts came from: the source model, the converter, the calibration data."""

    source_sha256: str = Field(description="SHA-256 of the source model file.")
    source_format: str = Field(description="keras, savedmodel or onnx.")
    converter_version: str = Field(description="medge version that converted it.")
    calibration_sha256: str | None = Field(
        default=None, description="SHA-256 of the int8 calibration data."
    )
    calibration_count: int | None = Field(
        default=None, description="Samples the int8 calibration used."
    )
    strategy: str | None = Field(default=None, description="Which conversion strategy won.")


class ChannelSummary(_Model):
    """One channel of a signal's reference samples, before preprocessing (schema 1.4)."""

    mean: float = Field(description="Mean of every value of the channel.")
    std: float = Field(ge=0, description="Standard deviation of every value of the channel.")
    quantiles: list[float] = Field(
        description="Quantiles of every value, at the reference's quantile_levels."
    )
    window_std: list[float] = Field(
        min_length=2,
        max_length=2,
        description="The channel's std within one sample: [1st percentile, median] over samples.",
    )
    rail_share: float = Field(
        ge=0,
        le=1,
        description="The largest share of one sample's values at its own maximum or minimum "
        "(the clipping the reference data already had).",
    )
    psi_edges: list[float] = Field(
        min_length=1, description="Bin edges of the drift index: the 0.1, 1, 99, 99.9 % quantiles."
    )
    psi_shares: list[float] = Field(
        min_length=2, description="Share of the reference's values in each of those bins."
    )


class ImageSummary(_Model):
    """Pixel intensities of the reference images (or clip frames), before preprocessing."""

    range: list[float] = Field(
        min_length=2, max_length=2, description="[low, high] of the intensity histogram."
    )
    histogram: list[float] = Field(
        min_length=2,
        description="Share of pixel values in each equal bin over range (values outside it "
        "count in the end bins).",
    )
    mean: float = Field(description="Mean pixel value.")
    std: float = Field(ge=0, description="Standard deviation of the pixel values.")
    clip: bool = Field(
        default=False,
        description="Samples are clips of frames (T, H, W[, C]): the last one counts.",
    )


class ScoreSummary(_Model):
    """What the float model said on the reference data: a classifier's score distribution."""

    score_of: str = Field(description="The label whose score is binned, or 'top' (the highest).")
    histogram: list[float] = Field(
        min_length=2, description="Share of samples in each equal bin of the score over [0, 1]."
    )
    class_frequencies: dict[str, float] = Field(
        description="Share of samples predicted as each label."
    )
    count: int = Field(ge=1, description="Samples the scores come from.")
    source: Literal["evaluation", "recordings"] = Field(
        description="evaluation: the held-out evaluation samples; recordings: the request's "
        "recordings cut into windows."
    )


class Reference(_Model):
    """What the inputs and scores looked like when the model was validated (schema 1.4,
    optional): the agent's drift monitor (edge_agent.drift) compares live samples, as the
    source gives them (before preprocessing), with it."""

    kind: Literal["signal", "image"] = Field(
        description="signal: (L, C) windows, per channel; image: pixel intensities."
    )
    source: Literal["calibration", "recordings"] = Field(
        description="Which samples the inputs summary describes: the calibration samples, or "
        "the request's recordings cut into windows (the units a device's source gives)."
    )
    count: int = Field(ge=1, description="Samples the inputs summary describes.")
    quantile_levels: list[float] = Field(
        default_factory=list, description="Levels of each channel's quantiles."
    )
    channels: list[ChannelSummary] = Field(
        default_factory=list, description="signal: one summary per channel (at most 32)."
    )
    image: ImageSummary | None = Field(default=None, description="image: the intensities.")
    scores: ScoreSummary | None = Field(
        default=None, description="classification: the float model's scores."
    )


class Manifest(_Model):
    """``manifest.json``: everything a device needs to know to run the bundle's artifacts.

    Written by the converter, read and verified by the agent (:meth:`Bundle.load`); the fields
    are described in docs/bundle.md, and docs/manifest.schema.json is their JSON Schema.
    Minor schema versions only add optional fields; unknown fields are ignored.
    """

    schema_version: str = Field(description="major.minor; a device refuses another major.")
    name: str = Field(description="Model name, the bundle's first name part.")
    version: str = Field(description="Model version; the OTA updater compares it.")
    created: str = Field(description="UTC time of conversion, ISO 8601.")
    task: Task = Field(description="classification, segmentation, image_to_image or regression.")
    profile: str = Field(description="Device profile it was built for (rpi4, rpi5, jetson, x86).")
    preprocess: Preprocess = Field(description="What the agent does to each input.")
    decode: Decode = Field(description="How outputs become results and events.")
    labels: list[str] = Field(min_length=1, description="Class names, in output order.")
    positive_label: str | None = Field(
        default=None, description="The clinically positive class, for sensitivity/specificity."
    )
    artifacts: list[Artifact] = Field(
        min_length=1,
        description="Model files; a device runs the first of its runtime unless told otherwise.",
    )
    files: dict[str, FileEntry] = Field(description="Every file of the bundle but the manifest.")
    metrics: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="Validation metrics per model variant (float, int8...)."
    )
    provenance: Provenance = Field(description="Where the artifacts came from.")
    cam: CamSpec | None = Field(
        default=None, description="Optional: which output is a class activation map."
    )
    window: WindowSpec | None = Field(
        default=None, description="Optional: how a stream is cut into inputs (schema 1.2)."
    )
    feature: FeatureStage | None = Field(
        default=None,
        description="Optional: a per-frame model whose outputs, windowed, are the input (2.0).",
    )
    reference: Reference | None = Field(
        default=None,
        description="Optional: what inputs and scores looked like on the reference data (1.4).",
    )

    @property
    def positive_index(self) -> int | None:
        """Output index of ``positive_label``; None when the manifest names none."""
        return self.labels.index(self.positive_label) if self.positive_label else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    """Hash and size of one file, as the manifest records it."""
    return FileEntry(sha256=_sha256(path), bytes=path.stat().st_size)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into a bundle directory."""
    out = directory / MANIFEST_NAME
    out.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return out


def _signer_id(public: ed25519.Ed25519PublicKey) -> str:
    return key_id(public.public_bytes_raw())


def sign_bundle(directory: Path, key: ed25519.Ed25519PrivateKey) -> str:
    """Sign the manifest (which hashes every file) with Ed25519; returns the signer's key id."""
    raw = (Path(directory) / MANIFEST_NAME).read_bytes()
    signer = _signer_id(key.public_key())
    doc = {
        "alg": "Ed25519",
        "key_id": signer,
        "signature": base64.b64encode(key.sign(raw)).decode(),
    }
    (Path(directory) / SIGNATURE_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return signer


def _q(value: object) -> str:
    """An untrusted key or value, as one short printable line inside an error message."""
    return one_line(str(value), 120)


def _verify_signature(root: Path, raw: bytes, trusted: list[ed25519.Ed25519PublicKey]) -> str:
    path = root / SIGNATURE_NAME
    if not path.is_file():
        raise BundleError(f"{root}: bundle is not signed (no {SIGNATURE_NAME})")
    try:
        doc = json.loads(path.read_bytes())
        alg, signer, sig = doc["alg"], doc["key_id"], base64.b64decode(doc["signature"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: malformed signature file") from exc
    if alg != "Ed25519":
        raise BundleError(f"{path}: signature algorithm {alg!r} is not accepted")
    by_id = {_signer_id(k): k for k in trusted}
    if signer not in by_id:
        raise BundleError(f"{root}: signed by key {_q(signer)}, which this device does not trust")
    try:
        by_id[signer].verify(sig, raw)
    except InvalidSignature as exc:
        raise BundleError(f"{root}: signature does not match the manifest") from exc
    return str(signer)


class Bundle:
    """A verified bundle on disk. Construct with :meth:`load`."""

    def __init__(
        self, directory: Path, manifest: Manifest, manifest_sha256: str, signer: str | None = None
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.signer = signer

    @property
    def id(self) -> str:
        """Short identity of this exact bundle: name@version#hash-prefix."""
        return f"{self.manifest.name}@{self.manifest.version}#{self.manifest_sha256[:12]}"

    @classmethod
    def load(
        cls, directory: str | Path, trusted: list[ed25519.Ed25519PublicKey] | None = None
    ) -> Bundle:
        """Read and verify a bundle; raise :class:`BundleError` naming what failed.

        With ``trusted`` (a device always passes it), the manifest must carry a valid Ed25519
        signature by one of those keys; without it only the hashes and schema are checked.
        """
        root = Path(directory)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{root}: not a bundle (no {MANIFEST_NAME})")
        raw = path.read_bytes()
        signer = _verify_signature(root, raw, trusted) if trusted is not None else None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: manifest is not valid JSON ({_q(exc)})") from exc
        except (RecursionError, ValueError) as exc:  # nested too deep; an int of 4300+ digits
            raise BundleError(f"{path}: manifest is not valid JSON ({type(exc).__name__})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path}: manifest must be a JSON object")
        version = str(data.get("schema_version", ""))
        if version.split(".", maxsplit=1)[0] not in READS_MAJORS:
            reads = " and ".join(f"{m}.x" for m in READS_MAJORS)
            raise BundleError(
                f"{path}: schema version {_q(version) or '(missing)'} is not supported "
                f"(this agent reads {reads})"
            )
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _q(".".join(str(p) for p in first["loc"]))
            raise BundleError(f"{path}: manifest field '{where}': {_q(first['msg'])}") from exc
        _verify_files(root, manifest)
        _verify_consistency(path, manifest)
        return cls(root, manifest, hashlib.sha256(raw).hexdigest(), signer)

    def artifact(self, runtime: str, precision: str | None = None) -> Artifact:
        """The artifact for a runtime (the first listed, or the one of that precision)."""
        for art in self.manifest.artifacts:
            if art.runtime == runtime and (precision is None or art.precision == precision):
                return art
        have = ", ".join(f"{a.runtime}/{a.precision}" for a in self.manifest.artifacts)
        wanted = f"{runtime} {precision}" if precision else runtime
        raise BundleError(f"{self.directory}: no {_q(wanted)} artifact (has {_q(have)})")

    def path_of(self, artifact: Artifact) -> Path:
        return self.directory / artifact.file

    def feature_artifact(self, artifact: Artifact) -> Artifact | None:
        """The feature stage's artifact that runs in front of ``artifact`` (same runtime and
        precision); None when the bundle has no feature stage."""
        stage = self.manifest.feature
        if stage is None:
            return None
        return _feature_for(self.directory, stage, artifact)


def _feature_for(where: Path, stage: FeatureStage, artifact: Artifact) -> Artifact:
    for f in stage.artifacts:
        if f.runtime == artifact.runtime and f.precision == artifact.precision:
            return f
    have = ", ".join(f"{a.runtime}/{a.precision}" for a in stage.artifacts)
    raise BundleError(
        f"{where}: no feature artifact for {artifact.runtime}/{artifact.precision} "
        f"(the feature stage has {_q(have)})"
    )


def _verify_files(root: Path, manifest: Manifest) -> None:
    for name, entry in manifest.files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root}: file name '{_q(name)}' escapes the bundle")
        p = root / name
        if not p.is_file():
            raise BundleError(f"{root}: file '{_q(name)}' listed in the manifest is missing")
        got = file_entry(p)
        if got.sha256 != entry.sha256 or got.bytes != entry.bytes:
            raise BundleError(f"{root}: file '{_q(name)}' does not match its hash in the manifest")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    extra = sorted(present - set(manifest.files) - {MANIFEST_NAME, SIGNATURE_NAME})
    if extra:
        raise BundleError(f"{root}: file '{_q(extra[0])}' is not listed in the manifest")


def _verify_consistency(path: Path, manifest: Manifest) -> None:
    """The manifest agrees with itself: artifacts, labels, decoding and events."""
    _verify_artifacts(path, manifest)
    _verify_feature_stage(path, manifest)
    if manifest.positive_label is not None and manifest.positive_label not in manifest.labels:
        raise BundleError(f"{path}: positive_label '{_q(manifest.positive_label)}' is not a label")
    if manifest.decode.kind != manifest.task:
        raise BundleError(
            f"{path}: decode.kind '{manifest.decode.kind}' does not match task '{manifest.task}'"
        )
    for rule in manifest.decode.events:
        if rule.label not in manifest.labels:
            raise BundleError(
                f"{path}: event '{_q(rule.name)}' names unknown label '{_q(rule.label)}'"
            )
        if rule.off > rule.on:
            raise BundleError(f"{path}: event '{_q(rule.name)}' has off {rule.off} > on {rule.on}")


def _verify_artifacts(path: Path, manifest: Manifest) -> None:
    """Each artifact is hashed, has the CAM output, and as many class outputs as labels."""
    if manifest.cam is not None:
        for art in manifest.artifacts:
            if len(art.outputs) <= manifest.cam.output:
                raise BundleError(
                    f"{path}: {_q(art.file)} has no output {manifest.cam.output} (cam)"
                )
    for art in manifest.artifacts:
        if art.file not in manifest.files:
            raise BundleError(f"{path}: artifact '{_q(art.file)}' is not among the hashed files")
    if manifest.task != "classification":
        return
    for art in manifest.artifacts:
        classes = art.outputs[0].shape[-1] if art.outputs else 0
        n = len(manifest.labels)
        if classes != n and not (classes == 1 and n == 2):
            raise BundleError(
                f"{path}: {_q(art.file)} has {classes} outputs but the manifest lists {n} labels"
            )


def _verify_feature_stage(path: Path, manifest: Manifest) -> None:
    """A feature stage comes with schema 2.x and a window; every artifact has its feature
    artifact, whose one output is as wide as the artifact's input features and whose input is
    one frame; and a 2.x bundle has a feature stage (else it would be a 1.x one)."""
    stage, major = manifest.feature, manifest.schema_version.split(".", maxsplit=1)[0]
    if stage is None:
        if major != "1":
            raise BundleError(f"{path}: schema {major}.x without a feature stage")
        return
    if major == "1":
        raise BundleError(f"{path}: a feature stage needs schema {CHAIN_SCHEMA_VERSION}")
    if manifest.window is None:
        raise BundleError(f"{path}: a feature stage needs a window (frames per input)")
    if manifest.cam is not None:
        raise BundleError(f"{path}: a feature stage and a cam output cannot be combined")
    _verify_chain(path, manifest, stage, manifest.window)


def _verify_chain(path: Path, manifest: Manifest, stage: FeatureStage, window: WindowSpec) -> None:
    for f in stage.artifacts:
        if f.file not in manifest.files:
            raise BundleError(f"{path}: feature artifact '{_q(f.file)}' is not among the files")
        if len(f.inputs) != 1 or len(f.outputs) != 1 or len(f.outputs[0].shape) != 2:
            raise BundleError(
                f"{path}: feature artifact '{_q(f.file)}' must take one frame and give one "
                "(1, features) output"
            )
    for art in manifest.artifacts:
        f = _feature_for(path, stage, art)
        want = [window.length, f.outputs[0].shape[-1]]
        if len(art.inputs) != 1 or art.inputs[0].shape[1:] != want:
            raise BundleError(
                f"{path}: {_q(art.file)} takes {art.inputs[0].shape[1:]} but its feature stage "
                f"gives {want} (window length, features)"
            )
