"""Shared fixtures: the zoo model converted once (and cached by content, see
``convert_cached``), real brokers per test, and ``side_by_side`` to run a module's slow
conversions two at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from edge_agent.bundle import SIGNATURE_NAME, Bundle, Preprocess, sign_bundle
from gateway.broker import RunningBroker, mosquitto_path, start_broker
from models import breast_cnn

DATA = breast_cnn.DATA


SITE = "ward-a"


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site with its device CA, the gateway's HPKE key and the bundle signer (throwaway keys
    generated for this test session)."""
    from gateway.site import init_site

    d = tmp_path_factory.mktemp("site") / SITE
    init_site(d, SITE)
    return d


@pytest.fixture(scope="session")
def identity(site_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """identity(device) -> the device's provisioned identity directory (made once)."""
    from gateway.site import provision_device

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("identities")

    def get(device: str) -> Path:
        if device not in made:
            made[device] = provision_device(site_dir, device, root / device)
        return made[device]

    return get


@pytest.fixture
def opener(site_dir: Path):  # type: ignore[no-untyped-def]
    from gateway.site import opener_for

    return opener_for(site_dir)


# --- converted bundles, cached by content ----------------------------------------------------
#
# A conversion takes 5-25 s; its result depends only on the bytes of its inputs, the request's
# fields and the code that converts. ``convert_cached(request)`` converts once per such key and
# copies the bundle from the cache afterwards, then signs the copy again with the request's key
# (each session makes its own throwaway signer, so the key is no part of the cache key).
#
# The cache lives in $MEDGE_TEST_CACHE (default: .pytest_cache/medge-bundles; `make clean`
# removes it; MEDGE_TEST_CACHE=off converts every time). The key hashes the sources of
# converter/ and edge_agent/ and the TensorFlow version, so editing the converter never serves
# a stale bundle.
#
# To switch a module's fixture from convert() to the cache:
#     from conftest import convert_cached
#     out = convert_cached(ConvertRequest(..., out=tmp / "name", sign_key=...))
#     bundle = Bundle.load(out)
# It suits a fixture that needs the bundle only: a test that checks what convert() logs,
# raises, returns or times must still call convert() itself.

ROOT = Path(__file__).resolve().parent.parent


def _hash_path(h: Any, path: Path) -> None:
    """Feed a file's bytes, or a directory's relative names and bytes (a SavedModel), to h."""
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
    elif path.is_file():
        h.update(path.read_bytes())
    else:
        h.update(b"missing:" + str(path).encode())


def _code_key() -> str:
    from medge.zoo import code_key

    return code_key()


def _field_key(h: Any, value: object) -> object:
    """A JSON-able stand-in for one request field; the bytes of files go into h."""
    if isinstance(value, Path):
        _hash_path(h, value)
        return "path"
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_field_key(h, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _field_key(h, v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def bundle_cache_key(request: Any) -> str:
    """sha256 of what a conversion depends on: the request's fields, the bytes of the files it
    names, the converting code. ``out`` counts by its name only; ``sign_key`` not at all."""
    h = hashlib.sha256(_code_key().encode())
    fields: dict[str, object] = {}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name == "sign_key":
            continue
        fields[f.name] = Path(value).name if f.name == "out" else _field_key(h, value)
    h.update(json.dumps(fields, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def bundle_cache_dir() -> Path | None:
    where = os.environ.get("MEDGE_TEST_CACHE", "")
    if where.lower() in {"off", "0", "none"}:
        return None
    return Path(where) if where else ROOT / ".pytest_cache" / "medge-bundles"


def convert_cached(request: Any) -> Path:
    """convert(request), from the cache when the same inputs were converted before; returns
    ``request.out``, signed with ``request.sign_key`` when it names one. Cache entries appear
    by an atomic rename, so two pytest runs sharing a cache never see half a bundle."""
    from converter import convert
    from edge_agent.keys import load_signer_key

    cache = bundle_cache_dir()
    if cache is None:
        convert(request)
        return Path(request.out)
    entry = cache / bundle_cache_key(request)
    if not entry.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        stage = cache / f".stage-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            convert(dataclasses.replace(request, out=stage / Path(request.out).name))
            try:
                (stage / Path(request.out).name).rename(entry)
            except OSError:
                if not entry.is_dir():  # another run put it there first: keep theirs
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    out = Path(request.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(entry, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)  # the entry's signer, not this request's
    if request.sign_key is not None:
        key = load_signer_key(request.sign_key)
        sign_bundle(out, key)
        Bundle.load(out, [key.public_key()])  # as convert() checks what it publishes
    return out


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Path:
    """The BreastMNIST CNN as a full-int8 LiteRT bundle, built and signed by the real converter
    (once per cache key: see ``convert_cached``)."""
    from converter import ConvertRequest

    out = tmp_path_factory.mktemp("bundle") / "breast-cnn"
    convert_cached(
        ConvertRequest(
            model=breast_cnn.WEIGHTS,
            calib=DATA,
            eval=DATA,
            out=out,
            profile="x86",
            preprocess=Preprocess(kind="scale01"),
            labels=breast_cnn.CLASS_NAMES,
            positive_label=breast_cnn.POSITIVE,
            calib_split="train",
            eval_split="val",
            name="breast-cnn",
            sign_key=site_dir / "bundle-signer.key",
            float_artifacts="none",  # the same file list on a quiet or a loaded machine
        )
    )
    return out


@pytest.fixture(scope="module")
def side_by_side(request: pytest.FixtureRequest) -> Iterator[Callable[..., dict[str, Future]]]:  # type: ignore[type-arg]
    """side_by_side({test name: job}) -> {test name: Future of job()}: the slow jobs of this
    module (a conversion, a ``medge convert`` run; each mostly one core) run two at a time, and
    only those whose test is selected. A name matches a test function or one of its parameter
    sets (``test_x[case]``). Called again in the module, it returns the jobs already started."""
    selected = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for name in (item.name, getattr(item, "originalname", item.name))
    }
    pool = ThreadPoolExecutor(2, thread_name_prefix="side-by-side")
    started: dict[str, Future] = {}  # type: ignore[type-arg]

    def start(jobs: dict[str, Callable[[], object]]) -> dict[str, Future]:  # type: ignore[type-arg]
        for name, job in jobs.items():
            if name not in started and name in selected:
                started[name] = pool.submit(job)
        return started

    yield start
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


@pytest.fixture
def loaded_bundle(bundle_dir: Path) -> Bundle:
    return Bundle.load(bundle_dir)


@pytest.fixture
def mosquitto() -> Iterator[RunningBroker]:
    """A real Mosquitto process on a free loopback port, MQTT 5."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (see .ci/run)")
    with start_broker("mosquitto") as broker:
        yield broker


@pytest.fixture
def embedded_broker() -> Iterator[RunningBroker]:
    """The embedded amqtt broker, MQTT 3.1.1 only."""
    with start_broker("embedded") as broker:
        yield broker


@pytest.fixture(scope="session")
def sealer(identity):  # type: ignore[no-untyped-def]
    """sealer(device) -> a Sealer with the device's provisioned key, as its agent would have."""
    import itertools

    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity

    def make(device: str, site: str = SITE, rotate_after: int = 100_000) -> Sealer:
        ident = DeviceIdentity.load(identity(device), SITE, device)
        epochs = itertools.count(1)
        return Sealer(site, device, ident.key, ident.recipient, lambda: next(epochs), rotate_after)

    return make


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (tests/pg.py); its URL names the
    maintenance database: make a fresh one per test with ``pg.new_database(postgres_url)``."""
    from pg import PostgresMissing, require_postgres, start_postgres

    try:
        require_postgres()
    except PostgresMissing as exc:
        pytest.fail(str(exc))
    with start_postgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$MEDGE_CACHE_DIR for the demo tests' zoo builds and demo runs (never set for other
    tests): zoo bundles converted once, here, and found again by the demo's medge.zoo.build."""
    return tmp_path_factory.mktemp("medge-cache")


@pytest.fixture(scope="session")
def wrist_bundle(zoo_cache: Path) -> Bundle:
    """The zoo's wrist fall LSTM, built as the demo builds it (lean) into ``zoo_cache``."""
    from medge.zoo import build

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDGE_CACHE_DIR", str(zoo_cache))
        return build("wrist_fall_lstm", lean=True)
