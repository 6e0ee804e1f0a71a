"""A small FHIR R4 receiver for the tests: what a FHIR server does with a transaction Bundle,
and nothing more (no FHIR server package is installed here).

A real HTTP server on a free loopback port, in a thread. ``POST <base>`` with a transaction
Bundle: every entry is validated by fhir.resources (R4B models, as gateway.clinical.fhir
builds them) and the whole Bundle is refused with 400 + OperationOutcome when one is invalid;
``POST Type`` with ``ifNoneExist: identifier=system|value`` is a conditional create (an
existing match is answered 200 and nothing is created), ``PUT Type?identifier=system|value``
a conditional update (creates when none matches); more than one match is 412. References to
an entry's ``fullUrl`` are rewritten to the id it got. The transaction is all or nothing.
It answers a ``transaction-response`` Bundle. ``fail_next(n)`` makes the next n requests
answer 503 (or another status); ``auth`` makes it require that ``Authorization`` header
(``Bearer <token>`` or ``Basic <base64>``); ``context`` serves HTTPS with that SSL context.
"""

from __future__ import annotations

import copy
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

__all__ = ["FhirReceiver", "Refused", "receiver_fixture"]

BASE = "/fhir"


class Refused(Exception):
    """A transaction the receiver refuses: HTTP status and OperationOutcome text."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _outcome(text: str, code: str = "invalid") -> dict[str, Any]:
    issue = {"severity": "error", "code": code, "diagnostics": text}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _first(exc: Exception) -> str:
    """The first lines of a validation error, as one line."""
    return " ".join(line.strip() for line in str(exc).splitlines()[:3])


def _token(query: str) -> tuple[str, str]:
    """``identifier=system|value`` (URL-encoded, FHIR-escaped) -> (system, value)."""
    params = parse_qs(query, strict_parsing=True)
    if list(params) != ["identifier"] or len(params["identifier"]) != 1:
        raise Refused(400, f"only identifier=system|value is searched here, not {query!r}")
    parts: list[str] = []
    cur, escaped = "", False
    for c in params["identifier"][0]:
        if escaped:
            cur, escaped = cur + c, False
        elif c == "\\":
            escaped = True
        elif c == "|" and not parts:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    if len(parts) != 1:
        raise Refused(400, "identifier search needs system|value")
    return parts[0], cur


class FhirReceiver:
    """The server, its stored resources (``resources[type][id]``) and its counters."""

    def __init__(self, auth: str | None = None, context: ssl.SSLContext | None = None) -> None:
        self.auth = auth
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests = 0  # POSTs received, failed ones included
        self.transactions = 0  # transactions applied
        self._fail: list[int] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        if context is not None:
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._http.server_address[1]}{BASE}"
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="fhir-receiver"
        )
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` requests answer ``status`` with an OperationOutcome."""
        with self._lock:
            self._fail.extend([status] * n)

    def find(self, kind: str, system: str, value: str) -> list[dict[str, Any]]:
        """Stored resources of ``kind`` with that identifier."""
        return [
            r
            for r in self.resources.get(kind, {}).values()
            if any(
                i.get("system") == system and i.get("value") == value
                for i in r.get("identifier", [])
            )
        ]

    def count(self, kind: str) -> int:
        return len(self.resources.get(kind, {}))

    # -- the transaction --------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet tests

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, doc = receiver._post(self.path, self.headers.get("Authorization"), raw)
                out = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        return Handler

    def _post(self, path: str, auth: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests += 1
            if self._fail:
                status = self._fail.pop(0)
                return status, _outcome(f"told to fail ({status})", "transient")
            if self.auth is not None and auth != self.auth:
                return 401, _outcome("no valid credentials", "login")
            if urlsplit(path).path.rstrip("/") != BASE:
                return 404, _outcome(f"no endpoint {path}", "not-found")
            try:
                return 200, self._transaction(raw)
            except Refused as exc:
                return exc.status, _outcome(str(exc))

    def _transaction(self, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
            Bundle.model_validate(doc)
        except (ValueError, ValidationError) as exc:
            raise Refused(400, f"not a valid Bundle: {_first(exc)}") from exc
        if doc.get("type") != "transaction":
            raise Refused(400, f"Bundle type {doc.get('type')!r} is not transaction")
        entries = doc.get("entry") or []
        for i, e in enumerate(entries):  # each entry on its own, by its own model
            res = e.get("resource") or {}
            try:
                get_fhir_model_class(res.get("resourceType", "")).model_validate(res)
            except (KeyError, ValueError, ValidationError) as exc:
                raise Refused(400, f"entry {i}: {_first(exc)}") from exc
        store = copy.deepcopy(self.resources)  # all or nothing
        ids: dict[str, str] = {}
        answers = [self._entry(store, ids, i, e) for i, e in enumerate(entries)]
        self.resources = store
        self.transactions += 1
        out = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        Bundle.model_validate(out)
        return out

    def _entry(
        self, store: dict[str, Any], ids: dict[str, str], i: int, e: dict[str, Any]
    ) -> dict[str, Any]:
        req, res = e.get("request") or {}, copy.deepcopy(e["resource"])
        kind, method = res["resourceType"], req.get("method")
        url = urlsplit(req.get("url", ""))
        if url.path != kind:
            raise Refused(400, f"entry {i}: url {req.get('url')!r} is not {kind}")
        if method == "POST":
            query = req.get("ifNoneExist")
        elif method == "PUT" and url.query:
            query = url.query
        else:
            raise Refused(400, f"entry {i}: only POST and conditional PUT are served here")
        found = self._match(store, kind, query) if query else []
        if len(found) > 1:
            raise Refused(412, f"entry {i}: {query} matches {len(found)} {kind} resources")
        self._resolve(res, ids, i)
        if found and method == "POST":  # conditional create: it exists, nothing is created
            rid, status = found[0]["id"], "200 OK"
        else:
            if found:
                rid, status = found[0]["id"], "200 OK"
                version = int(found[0]["meta"]["versionId"]) + 1
            else:
                self._next_id += 1
                rid, status, version = str(self._next_id), "201 Created", 1
            res["id"], res["meta"] = rid, {"versionId": str(version)}
            store.setdefault(kind, {})[rid] = res
        if e.get("fullUrl"):
            ids[e["fullUrl"]] = f"{kind}/{rid}"
        return {"response": {"status": status, "location": f"{kind}/{rid}"}}

    @staticmethod
    def _match(store: dict[str, Any], kind: str, query: str) -> list[dict[str, Any]]:
        system, value = _token(query)
        return [
            r
            for r in store.get(kind, {}).values()
            if any(
                x.get("system") == system and x.get("value") == value
                for x in r.get("identifier", [])
            )
        ]

    @staticmethod
    def _resolve(node: Any, ids: dict[str, str], i: int) -> None:
        """Rewrite references to earlier entries' fullUrls; refuse one to nothing known."""
        if isinstance(node, list):
            for x in node:
                FhirReceiver._resolve(x, ids, i)
        elif isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                if ref not in ids:
                    raise Refused(400, f"entry {i}: reference {ref} to no earlier entry")
                node["reference"] = ids[ref]
            for k, v in node.items():
                if k != "reference":
                    FhirReceiver._resolve(v, ids, i)


@pytest.fixture(name="fhir_receiver")
def receiver_fixture() -> Iterator[FhirReceiver]:
    """``fhir_receiver``: a receiver for one test (import ``receiver_fixture`` to use it)."""
    receiver = FhirReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
