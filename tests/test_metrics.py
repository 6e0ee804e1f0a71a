from __future__ import annotations

import itertools

import numpy as np
import pytest

from converter.metrics import agreement, auc, classification_metrics


def _auc_brute(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert auc(y, s) == pytest.approx(_auc_brute(y, s))


def test_auc_undefined_with_one_class() -> None:
    assert auc(np.ones(5), np.arange(5)) is None


def test_sensitivity_specificity_for_positive_class_zero() -> None:
    # positive class is 0 (e.g. malignant): 3 positives, 2 found; 4 negatives, 1 false alarm
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0])
    scores = np.eye(2)[pred]
    m = classification_metrics(y, scores, pred, positive=0)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["confusion"] == [[2, 1], [1, 3]]


def test_agreement() -> None:
    assert agreement(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 1])) == 0.75
