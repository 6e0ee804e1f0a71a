"""The fog node's one strict configuration tree, loaded from YAML (docs/gateway-config.md).

One file, ``gateway.yaml``, holds both services of a fog node: a ``gateway:`` section
(``medge gateway run --config``) and a ``dashboard:`` section (``medge dashboard --config``).
They share the store, so the store is named once: the dashboard reads the gateway's
``store.db`` unless its own ``db`` says otherwise. Every key is checked (unknown keys are
errors); an error names the file, the line and the key. A flag given on the command line
overrides the file, key by key (flag > file > default): the loaders take those as
``overrides``, dotted keys of the section (``{"broker.host": "10.0.0.2"}``). Relative paths
in the file are relative to the file; those given as flags, to the working directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.config import YAML_LOADER, yaml_line_of
from edge_agent.errors import ConfigError, one_line
from gateway.clinical.settings import OutputsSettings

__all__ = [
    "AlertSettings",
    "BatchingSettings",
    "BrokerSettings",
    "DashboardConfig",
    "ForwardSettings",
    "ForwardTls",
    "GatewayConfig",
    "LimitSettings",
    "MetricsSettings",
    "NodeConfig",
    "RolloutSettings",
    "StoreSettings",
    "is_db_url",
    "load_dashboard_config",
    "load_gateway_config",
    "load_node_config",
    "parse_host_port",
]


def is_db_url(db: str) -> bool:
    """A PostgreSQL URL (kept as text) rather than a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def parse_host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for the default host)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or default_host, int(port)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Strict):
    """The site's MQTT broker: where devices publish and the gateway subscribes."""

    host: str = Field(default="127.0.0.1", description="The site's MQTT broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="The site's MQTT broker port.")
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT protocol version (3.1.1 for brokers without MQTT 5)."
    )
    tls: bool = Field(
        default=False,
        description="Connect with the site's gateway certificate (site broker from 'medge "
        "gateway broker-config').",
    )
    client_id: str = Field(
        default="medge-gateway", min_length=1, description="MQTT client id of this worker."
    )
    share_group: str | None = Field(
        default=None,
        min_length=1,
        description="MQTT 5 shared-subscription group for several workers of one site.",
    )


class StoreSettings(_Strict):
    """Where results, devices and alerts are stored: SQLite file or PostgreSQL URL."""

    db: str = Field(
        default="gateway.sqlite",
        min_length=1,
        description="A SQLite file (also sqlite:///FILE) or a PostgreSQL URL "
        "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB shared by several gateway workers.",
    )

    @field_validator("db")
    @classmethod
    def _sqlite_prefix(cls, v: str) -> str:
        return v if is_db_url(v) else v.removeprefix("sqlite:///")

    def target(self) -> Path | str:
        """What :class:`gateway.store.Store` opens: a URL as text, a SQLite file as a Path."""
        return self.db if is_db_url(self.db) else Path(self.db)


class LimitSettings(_Strict):
    """Per-device and per-message limits that keep one device from starving the rest."""

    device_rate: float = Field(
        default=100.0,
        ge=0,
        allow_inf_nan=False,
        description="Flood limit per device, messages per second (0: no limit); messages over "
        "it are not acknowledged, so the device resends them.",
    )
    device_burst: float = Field(
        default=1000.0,
        ge=1,
        allow_inf_nan=False,
        description="Messages a device may send at once above its rate.",
    )


class BatchingSettings(_Strict):
    """How the writer groups messages into one transaction (and one ack per device)."""

    window: float = Field(
        default=0.005,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="Used only with when_idle: gather results this many seconds into one "
        "store commit. Without it (the default) the writer commits at once whatever is "
        "waiting, and what arrives during a commit goes into the next (group commit).",
    )
    when_idle: bool = Field(
        default=False,
        description="Wait the window before every commit (a fixed window, as earlier "
        "versions did; for comparison: higher latency, less CPU at a steady rate).",
    )
    max: int = Field(default=500, ge=1, description="At most this many results per commit.")


class AlertSettings(_Strict):
    """When a device counts as silent, and the site's own alert rules."""

    silence_after: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Alert when a device sends nothing for this many seconds (the rules "
        "file's silence_after wins).",
    )
    rules: Path | None = Field(
        default=None,
        description="Alert rules file: severity per event kind, silence, offline "
        "(docs/dashboard.md, 'Alerts').",
    )


class ForwardTls(_Strict):
    """TLS files for the connection to the cloud tier's broker."""

    ca: Path = Field(description="CA certificate of the cloud broker.")
    cert: Path = Field(description="Client certificate of this fog gateway's forwarder.")
    key: Path = Field(description="Its private key.")

    def files(self) -> tuple[Path, Path, Path]:
        return self.ca, self.cert, self.key


class ForwardSettings(_Strict):
    """Forwarding stored results to the cloud tier through a durable outbox."""

    to: str | None = Field(
        default=None,
        description="HOST:PORT of the cloud broker: forward every stored result and event "
        "through an outbox on disk, deleted only on the cloud gateway's ack. None: off.",
    )
    outbox: Path | None = Field(
        default=None,
        description="The forward outbox (default: DB.forward.sqlite beside a SQLite store).",
    )
    tls: ForwardTls | None = Field(default=None, description="TLS to the cloud broker.")
    resend_after: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        description="Resend to the cloud what it has not acknowledged after this many seconds.",
    )
    backfill: str | None = Field(
        default=None,
        description="Also queue the results already stored since then (all, 30m, 24h, 7d, an "
        "ISO date/time or a Unix time); the cloud keeps each once.",
    )

    @field_validator("to")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v

    @field_validator("backfill")
    @classmethod
    def _since(cls, v: str | None) -> str | None:
        if v is not None:
            from gateway.forward import parse_since

            try:
                parse_since(v)
            except Exception as exc:
                raise ValueError(str(exc)) from exc
        return v


class MetricsSettings(_Strict):
    """The Prometheus metrics and /healthz endpoint."""

    port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics and /healthz on this port (0: any free port); "
        "None: off.",
    )
    host: str = Field(default="127.0.0.1", description="Address of the metrics endpoint.")


class RolloutSettings(_Strict):
    """Staged rollouts (docs/rollouts.md): this gateway drives them and serves their bundles."""

    bundles: Path | None = Field(
        default=None,
        description="Folder of the packed bundles 'medge gateway rollout start' writes and "
        "this gateway serves (default: DB.bundles/ beside a SQLite store).",
    )
    http_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - devices must reach it
        description="Address the bundles are served on over HTTP.",
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="Port they are served on (0: any free port)."
    )
    url_host: str | None = Field(
        default=None,
        description="Host name or address devices fetch bundles by (default: http_host, or "
        "this machine's address toward the broker when http_host is all addresses).",
    )
    poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="Seconds between two looks at the store's rollouts.",
    )


class GatewayConfig(_Strict):
    """``medge gateway run``: one gateway worker."""

    site_dir: Path = Field(
        description="Site directory (from 'medge site init'): keys and registered devices."
    )
    tier: Literal["fog", "cloud"] = Field(
        default="fog",
        description="fog: the site's gateway; cloud: the tier that stores what fog gateways "
        "forward and acknowledges it (docs/forwarding.md).",
    )
    broker: BrokerSettings = Field(
        default_factory=BrokerSettings, description="The broker devices publish to."
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description="Where results go.")
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Flood limit per device."
    )
    batching: BatchingSettings = Field(
        default_factory=BatchingSettings, description="Group commit of results."
    )
    alerts: AlertSettings = Field(default_factory=AlertSettings, description="Alert rules.")
    forward: ForwardSettings = Field(
        default_factory=ForwardSettings, description="Forwarding to the cloud tier."
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="The Prometheus endpoint."
    )
    relay_for: list[Path] = Field(
        default_factory=list,
        description="End-to-end mode: accept messages sealed to these public keys (the "
        "cloud's) unread, checking each device signature.",
    )
    cloud_key: list[Path] = Field(
        default_factory=list,
        description="Also open messages sealed to these private keys (the cloud's, from "
        "'medge site cloud-key').",
    )
    outputs: OutputsSettings | None = Field(
        default=None,
        description="Clinical outputs: DICOM objects to a PACS, FHIR resources to an EHR "
        "(docs/outputs.md).",
    )
    rollouts: RolloutSettings | None = Field(
        default=None,
        description="Staged rollouts: drive them from this gateway (docs/rollouts.md). None: off.",
    )

    def check_combination(self) -> None:
        """What no single field can say; raises ConfigError."""
        if self.tier == "cloud" and (self.relay_for or self.forward.to):
            raise ConfigError(
                "--tier cloud opens every message itself: no --relay-for/"
                "--forward-to (tier cloud: no relay_for/forward.to)"
            )
        if self.forward.backfill and not self.forward.to:
            raise ConfigError(
                "--backfill re-queues stored results for the cloud: add "
                "--forward-to (forward.backfill needs forward.to)"
            )
        if self.forward.to and self.forward.outbox is None and is_db_url(self.store.db):
            raise ConfigError(
                "--forward-to with a PostgreSQL --db needs --forward-outbox FILE "
                "(forward.outbox): the forward outbox is a file on this "
                "gateway's own disk"
            )
        out = self.outputs
        if out is not None and out.outbox is None and is_db_url(self.store.db):
            raise ConfigError(
                "outputs with a PostgreSQL store need outputs.outbox FILE: the clinical "
                "outbox is a file on this gateway's own disk"
            )
        ro = self.rollouts
        if ro is not None and ro.bundles is None and is_db_url(self.store.db):
            raise ConfigError(
                "rollouts with a PostgreSQL store need rollouts.bundles FOLDER: the bundles "
                "are served from this gateway's own disk"
            )
        if out is not None and out.pacs is not None and self.tier == "cloud":
            raise ConfigError(
                "outputs.pacs is for the fog tier: the cloud tier cannot open the source UIDs "
                "that DICOM objects reference (docs/outputs.md)"
            )

    def rollout_bundles(self) -> Path:
        """The rollouts' bundles folder: rollouts.bundles, else DB.bundles/ beside a SQLite
        store."""
        if self.rollouts is not None and self.rollouts.bundles is not None:
            return self.rollouts.bundles
        db = Path(self.store.db)
        return db.with_name(db.stem + ".bundles")

    def clinical_outbox(self) -> Path:
        """The clinical outbox: outputs.outbox, else DB.clinical.sqlite beside a SQLite store."""
        if self.outputs is not None and self.outputs.outbox is not None:
            return self.outputs.outbox
        db = Path(self.store.db)
        return db.with_name(db.stem + ".clinical.sqlite")

    def forward_outbox(self) -> Path:
        """The forward outbox: as set, else DB.forward.sqlite beside a SQLite store."""
        if self.forward.outbox is not None:
            return self.forward.outbox
        db = Path(self.store.db)
        return db.with_name(db.stem + ".forward.sqlite")


class DashboardConfig(_Strict):
    """``medge dashboard``: the web page over a gateway store."""

    db: str | None = Field(
        default=None,
        description="The store to show (a SQLite file or a PostgreSQL URL); default: the "
        "gateway section's store.db, else gateway.sqlite.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port (0: any free port).")
    users: Path | None = Field(
        default=None, description="Users file (from 'medge dashboard add-user')."
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without login (local tests only: the data is patient-derived).",
    )
    title: str = Field(default="medge", description="Title shown on the page.")
    trusted_proxy: list[str] = Field(
        default_factory=list,
        description="Reverse proxies (ADDRESS[/BITS]) whose X-Forwarded-For/-Proto are "
        "believed; from anyone else they are ignored.",
    )
    secure_cookies: bool = Field(
        default=False, description="Mark the session cookie Secure (the page is reached over TLS)."
    )

    @field_validator("db")
    @classmethod
    def _sqlite_prefix(cls, v: str | None) -> str | None:
        return v if v is None or is_db_url(v) else v.removeprefix("sqlite:///")

    def target(self) -> Path | str:
        db = self.db or "gateway.sqlite"
        return db if is_db_url(db) else Path(db)


class NodeConfig(_Strict):
    """The whole file: either section may be left out (it is then not configured)."""

    gateway: GatewayConfig | None = Field(default=None, description="The gateway service.")
    dashboard: DashboardConfig | None = Field(default=None, description="The dashboard service.")


# -- loading -------------------------------------------------------------------------------

_GATEWAY_PATHS = (
    "site_dir",
    "store.db",
    "alerts.rules",
    "forward.outbox",
    "forward.tls.ca",
    "forward.tls.cert",
    "forward.tls.key",
    "relay_for",
    "cloud_key",
    "outputs.source_key",
    "outputs.outbox",
    "outputs.pacs.ca_file",
    "outputs.pacs.password_file",
    "outputs.fhir.token_file",
    "outputs.fhir.basic_auth_file",
    "outputs.fhir.ca_file",
    "rollouts.bundles",
)
_DASHBOARD_PATHS = ("db", "users")


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(one_line(f"{path}: not valid YAML ({exc})", 500)) from exc
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (gateway:, dashboard:)")
    return text, data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def _get(data: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def _rebase(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_rebase(v, base) for v in value]
    if isinstance(value, str) and not is_db_url(value):
        value = value.removeprefix("sqlite:///")
    if isinstance(value, (str, Path)) and not Path(value).is_absolute():
        return str(base / value)
    return value


def load_node_config(
    path: str | Path | None,
    gateway: dict[str, Any] | None = None,
    dashboard: dict[str, Any] | None = None,
) -> NodeConfig:
    """The whole file, validated, with ``gateway``/``dashboard`` overrides (dotted keys of
    each section, from flags) applied over it; paths of the file made relative to it.
    Raises ConfigError naming the file:line (or the flag) and the key."""
    p = Path(path) if path is not None else None
    text, data = _read(p) if p is not None else ("", {})
    if p is not None:  # paths in the file are relative to it: rebased before flags go over them
        _rebase_paths(data, p.parent)
    overridden = _apply_overrides(data, gateway, dashboard)
    try:
        cfg = NodeConfig.model_validate(data)
    except RecursionError as exc:
        raise ConfigError(f"{p}: nested too deeply to be a gateway config") from exc
    except ValidationError as exc:
        raise ConfigError(_explain(exc, p, text, overridden)) from exc
    return cfg


def _rebase_paths(data: dict[str, Any], base: Path) -> None:
    for section, keys in (("gateway", _GATEWAY_PATHS), ("dashboard", _DASHBOARD_PATHS)):
        sec = data.get(section)
        if isinstance(sec, dict):
            for dotted in keys:
                value = _get(sec, dotted)
                if value is not None and isinstance(value, (str, list)):
                    _set(sec, dotted, _rebase(value, base))


def _apply_overrides(
    data: dict[str, Any], gateway: dict[str, Any] | None, dashboard: dict[str, Any] | None
) -> set[tuple[str, ...]]:
    """Flags over the file; returns the (section, *key) paths they set."""
    overridden: set[tuple[str, ...]] = set()
    for section, over in (("gateway", gateway), ("dashboard", dashboard)):
        if not over:
            continue
        if not isinstance(data.get(section), dict):
            data[section] = {}
        for dotted, value in over.items():
            _set(data[section], dotted, value)
            overridden.add((section, *dotted.split(".")))
    return overridden


def _explain(
    exc: ValidationError, p: Path | None, text: str, overridden: set[tuple[str, ...]]
) -> str:
    """One line for the first error: the flag that set the key, or the file's line."""
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"]]
    flag = next((o for o in overridden if tuple(loc[: len(o)]) == o), None)
    if flag is not None:
        where = f"{p}: " if p is not None else ""
        return one_line(f"{where}{'.'.join(loc[1:])} (from the command line): {err['msg']}", 500)
    line = None
    if p is not None:
        try:
            line = yaml_line_of(yaml.compose(text, Loader=YAML_LOADER), loc)
        except (yaml.YAMLError, RecursionError, ValueError):
            line = None
    where = f"{p}:{line}" if line else str(p) if p is not None else "config"
    return one_line(f"{where}: {'.'.join(loc)}: {err['msg']}", 500)


def load_gateway_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> GatewayConfig:
    """The ``gateway:`` section of ``path`` (None: no file, flags and defaults only) with
    ``overrides`` over it; checked as a whole (:meth:`GatewayConfig.check_combination`)."""
    cfg = load_node_config(path, gateway=overrides or {})
    if cfg.gateway is None:
        raise ConfigError(f"{path}: no gateway: section (it names at least site_dir)")
    cfg.gateway.check_combination()
    return cfg.gateway


def load_dashboard_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> DashboardConfig:
    """The ``dashboard:`` section (None: no file) with ``overrides``; without its own ``db``,
    the gateway section's ``store.db``."""
    cfg = load_node_config(path, dashboard=overrides or {})
    dash = cfg.dashboard or DashboardConfig()
    if dash.db is None and cfg.gateway is not None:
        dash = dash.model_copy(update={"db": cfg.gateway.store.db})
    return dash
