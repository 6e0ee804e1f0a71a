"""medge converter: trained models into verified, quantized bundles. TensorFlow is only ever
imported in a child process, so a converter crash is a reported failure, not a lost session."""

from __future__ import annotations

from converter.convert import convert
from converter.errors import ConversionError
from converter.evaluate import evaluate_bundle
from converter.metrics import auc, classification_metrics
from converter.request import ConvertRequest

__all__ = [
    "ConversionError",
    "ConvertRequest",
    "auc",
    "classification_metrics",
    "convert",
    "evaluate_bundle",
]
