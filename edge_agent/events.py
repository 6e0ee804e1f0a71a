"""Events from a stream of per-window class scores: one fall is one event, a run of PVCs is one.

Each rule of the manifest's ``decode.events`` (:class:`edge_agent.bundle.EventRule`) has its own
state. An event starts once the score of the rule's ``label`` has been >= ``on`` for
``min_windows`` consecutive windows, and ends at the first window whose score drops below
``off`` (hysteresis: a score that flickers between ``off`` and ``on`` keeps the event going). An
onset that begins within ``refractory_s`` of the last event's start is suppressed, whole, and
counted. Each message carries the rule's ``alert`` and ``severity`` (the gateway raises an
alert for the start of an event marked ``alert: true``, at that severity). Times are the
sample times the source gives (recorded time for a replay), never the wall clock.
The tracker returns message bodies for the ``event`` topic; it sends nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.bundle import EventRule
from edge_agent.errors import BundleError, one_line

__all__ = ["MAX_INPUTS", "EventTracker"]

MAX_INPUTS = 32
"""At most this many input ids are listed in one event message (the first ones)."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # it travels in the envelope's clear header


@dataclass
class _State:
    streak: int = 0  # consecutive windows >= on while no event is open
    streak_start: float = 0.0
    streak_inputs: list[str] = field(default_factory=list)
    streak_peak: float = 0.0
    suppressed: bool = False  # the current onset falls in the refractory time
    active: bool = False
    start: float = 0.0
    last: float = 0.0
    peak: float = 0.0
    windows: int = 0
    inputs: list[str] = field(default_factory=list)
    last_start: float | None = None


class EventTracker:
    """Feed it ``(time, scores, input id)`` per window with :meth:`update`; call :meth:`finish`
    at the end of the stream to close what is still open."""

    def __init__(self, rules: Sequence[EventRule], labels: Sequence[str]) -> None:
        self.rules = list(rules)
        self._index = []
        for r in self.rules:
            if r.label not in labels:
                raise BundleError(one_line(f"event {r.name!r} names unknown label {r.label!r}"))
            if not _NAME.match(r.name):
                raise BundleError(one_line(f"event name {r.name!r} must be 1-32 of [a-z0-9_-]"))
            self._index.append(list(labels).index(r.label))
        self._states = [_State() for _ in self.rules]
        self.suppressed: dict[str, int] = {}
        """Onsets suppressed by the refractory time, per rule name."""
        self.time_resets = 0
        """Windows whose time went back (a looped recording starting again, a source clock
        reset): each ended what was open (``ended_by: time_reset``) and cleared the refractory
        time, which cannot be measured across it."""
        self._t: float | None = None

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def last_time(self) -> float | None:
        """The time of the last window seen (None before the first)."""
        return self._t

    def update(self, t: float, scores: Sequence[float], input_id: str) -> list[dict[str, Any]]:
        """Event messages (start and end) that this window causes, in order."""
        out: list[dict[str, Any]] = []
        t = float(t)
        if self._t is not None and t < self._t:
            self.time_resets += 1
            out.extend(self._reset())
        self._t = t
        for rule, k, st in zip(self.rules, self._index, self._states, strict=True):
            out.extend(self._step(rule, st, t, float(scores[k]), input_id))
        return out

    def _reset(self) -> list[dict[str, Any]]:
        """Time went back: end what is open, forget onsets and the last start."""
        out = []
        for i, (rule, st) in enumerate(zip(self.rules, self._states, strict=True)):
            if st.active:
                out.append(self._end(rule, st, "time_reset"))
            self._states[i] = _State()
        return out

    def finish(self) -> list[dict[str, Any]]:
        """End every open event (the stream ended), marked ``ended_by: stream_end``."""
        out = []
        for rule, st in zip(self.rules, self._states, strict=True):
            if st.active:
                out.append(self._end(rule, st, "stream_end"))
        return out

    def _step(
        self, rule: EventRule, st: _State, t: float, score: float, input_id: str
    ) -> list[dict[str, Any]]:
        if st.active:
            if score >= rule.off:
                st.last, st.peak, st.windows = t, max(st.peak, score), st.windows + 1
                if len(st.inputs) < MAX_INPUTS:
                    st.inputs.append(input_id)
                return []
            return [self._end(rule, st, "score")]
        if score < rule.on:
            st.streak, st.suppressed = 0, False
            return []
        if st.streak == 0:
            st.streak_start, st.streak_inputs, st.streak_peak = t, [], score
            refractory = st.last_start is not None and t - st.last_start < rule.refractory_s
            if refractory:
                st.suppressed = True
                self.suppressed[rule.name] = self.suppressed.get(rule.name, 0) + 1
        st.streak += 1
        st.streak_peak = max(st.streak_peak, score)
        if len(st.streak_inputs) < MAX_INPUTS:
            st.streak_inputs.append(input_id)
        if st.suppressed or st.streak < rule.min_windows:
            return []
        st.active, st.start, st.last = True, st.streak_start, t
        st.peak, st.windows, st.inputs = st.streak_peak, st.streak, list(st.streak_inputs)
        st.last_start, st.streak = st.start, 0
        return [self._body(rule, st, "start")]

    def _end(self, rule: EventRule, st: _State, why: str) -> dict[str, Any]:
        st.active, st.streak, st.suppressed = False, 0, False
        body = self._body(rule, st, "end")
        body.update(end=st.last, duration_s=round(st.last - st.start, 6), ended_by=why)
        return body

    @staticmethod
    def _body(rule: EventRule, st: _State, state: str) -> dict[str, Any]:
        return {
            "event": rule.name,
            "state": state,
            "label": rule.label,
            "start": st.start,
            "peak": round(st.peak, 6),
            "windows": st.windows,
            "input": list(st.inputs),
            "alert": rule.alert,
            "severity": rule.severity,
        }
