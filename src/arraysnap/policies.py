"""When to checkpoint: every N steps, every T seconds, or at the Young/Daly interval.

A policy answers ``due(step, now)`` and is told about each capture (its step, its wall time
and how long it blocked the caller). Policies combine with ``|``: whichever is due first.
``Store.due(step)`` asks the store's policy; a policy can also be used alone.

>>> policy = every(steps=100) | every(seconds=3600)
>>> policy.due(0, now=0.0), policy.due(100, now=1.0)
(False, True)
>>> policy.captured(100, now=1.0, blocking_seconds=0.01)
>>> policy.due(150, now=2.0), policy.due(200, now=3.0)
(False, True)

The Young/Daly interval is ``sqrt(2 * C * MTBF)``, with C the measured blocking cost of this
run's own captures (the median of the recent ones):

>>> yd = young_daly(mtbf="1h")
>>> yd.captured(0, now=0.0, blocking_seconds=0.5)
>>> round(yd.interval(), 1)  # sqrt(2 * 0.5 * 3600)
60.0
>>> yd.due(1, now=59.0), yd.due(2, now=61.0)
(False, True)
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import deque
from typing import Protocol, runtime_checkable

__all__ = ["AnyOf", "Every", "Policy", "YoungDaly", "every", "parse_duration", "parse_policy",
           "young_daly"]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|m|min|h|d)?\s*$")


def parse_duration(value: object, what: str = "duration") -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"30m"``, ``"24h"``, ``"2d"``.

    >>> parse_duration("24h"), parse_duration(1.5), parse_duration("30 m")
    (86400.0, 1.5, 1800.0)
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds or a string like '24h', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2) or ""]
    else:
        raise ValueError(f"{what} must be a number of seconds or a string like '90s', '30m', "
                         f"'24h' or '2d', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive, finite duration, got {value!r}")
    return seconds


@runtime_checkable
class Policy(Protocol):
    """What the store needs of a checkpoint policy."""

    def due(self, step: int | None, now: float | None = None) -> bool:
        """True when a capture at `step` (at wall time `now`) is due."""

    def captured(self, step: int | None, now: float, blocking_seconds: float) -> None:
        """Record a capture: its step, its wall time, and how long it blocked the caller."""


class _Base:
    def __or__(self, other: object) -> AnyOf:
        if not isinstance(other, Policy):
            return NotImplemented
        return AnyOf(self, other)  # type: ignore[arg-type]


class Every(_Base):
    """Due every `steps` steps and/or every `seconds` of wall time (whichever comes first).

    Step captures land on multiples of `steps` (the first one after the step of the last
    capture, or of the first ``due()`` call), so a resumed run keeps its cadence and
    ``keep_every`` tiers find their snapshots; time is counted from the last capture (or
    from the first ``due()`` call).

    >>> policy = Every(steps=10)
    >>> [s for s in range(0, 35) if policy.due(s) and policy.captured(s, 0.0, 0.0) is None]
    [10, 20, 30]
    """

    def __init__(self, steps: int | None = None, seconds: float | str | None = None) -> None:
        if steps is None and seconds is None:
            raise ValueError("every() needs steps=N, seconds=T, or both")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.seconds = None if seconds is None else parse_duration(seconds, "seconds")
        self._last_step: int | None = None
        self._last_time: float | None = None

    def due(self, step: int | None, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self._last_time is None:
            self._last_time = now
        if self.seconds is not None and now - self._last_time >= self.seconds:
            return True
        if self.steps is not None and step is not None:
            if self._last_step is None:
                self._last_step = step
            # Aligned to multiples of `steps`, so that captures land on keep_every's tiers.
            return step // self.steps > self._last_step // self.steps
        return False

    def captured(self, step: int | None, now: float, blocking_seconds: float) -> None:
        self._last_time = now
        if step is not None:
            self._last_step = step

    def __repr__(self) -> str:
        parts = [f"steps={self.steps}"] if self.steps is not None else []
        parts += [f"seconds={self.seconds:g}"] if self.seconds is not None else []
        return f"every({', '.join(parts)})"


class YoungDaly(_Base):
    """Due every ``sqrt(2 * C * MTBF)`` seconds, C being the measured blocking cost.

    C is the median of the last `window` captures' blocking time (the first capture, which
    also allocates the baselines, counts only until a second one is measured). Before any
    capture the first ``due()`` is true, so that C gets measured.

    >>> policy = YoungDaly(mtbf=3600)
    >>> policy.due(0, now=0.0)
    True
    """

    def __init__(self, mtbf: float | str, window: int = 9) -> None:
        self.mtbf = parse_duration(mtbf, "mtbf")
        self._costs: deque[float] = deque(maxlen=window)
        self._first_cost: float | None = None
        self._last_time: float | None = None

    def cost(self) -> float | None:
        """The blocking cost C used in the formula, in seconds (None before any capture)."""
        if self._costs:
            return statistics.median(self._costs)
        return self._first_cost

    def interval(self) -> float | None:
        """The current checkpoint interval in seconds (None before any capture)."""
        cost = self.cost()
        return None if cost is None else math.sqrt(2.0 * max(cost, 1e-6) * self.mtbf)

    def due(self, step: int | None, now: float | None = None) -> bool:
        interval = self.interval()
        if interval is None or self._last_time is None:
            return True
        now = time.time() if now is None else now
        return now - self._last_time >= interval

    def captured(self, step: int | None, now: float, blocking_seconds: float) -> None:
        if self._first_cost is None:
            self._first_cost = blocking_seconds
        else:
            self._costs.append(blocking_seconds)
        self._last_time = now

    def __repr__(self) -> str:
        return f"young_daly(mtbf={self.mtbf:g})"


class AnyOf(_Base):
    """Due when any of its policies is due.

    >>> AnyOf(every(steps=5), every(seconds=60))
    every(steps=5) | every(seconds=60)
    """

    def __init__(self, *policies: Policy) -> None:
        flat: list[Policy] = []
        for policy in policies:
            flat.extend(policy.policies if isinstance(policy, AnyOf) else [policy])
        self.policies = tuple(flat)

    def due(self, step: int | None, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        # Ask every policy (no short cut): each starts its clock at its first question.
        answers = [policy.due(step, now) for policy in self.policies]
        return any(answers)

    def captured(self, step: int | None, now: float, blocking_seconds: float) -> None:
        for policy in self.policies:
            policy.captured(step, now, blocking_seconds)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


def every(steps: int | None = None, seconds: float | str | None = None) -> Every:
    """A policy due every `steps` steps, every `seconds` of wall time, or both (first wins).

    >>> import arraysnap
    >>> arraysnap.every(steps=500), arraysnap.every(seconds="10m")
    (every(steps=500), every(seconds=600))
    """
    return Every(steps=steps, seconds=seconds)


def young_daly(mtbf: float | str) -> YoungDaly:
    """A policy due at the Young/Daly interval ``sqrt(2 * C * MTBF)`` for this run.

    `mtbf` is the mean time between failures (seconds, or ``"24h"``); C is measured from
    this run's own captures. Combine it with ``every(...)`` to cap the interval.

    >>> import arraysnap
    >>> arraysnap.young_daly(mtbf="24h")
    young_daly(mtbf=86400)
    """
    return YoungDaly(mtbf)


def parse_policy(value: object) -> Policy | None:
    """``open(every=...)``'s argument as a policy: None, an int (steps), a policy, or a list.

    >>> parse_policy(100), parse_policy([every(steps=5), young_daly("1h")])
    (every(steps=100), every(steps=5) | young_daly(mtbf=3600))
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("every= takes an int (steps), a policy such as arraysnap.every(...) or "
                        f"arraysnap.young_daly(...), or a list of them; got {value!r}")
    if isinstance(value, int):
        return every(steps=value)
    if isinstance(value, (list, tuple)):
        return AnyOf(*(_require_policy(item) for item in value))
    return _require_policy(value)


def _require_policy(value: object) -> Policy:
    if isinstance(value, int) and not isinstance(value, bool):
        return every(steps=value)
    if not isinstance(value, Policy):
        raise TypeError("every= takes an int (steps), a policy such as arraysnap.every(...) or "
                        f"arraysnap.young_daly(...), or a list of them; got {value!r}")
    return value
