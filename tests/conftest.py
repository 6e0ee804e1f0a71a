"""Shared fixtures: the zoo model converted once per session, real brokers per test, and
``side_by_side`` to run a module's slow conversions two at a time."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_agent.bundle import Bundle, Preprocess
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


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Path:
    """The BreastMNIST CNN as a full-int8 LiteRT bundle, built and signed by the real converter."""
    from converter import ConvertRequest, convert

    out = tmp_path_factory.mktemp("bundle") / "breast-cnn"
    convert(
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
