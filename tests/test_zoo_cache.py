"""The zoo's bundle cache (medge.zoo.build without ``out``): a cached bundle is used only when
it loads and was made from the model's own weights; else it is rebuilt, told in one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import converter
from edge_agent.bundle import Bundle

pytestmark = pytest.mark.slow  # the wrist bundle is converted once per session (conftest)


class Rebuilt(Exception):
    """Raised instead of converting: the cache was not used."""


def _cache(zoo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(zoo_cache, copy)
    monkeypatch.setenv("MEDGE_CACHE_DIR", str(copy))

    def no_conversion(req: object) -> None:
        raise Rebuilt

    monkeypatch.setattr(converter, "convert", no_conversion)
    return copy


def _entry(cache: Path, bundle: Bundle) -> Path:
    """The copy's entry of ``bundle`` (the one this session's code built)."""
    return cache / "bundles" / bundle.directory.name


def test_a_good_cached_bundle_is_used(
    wrist_bundle: Bundle, zoo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medge.zoo import build

    _cache(zoo_cache, tmp_path, monkeypatch)
    assert build("wrist_fall_lstm", lean=True).manifest.name == wrist_bundle.manifest.name


@pytest.mark.parametrize("damage", ["manifest says other weights", "a file changed"])
def test_a_stale_or_broken_cached_bundle_is_rebuilt_and_said(
    wrist_bundle: Bundle,
    zoo_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    from medge.zoo import build

    entry = _entry(_cache(zoo_cache, tmp_path, monkeypatch), wrist_bundle)
    if damage == "a file changed":
        (entry / "report.md").write_text("changed\n")
        said = "'report.md' does not match its hash"
    else:
        path = entry / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["provenance"]["source_sha256"] = "0" * 64
        path.write_text(json.dumps(manifest))
        said = "was not made from wrist_fall_lstm.keras"
    with caplog.at_level(logging.WARNING, logger="medge.zoo"), pytest.raises(Rebuilt):
        build("wrist_fall_lstm", lean=True)
    assert [r.getMessage() for r in caplog.records if said in r.getMessage()], caplog.text
