"""Fuzzing the manifest and signature parsers: whatever the bytes, loading a bundle either
succeeds or raises one BundleError of one line — never another exception.

The fuzzing is deterministic (derandomized, no example database): the same examples every run.
What it once found at random — an untrusted key holding a newline split the loader's one-line
error in two — is kept below as fixed examples, for the bundle loader, the agent's config
loader and the ``medge`` command's error printer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent.bundle import Bundle
from edge_agent.config import load_config
from edge_agent.errors import BundleError, ConfigError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
FUZZ = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def work(bundle_dir: Path) -> Any:
    root = Path(tempfile.mkdtemp(prefix="medge-fuzz-"))
    shutil.copytree(bundle_dir, root / "b")
    original = (root / "b" / "manifest.json").read_bytes()
    yield root / "b", original
    shutil.rmtree(root)


def _load(bundle: Path, trusted: list[ed25519.Ed25519PublicKey] | None = None) -> None:
    message = ""
    try:
        Bundle.load(bundle, trusted)
    except BundleError as exc:
        message = str(exc)
    assert "\n" not in message, "one line"


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_manifest_bytes(work: Any, raw: bytes) -> None:
    bundle, original = work
    (bundle / "manifest.json").write_bytes(raw)
    try:
        _load(bundle)
    finally:
        (bundle / "manifest.json").write_bytes(original)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(pick=st.integers(min_value=0), value=json_values)
@example(pick=0, value={"\n": None})
@example(pick=3, value={"a\nb": [1]})
def test_any_field_replaced_by_any_value(work: Any, pick: int, value: Any) -> None:
    bundle, original = work
    doc = json.loads(original)
    paths = [p for p in _paths(doc) if p]
    path = paths[pick % len(paths)]
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (bundle / "manifest.json").write_text(json.dumps(doc))
    try:
        _load(bundle)
    finally:
        (bundle / "manifest.json").write_bytes(original)


@FUZZ
@given(sig=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_random_signature_files_are_refused(work: Any, sig: bytes) -> None:
    bundle, _ = work
    saved = (bundle / "manifest.sig").read_bytes()
    (bundle / "manifest.sig").write_bytes(sig)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    try:
        with pytest.raises(BundleError):
            Bundle.load(bundle, [key])
    finally:
        (bundle / "manifest.sig").write_bytes(saved)


# -- what the fuzzer found: a newline in an untrusted key --------------------------------------
def _edited(bundle: Path, original: bytes, edit: Any) -> str:
    doc = json.loads(original)
    edit(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    try:
        with pytest.raises(BundleError) as exc:
            Bundle.load(bundle)
    finally:
        (bundle / "manifest.json").write_bytes(original)
    return str(exc.value)


@pytest.mark.parametrize(
    ("edit", "shown"),
    [
        (
            lambda d: d["files"].update({"evil\nname": d["files"]["report.json"]}),
            "file 'evil\\nname' listed in the manifest is missing",
        ),
        (
            lambda d: d["metrics"].update({"x\ny": {"auc": "high"}}),
            "manifest field 'metrics.x\\ny.auc'",
        ),
        (lambda d: d.update(schema_version="9\r\n.0"), "schema version 9\\r\\n.0 is not"),
        (
            lambda d: d.update(positive_label="benign\nmalignant"),
            "positive_label 'benign\\nmalignant' is not a label",
        ),
    ],
    ids=["file-name", "metrics-key", "schema-version", "positive-label"],
)
def test_a_newline_in_an_untrusted_key_stays_escaped_on_one_line(
    work: Any, edit: Any, shown: str
) -> None:
    bundle, original = work
    message = _edited(bundle, original, edit)
    assert "\n" not in message and "\r" not in message
    assert shown in message


def test_a_newline_in_the_signers_key_id_stays_on_one_line(work: Any) -> None:
    bundle, _ = work
    saved = (bundle / "manifest.sig").read_bytes()
    doc = json.loads(saved)
    (bundle / "manifest.sig").write_text(json.dumps({**doc, "key_id": "k1\nforged: yes"}))
    try:
        with pytest.raises(BundleError, match=r"signed by key k1\\nforged: yes, which") as exc:
            Bundle.load(bundle, [ed25519.Ed25519PrivateKey.generate().public_key()])
    finally:
        (bundle / "manifest.sig").write_bytes(saved)
    assert "\n" not in str(exc.value)


def test_the_agent_config_loader_keeps_a_newline_key_on_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "site: ward-a\ndevice: us-01\nbundle: b\nidentity: i\n"
        'source: {path: x.npz}\n"co\\nlour": red\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "\n" not in str(exc.value) and "co\\nlour: Extra inputs" in str(exc.value)


def _medge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_medge_error_line_is_one_line(work: Any, tmp_path: Path) -> None:
    """`medge convert` names an untrusted path in its error; `medge evaluate` a manifest's key:
    either way stderr ends in one `medge: error:` line."""
    r = _medge(
        "convert",
        str(tmp_path / "no\nmodel.keras"),
        "--calib",
        "x.npz",
        "--eval",
        "x.npz",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith("medge: error: ")
    assert "no\\nmodel.keras: no such model file" in r.stderr.splitlines()[-1]
    bundle, original = work
    doc = json.loads(original)
    doc["files"]["evil\nname"] = doc["files"]["report.json"]
    (bundle / "manifest.json").write_text(json.dumps(doc))
    try:
        r = _medge("evaluate", str(bundle), "--data", str(tmp_path / "none.npz"))
    finally:
        (bundle / "manifest.json").write_bytes(original)
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("medge: error: ") and "evil\\nname" in last, r.stderr
