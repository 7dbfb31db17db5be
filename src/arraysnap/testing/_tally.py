"""The torture's bookkeeping: failed checks by category, counts, and short tracebacks.

>>> tally = Tally(print)
>>> tally.check(1 + 1 == 2, (LOST,), "arithmetic")
True
>>> tally.check(False, (WRONG,), "wrong on purpose")
FAIL [wrong] : wrong on purpose
False
>>> tally.passed, tally.category(WRONG)
(1, 1)
"""

from __future__ import annotations

import collections
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CATEGORY_LINES", "LOST", "UNEXPECTED", "WRONG", "Failure", "Tally", "cause_chain",
           "filesystem_type", "trace_summary"]

LOST, WRONG, UNEXPECTED = "lost", "wrong", "unexpected"
CATEGORY_LINES = {LOST: "snapshots lost", WRONG: "wrong data returned",
                  UNEXPECTED: "unexpected errors"}


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Failure:
    """One failed check: its categories (lost, wrong, unexpected), event and explanation.

    >>> print(Failure((LOST, WRONG), "event 3", "snapshot 2 is gone"))
    FAIL [lost+wrong] event 3: snapshot 2 is gone
    """

    categories: tuple[str, ...]
    event: str
    message: str
    trace: tuple[str, ...] = ()

    def __str__(self) -> str:
        kinds = "+".join(self.categories)
        return f"FAIL [{kinds}] {self.event}: {self.message}"


class Tally:
    """Counts of events, passed checks and failures; see the module doc for an example."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.passed = 0
        self.failures: list[Failure] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.event = ""

    def check(self, ok: bool, categories: tuple[str, ...], message: str) -> bool:
        """Record a check; a failed one is printed at once."""
        if ok:
            self.passed += 1
            return True
        self.fail(categories, message)
        return False

    def fail(self, categories: tuple[str, ...], message: str,
             trace: list[str] | None = None) -> None:
        """Record and print a failure."""
        failure = Failure(categories, self.event, message, tuple(trace or ()))
        self.failures.append(failure)
        self.say(str(failure))
        for line in failure.trace:
            self.say(f"    {line}")

    def category(self, name: str) -> int:
        """How many failures carry category `name`."""
        return sum(name in failure.categories for failure in self.failures)


def trace_summary(error: BaseException, frames: int = 4) -> list[str]:
    """A few lines: the innermost frames of `error` and the exceptions it was caused by.

    >>> try:
    ...     raise ValueError("inner")
    ... except ValueError as inner:
    ...     try:
    ...         raise KeyError("outer") from inner
    ...     except KeyError as outer:
    ...         trace_summary(outer)[-1]
    'caused by ValueError: inner'
    """
    lines = []
    for entry in traceback.extract_tb(error.__traceback__)[-frames:]:
        lines.append(f"{Path(entry.filename).name}:{entry.lineno} in {entry.name}: "
                     f"{(entry.line or '').strip()[:90]}")
    for cause in cause_chain(error)[1:]:
        lines.append(f"caused by {type(cause).__name__}: {str(cause)[:200]}")
    return lines




def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/self/mounts), or "unknown".

    >>> isinstance(filesystem_type(Path("/")), str)
    True
    """
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def cause_chain(error: BaseException | None) -> list[BaseException]:
    """`error`, what caused it, what caused that, ...

    >>> len(cause_chain(ValueError())), cause_chain(None)
    (1, [])
    """
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain

