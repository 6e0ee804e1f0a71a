from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Sample"]


@dataclass(frozen=True)
class Sample:
    """One unit of input: an image or a signal window, with its ground truth when replayed."""

    id: str
    data: np.ndarray
    label: int | None = None
