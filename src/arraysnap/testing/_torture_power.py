"""The torture's power cuts: a writer on a forgetting file system frozen at a random
operation, what it had not made durable dropped, the store opened after a new boot (now
and then cut again while it recovers, or on a full disk); and crash states of recorded runs,
random mixtures of lost and kept changes.

Each event makes its own small store on its own mount (the torture's stores are on a real
disk; these need FUSE). Without FUSE the events are counted as skipped, with the reason.

>>> import io, tempfile
>>> from pathlib import Path
>>> events = PowerEvents(Path(tempfile.mkdtemp()), seed=4, out=io.StringIO())
>>> events.power_cut_states()
>>> events.tally.failures, events.counts["crash states checked"] > 0 or events.power_skip
([], True)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from arraysnap.testing._tally import LOST, UNEXPECTED
from arraysnap.testing._torture_base import TortureBase
from arraysnap.testing.powercuts import FULL_DISK, check_crash_states, live_cut, record
from arraysnap.testing.powerloss import Cut, fuse_unavailable

__all__ = ["PowerEvents"]

# Operations of one power routine of two rounds (about 1,400): live cuts are drawn below.
ROUTINE_OPS = 1400
STATES_PER_EVENT = 12


class PowerEvents(TortureBase):
    """Power-cut events of the torture."""

    _power_runs = 0
    _states: Iterator[tuple[Cut, list[str]]] | None = None

    @property
    def power_skip(self) -> str | None:
        """Why power cuts cannot run here (None if they can)."""
        return fuse_unavailable()

    def _skipped(self) -> bool:
        reason = self.power_skip
        if reason is not None:
            if not self.counts["power cuts skipped"]:
                self.say(f"  power cuts skipped: {reason}")
            self.counts["power cuts skipped"] += 1
        return reason is not None

    def _power_dir(self) -> Path:
        self._power_runs += 1
        return self.workdir / f"power-{self._power_runs:05d}"

    def power_cut_live(self) -> None:
        """Freeze a writer at a random operation, cut, boot again and check the store."""
        if self._skipped():
            return
        workdir = self._power_dir()
        full = self.rng.random() < 0.2
        capacity = self.rng.choice(FULL_DISK) if full else 0
        hold = self.rng.randrange(1, ROUTINE_OPS)
        again = self.rng.random() < 0.3
        failures = len(self.tally.failures)
        cut = live_cut(workdir, hold_at=hold, capacity=capacity,
                       again_at=self.rng.randrange(2, 120) if again else 0)
        held, problems = cut.held, cut.problems
        self.counts["power cuts"] += 1
        self.counts["power cuts live" if held else "power cuts past the end"] += 1
        if again:
            self.counts["power cuts during recovery"] += 1
        if full:
            self.counts["power cuts on a full disk"] += 1
        self.tally.check(not problems, (LOST,), f"power cut at operation {hold} "
                         f"(capacity {capacity or 'unlimited'}): {'; '.join(problems)}")
        self._done_with(workdir, failures)

    def power_cut_states(self) -> None:
        """Check the next crash states of a recorded run (a new run when they are used
        up): random mixtures of lost and kept changes, and every barrier."""
        if self._skipped():
            return
        for _ in range(STATES_PER_EVENT):
            checked = next(self._states, None) if self._states is not None else None
            if checked is None:
                self._states = self._record()
                checked = next(self._states, None)
                if checked is None:
                    self.tally.fail((UNEXPECTED,), "a recorded power routine gave no state")
                    return
            cut, problems = checked
            self.counts["power cuts"] += 1
            self.counts["crash states checked"] += 1
            self.counts["crash states at barriers" if cut.variant == 0
                        else "crash states mixed"] += 1
            if not self.tally.check(not problems, (LOST,),
                                    f"crash state before operation {cut.index} (variant "
                                    f"{cut.variant}): {'; '.join(problems)}"):
                kept = self.workdir / f"power-state-{cut.index}-{cut.variant}"
                self._scratch.rename(kept)
                self.keep(kept)
        shutil.rmtree(self._scratch, ignore_errors=True)

    @property
    def _scratch(self) -> Path:
        return self.workdir / "power-state"

    def _record(self) -> Iterator[tuple[Cut, list[str]]]:
        base, journal = record(self._power_dir())
        self.counts["power routines recorded"] += 1
        return check_crash_states(self._scratch, base, journal,
                                  instants=len(journal.ops) // 10,
                                  seed=self.rng.randrange(1 << 30))
