"""POST a transaction Bundle (gateway.clinical.fhir) to a FHIR server, and say clearly why not.

Standard library only (urllib, ssl): one blocking call, :func:`post_transaction`, for a
worker thread or a durable outbox to run and retry. Every failure is one :class:`FhirError`
whose ``reason`` is one line (connection refused, timeout, TLS, HTTP status with the server's
OperationOutcome text, a response that is not the transaction-response it should be) and
whose ``retryable`` says whether the same Bundle may succeed later (the link, the server, its
certificate or the credentials were at fault: keep it and retry) or never will (the server
refused the Bundle's content: 400, 409, 412, 413, 422, or an entry that failed).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from edge_agent.errors import ConfigError, MedgeError, one_line

__all__ = ["FhirConfig", "FhirError", "post_transaction"]

FHIR_JSON = "application/fhir+json"
_REFUSED = frozenset({400, 409, 412, 413, 422})  # the content is at fault
_MAX_RESPONSE = 64 * 1024 * 1024


class FhirError(MedgeError):
    """A transaction did not reach the server or was not stored; ``reason`` says why.

    ``status`` is the HTTP status when the server answered; ``retryable`` is False only when
    the server refused the Bundle's content, which sending it again cannot change."""

    def __init__(self, reason: str, status: int | None = None, retryable: bool = True) -> None:
        self.reason = one_line(reason)
        self.status = status
        self.retryable = retryable
        super().__init__(f"FHIR server: {self.reason}")


@dataclass(frozen=True)
class FhirConfig:
    """Where and how to send FHIR resources."""

    base_url: str
    """The server's FHIR base, e.g. ``https://ehr.example/fhir`` (a transaction is POSTed to it)."""
    token_file: Path | None = None
    """A file holding a bearer token (read at each request, so it can be rotated)."""
    basic_auth_file: Path | None = None
    """A file holding ``user:password`` for HTTP basic auth (not with ``token_file``)."""
    ca_file: Path | None = None
    """PEM CA bundle that the server's certificate must chain to (default: the system's)."""
    timeout_s: float = 30.0
    """Seconds for the connection and for each read of the response."""
    patients: Mapping[str, str] = field(default_factory=dict)
    """``site/device`` or ``device`` -> Patient reference (``Patient/123``) for Observations'
    ``subject``; a device not listed gets no subject."""

    def __post_init__(self) -> None:
        """ConfigError naming the field that is wrong."""
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"fhir base url {self.base_url!r} is not http(s)://host/...")
        if self.token_file is not None and self.basic_auth_file is not None:
            raise ConfigError("fhir: give token_file or basic_auth_file, not both")
        if not self.timeout_s > 0:
            raise ConfigError("fhir timeout_s must be positive")
        for device, ref in self.patients.items():
            if not ref.startswith("Patient/") or len(ref) <= len("Patient/"):
                raise ConfigError(f"fhir patient of {device!r} must be 'Patient/<id>'")


def _secret(path: Path, what: str) -> str:
    try:
        text = path.read_text("utf-8").strip()
    except OSError as exc:
        raise FhirError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if not text:
        raise FhirError(f"the {what} file {path} is empty")
    return text


def _headers(config: FhirConfig) -> dict[str, str]:
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Prefer": "return=minimal"}
    if config.token_file is not None:
        headers["Authorization"] = "Bearer " + _secret(config.token_file, "token")
    elif config.basic_auth_file is not None:
        pair = _secret(config.basic_auth_file, "basic auth")
        if ":" not in pair:
            raise FhirError(f"{config.basic_auth_file} must hold user:password")
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return headers


def _outcome(raw: bytes) -> str:
    """The diagnostics of an OperationOutcome, or the start of whatever else came back."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return one_line(raw[:200].decode("utf-8", "replace")) or "(empty body)"
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        texts = [
            str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code"))
            for i in doc.get("issue", [])
            if isinstance(i, dict)
        ]
        return "; ".join(texts) or "OperationOutcome without issues"
    return one_line(json.dumps(doc)[:200])


def _check_response(raw: bytes, sent: int) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        Bundle.model_validate(doc)
    except (ValueError, ValidationError) as exc:
        raise FhirError(f"the answer is not a FHIR Bundle ({type(exc).__name__})", 200) from exc
    if doc.get("type") != "transaction-response":
        raise FhirError(f"the answer is a {doc.get('type')} Bundle, not transaction-response", 200)
    entries = doc.get("entry") or []
    if len(entries) != sent:
        raise FhirError(f"the answer has {len(entries)} entries for {sent} sent", 200)
    for i, e in enumerate(entries):
        status = str((e.get("response") or {}).get("status", ""))
        if not status[:1] == "2":
            raise FhirError(f"entry {i} answered {status or 'no status'}", 200, False)
    return doc


def post_transaction(config: FhirConfig, bundle: Bundle | Mapping[str, Any]) -> dict[str, Any]:
    """POST ``bundle`` (type ``transaction``) to the base URL; the transaction-response Bundle
    (as JSON) when the server stored every entry, else :class:`FhirError`."""
    doc = (
        bundle
        if isinstance(bundle, Mapping)
        else json.loads(bundle.model_dump_json(exclude_none=True))
    )
    if doc.get("resourceType") != "Bundle" or doc.get("type") != "transaction":
        raise FhirError("only a transaction Bundle is sent", None, False)
    data = json.dumps(doc, separators=(",", ":")).encode()
    url, headers = config.base_url.rstrip("/"), _headers(config)
    # S310: the scheme is http or https (FhirConfig checks it), never file: or custom
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
    context = None
    if urlsplit(config.base_url).scheme == "https":
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s, context=context) as resp:  # noqa: S310
            raw = resp.read(_MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        text = _outcome(exc.read(_MAX_RESPONSE))
        exc.close()
        raise FhirError(f"HTTP {exc.code}: {text}", exc.code, exc.code not in _REFUSED) from exc
    except urllib.error.URLError as exc:
        why = exc.reason
        if isinstance(why, ssl.SSLError):
            raise FhirError(f"TLS to {config.base_url} failed: {why}") from exc
        if isinstance(why, TimeoutError):
            raise FhirError(f"no answer from {config.base_url} in {config.timeout_s:g} s") from exc
        if isinstance(why, ConnectionRefusedError):
            raise FhirError(f"connection to {config.base_url} refused") from exc
        raise FhirError(f"cannot reach {config.base_url}: {why}") from exc
    except TimeoutError as exc:
        raise FhirError(f"no answer from {config.base_url} in {config.timeout_s:g} s") from exc
    except (ConnectionError, OSError) as exc:
        raise FhirError(f"connection to {config.base_url} failed: {exc}") from exc
    return _check_response(raw, len(doc.get("entry") or []))
