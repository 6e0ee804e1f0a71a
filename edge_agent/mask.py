"""Masks as pixels: connected components and the outer contour of a boolean mask, with OpenCV
where it is installed and the same result from a numpy fallback without it. decode.py (the
result's contour) and measure.py (the fitted ellipse) build on them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["components", "cv2_or_none", "trace_contour"]


def cv2_or_none() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (int32 label image, 0 = background; count)."""
    mask = np.asarray(mask, dtype=bool)
    cv2 = cv2_or_none()
    if cv2 is not None:
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        return lab.astype(np.int32), int(n) - 1
    return _components_numpy(mask)


def _row_runs(mask: np.ndarray) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """The runs of True of each row: (row, start, end exclusive), and each row's run ids."""
    runs: list[tuple[int, int, int]] = []
    row_runs: list[list[int]] = []
    for y in range(mask.shape[0]):
        d = np.diff(np.concatenate(([0], mask[y].view(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        row_runs.append([])
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            row_runs[-1].append(len(runs))
            runs.append((y, s, e))
    return runs, row_runs


def _components_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """components() without OpenCV: union-find over the runs of each row."""
    runs, row_runs = _row_runs(mask)
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, len(row_runs)):
        above, k = row_runs[y - 1], 0  # runs of a row are sorted and disjoint: two pointers
        for i in row_runs[y]:
            _, s, e = runs[i]
            while k < len(above) and runs[above[k]][2] < s:
                k += 1
            m = k
            while m < len(above) and runs[above[m]][1] <= e:  # touching, diagonals included
                ri, rj = find(i), find(above[m])
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
                m += 1
    lab = np.zeros(mask.shape, np.int32)
    ids: dict[int, int] = {}
    for i, (y, s, e) in enumerate(runs):
        lab[y, s:e] = ids.setdefault(find(i), len(ids) + 1)
    return lab, len(ids)


# 8 neighbours clockwise on screen (x right, y down), starting east
_DIRS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


def trace_contour(mask: np.ndarray) -> list[list[int]]:
    """The outer boundary of the (single) component in a boolean mask, as [x, y] pixels in
    clockwise order (Moore-neighbour tracing); [] for an empty mask."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return []
    start = (int(xs[0]), int(ys[0]))  # top-most, then left-most: its west neighbour is empty
    out, p, back = [start], start, 4  # 'back': direction from p to the last background pixel
    for _ in range(4 * int(ys.size) + 8):
        for i in range(1, 9):
            d = (back + i) % 8
            q = (p[0] + _DIRS[d][0], p[1] + _DIRS[d][1])
            if m[q[1], q[0]]:
                prev = (back + i - 1) % 8  # background, seen from p
                bx, by = p[0] + _DIRS[prev][0], p[1] + _DIRS[prev][1]
                back = _DIRS.index((bx - q[0], by - q[1]))
                p = q
                break
        else:
            break  # a single pixel
        if p == start:
            break
        out.append(p)
    return [[x - 1, y - 1] for x, y in out]
