from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.bundle import Bundle, file_entry
from edge_agent.errors import BundleError
from edge_agent.model import LoadedModel


def _edit_manifest(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_good_bundle_loads_and_describes_itself(bundle_dir: Path) -> None:
    b = Bundle.load(bundle_dir)
    m = b.manifest
    assert m.labels == ["malignant", "benign"] and m.positive_label == "malignant"
    art = b.artifact("litert")
    assert art.precision == "int8"
    assert art.inputs[0].dtype == "int8" and art.inputs[0].quantization is not None
    assert art.inputs[0].shape == [1, 28, 28, 1] and art.inputs[0].layout == "NHWC"
    report = json.loads((bundle_dir / "report.json").read_text())
    shipped = {f"model_{p}.tflite" for p, d in report["float_artifacts"].items() if d["shipped"]}
    assert set(m.files) - shipped == {
        "model_int8.tflite",
        "model_fp32.onnx",
        "model_int8.onnx",
        "report.json",
        "report.md",
        "report.html",
    }
    assert m.metrics["litert-int8"]["auc"] is not None


def test_one_changed_byte_is_refused_naming_the_file(bundle_copy: Path) -> None:
    model = bundle_copy / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="'model_int8.tflite' does not match its hash"):
        Bundle.load(bundle_copy)


def test_missing_and_unlisted_files_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="'extra.bin' is not listed"):
        Bundle.load(bundle_copy)
    (bundle_copy / "extra.bin").unlink()
    (bundle_copy / "report.md").unlink()
    with pytest.raises(BundleError, match="'report.md' listed in the manifest is missing"):
        Bundle.load(bundle_copy)


def test_other_schema_major_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version="3.0"))
    with pytest.raises(BundleError, match=r"schema version 3.0 is not supported"):
        Bundle.load(bundle_copy)
    # 2.x is a bundle with a feature stage (tests/test_feature_stage.py): not this one
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version="2.0"))
    with pytest.raises(BundleError, match=r"schema 2.x without a feature stage"):
        Bundle.load(bundle_copy)


def test_newer_minor_with_unknown_fields_still_loads(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version="1.7", future_field={"a": 1}))
    assert Bundle.load(bundle_copy).manifest.schema_version == "1.7"


def test_bad_manifest_field_is_named(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(labels="malignant"))
    with pytest.raises(BundleError, match="field 'labels'"):
        Bundle.load(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_copy)


def test_labels_that_do_not_match_outputs_are_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(labels=["a", "b", "c"], positive_label="a"))
    with pytest.raises(BundleError, match="has 2 outputs but the manifest lists 3 labels"):
        Bundle.load(bundle_copy)


def test_manifest_that_lies_about_the_model_is_refused(bundle_copy: Path) -> None:
    def lie(d: dict) -> None:  # type: ignore[type-arg]
        d["artifacts"][0]["inputs"][0]["shape"] = [1, 32, 32, 1]

    _edit_manifest(bundle_copy, lie)
    with pytest.raises(BundleError, match=r"input .* is int8\[1, 32, 32, 1\] in the manifest"):
        LoadedModel(Bundle.load(bundle_copy))


def test_corrupt_model_with_matching_hash_is_one_clear_line(bundle_copy: Path) -> None:
    model = bundle_copy / "model_int8.tflite"
    model.write_bytes(b"this is not a flatbuffer")
    entry = file_entry(model)
    _edit_manifest(
        bundle_copy, lambda d: d["files"].update({"model_int8.tflite": entry.model_dump()})
    )
    from edge_agent.errors import BackendError

    with pytest.raises(BackendError, match="LiteRT cannot load model_int8.tflite"):
        LoadedModel(Bundle.load(bundle_copy))
