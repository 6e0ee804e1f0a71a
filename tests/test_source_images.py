"""The image-folder source on real BreastMNIST ultrasound images written out as PNG and JPEG."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.sources import ImagesSettings, ImagesSource, load_labelled

NPZ = Path(__file__).parents[1] / "models" / "data" / "breastmnist_dev.npz"
CLASSES = ["malignant", "normal_benign"]  # BreastMNIST: 0 = malignant, 1 = normal/benign


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The first 24 validation images as <class>/<index>.png, plus one JPEG and one bad file."""
    x, y, _ = load_labelled(NPZ, "val")
    assert y is not None
    root = tmp_path / "us"
    for i in range(24):
        d = root / CLASSES[y[i]]
        d.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(d / f"{i:03d}.png"), x[i])
    assert cv2.imwrite(str(root / CLASSES[y[24]] / "024.JPG"), x[24])
    (root / CLASSES[0] / "025.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root, x[:25], y[:25]


def test_labels_from_subfolders_and_pixels_as_written(
    folder: tuple[Path, np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    root, x, y = folder
    src = ImagesSource(ImagesSettings(path=root, labels="folder", color="grey", classes=CLASSES))
    assert len(src) == 26
    with caplog.at_level(logging.WARNING, "medge.agent.source.images"):
        out = list(src.stream(threading.Event()))
    assert len(out) == 25 and src.errors == {"unreadable": 1}
    told = [r.getMessage() for r in caplog.records if "025.png" in r.getMessage()]
    assert len(told) == 1 and "not a decodable image" in told[0]
    by_index = {int(Path(s.meta["file"]).stem): s for s in out}
    assert [by_index[i].label for i in range(25)] == y.tolist()
    for i in range(24):  # PNG is lossless: the very pixels of the data set
        np.testing.assert_array_equal(by_index[i].data, x[i])
    assert by_index[24].data.shape == (28, 28)  # the JPEG, lossy
    assert np.abs(by_index[24].data.astype(int) - x[24]).mean() < 8


def test_rgb_resize_sorted_order_and_limit(folder: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, _, _ = folder
    src = ImagesSource(ImagesSettings(path=root, size=(56, 56), limit=5))
    out = list(src.stream(threading.Event()))
    assert len(out) == 5 and all(s.label is None for s in out)
    assert out[0].data.shape == (56, 56, 3)
    files = [s.meta["file"] for s in out]
    assert files == sorted(files) and files[0].startswith("malignant/")


def test_classes_default_to_sorted_subfolders_and_unknown_ones_are_refused(
    folder: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, _, _ = folder
    assert ImagesSource(ImagesSettings(path=root, labels="folder")).classes == CLASSES
    with pytest.raises(SourceError, match="not in classes"):
        ImagesSource(ImagesSettings(path=root, labels="folder", classes=["malignant"]))
    with pytest.raises(SourceError, match="no such folder"):
        ImagesSource(ImagesSettings(path=root / "nope"))
