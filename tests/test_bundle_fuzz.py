"""Fuzzing the manifest and signature parsers: whatever the bytes, loading a bundle either
succeeds or raises one BundleError — never another exception."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.bundle import Bundle
from edge_agent.errors import BundleError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=600, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


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
