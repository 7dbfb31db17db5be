"""The core of the torture: its stores, its tally and the checks every family of events uses.

The events themselves are mixed in from ``_torture_kills``, ``_torture_faults`` and
``_torture_damage``; :class:`arraysnap.testing.torture.Torture` puts them together.

>>> import io, tempfile
>>> base = TortureBase(Path(tempfile.mkdtemp()), seed=1, out=io.StringIO())
>>> base.new_store(); [info.step for info in arraysnap.open(base.store, mode="r").list()]
[0, 1, 2]
"""

from __future__ import annotations

import collections
import random
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import arraysnap
from arraysnap.errors import CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError
from arraysnap.testing._tally import LOST, UNEXPECTED, WRONG, Tally, trace_summary
from arraysnap.testing._workload import TORTURE_WORKLOAD

__all__ = ["CHUNK_BYTES", "KEEP_LAST", "TortureBase"]

CHUNK_BYTES = 64 << 10
KEEP_LAST = 3  # every prune keeps this many snapshots
EVENTS_PER_STORE = 12
CHILD_TIMEOUT = 120.0
MAX_KEPT = 10  # failing stores and copies kept for a post-mortem
WORKLOAD = TORTURE_WORKLOAD
capture_step = WORKLOAD.capture
restored_difference = WORKLOAD.difference


class TortureBase:
    """Stores, tally and shared checks of a torture under `workdir` (see the module doc)."""

    def __init__(self, workdir: Path, seed: int, out: TextIO | None = None) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = out if out is not None else sys.stdout
        self.tally = Tally(self.say)
        self.store = workdir / "store-0000"
        self.stores = 0
        self.events_on_store = 0
        self.events = 0
        self.op_estimate = 300
        self.prune_estimates: dict[tuple[str, str], int] = {}
        self.kept: list[Path] = []
        self.needs_fresh_store = True

    # -- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Print a line at once."""
        print(text, file=self.out, flush=True)

    @property
    def counts(self) -> collections.Counter[str]:
        """Event counters."""
        return self.tally.counts

    # -- stores ----------------------------------------------------------------------------
    def new_store(self) -> None:
        """Replace the current store by a fresh one holding steps 0, 1, 2."""
        previous = self.store
        self.stores += 1
        self.store = self.workdir / f"store-{self.stores:04d}"
        if previous.exists() and previous not in self.kept:
            shutil.rmtree(previous, ignore_errors=True)
        codec = self.rng.choice(["zstd", "zstd", "zstd:3", "none"])
        with arraysnap.open(self.store, chunk_bytes=CHUNK_BYTES, codec=codec) as snap:
            for step in range(3):
                capture_step(snap, step)
            snap.wait()
        self.events_on_store = 0
        self.needs_fresh_store = False

    def keep(self, path: Path) -> bool:
        """Keep `path` (a store or a scratch copy) for a post-mortem, up to MAX_KEPT of them."""
        if path not in self.kept:
            if len(self.kept) >= MAX_KEPT:
                return False
            self.kept.append(path)
            self.say(f"    kept for inspection: {path}")
        return True

    def scratch_copy(self) -> Path:
        """A copy of the current store to damage."""
        scratch = self.workdir / f"scratch-{self.events:05d}"
        shutil.copytree(self.store, scratch, symlinks=True)
        return scratch

    # -- shared checks ---------------------------------------------------------------------
    def expect_restore(self, snap: arraysnap.Store, seq: int | None, step: int | None,
                       what: str, *, expected_seq: int | None = None,
                       fallback: bool = False) -> bool:
        """Restore snapshot `seq` (None: the latest) of `snap`; it must hold exactly the
        workload of `step` (and be snapshot `expected_seq`, if given)."""
        try:
            if seq is None:
                restored = snap.restore(fallback=fallback) if fallback else snap.restore()
            else:
                restored = snap.restore(seq=seq)
        except (CorruptSnapshotError, SnapshotNotFoundError, FormatVersionError) as err:
            self.tally.fail((LOST,), f"{what}: snapshot {'latest' if seq is None else seq} (step "
                                     f"{step}) does not restore: {type(err).__name__}: {err}")
            return False
        got_seq = restored.seq
        problem = restored_difference(restored, step)
        del restored
        if expected_seq is not None and problem is None and got_seq != expected_seq:
            problem = f"restored snapshot {got_seq}, expected {expected_seq}"
        return self.tally.check(problem is None, (LOST, WRONG),
                                f"{what}: snapshot {got_seq} restored wrong data: {problem}")

    def check_all_restore(self, snap: arraysnap.Store, what: str) -> None:
        """Every listed snapshot restores to exactly the workload of its step."""
        for info in snap.list():
            self.expect_restore(snap, info.seq, info.step, what)

    def check_prune_explains(self, expected: Iterable[int], listed: Iterable[int],
                             what: str) -> None:
        """Snapshots known committed that are gone must have been pruned: a prune keeps
        the newest KEEP_LAST, so at least that many newer snapshots must be listed."""
        listed = set(listed)
        for seq in sorted(set(expected) - listed):
            newer = sum(1 for other in listed if other > seq)
            self.tally.check(newer >= KEEP_LAST, (LOST,),
                             f"{what}: committed snapshot {seq} disappeared (only {newer} newer "
                             f"snapshots listed; prune keeps {KEEP_LAST})")

    def _done_with(self, scratch: Path, failures: int) -> None:
        if len(self.tally.failures) == failures or not self.keep(scratch):
            shutil.rmtree(scratch, ignore_errors=True)

    # -- the rotation ----------------------------------------------------------------------
    def run_event(self, family: str, kind: str, action: Callable[[], None]) -> None:
        """Run one event; any exception escaping it is an unexpected error."""
        self.events += 1
        self.events_on_store += 1
        self.tally.event = f"event {self.events} ({family}: {kind}, {self.store.name})"
        failures = len(self.tally.failures)
        try:
            action()
        except Exception as error:  # noqa: BLE001 - exactly what the torture looks for
            self.tally.fail((UNEXPECTED,), f"{type(error).__name__}: {error}",
                            trace_summary(error))
        if len(self.tally.failures) > failures:
            # Go on with a clean slate; keep this store for a post-mortem.
            self.keep(self.store)
            self.needs_fresh_store = True

