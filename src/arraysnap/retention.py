"""What to keep: the retention policy, applied after each commit and by ``prune()``.

Rules combine. A snapshot is kept when *any* rule keeps it: it is among the newest
``keep_last``, its step is a multiple of ``keep_every`` (kept for good, a tiered history), or
it is younger than ``keep_within`` seconds. ``max_bytes`` is a disk quota on top: while the
store is larger, the oldest snapshots not protected by ``keep_every`` go first, whatever the
other rules say. The newest snapshot is never removed.

>>> policy = Retention(keep_last=2, keep_every=100)
>>> snaps = [Candidate(seq, step, 0.0) for seq, step in enumerate([0, 50, 100, 150, 200, 250])]
>>> [c.step for c in policy.doomed(snaps, now=0.0)]
[50, 150]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .policies import parse_duration

__all__ = ["Candidate", "Retention"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """What retention needs to know of a committed snapshot."""

    seq: int
    step: int | None
    time: float


@dataclass(frozen=True, slots=True)
class Retention:
    """A retention policy; all fields None means keep everything.

    >>> Retention(keep_within="2h").keep_within
    7200.0
    >>> Retention(keep_last=0)
    Traceback (most recent call last):
    ...
    ValueError: keep_last must be a positive integer (the newest snapshot is always kept), got 0
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_within: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                extra = " (the newest snapshot is always kept)" if name == "keep_last" else ""
                raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")
        if self.keep_within is not None:
            object.__setattr__(self, "keep_within",
                               parse_duration(self.keep_within, "keep_within"))

    @property
    def active(self) -> bool:
        return any(value is not None for value in (self.keep_last, self.keep_every,
                                                   self.keep_within, self.max_bytes))

    def protected(self, candidate: Candidate) -> bool:
        """Kept for good by ``keep_every`` (even under the ``max_bytes`` quota)."""
        return (self.keep_every is not None and candidate.step is not None
                and candidate.step % self.keep_every == 0)

    def doomed(self, snapshots: Sequence[Candidate], now: float,
               size_after_removing: Callable[[Sequence[Candidate]], int] | None = None,
               ) -> list[Candidate]:
        """The snapshots to remove, oldest first. `snapshots` are sorted by seq.

        `size_after_removing(doomed)` gives the store's size once `doomed` are gone; it is
        needed only with ``max_bytes``.
        """
        if not snapshots or not self.active:
            return []
        count_rules = (self.keep_last, self.keep_every, self.keep_within)
        doomed: list[Candidate] = []
        if any(rule is not None for rule in count_rules):
            recent = {c.seq for c in snapshots[-self.keep_last:]} if self.keep_last else set()
            for candidate in snapshots[:-1]:
                kept = (candidate.seq in recent or self.protected(candidate)
                        or (self.keep_within is not None
                            and now - candidate.time <= self.keep_within))
                if not kept:
                    doomed.append(candidate)
        if self.max_bytes is not None and size_after_removing is not None:
            chosen = {c.seq for c in doomed}
            for candidate in snapshots[:-1]:
                if size_after_removing(doomed) <= self.max_bytes:
                    break
                if candidate.seq not in chosen and not self.protected(candidate):
                    doomed.append(candidate)
                    chosen.add(candidate.seq)
        doomed.sort(key=lambda c: c.seq)
        return doomed
