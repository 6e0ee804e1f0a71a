"""The `medge convert` arguments of the zoo's breast CNN (its data, splits, preprocessing and
labels), shared by the tests that run the converter's command line."""

from __future__ import annotations

from models import breast_cnn

DATA = str(breast_cnn.DATA)
BREAST_CNN_ARGS = [
    "--calib",
    DATA,
    "--calib-split",
    "train",
    "--eval",
    DATA,
    "--eval-split",
    "val",
    "--preprocess",
    "scale01",
    "--labels",
    "malignant,benign",
    "--positive",
    "malignant",
]
