"""``medge gateway check-config FILE``: validate gateway.yaml and check what the fog node's
services need on start, without starting them (docs/gateway-config.md).

Each failure is one :class:`MedgeError` line. Nothing is created or issued: a SQLite store
not there yet is reported as created on the first run; the broker is only tried (a TCP
connection), and an unreachable one is a warning: the gateway retries with back-off."""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError, one_line
from gateway.config import DashboardConfig, GatewayConfig, is_db_url, load_node_config

__all__ = ["NodeCheck", "check_node"]

_PRIVATE = ("ca.key", "recipient.json", "bundle-signer.key", "gateway.key", "forwarder.key")


@dataclass
class NodeCheck:
    summary: str = ""
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "checks": self.lines, "warnings": self.warnings}


def _private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise MedgeError(f"{path}: cannot read key ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MedgeError(f"{path}: private key is readable by others (chmod 600 {path})")


def _readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise MedgeError(f"{what} {path}: cannot read ({exc.strerror})") from exc


def check_store(target: Path | str) -> str:
    """One line on the store: reachable (a read), or a SQLite file still to be created."""
    from gateway.db import connect, redact

    if isinstance(target, str) and is_db_url(target):
        try:
            db = connect(target, timeout=5.0)
            try:
                db.execute("SELECT 1").fetchone()
            finally:
                db.close()
        except Exception as exc:
            raise MedgeError(
                one_line(f"store {redact(target)}: not reachable ({type(exc).__name__}: {exc})")
            ) from exc
        return f"store {redact(target)}: reachable (PostgreSQL)"
    path = Path(target)
    if not path.exists():
        if not path.parent.is_dir():
            raise MedgeError(f"store {path}: its directory {path.parent} does not exist")
        return f"store {path}: not there yet, created on the first run"
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5) as conn:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        raise MedgeError(f"store {path}: not a readable SQLite database ({exc})") from exc
    return f"store {path}: readable (SQLite, {tables} schema objects)"


def check_gateway(cfg: GatewayConfig, broker_timeout_s: float, out: NodeCheck) -> None:
    from gateway.node import build_opener, build_rules
    from gateway.site import site_name

    cfg.check_combination()
    site = site_name(cfg.site_dir)
    for name in _PRIVATE:
        if (cfg.site_dir / name).exists():
            _private(cfg.site_dir / name)
    for p in sorted((cfg.site_dir / "recipients").glob("*.json")):
        _private(p)
    for p in cfg.cloud_key:
        _private(p)
    build_opener(cfg)  # every key the worker opens envelopes with, the CA and the CRL
    devices = len(list((cfg.site_dir / "devices").glob("*.crt")))
    out.summary = f"site {site}, tier {cfg.tier}"
    out.lines.append(
        f"site {cfg.site_dir}: {devices} registered device(s), private keys "
        "0600 or stricter, envelope keys loaded"
    )
    rules = build_rules(cfg)
    out.lines.append(
        f"alerts: silence after {rules.silence_after:g} s"
        + (f", rules {cfg.alerts.rules}" if cfg.alerts.rules else "")
    )
    _check_broker(cfg, broker_timeout_s, out)
    out.lines.append(check_store(cfg.store.target()))
    if cfg.forward.to is not None:
        _check_forward(cfg, out)
    if cfg.outputs is not None:
        _check_outputs(cfg, out)
    if cfg.metrics.port is not None:
        out.lines.append(f"metrics on {cfg.metrics.host}:{cfg.metrics.port}")


def _check_broker(cfg: GatewayConfig, broker_timeout_s: float, out: NodeCheck) -> None:
    from edge_agent.preflight import broker_reachable

    b = cfg.broker
    if b.tls:
        for p in (cfg.site_dir / "gateway.crt", cfg.site_dir / "gateway.key"):
            if not p.exists():
                out.warnings.append(f"{p} not there yet: issued on the first run (--tls)")
    why = broker_reachable(b.host, b.port, broker_timeout_s)
    if why is not None:
        out.warnings.append(
            f"broker {b.host}:{b.port} not reachable ({why}); the gateway would keep retrying"
        )
    out.lines.append(
        f"broker {b.host}:{b.port} (MQTT {b.protocol}"
        f"{', TLS' if b.tls else ''}, client id {b.client_id}"
        f"{', group ' + b.share_group if b.share_group else ''})"
        f"{'' if why is None else ': not reachable now'}"
    )


def _check_forward(cfg: GatewayConfig, out: NodeCheck) -> None:
    if cfg.forward.tls is not None:
        for p in cfg.forward.tls.files():
            _readable(p, "forward TLS file")
        _private(cfg.forward.tls.key)
    outbox = cfg.forward_outbox()
    if not outbox.parent.is_dir():
        raise MedgeError(f"forward outbox {outbox}: its directory does not exist")
    out.lines.append(
        f"forward to {cfg.forward.to} through {outbox}"
        + (f", backfill since {cfg.forward.backfill}" if cfg.forward.backfill else "")
    )


def _check_outputs(cfg: GatewayConfig, out: NodeCheck) -> None:
    """The clinical outputs: source keys private and loadable, secret files readable and
    private, the outbox's folder there. The PACS and FHIR servers are not called."""
    o = cfg.outputs
    assert o is not None
    for p in o.source_key:
        _private(p)
    keys = o.source_keys()  # ConfigError naming a file without a private key
    secrets: list[Path | None] = [o.pacs.password_file] if o.pacs is not None else []
    if o.fhir is not None:
        secrets += [o.fhir.token_file, o.fhir.basic_auth_file]
    for secret in secrets:
        if secret is not None:
            _readable(secret, "outputs secret")
            _private(secret)
    outbox = cfg.clinical_outbox()
    if not outbox.parent.is_dir():
        raise MedgeError(f"clinical outbox {outbox}: its directory does not exist")
    to = []
    if o.pacs is not None:
        to.append(f"PACS {o.pacs.url} ({o.pacs.send})")
    if o.fhir is not None:
        to.append(f"FHIR {o.fhir.base_url} ({len(o.fhir.models)} model(s))")
    out.lines.append(
        f"outputs to {' and '.join(to) or 'nothing'} through {outbox}; {len(keys)} source key(s)"
    )
    if o.fhir is not None and not o.fhir.patients:
        out.warnings.append(
            "outputs.fhir.patients is empty: Observations will have no subject "
            "(docs/outputs.md, 'Patient mapping')"
        )


def check_dashboard(cfg: DashboardConfig, out: NodeCheck) -> None:
    from gateway.dashboard.app import check_access

    users = check_access(cfg.users, cfg.allow_anonymous)  # the users file: mode, format
    who = f"users {cfg.users}" if users is not None else "anonymous (local tests only)"
    out.lines.append(f"dashboard on {cfg.host}:{cfg.port}, {who}; " + check_store(cfg.target()))


def check_node(path: Path, broker_timeout_s: float = 2.0) -> NodeCheck:
    """Load ``path`` strictly, then check each section it has."""
    node = load_node_config(path)
    if node.gateway is None and node.dashboard is None:
        raise MedgeError(f"{path}: neither a gateway: nor a dashboard: section")
    out = NodeCheck()
    if node.gateway is not None:
        check_gateway(node.gateway, broker_timeout_s, out)
    if node.dashboard is not None:
        dash = node.dashboard
        if dash.db is None and node.gateway is not None:
            dash = dash.model_copy(update={"db": node.gateway.store.db})
        check_dashboard(dash, out)
        out.summary = ", ".join(x for x in (out.summary, "dashboard") if x)
    return out
