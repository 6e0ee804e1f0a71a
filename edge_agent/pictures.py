"""Which results carry pictures: the input thumbnail (:mod:`edge_agent.thumbnail`) and the CAM
heatmap (:mod:`edge_agent.cam`).

A picture costs more than the rest of a fast model's result (on the zoo CNN: about 10 us for
the thumbnail and 15 us for the CAM, against a 50 us invoke) and adds 1-3 KB to a message of
under 1 KB. At a camera's or an ultrasound probe's frame rate that is nothing; at thousands of
samples a second it is most of the device's work and of the link. So agent config
``pictures_max_hz`` caps how many results a second carry pictures (None: every result), and
the cap never hides what a clinician looks for: a result of the manifest's ``positive_label``
and a result whose class differs from the one before always carry them. Results left without
pictures are counted (telemetry ``pictures.capped``); pictured ones too (``pictures.made``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_agent.decode import Classification, Decoded
from edge_agent.model import Model
from edge_agent.telemetry import PipelineStats
from edge_agent.thumbnail import takes_images

__all__ = ["PictureCap"]


class PictureCap:
    """Decides, result by result, whether it carries pictures. ``max_hz`` None: always."""

    def __init__(
        self,
        max_hz: float | None,
        stats: PipelineStats,
        cam: bool = True,
        thumbnails: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_hz is not None and not max_hz > 0:
            raise ValueError(f"pictures_max_hz must be > 0 or None, got {max_hz}")
        self.gap = 0.0 if max_hz is None else 1.0 / max_hz
        self.stats, self.clock = stats, clock
        self.cam, self.thumbnails = cam, thumbnails
        self._has: dict[str, bool] = {}  # bundle id -> its results can carry a picture
        self._last_at = -float("inf")
        self._last_class: tuple[str, int] | None = None  # (bundle id, class) of the last result

    def take(self, decoded: Decoded, model: Model) -> bool:
        """True when this result gets its pictures (and counts it either way); False, and
        not counted, for a model whose results carry none (no CAM, not an image model)."""
        if not self._pictures(model):
            return False
        now = self.clock()
        wanted = now - self._last_at >= self.gap
        if isinstance(decoded, Classification):
            bundle = model.bundle
            key = (bundle.id, decoded.pred)
            # the first result, a change of class, a positive: always pictured
            changed = key != self._last_class
            wanted = wanted or changed or decoded.pred == bundle.manifest.positive_index
            self._last_class = key
        if wanted:
            self._last_at = now
        self.stats.picture_note("made" if wanted else "capped")
        return wanted

    def _pictures(self, model: Model) -> bool:
        bundle = model.bundle
        has = self._has.get(bundle.id)
        if has is None:
            m = bundle.manifest
            has = (self.cam and m.cam is not None) or (self.thumbnails and takes_images(m))
            self._has[bundle.id] = has
        return has
