"""PhysioNet WFDB records with numpy alone: the header (.hea), signal formats 212/16/61/80/160,
and MIT-format annotation files (.atr). See https://physionet.org/physiotools/wag/ (header(5),
signal(5), annot(5)). Only single-segment records with one sample per frame per signal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import SourceError

__all__ = [
    "BEAT_CODES",
    "PVC",
    "WfdbHeader",
    "WfdbSignal",
    "read_annotations",
    "read_header",
    "read_record",
]

# annotation codes that mark a beat (wfdb isqrs); PVC is 'V'
BEAT_CODES = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 25, 30, 34, 35, 38, 41})
PVC = 5
_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63
_INVALID = {"212": -2048, "16": -32768, "61": -32768, "80": -128, "160": -32768}


@dataclass(frozen=True)
class WfdbSignal:
    file: str
    fmt: str
    offset: int
    gain: float
    baseline: int
    units: str
    init: int | None
    checksum: int | None
    description: str


@dataclass(frozen=True)
class WfdbHeader:
    name: str
    fs: float
    nsamp: int | None
    signals: list[WfdbSignal]

    def index(self, lead: int | str) -> int:
        """The signal number of a lead given by number or description ('MLII')."""
        if isinstance(lead, int):
            if not 0 <= lead < len(self.signals):
                raise SourceError(f"{self.name}: no signal {lead} (has {len(self.signals)})")
            return lead
        names = [s.description for s in self.signals]
        if lead not in names:
            raise SourceError(f"{self.name}: no lead '{lead}' (leads: {', '.join(names)})")
        return names.index(lead)


def read_header(path: Path) -> WfdbHeader:
    """Parse ``<record>.hea``; comment lines (#) are ignored."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="latin-1").splitlines()]
    except OSError as exc:
        raise SourceError(f"{path}: cannot read WFDB header ({exc.strerror})") from exc
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise SourceError(f"{path}: empty WFDB header")
    rec = lines[0].split()
    if "/" in rec[0]:
        raise SourceError(f"{path}: multi-segment records are not supported")
    try:
        nsig = int(rec[1])
        fs = float(re.match(r"[\d.]+", rec[2]).group()) if len(rec) > 2 else 250.0  # type: ignore[union-attr]
        nsamp = int(rec[3]) if len(rec) > 3 else None
        signals = [_signal(ln.split(maxsplit=8)) for ln in lines[1 : 1 + nsig]]
    except (IndexError, ValueError, AttributeError) as exc:
        raise SourceError(f"{path}: malformed WFDB header ({exc})") from exc
    if len(signals) != nsig:
        raise SourceError(f"{path}: header names {nsig} signals but describes {len(signals)}")
    return WfdbHeader(rec[0], fs, nsamp, signals)


def _signal(f: list[str]) -> WfdbSignal:
    m = re.fullmatch(r"(\d+)(x\d+)?(:\d+)?(\+\d+)?", f[1])
    if m is None or (m.group(2) not in (None, "x1")):
        raise ValueError(f"format '{f[1]}' (only one sample per frame is supported)")
    fmt, offset = m.group(1), int(m.group(4)[1:]) if m.group(4) else 0
    adczero = int(f[4]) if len(f) > 4 else 0
    gain, baseline, units = 200.0, adczero, "mV"
    if len(f) > 2:
        g = re.fullmatch(r"([-\d.eE+]+)(?:\((-?\d+)\))?(?:/(\S+))?", f[2])
        if g is None:
            raise ValueError(f"gain '{f[2]}'")
        gain = float(g.group(1)) or 200.0
        baseline = int(g.group(2)) if g.group(2) else adczero
        units = g.group(3) or "mV"
    return WfdbSignal(
        file=f[0],
        fmt=fmt,
        offset=offset,
        gain=gain,
        baseline=baseline,
        units=units,
        init=int(f[5]) if len(f) > 5 else None,
        checksum=int(f[6]) if len(f) > 6 else None,
        description=f[8] if len(f) > 8 else "",
    )


def _decode(raw: bytes, fmt: str, count: int) -> np.ndarray:
    """``count`` digital samples (int32) of one signal file, frames interleaved."""
    if fmt == "212":
        b = np.frombuffer(raw, np.uint8)
        pairs = b[: 3 * ((count + 1) // 2)]
        if len(pairs) % 3:
            pairs = np.concatenate([pairs, np.zeros(3 - len(pairs) % 3, np.uint8)])
        t = pairs.reshape(-1, 3).astype(np.int32)
        out = np.empty(2 * len(t), np.int32)
        out[0::2] = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
        out[1::2] = t[:, 2] | ((t[:, 1] & 0xF0) << 4)
        out[out > 2047] -= 4096
        return out[:count]
    dtypes = {"16": "<i2", "61": ">i2", "80": "u1", "160": "<u2"}
    if fmt not in dtypes:
        raise SourceError(f"WFDB signal format {fmt} is not supported (212, 16, 61, 80, 160 are)")
    out = np.frombuffer(raw, dtypes[fmt])[:count].astype(np.int32)
    if fmt == "80":
        out -= 128
    elif fmt == "160":
        out -= 32768
    return out


def read_record(
    hea: Path, leads: list[int | str] | None = None
) -> tuple[WfdbHeader, np.ndarray, list[str]]:
    """(header, physical signal (N, C) float32 with NaN where a sample is invalid, problems).

    ``problems`` lists checksum mismatches and short files, for the caller to count and tell.
    """
    head = read_header(hea)
    picks = [head.index(x) for x in leads] if leads else list(range(len(head.signals)))
    problems: list[str] = []
    files: dict[str, list[int]] = {}
    for i, s in enumerate(head.signals):
        files.setdefault(s.file, []).append(i)
    digital: dict[int, np.ndarray] = {}
    for fname, members in files.items():
        if not set(members) & set(picks):
            continue
        sig0 = head.signals[members[0]]
        try:
            raw = (hea.parent / fname).read_bytes()[sig0.offset :]
        except OSError as exc:
            raise SourceError(f"{hea.parent / fname}: cannot read ({exc.strerror})") from exc
        per = len(members)
        have = len(raw) * 2 // 3 if sig0.fmt == "212" else len(raw) // _width(sig0.fmt)
        n = head.nsamp if head.nsamp is not None else have // per
        if have < n * per:
            problems.append(f"{fname} holds {have // per} of {n} samples; short record")
            n = have // per
        flat = _decode(raw, sig0.fmt, n * per).reshape(n, per)
        for j, i in enumerate(members):
            digital[i] = flat[:, j]
    n = min(len(digital[i]) for i in picks)
    out = np.empty((n, len(picks)), np.float32)
    for c, i in enumerate(picks):
        s, d = head.signals[i], digital[i][:n]
        if s.checksum is not None and n == head.nsamp:
            got = int(d.sum(dtype=np.int64)) & 0xFFFF
            got = got - 65536 if got >= 32768 else got  # a 16-bit two's complement sum
            if got != s.checksum:
                problems.append(f"signal {s.description}: checksum {got} != header {s.checksum}")
        bad = d == _INVALID.get(s.fmt)
        out[:, c] = (d - s.baseline) / s.gain
        out[bad, c] = np.nan
    return head, out, problems


def _width(fmt: str) -> int:
    return 1 if fmt == "80" else 2


def read_annotations(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, code) of every annotation in an MIT-format file such as ``100.atr``."""
    try:
        words = np.fromfile(path, "<u2").tolist()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read annotations ({exc.strerror})") from exc
    t, i, samples, codes = 0, 0, [], []
    while i < len(words):
        code, value = words[i] >> 10, words[i] & 0x3FF
        i += 1
        if code == 0 and value == 0:
            break
        if code == _SKIP:
            if i + 2 > len(words):
                raise SourceError(f"{path}: truncated SKIP annotation")
            skip = (words[i] << 16) | words[i + 1]
            t += skip - (1 << 32) if skip & 0x80000000 else skip
            i += 2
        elif code == _AUX:
            i += (value + 1) // 2
        elif code in (_NUM, _SUB, _CHN):
            continue
        else:
            t += value
            samples.append(t)
            codes.append(code)
    return np.asarray(samples, np.int64), np.asarray(codes, np.uint8)
