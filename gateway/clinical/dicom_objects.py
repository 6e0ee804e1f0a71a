"""DICOM objects for a medge result, to put it where clinicians already look: the PACS.

Built with highdicom from two things: the source image's DICOM header (a pydicom Dataset, as
:func:`gateway.clinical.pacs.fetch_header` gets it from the PACS by its UIDs; it gives the
patient and study modules and what the objects reference) and a :class:`MedgeResult` (the
opened result body, the time it was made, the device, which frame).

- :func:`structured_report`: a Comprehensive SR holding a TID 1500 Measurement Report: the
  device observer (the medge device) and the algorithm (the bundle), one TID 1501 group for
  the predicted label (Finding = label, Probability = its score) and one for the bundle's
  positive label when it is another, each referencing the source image (and frame).
- :func:`segmentation`: a binary SEG of a segmentation result's mask on the source frame.
- :func:`cam_capture`: a secondary capture of the CAM heatmap (and the input thumbnail).

Every object has new UIDs (derived from the result's device and sequence number when given, so
that building it again gives the same UIDs and a PACS stores a resend once), the patient and
study of the source, its own series, Manufacturer "medge", the bundle id in SoftwareVersions,
and the result's time (UTC) as its content date/time. Labels are coded in the private scheme
``99MEDGE`` (code value: the label as the bundle names it).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from edge_agent.errors import MedgeError, one_line
from gateway.clinical.pixels import fill_contour, heat_overlay, png_pixels

__all__ = [
    "CODING_SCHEME",
    "POSITIVE_LABEL",
    "DicomObjectError",
    "MedgeResult",
    "cam_capture",
    "dicom_objects",
    "label_code",
    "segmentation",
    "structured_report",
]

CODING_SCHEME = "99MEDGE"
MANUFACTURER = "medge"
SERIES_NUMBER = {"SR": 9101, "SEG": 9102, "SC": 9103}
_UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
POSITIVE_LABEL = hd.sr.CodedConcept("POSITIVE", CODING_SCHEME, "Positive label of the model")
_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    CODING_SCHEME, name="medge model labels", responsible_organization="medge"
)


class DicomObjectError(MedgeError):
    """A DICOM object cannot be built from this result and source header; says which and why."""


@dataclass(frozen=True)
class MedgeResult:
    """What the objects are built from. ``body``: the opened result body (edge_agent.pipeline
    ``result_body`` and its ``mask``/``cam``/``thumbnail`` fields); ``time``: when the result
    was made (the envelope's time; naive means UTC); ``device``: "site/device"; ``frame``: the
    0-based frame of a multi-frame source, as the agent's DICOM source counts them (its sample
    meta ``frame``); ``seq``: the device's sequence number, which makes the UIDs reproducible;
    ``labels``: the bundle's label names (the score of the positive label needs them, unless
    the model has two classes)."""

    body: Mapping[str, Any]
    time: datetime
    device: str
    frame: int | None = None
    seq: int | None = None
    labels: Sequence[str] | None = None  # the bundle's label names, in score order

    @property
    def bundle(self) -> str:
        b = self.body.get("bundle")
        if not isinstance(b, str) or not b:
            raise DicomObjectError("result has no bundle id: cannot say which model made it")
        return b

    @property
    def model(self) -> tuple[str, str]:
        """(name, version) of the bundle id ``name@version#hash``."""
        name, _, rest = self.bundle.partition("@")
        return name, rest.partition("#")[0] or "unknown"

    @property
    def utc(self) -> datetime:
        t = self.time
        return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _positive_is(label: str) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(POSITIVE_LABEL, label_code(label))


def label_code(label: str) -> hd.sr.CodedConcept:
    """A model label as a coded concept of the private scheme ``99MEDGE``: the code value is the
    label (a long one becomes a Long Code Value), the meaning its first 64 characters."""
    return hd.sr.CodedConcept(label, CODING_SCHEME, label[:64])


def _uid(result: MedgeResult, source: Dataset, what: str) -> str:
    if result.seq is None:
        return str(generate_uid())
    parts = [result.device, str(result.seq), str(source.SOPInstanceUID), str(result.frame), what]
    return _uuid_uid(*parts)


def _uuid_uid(*parts: str) -> str:
    """A UID of the form 2.25.<UUID> (PS3.5 B.2), the UUID a name-based (v5) one of ``parts``."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'medge:' + '|'.join(parts)).int}"


def _frames(source: Dataset, result: MedgeResult) -> list[int] | None:
    """The DICOM (1-based) frame number a multi-frame source is referenced with."""
    n = int(source.get("NumberOfFrames", 1) or 1)
    if n <= 1:
        return None
    if result.frame is None or not 0 <= result.frame < n:
        raise DicomObjectError(
            f"source {source.SOPInstanceUID} has {n} frames: the result must say which "
            f"(frame {result.frame} given)"
        )
    return [result.frame + 1]


def _common(source: Dataset, result: MedgeResult, kind: str, description: str) -> dict[str, Any]:
    """The keyword arguments every object shares: identity, equipment, content time."""
    for field, value in (("bundle id", result.bundle), ("device", result.device)):
        if len(value) > 64:  # LO: cut, it would name another bundle or device
            raise DicomObjectError(f"{field} {value[:80]!r} is longer than DICOM's 64 (LO)")
    t = result.utc
    return {
        "series_instance_uid": _uid(result, source, kind + "-series"),
        "series_number": SERIES_NUMBER[kind],
        "sop_instance_uid": _uid(result, source, kind),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": result.model[0],
        "software_versions": result.bundle,
        "series_description": one_line(description, 64),
        "content_date": t.date(),
        "content_time": t.time().replace(tzinfo=None),
        "series_date": t.date(),
        "series_time": t.time().replace(tzinfo=None),
    }


@contextmanager
def _building(what: str) -> Iterator[None]:
    """highdicom's errors -> DicomObjectError naming the object. Its warning about a one-part
    person name is about the source's PatientName, copied as the PACS has it, so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The string .* unlikely to represent", UserWarning)
        try:
            yield
        except (AttributeError, ValueError, TypeError) as exc:
            raise DicomObjectError(f"{what}: {exc}") from exc


_D = TypeVar("_D", bound=Dataset)


def _finish(ds: _D) -> _D:
    ds.TimezoneOffsetFromUTC = "+0000"
    return ds


def _describe(source: Dataset, what: str) -> str:
    return f"{what} for {source.get('Modality', '?')} image {source.get('SOPInstanceUID', '?')}"


def structured_report(source: Dataset, result: MedgeResult) -> hd.sr.ComprehensiveSR:
    """The SR of a result: finding, score(s), device and algorithm, references to the source."""
    with _building(_describe(source, "SR")):
        return _finish(_sr(source, result))


def _sr(source: Dataset, result: MedgeResult) -> hd.sr.ComprehensiveSR:
    b = result.body
    label = b.get("pred_label")
    if not isinstance(label, str) or not label:
        raise DicomObjectError(f"{_describe(source, 'SR')}: result has no pred_label")
    scores = _scores(result)
    name, version = result.model
    algorithm = hd.sr.AlgorithmIdentification(
        name=name,
        version=version,
        parameters=[f"bundle {result.bundle}"],
        manufacturer=MANUFACTURER,
    )
    refs = [hd.sr.SourceImageForMeasurementGroup.from_source_image(source, _frames(source, result))]

    def group(what: str, label: str, found: bool) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        # found: "Finding = label" (the prediction); else "Positive label = label" (its score)
        score = scores.get(label)
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(result, source, f"SR-{what}"), identifier=f"medge {what}: {label}"
            ),
            finding_type=label_code(label) if found else None,
            algorithm_id=algorithm,
            qualitative_evaluations=None if found else [_positive_is(label)],
            measurements=(
                [hd.sr.Measurement(codes.DCM.Probability, score, _UNITY, algorithm_id=algorithm)]
                if score is not None
                else None
            ),
            source_images=refs,
        )

    groups = [group("prediction", label, True)]
    positive = b.get("positive_label")
    if isinstance(positive, str) and positive != label and positive in scores:
        groups.append(group("positive label", positive, False))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uuid_uid("device", result.device),
            name=result.device,
            manufacturer_name=MANUFACTURER,
            model_name=name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    kw = _common(source, result, "SR", f"medge {name}: {label} (AI, unverified)")
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report, is_complete=True, coding_schemes=[_SCHEME], **kw
    )


def _scores(result: MedgeResult) -> dict[str, float]:
    """label -> score: all of them with the label names; else the predicted label's, and for
    two classes the positive label's (the other score)."""
    b = result.body
    scores = [float(s) for s in b.get("scores") or []]
    names = result.labels
    if names is not None and len(names) == len(scores):
        return dict(zip(names, scores, strict=True))
    out: dict[str, float] = {}
    pred, label, positive = b.get("pred"), b.get("pred_label"), b.get("positive_label")
    if isinstance(pred, int) and isinstance(label, str) and 0 <= pred < len(scores):
        out[label] = scores[pred]
        if len(scores) == 2 and isinstance(positive, str) and positive != label:
            out[positive] = scores[1 - pred]
    return out


def segmentation(source: Dataset, result: MedgeResult) -> hd.seg.Segmentation:
    """A binary SEG of the result's mask on the source frame. The result carries the outline of
    the mask's largest component (at most 32 vertices, in pixels of the model output of
    ``mask.size``), not the mask: the SEG holds that polygon filled and scaled to the source's
    Rows x Columns (:func:`fill_contour`)."""
    what = _describe(source, "SEG")
    with _building(what):
        return _finish(_seg(source, result, what))


def _seg(source: Dataset, result: MedgeResult, what: str) -> hd.seg.Segmentation:
    mask = result.body.get("mask")
    if not isinstance(mask, Mapping):
        raise DicomObjectError(f"{what}: the result has no mask (not a segmentation result)")
    contour, size = mask.get("contour"), mask.get("size") or []
    if not contour:
        raise DicomObjectError(f"{what}: the mask is empty: nothing to segment")
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomObjectError(  # highdicom 0.28 refuses it without a Frame of Reference
            f"{what}: a SEG on one frame of a multi-frame source is not supported (the SR and SC "
            "reference the frame)"
        )
    try:
        pixels = fill_contour(contour, size, (int(source.Rows), int(source.Columns)))
    except (TypeError, ValueError) as exc:
        raise DicomObjectError(f"{what}: malformed mask ({exc})") from exc
    label = str(result.body.get("pred_label") or "foreground")
    name, version = result.model
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=hd.sr.CodedConcept("FINDING", CODING_SCHEME, "Model finding"),
        segmented_property_type=label_code(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=name, family=codes.cid7162.ArtificialIntelligence, version=version
        ),
    )
    desc = f"medge {name}: {label} outline (AI, unverified)"
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        device_serial_number=result.device,
        content_description="largest component's outline, filled",
        content_label="MEDGE",
        omit_empty_frames=False,
        coding_schemes=[_SCHEME],
        **_common(source, result, "SEG", desc),
    )


def _png(data: Any, what: str) -> np.ndarray:
    try:
        return png_pixels(data)
    except ValueError as exc:
        raise DicomObjectError(f"{what}: {exc}") from exc


def cam_capture(source: Dataset, result: MedgeResult) -> hd.sc.SCImage:
    """A secondary capture of the CAM: with the input thumbnail, the thumbnail (left) beside the
    heatmap in colour over it (right); without, the heatmap in colour alone. Blue = no evidence,
    red = most evidence for the class the CAM names; at most 256 pixels a side per panel."""
    what = _describe(source, "CAM secondary capture")
    with _building(what):
        return _finish(_sc(source, result, what))


def _sc(source: Dataset, result: MedgeResult, what: str) -> hd.sc.SCImage:
    cam = result.body.get("cam")
    if not isinstance(cam, Mapping):
        raise DicomObjectError(f"{what}: the result has no cam")
    heat = _png(cam.get("png"), what + " (cam)")
    thumb_body = result.body.get("thumbnail")
    thumb = _png(thumb_body.get("png"), what + " (thumbnail)") if thumb_body else None
    pixels = heat_overlay(heat, thumb)
    label = str(cam.get("label") or result.body.get("pred_label") or "?")
    name = result.model[0]
    shows = "thumbnail | CAM over it" if thumb is not None else "CAM heatmap only"
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=_orientation(source),
        **_common(source, result, "SC", f"medge CAM {label}: {shows}"),
    )
    if not _orientation_known(source):
        sc.PatientOrientation = []  # type 2: unknown (highdicom wants a value to build)
    sc.ImageComments = one_line(
        f"Class activation map of model {name} (bundle {result.bundle}) for '{label}': "
        + (
            "left, the model's input thumbnail; right, the heatmap over it"
            if thumb is not None
            else "the heatmap alone (the result carried no input thumbnail)"
        )
        + ". Blue: no evidence, red: most evidence. Not for diagnosis on its own.",
        1024,
    )
    sc.BurnedInAnnotation = "NO"
    if "Laterality" not in sc:  # type 2C: the source's, or empty (unknown)
        sc.Laterality = str(source.get("Laterality") or "")
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frames = _frames(source, result)
    if frames:
        ref.ReferencedFrameNumber = frames[0]
    sc.SourceImageSequence = [ref]
    return sc


_AXES = (("L", "R"), ("P", "A"), ("H", "F"))


def _orientation_known(source: Dataset) -> bool:
    return len(source.get("ImageOrientationPatient") or ()) == 6 or _given(source) is not None


def _given(source: Dataset) -> tuple[str, str] | None:
    po = source.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2 and all(len(v) == 1 for v in po):
        return str(po[0]), str(po[1])
    return None


def _orientation(source: Dataset) -> tuple[str, str]:
    """Row and column directions as PatientOrientation letters: the source's own, else the main
    axis of its ImageOrientationPatient, else a placeholder that the caller then empties."""
    given = _given(source)
    if given is not None:
        return given
    iop: Sequence[float] = [float(v) for v in source.get("ImageOrientationPatient") or ()]
    if len(iop) != 6:
        return "L", "F"
    out = []
    for vec in (iop[:3], iop[3:]):
        k = int(np.argmax(np.abs(vec)))
        out.append(_AXES[k][0] if vec[k] > 0 else _AXES[k][1])
    return out[0], out[1]


def dicom_objects(
    source: Dataset, result: MedgeResult, skipped: list[str] | None = None
) -> list[Dataset]:
    """Every object the result makes: the SR always; the SEG for a mask with a contour; the SC
    for a CAM. With ``skipped`` given, a SEG or SC that cannot be built (e.g. a SEG on a frame
    of a cine) is left out and the reason appended to it, so that the SR still goes; without,
    it raises :class:`DicomObjectError` like the SR."""
    out: list[Dataset] = [structured_report(source, result)]
    optional: list[Callable[[Dataset, MedgeResult], Dataset]] = []
    mask = result.body.get("mask")
    if isinstance(mask, Mapping) and mask.get("contour"):
        optional.append(segmentation)
    if isinstance(result.body.get("cam"), Mapping):
        optional.append(cam_capture)
    for build in optional:
        try:
            out.append(build(source, result))
        except DicomObjectError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    return out
