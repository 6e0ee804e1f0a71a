"""Warnings said once: messages that differ only in a quoted name or a number (one per tensor,
per layer, per channel) become one line with a count, e.g.

    tensor 'conv1/w' has no calibration range (said of 12 tensors: 'conv1/w', 'conv2/w', ...)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["collapse"]

_NAME = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")
_SHOWN = 3


def _template(message: str) -> tuple[str, list[str]]:
    names = _NAME.findall(message)
    return _NUMBER.sub("#", _NAME.sub("'*'", message)), names


def collapse(messages: Iterable[str]) -> list[str]:
    """``messages`` in first-seen order, exact repeats dropped and messages of one template
    (the same words, other quoted names or numbers) said once with how many there were."""
    groups: dict[str, list[str]] = {}
    for m in messages:
        key = _template(m)[0]
        if m not in groups.setdefault(key, []):
            groups[key].append(m)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        names = [n for m in same for n in _template(m)[1]]
        distinct = list(dict.fromkeys(names))
        shown = ", ".join(distinct[:_SHOWN]) + (", ..." if len(distinct) > _SHOWN else "")
        about = f": {shown}" if distinct else ""
        out.append(f"{same[0]} (said {len(same)} times{about})")
    return out
