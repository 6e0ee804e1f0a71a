"""What the agent checks when it starts, checked without starting it (`medge agent check-config`).

:func:`preflight` does what :class:`edge_agent.agent.Agent` does before it runs, in the same
order and with the same code, so a config that passes here does not fail there on any of them:

1. the identity: device key (mode 0600 or stricter), certificate for this site/device, issued by
   the site CA, recipient key (``DeviceIdentity.load``);
2. the bundle against the identity's trusted signers: signature, schema major version, the
   hash and size of every file (``Bundle.load``);
3. the artifact for the configured runtime and precision, opened by its runtime
   (``LoadedModel``);
4. the source, built as the agent builds it: files present, sampling rate against the bundle's
   ``window.rate_hz``, the window from the bundle unless the config sets it (``open_source``;
   constructors read files but open no camera, socket or serial port).

Each failure is the agent's own :class:`MedgeError`, one line. The broker is only tried: a TCP
connect with a short timeout whose failure is a warning, not an error (the agent retries and its
outbox keeps results meanwhile).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from edge_agent.bundle import Bundle
from edge_agent.config import AgentConfig
from edge_agent.identity import DeviceIdentity
from edge_agent.model import LoadedModel
from edge_agent.sources import open_source, window_plan
from edge_agent.window import Setting

__all__ = ["Preflight", "broker_reachable", "preflight"]


@dataclass
class Preflight:
    """What the agent would run, as checked: bundle, signers, window, preprocessing."""

    bundle: Bundle
    signers: int
    artifact: str
    source: str
    window: list[Setting]
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report, one line each (no warnings: :attr:`warnings` holds those)."""
        m = self.bundle.manifest
        files = len(m.files)
        out = [
            f"bundle {self.bundle.id}: signature verified against {self.signers} trusted "
            f"signer(s), {files} file hash(es) checked; artifact {self.artifact}",
            f"source {self.source}",
        ]
        if self.window:
            out.append("window: " + ", ".join(s.describe() for s in self.window))
        else:
            out.append("window: none (each sample is one input)")
        pre = m.preprocess.model_dump(exclude_none=True)
        out.append(f"preprocess: {_kv(pre)} (bundle)")
        decode = [f"activation {m.decode.activation}"]
        if m.decode.threshold is not None:
            decode.append(f"threshold {m.decode.threshold}")
        decode += [f"event {e.name} on {e.on} off {e.off}" for e in m.decode.events]
        out.append(f"decode: {', '.join(decode)} (bundle)")
        return out

    def to_json(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "bundle": self.bundle.id,
            "signers": self.signers,
            "files": len(m.files),
            "artifact": self.artifact,
            "source": self.source,
            "window": [
                {"name": s.name, "value": s.value, "origin": s.origin, "bundle": s.bundle}
                for s in self.window
            ],
            "preprocess": m.preprocess.model_dump(exclude_none=True),
            "decode": m.decode.model_dump(exclude_none=True),
            "warnings": self.warnings,
        }


def _kv(d: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" if k != "kind" else str(v) for k, v in d.items())


def broker_reachable(host: str, port: int, timeout_s: float = 2.0) -> str | None:
    """None when a TCP connection to the broker opens within ``timeout_s``, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def preflight(cfg: AgentConfig, broker_timeout_s: float = 2.0) -> Preflight:
    """Check ``cfg`` as the agent's start does (see the module docstring); raise the agent's
    error on the first problem, return what would run and the warnings. A window setting the
    config overrides is logged as the agent logs it (one warning line each)."""
    ident = DeviceIdentity.load(cfg.identity, cfg.site, cfg.device)
    bundle = Bundle.load(cfg.bundle, trusted=ident.signers)
    model = LoadedModel(bundle, cfg.runtime, cfg.threads, cfg.precision)
    source = open_source(cfg.source, bundle.manifest.window, bundle.manifest.labels)
    plan = window_plan(cfg.source, bundle.manifest.window)
    art = model.artifact
    runs = f"{art.file} ({art.runtime} {art.precision})"
    if model.feature is not None:  # a chained bundle: each frame's features, then the window
        runs = f"{model.feature.artifact.file} per frame -> {runs}"
    report = Preflight(bundle, len(ident.signers), runs, source.name, plan)
    b = cfg.broker
    why = broker_reachable(b.host, b.port, broker_timeout_s)
    if why is not None:
        report.warnings.append(
            f"broker {b.host}:{b.port} not reachable ({why}); the agent would keep retrying "
            "and hold results in its outbox"
        )
    return report
