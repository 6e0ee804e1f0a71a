"""The ``outputs:`` configuration of a fog gateway: where results go beside the store (a PACS,
a FHIR server), the fog source keys that open a result's sealed source UIDs, and the durable
outbox that keeps each item until its receiver has it (docs/outputs.md).

Strict pydantic models, like gateway.config: unknown keys are errors and every field says what
it is. ``PacsSettings.config()`` and ``FhirSettings.config()`` give the plain configs that
gateway.clinical.pacs and gateway.clinical.fhir_client take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.errors import ConfigError, MedgeError
from edge_agent.keys import RecipientKey, load_recipient
from gateway.clinical.fhir import Coding, ModelFacts
from gateway.clinical.fhir_client import FhirConfig
from gateway.clinical.pacs import PacsConfig

__all__ = ["FhirModel", "FhirSettings", "OutputsSettings", "PacsSettings", "model_name"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def model_name(bundle: str | None) -> str | None:
    """The model name of a bundle id ``name@version#hash`` (None for None)."""
    return bundle.partition("@")[0] if bundle else None


def _rebased(p: Path | None, base: Path) -> Path | None:
    return p if p is None or p.is_absolute() else base / p


class PacsSettings(_Strict):
    """The PACS that takes the DICOM objects of image results (SR, SEG, CAM capture)."""

    url: str | None = Field(
        default=None,
        description="DICOMweb service root (QIDO/WADO/STOW), e.g. https://pacs.example/dicom-web; "
        "also where a source's header is fetched (WADO-RS metadata).",
    )
    host: str | None = Field(default=None, description="DIMSE C-STORE host of the PACS.")
    port: int = Field(default=104, ge=1, le=65535, description="DIMSE C-STORE port of the PACS.")
    called_ae: str = Field(
        default="ANY-SCP", min_length=1, max_length=16, description="The PACS's AE title."
    )
    calling_ae: str = Field(
        default="MEDGE", min_length=1, max_length=16, description="Our AE title."
    )
    send: Literal["stow", "c-store"] = Field(
        default="stow", description="Send the objects by DICOMweb STOW-RS or by DIMSE C-STORE."
    )
    verify: bool = Field(default=True, description="Check the PACS's HTTPS certificate.")
    ca_file: Path | None = Field(
        default=None, description="CA bundle for HTTPS (instead of the system's)."
    )
    user: str | None = Field(default=None, description="HTTP basic auth user.")
    password_file: Path | None = Field(
        default=None, description="A file holding the HTTP basic auth password (never inline)."
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        description="Bound on every connect and every reply (HTTP and DIMSE), seconds.",
    )

    @model_validator(mode="after")
    def _needs(self) -> PacsSettings:
        if not self.url:
            raise ValueError(
                "pacs.url (DICOMweb root) is needed: the source's header is fetched by WADO-RS"
                + (", and send: stow stores by STOW-RS" if self.send == "stow" else "")
            )
        if self.send == "c-store" and not self.host:
            raise ValueError("pacs.send: c-store needs pacs.host (and port, called_ae)")
        if self.user is not None and self.password_file is None:
            raise ValueError("pacs.user needs pacs.password_file")
        return self

    def config(self) -> PacsConfig:
        return PacsConfig(
            url=self.url,
            host=self.host,
            port=self.port,
            called_ae=self.called_ae,
            calling_ae=self.calling_ae,
            verify=self.verify,
            ca_file=self.ca_file,
            user=self.user,
            password_file=self.password_file,
            timeout_s=self.timeout_s,
        )


class FhirModel(_Strict):
    """What the gateway must know of a model whose rows go to FHIR (from its manifest)."""

    signal: Literal["ecg", "imu", "ppg"] = Field(
        description="What the model reads: ecg, imu (a wrist IMU) or ppg; sets the category."
    )
    labels: list[str] = Field(min_length=1, description="The model's labels, in score order.")
    positive_label: str | None = Field(
        default=None, description="The label flagged abnormal (interpretation A), if any."
    )
    label_codings: dict[str, tuple[str, str, str]] = Field(
        default_factory=dict,
        description="Standard codes for some labels: label -> [system, code, display], sent "
        "beside medge's own (e.g. fall: [http://snomed.info/sct, '1912002', Fall]).",
    )

    @model_validator(mode="after")
    def _labels(self) -> FhirModel:
        if self.positive_label is not None and self.positive_label not in self.labels:
            raise ValueError(f"positive_label {self.positive_label!r} is not one of the labels")
        unknown = sorted(set(self.label_codings) - set(self.labels))
        if unknown:
            raise ValueError(f"label_codings for labels the model does not have: {unknown}")
        return self


class FhirSettings(_Strict):
    """The FHIR R4 server that takes wearable and ECG results and their events."""

    base_url: str = Field(description="The server's FHIR base, e.g. https://ehr.example/fhir.")
    token_file: Path | None = Field(
        default=None, description="A file holding a bearer token (read at every request)."
    )
    basic_auth_file: Path | None = Field(
        default=None, description="A file holding user:password (not with token_file)."
    )
    ca_file: Path | None = Field(
        default=None, description="PEM bundle the server's certificate must chain to."
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds for the connection and for each read.",
    )
    models: dict[str, FhirModel] = Field(
        min_length=1,
        description="By model name (the bundle id's part before @): only rows of these models "
        "go to FHIR.",
    )
    patients: dict[str, str] = Field(
        default_factory=dict,
        description="site/device or device -> Patient/<id>, the Observations' subject (a "
        "device not listed: no subject; read docs/outputs.md first).",
    )
    batch: int = Field(default=50, ge=1, le=1000, description="Rows per transaction at most.")

    @model_validator(mode="after")
    def _checked(self) -> FhirSettings:
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def config(self) -> FhirConfig:
        return FhirConfig(
            base_url=self.base_url,
            token_file=self.token_file,
            basic_auth_file=self.basic_auth_file,
            ca_file=self.ca_file,
            timeout_s=self.timeout_s,
            patients=dict(self.patients),
        )

    def facts(self, bundle: str | None) -> ModelFacts | None:
        """The facts of the bundle's model, None when the model is not configured."""
        name = model_name(bundle)
        model = self.models.get(name) if name else None
        if bundle is None or name is None or model is None:
            return None
        codings: dict[str, Coding] = dict(model.label_codings)
        return ModelFacts(
            bundle,
            name,
            tuple(model.labels),
            model.signal,
            model.positive_label,
            label_codings=codings,
        )


class OutputsSettings(_Strict):
    """Clinical outputs: DICOM objects to a PACS, FHIR resources to an EHR, through an outbox."""

    source_key: list[Path] = Field(
        default_factory=list,
        description="Fog source key files (private HPKE recipient JSON, 'medge site "
        "source-key'): the first is current, later ones are kept to open older results.",
    )
    outbox: Path | None = Field(
        default=None, description="The clinical outbox file (default: beside the store)."
    )
    pacs: PacsSettings | None = Field(default=None, description="The PACS; None: off.")
    fhir: FhirSettings | None = Field(default=None, description="The FHIR server; None: off.")
    retry_min_s: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="First wait after a failure that may pass (unreachable, busy), seconds; "
        "doubled at each further failure.",
    )
    retry_max_s: float = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait between tries while a receiver keeps failing, seconds.",
    )

    @model_validator(mode="after")
    def _combination(self) -> OutputsSettings:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must not be below retry_min_s")
        if self.pacs is not None and not self.source_key:
            raise ValueError(
                "pacs needs source_key: a result names its source image only in UIDs sealed "
                "to the fog source key"
            )
        return self

    def resolve(self, base: Path) -> OutputsSettings:
        """A copy with relative paths made relative to ``base`` (the config file's folder)."""
        update: dict[str, object] = {
            "source_key": [_rebased(p, base) for p in self.source_key],
            "outbox": _rebased(self.outbox, base),
        }
        if self.pacs is not None:
            update["pacs"] = self.pacs.model_copy(
                update={
                    "ca_file": _rebased(self.pacs.ca_file, base),
                    "password_file": _rebased(self.pacs.password_file, base),
                }
            )
        if self.fhir is not None:
            update["fhir"] = self.fhir.model_copy(
                update={
                    k: _rebased(getattr(self.fhir, k), base)
                    for k in ("token_file", "basic_auth_file", "ca_file")
                }
            )
        return self.model_copy(update=update)

    def source_keys(self) -> dict[str, RecipientKey]:
        """The fog source keys by key id, each with its private half; ConfigError naming the
        file that cannot be read or holds no private key."""
        keys: dict[str, RecipientKey] = {}
        for path in self.source_key:
            try:
                key = load_recipient(path)
            except MedgeError as exc:
                raise ConfigError(f"outputs.source_key: {exc}") from exc
            if key.private is None:
                raise ConfigError(f"outputs.source_key: {path} holds no private key")
            keys.setdefault(key.kid, key)
        return keys
