"""The agent's one strict configuration tree, loaded from YAML. See docs/config.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.drift import DriftSettings
from edge_agent.errors import ConfigError, one_line
from edge_agent.sources import SOURCE_KINDS, SourceConfig
from edge_agent.topics import check_name

__all__ = [
    "YAML_LOADER",
    "AgentConfig",
    "BrokerConfig",
    "OutboxConfig",
    "SourceConfig",
    "load_config",
    "yaml_line_of",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    """The MQTT broker the agent publishes to, and how it reconnects when the link drops."""

    host: str = Field(default="127.0.0.1", description="MQTT broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker port.")
    protocol: Literal["5", "3.1.1", "auto"] = Field(
        default="5",
        description="MQTT protocol version; 3.1.1 for brokers without MQTT 5; auto: try 5, "
        "fall back to 3.1.1 when the broker does not speak it.",
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="Reconnect back-off base (full jitter, doubling)."
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0, description="Reconnect back-off cap: never wait longer than this."
    )
    keepalive: int = Field(default=10, ge=2, le=3600, description="Keep-alive in seconds.")
    tls: bool = Field(
        default=False,
        description="TLS with the identity's device certificate (the site broker requires it).",
    )


# The source: a union of plug-in configs discriminated by ``kind`` (no kind: npz), each model
# living next to its plug-in in edge_agent/sources/. See docs/config.md.


class OutboxConfig(_Strict):
    """The disk-backed outbox: every message waits here until the gateway acknowledges it."""

    path: Path = Field(default=Path("outbox.sqlite"), description="SQLite file of the outbox.")
    resend_after_s: float = Field(
        default=5.0, gt=0, description="Resend what the gateway has not acknowledged after this."
    )
    batch_max: int = Field(
        default=64,
        ge=1,
        description="Group commit: results written in one transaction per batch of at most this "
        "many (1: one transaction per result). Events always commit at once.",
    )
    batch_ms: float = Field(
        default=50.0,
        ge=0,
        le=10_000,
        description="Group commit: a batch closes after this many milliseconds at the latest "
        "(what a kill -9 of the agent can lose: results of the last batch_ms, never an event). "
        "0: commit as soon as the writer is free, with no wait when idle; under load a batch "
        "is what arrives while the previous commit runs.",
    )
    max_mb: float | None = Field(
        default=None,
        gt=0,
        description="Quota of stored messages in MiB; over it the oldest routine results are "
        "dropped (counted), never events. None: no quota.",
    )
    max_messages: int | None = Field(
        default=None, ge=1, description="Quota in messages, same policy as max_mb."
    )


class AgentConfig(_Strict):
    """The agent's configuration file (YAML; :func:`load_config`): which bundle to run on which
    source, the identity it speaks with, and where it sends. Unknown keys are errors.

    Fields are described in docs/config.md; docs/agent-config.schema.json is the JSON Schema.
    Relative paths are read from the config file's directory.
    """

    site: str = Field(description="Site (hospital, ward) this device belongs to.")
    device: str = Field(description="This device's name, unique in its site.")
    bundle: Path = Field(
        description="Directory of the bundle to run (must be signed by a "
        "key in the identity's bundle-signers/)."
    )
    identity: Path = Field(description="Identity directory from 'medge device provision'.")
    end_to_end: bool = Field(
        default=False,
        description="Seal bodies to the cloud key in the identity (recipient.json); the fog "
        "gateway relays them unread and routes on the signed header (docs/security.md).",
    )
    epoch_messages: int = Field(
        default=100_000, ge=1, description="Rotate the envelope key after this many messages."
    )
    runtime: Literal["litert", "onnx"] = Field(
        default="litert", description="Inference backend: LiteRT (XNNPACK) or ONNX Runtime."
    )
    precision: Literal["fp32", "fp16", "int8", "int16x8", "dynamic"] | None = Field(
        default=None, description="Which artifact of that runtime (default: the first listed)."
    )
    threads: int = Field(default=1, ge=1, le=64, description="Inference threads.")
    broker: BrokerConfig = Field(
        default_factory=BrokerConfig, description="The MQTT broker results go to."
    )
    source: SourceConfig = Field(description="Where inputs come from; `kind` picks the source.")
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="The durable queue of sealed results."
    )
    telemetry_interval_s: float = Field(default=2.0, gt=0, description="Telemetry period.")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port (0: any free port); None: off.",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the metrics endpoint listens on."
    )
    rollback_failures: int = Field(
        default=3,
        ge=1,
        description="After an update, go back to the previous bundle when the new one fails "
        "on this many samples ...",
    )
    rollback_within: int = Field(
        default=50, ge=1, description="... among the first this many samples after the swap."
    )
    cam: bool = Field(
        default=True,
        description="Add the class activation heatmap (a small PNG, never the frame) to each "
        "result when the bundle has one (convert --cam); false: leave it out.",
    )
    thumbnails: bool = Field(
        default=True,
        description="Add a small picture of the model's input (grey or RGB PNG, at most 64 "
        "pixels a side, sealed in the body like the rest) to each result of an image model "
        "(classification or segmentation of 2-D images); false: leave it out.",
    )
    pictures_max_hz: float | None = Field(
        default=10.0,
        gt=0,
        description="At most this many results a second carry the thumbnail and the CAM; a "
        "result of the bundle's positive_label, or whose class differs from the one before, "
        "always does. Results left without are counted (telemetry pictures.capped). null: "
        "every result (a fast model at thousands of samples a second then spends most of its "
        "time on pictures).",
    )
    drift: DriftSettings | None = Field(
        default_factory=DriftSettings,
        description="Watch the inputs and scores against the bundle's reference (its "
        "calibration data's summary) and check signal quality; warnings go out as "
        "input_drift / signal_quality events, state in telemetry inputs (docs/device.md). "
        "null: off.",
    )
    float_check_share: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Where the running bundle also ships a float (fp32) artifact for this "
        "runtime, run it on this share of samples too and report how often it agrees with "
        "the quantized model (telemetry float_check), so a quantization problem on real "
        "inputs is seen; at most a quarter of the quantized model's inference time is spent "
        "on it. 0: off.",
    )

    @field_validator("site", "device")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name("name", v)
        except Exception as exc:
            raise ValueError(str(exc)) from exc


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML has it


def load_config(path: str | Path) -> AgentConfig:
    """Load and validate a YAML file; errors name the field and its line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data: Any = yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})".replace("\n", " ")) from exc
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # not UTF-8, too deep,
        raise ConfigError(f"{p}: not valid YAML ({type(exc).__name__})") from exc  # huge int
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    try:
        cfg = AgentConfig.model_validate(data)
    except RecursionError as exc:  # libyaml nests without limit; the model does not
        raise ConfigError(f"{p}: nested too deeply to be an agent config") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"]]
        if loc[:1] == ["source"] and len(loc) > 2 and loc[1] in SOURCE_KINDS:
            del loc[1]  # the union's tag: the YAML has no such key
        try:
            line = yaml_line_of(yaml.compose(text, Loader=YAML_LOADER), loc)  # again, for the line
        except (yaml.YAMLError, RecursionError, ValueError):
            line = None
        where = f"{p}:{line}" if line else str(p)
        raise ConfigError(one_line(f"{where}: {'.'.join(loc)}: {err['msg']}", 500)) from exc
    base = p.parent
    return cfg.model_copy(
        update={
            "bundle": base / cfg.bundle,
            "identity": base / cfg.identity,
            "source": cfg.source.resolve(base),
            "outbox": cfg.outbox.model_copy(update={"path": base / cfg.outbox.path}),
        }
    )


def yaml_line_of(node: Any, loc: list[str]) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (the agent's and the gateway's
    config loaders point at the line with it)."""
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == key:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line
