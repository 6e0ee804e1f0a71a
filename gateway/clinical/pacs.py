"""Talk to a PACS: send DICOM objects (DICOMweb STOW-RS, or DIMSE C-STORE) and fetch a source
image's header by its UIDs (DICOMweb WADO-RS metadata, bulk data left out).

Every failure is one :class:`PacsError` that names the object or UIDs and the reason
(connection refused, timeout, TLS, HTTP status, a STOW failure reason, a DIMSE status) and says
whether trying again may help (``retry``), so that a durable outbox can keep the object and try
later. Timeouts are bounded (``PacsConfig.timeout_s``); there is no global state.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset

from edge_agent.errors import MedgeError, one_line

__all__ = ["PacsConfig", "PacsError", "c_store", "describe", "fetch_header", "stow"]

# what time or an operator can fix: the link, a busy PACS, its certificate, our credentials
# (401/403: a wrong or expired password keeps the items waiting, not parked for good)
_RETRY_HTTP = {401, 403, 408, 425, 429, 500, 502, 503, 504}
_DIMSE_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the three storage warnings


class PacsError(MedgeError):
    """A PACS exchange failed. ``reason``: why, in words; ``status``: the HTTP status or the
    DIMSE status when there is one; ``retry``: whether the same request may succeed later
    (the PACS unreachable, busy or out of resources) rather than never (refused, malformed)."""

    def __init__(self, what: str, reason: str, retry: bool, status: int | None = None) -> None:
        super().__init__(one_line(f"{what}: {reason}", 1000))
        self.what, self.reason, self.retry, self.status = what, reason, retry, status


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is and how to reach it. DICOMweb: ``url`` (the service root, e.g.
    ``https://pacs.example/dicom-web``), ``verify``/``ca_file`` for TLS, ``user`` and
    ``password_file`` for HTTP basic auth. DIMSE: ``host``, ``port``, ``called_ae`` (the PACS)
    and ``calling_ae`` (us). ``timeout_s`` bounds every connect and every reply."""

    url: str | None = None
    host: str | None = None
    port: int = 104
    called_ae: str = "ANY-SCP"
    calling_ae: str = "MEDGE"
    verify: bool = True
    ca_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None
    timeout_s: float = 10.0


def describe(ds: Dataset) -> str:
    """An object in words: modality, SOP Instance UID, series description."""
    sd = ds.get("SeriesDescription")
    return f"{ds.get('Modality', '?')} {ds.get('SOPInstanceUID', '?')}" + (f" ({sd})" if sd else "")


def _session(cfg: PacsConfig) -> requests.Session:
    s = requests.Session()
    s.verify = str(cfg.ca_file) if cfg.ca_file is not None else cfg.verify
    if cfg.user is not None:
        if cfg.password_file is None:
            raise PacsError("PACS config", f"user {cfg.user!r} without a password_file", False)
        try:
            password = cfg.password_file.read_text().strip()
        except OSError as exc:
            raise PacsError("PACS config", f"cannot read password_file ({exc})", False) from exc
        s.auth = (cfg.user, password)
    return s


def _client(cfg: PacsConfig) -> Any:
    from dicomweb_client.api import DICOMwebClient

    if not cfg.url:
        raise PacsError("PACS config", "no DICOMweb url", False)
    client = DICOMwebClient(url=cfg.url, session=_session(cfg), timeout=cfg.timeout_s)
    client.set_http_retry_params(retry=False)  # one try, bounded: the caller's outbox retries
    return client


@contextmanager
def _http(what: str, cfg: PacsConfig) -> Iterator[None]:
    """requests' exceptions -> PacsError naming ``what``."""
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise PacsError(what, f"TLS failed with {cfg.url} ({_root(exc)})", True) from exc
    except requests.exceptions.ConnectionError as exc:
        raise PacsError(what, f"cannot connect to {cfg.url} ({_root(exc)})", True) from exc
    except requests.exceptions.Timeout as exc:
        raise PacsError(what, f"no answer from {cfg.url} in {cfg.timeout_s:g} s", True) from exc
    except requests.exceptions.HTTPError as exc:
        r = exc.response
        code = r.status_code if r is not None else None
        text = one_line(" ".join(r.text.split()), 200) if r is not None and r.text else ""
        reason = f"HTTP {code} {r.reason if r is not None else ''}".rstrip()
        raise PacsError(
            what, reason + (f": {text}" if text else ""), code in _RETRY_HTTP, code
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise PacsError(what, f"request failed ({_root(exc)})", True) from exc


def _root(exc: BaseException) -> str:
    """The innermost cause's message (e.g. '[Errno 111] Connection refused')."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.args):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc)
    for known in ("Connection refused", "timed out", "Name or service not known"):
        if known in text:
            return known
    return one_line(text, 200)


def stow(objects: Sequence[Dataset], cfg: PacsConfig) -> None:
    """STOW-RS every object to ``cfg.url`` in one request; the PACS's per-object failures
    (FailedSOPSequence) raise for the first object that failed, with its failure reason."""
    if not objects:
        return
    what = "STOW-RS of " + ", ".join(describe(d) for d in objects)
    with _http(what, cfg):
        answer = _client(cfg).store_instances(list(objects))
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        by_uid = {str(d.SOPInstanceUID): d for d in objects}
        item = failed[0]
        uid = str(item.get("ReferencedSOPInstanceUID", "?"))
        code = int(item.get("FailureReason", 0) or 0)
        obj = describe(by_uid[uid]) if uid in by_uid else uid
        raise PacsError(
            f"STOW-RS of {obj}",
            f"the PACS refused it: failure reason 0x{code:04X}",
            code >> 8 == 0xA7,  # A7xx: out of resources
            code,
        )


def c_store(objects: Sequence[Dataset], cfg: PacsConfig) -> None:
    """C-STORE every object to ``cfg.host:cfg.port`` (AE ``cfg.called_ae``) in one
    association, each in its own transfer syntax."""
    from pynetdicom import AE, evt

    if not cfg.host:
        raise PacsError("PACS config", "no DIMSE host", False)
    where = f"{cfg.called_ae}@{cfg.host}:{cfg.port}"
    ae = AE(ae_title=cfg.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.timeout_s
    ae.connection_timeout = cfg.timeout_s
    for ds in objects:
        ts = ds.file_meta.TransferSyntaxUID
        if (ds.SOPClassUID, ts) not in {
            (c.abstract_syntax, t) for c in ae.requested_contexts for t in c.transfer_syntax
        }:
            ae.add_requested_context(ds.SOPClassUID, [ts])
    first = describe(objects[0]) if objects else "nothing"
    try:  # a clear reason (refused, unreachable, timeout) before pynetdicom's bare "aborted"
        socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout_s).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise PacsError(f"C-STORE of {first} to {where}", f"cannot connect ({why})", True) from exc
    answers: list[Any] = []  # the A-ASSOCIATE response: why a rejection happened
    assoc = ae.associate(
        cfg.host,
        cfg.port,
        ae_title=cfg.called_ae,
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(e.primitive))],
    )
    if not assoc.is_established:
        raise PacsError(f"C-STORE of {first} to {where}", *_refusal(assoc, answers))
    try:
        for ds in objects:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise PacsError(f"C-STORE of {describe(ds)} to {where}", "no answer", True)
            if code not in _DIMSE_OK:
                raise PacsError(
                    f"C-STORE of {describe(ds)} to {where}",
                    f"DIMSE status 0x{code:04X}",
                    code >> 8 == 0xA7,
                    code,
                )
    finally:
        assoc.release()


def _refusal(assoc: Any, answers: list[Any]) -> tuple[str, bool]:
    """Why an association did not open, and whether to try again: a rejection says whether it
    is permanent (e.g. our or its AE title unknown) or transient (e.g. too busy)."""
    # the rejection first, whatever the state says: a PACS that rejects and closes the
    # connection at once can leave pynetdicom "aborted" with the A-ASSOCIATE-RJ already read
    rj = next((a for a in answers if getattr(a, "result", None) in (1, 2)), None)
    if rj is not None:
        return f"association rejected: {rj.result_str}, {rj.source_str}, {rj.reason_str}", (
            rj.result == 2
        )
    if assoc.is_rejected:
        return "association rejected", False
    return ("association aborted" if assoc.is_aborted else "no association"), True


def _no_bulk(node: Any) -> Any:
    """A DICOM JSON dataset without elements given by BulkDataURI (pixels, overlays, ...)."""
    if isinstance(node, dict):
        return {
            tag: {**el, "Value": [_no_bulk(v) for v in el["Value"]]}
            if el.get("vr") == "SQ" and "Value" in el
            else el
            for tag, el in node.items()
            if "BulkDataURI" not in el
        }
    return node


def fetch_header(cfg: PacsConfig, study: str, series: str, instance: str) -> Dataset:
    """The header of one instance, from its DICOMweb metadata without its bulk data."""
    what = f"metadata of instance {instance} (study {study}, series {series})"
    with _http(what, cfg):
        meta = _client(cfg).retrieve_instance_metadata(study, series, instance)
    try:
        ds = Dataset.from_json(_no_bulk(meta))
    except (ValueError, TypeError, KeyError) as exc:
        raise PacsError(what, f"the PACS sent unreadable DICOM JSON ({exc})", False) from exc
    if str(ds.get("SOPInstanceUID", "")) != instance:
        raise PacsError(what, f"the PACS sent instance {ds.get('SOPInstanceUID')}", False)
    return ds
