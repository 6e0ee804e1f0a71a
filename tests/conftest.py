"""Shared fixtures: the zoo model converted once per session, real brokers per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.bundle import Bundle, Preprocess
from gateway.broker import RunningBroker, mosquitto_path, start_broker
from models import breast_cnn

DATA = breast_cnn.DATA


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BreastMNIST CNN as a full-int8 LiteRT bundle, built by the real converter."""
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
        )
    )
    return out


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
