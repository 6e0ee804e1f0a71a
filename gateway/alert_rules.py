"""The gateway's alert rules: which conditions raise alerts, and how severe they are.

An event raises an alert by what the device's bundle says, not by its name: every event
message whose rule is marked ``alert: true`` raises one, at the ``severity`` its rule gives
(``decode.events[].severity`` in the manifest, default ``critical``). A site may override that
per event kind in a rules file (``medge gateway run --alert-rules FILE.yaml``)::

    default_severity: critical   # an alerting event that names no severity (older agents,
                                 # relays that cannot read the body)
    events:                      # per event kind: a severity that replaces the bundle's,
      pvc_run: warning           # or ignore (recorded, never raised)
      cough: ignore
    silence_after: 30            # seconds without any message: the device is silent
    silent_severity: warning
    offline_severity: warning

The file is strict (unknown keys refused, the offending key named). The gateway records the
rules it runs with in the audit log (action ``alert-rules``), so the dashboard shows them
(``/api/alert-rules``) and a change of rules is on the record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import MedgeError, one_line

__all__ = [
    "IGNORE",
    "SEVERITIES",
    "AlertError",
    "AlertRules",
    "AlertRulesFile",
    "check_severity",
    "load_alert_rules",
    "rules_json",
]

SEVERITIES = ("critical", "warning", "info")  # most urgent first
IGNORE = "ignore"
"""An event rule's override that records the event but raises no alert."""

Severity = Literal["critical", "warning", "info"]


class AlertError(MedgeError):
    """An alert cannot change to the state asked for (or a rule is misconfigured)."""


def check_severity(value: object) -> str:
    if value not in SEVERITIES:
        raise AlertError(one_line(f"severity {value!r} is not one of {', '.join(SEVERITIES)}"))
    return str(value)


@dataclass(frozen=True)
class AlertRules:
    """Which conditions raise alerts, and how severe they are."""

    events: Mapping[str, str] = field(default_factory=dict)
    """event kind -> severity replacing the bundle's, or ``ignore``; kinds not listed follow
    the bundle (the message's ``alert`` and ``severity``)"""
    default_severity: str = "critical"
    """severity of an alerting event whose message names none (or one not known here)"""
    silence_after: float = 30.0
    """seconds without any message from a device before it is reported silent"""
    silent_severity: str = "warning"
    offline_severity: str = "warning"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.silence_after) and self.silence_after > 0):
            raise AlertError(f"silence_after must be > 0 seconds, not {self.silence_after!r}")
        for kind, severity in self.events.items():
            if severity != IGNORE:
                check_severity(severity)
            if not isinstance(kind, str) or not kind:
                raise AlertError(one_line(f"event kind {kind!r} must be a non-empty name"))
        for severity in (self.default_severity, self.silent_severity, self.offline_severity):
            check_severity(severity)

    def event_severity(self, kind: str, given: object) -> tuple[str | None, str]:
        """The severity of an alerting event of ``kind`` whose message says ``given``, and
        where it came from (``rule``, ``bundle``, ``default``); None: the site ignores it."""
        if kind in self.events:
            chosen = self.events[kind]
            return (None if chosen == IGNORE else chosen), "rule"
        if given in SEVERITIES:
            return str(given), "bundle"
        return self.default_severity, "default"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events"] = dict(self.events)
        return out


class AlertRulesFile(BaseModel):
    """The rules file (YAML), strict: an unknown or mistyped key is refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    default_severity: Severity = Field(
        default="critical", description="Severity of an alerting event that names none."
    )
    events: dict[str, Severity | Literal["ignore"]] = Field(
        default_factory=dict,
        description="Per event kind: a severity replacing the bundle's, or 'ignore'.",
    )
    silence_after: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds without any message before a device is silent (default: "
        "--silence-after).",
    )
    silent_severity: Severity = Field(default="warning", description="Severity of 'silent'.")
    offline_severity: Severity = Field(default="warning", description="Severity of 'offline'.")


def load_alert_rules(path: str | Path, silence_after: float = 30.0) -> AlertRules:
    """Read a rules file; ``silence_after`` applies where the file sets none. Raises AlertError
    naming the file and the key (one line)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AlertError(one_line(f"{p}: cannot read the alert rules ({exc.strerror})")) from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AlertError(one_line(f"{p}: the alert rules are not valid YAML ({exc})")) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AlertError(f"{p}: the alert rules must be a mapping")
    try:
        f = AlertRulesFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise AlertError(one_line(f"{p}: {where}: {err['msg']}")) from exc
    return AlertRules(
        events=dict(f.events),
        default_severity=f.default_severity,
        silence_after=silence_after if f.silence_after is None else f.silence_after,
        silent_severity=f.silent_severity,
        offline_severity=f.offline_severity,
    )


def rules_json(rules: AlertRules) -> str:
    return json.dumps(rules.as_dict(), sort_keys=True, allow_nan=False)
