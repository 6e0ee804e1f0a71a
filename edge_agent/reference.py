"""The bundle's reference summary, and how both sides bin samples for the drift index.

The converter summarises the reference data (converter.reference) with
:func:`summarize_signal`, :func:`summarize_images` and :func:`summarize_scores` into the
manifest's ``reference`` (:class:`edge_agent.bundle.Reference`); the agent's drift monitor
(:mod:`edge_agent.drift`) bins live samples with :func:`bin_counts`, :func:`image_counts` and
:func:`score_bin`, the same functions, and compares with :func:`psi`. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_agent.bundle import ChannelSummary, ImageSummary, ScoreSummary
from edge_agent.signal_quality import rail_shares

__all__ = [
    "IMAGE_BINS",
    "MAX_CHANNELS",
    "MAX_PIXELS",
    "PSI_LEVELS",
    "QUANTILE_LEVELS",
    "SCORE_BINS",
    "bin_counts",
    "image_counts",
    "psi",
    "rounded",
    "score_bin",
    "summarize_images",
    "summarize_scores",
    "summarize_signal",
]

QUANTILE_LEVELS = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
PSI_LEVELS = (0.001, 0.01, 0.99, 0.999)
IMAGE_BINS = 32
SCORE_BINS = 20
MAX_CHANNELS = 32  # a signal's first channels summarised
MAX_PIXELS = 1 << 16  # pixels of one frame binned (an evenly strided subset of a larger one)


def rounded(v: float) -> float:
    """Six significant digits: what the manifest and the telemetry keep."""
    return float(f"{float(v):.6g}")


def bin_counts(values: np.ndarray, edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """Values per bin cut at ``edges`` (a value equal to an edge counts in the bin above)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values.ravel(), side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def image_counts(frame: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Pixel values per equal bin over [lo, hi) (outside: the end bins); a frame of more than
    MAX_PIXELS values is binned by an evenly strided subset."""
    v = np.asarray(frame, dtype=np.float64).ravel()
    if v.size > MAX_PIXELS:
        v = v[:: -(-v.size // MAX_PIXELS)]
    idx = np.clip(((v - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)
    return np.bincount(idx, minlength=bins).astype(np.float64)


def score_bin(score: float) -> int:
    """The score histogram's bin of a score in [0, 1]."""
    return min(max(int(score * SCORE_BINS), 0), SCORE_BINS - 1)


def psi(expected: Sequence[float], n_expected: int, counts: np.ndarray) -> float:
    """PSI of ``counts`` (the live window, per bin) against the reference's shares
    ``expected`` of ``n_expected`` samples; both smoothed by half a sample per bin."""
    k = len(expected)
    e = (np.asarray(expected, dtype=np.float64) * n_expected + 0.5) / (n_expected + 0.5 * k)
    total = float(counts.sum())
    a = (counts + 0.5) / (total + 0.5 * k)
    return float(np.sum((a - e) * np.log(a / e)))


def summarize_signal(samples: np.ndarray) -> list[ChannelSummary]:
    """Per channel of (N, L[, C]) raw samples (the first MAX_CHANNELS): mean, std, quantiles
    at QUANTILE_LEVELS, the within-sample std's 1st percentile and median, the largest share at
    the rail (the clipping the data already had), and the drift index's bins."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[..., None] if x.ndim == 2 else x.reshape(len(x), x.shape[1], -1)
    out = []
    for c in range(min(x.shape[2], MAX_CHANNELS)):
        ch = x[:, :, c]
        v = ch.ravel()
        edges = np.quantile(v, PSI_LEVELS)
        shares = bin_counts(v, edges) / v.size
        rails = rail_shares(ch.T)  # (L, N): one share per sample
        out.append(
            ChannelSummary(
                mean=rounded(v.mean()),
                std=rounded(v.std()),
                quantiles=[rounded(q) for q in np.quantile(v, QUANTILE_LEVELS)],
                window_std=[rounded(q) for q in np.quantile(ch.std(axis=1), (0.01, 0.5))],
                rail_share=rounded(max(rails)),
                psi_edges=[rounded(e) for e in edges],
                psi_shares=[rounded(s) for s in shares],
            )
        )
    return out


def summarize_images(samples: np.ndarray, clip: bool = False) -> ImageSummary:
    """The intensity histogram (IMAGE_BINS bins) of raw images, or of every frame of clips:
    over [0, 256) for 8-bit data, else over the data's own [min, max]."""
    x = np.asarray(samples)
    if x.dtype == np.uint8:
        lo, hi = 0.0, 256.0
    else:
        lo, hi = float(np.min(x)), float(np.max(x))
        hi = hi if hi > lo else lo + 1.0
    counts = np.zeros(IMAGE_BINS)
    total, sq = 0.0, 0.0
    for s in x:
        f = np.asarray(s, dtype=np.float64)
        for frame in f if clip else [f]:
            counts += image_counts(frame, lo, hi, IMAGE_BINS)
        total, sq = total + f.sum(), sq + np.square(f).sum()
    n = x.size
    mean = total / n
    return ImageSummary(
        range=[rounded(lo), rounded(hi)],
        histogram=[rounded(c) for c in counts / counts.sum()],
        mean=rounded(mean),
        std=rounded(np.sqrt(max(sq / n - mean * mean, 0.0))),
        clip=clip,
    )


def summarize_scores(
    scores: np.ndarray, preds: np.ndarray, labels: Sequence[str], positive: int | None, source: str
) -> ScoreSummary:
    """The float model's decoded class scores (N, K) and predictions (N,): the histogram of
    the positive class's score (the top score without one) and how often each class won."""
    s = np.asarray(scores, dtype=np.float64)
    col = s[:, positive] if positive is not None else s.max(axis=1)
    hist = np.bincount([score_bin(v) for v in col], minlength=SCORE_BINS) / len(col)
    freq = np.bincount(np.asarray(preds, dtype=np.int64), minlength=len(labels)) / len(preds)
    return ScoreSummary(
        score_of=labels[positive] if positive is not None else "top",
        histogram=[rounded(h) for h in hist],
        class_frequencies={lab: rounded(f) for lab, f in zip(labels, freq, strict=False)},
        count=len(col),
        source=source,  # type: ignore[arg-type]  # str: pydantic validates it
    )
