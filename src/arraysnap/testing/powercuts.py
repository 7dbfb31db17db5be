"""Power cuts made and counted: the cuts the test suite, the torture and a long run on
demand make with :mod:`arraysnap.testing.powerloss`, each checked by
:func:`~arraysnap.testing.powerloss.check_after_cut`.

``python -m arraysnap.testing.powercuts [--scale N] [--seed S]`` makes the suite's cuts
N times over (8N live cuts at random operations, 3N cut again during the recovery, 4N on a
full disk, every barrier of a recorded run, of a recorded recovery and of a recorded run
of 2,000 arrays more (a tree of table nodes in packs), and 60N, 30N and 10N random instants
in them, two mixtures each) and prints, by kind, how many were made and
survived; the exit code is 1 if any was not.

>>> from arraysnap.testing.powercuts import Tally
>>> tally = Tally(); tally.add("live cut", []); tally.add("live cut", ["lost"])
>>> tally.rows(), tally.ok
([('live cut', 2, 1)], False)
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from arraysnap.testing._processes import child_command
from arraysnap.testing.children import WORKLOADS
from arraysnap.testing.powerloss import (
    MARKS,
    CrashState,
    Cut,
    FileSystemModel,
    ForgettingMount,
    Journal,
    check_after_cut,
    crash_states,
    fuse_unavailable,
)

__all__ = ["FULL_DISK", "STORE", "LiveCut", "Tally", "campaign", "check_crash_states", "live_cut",
           "main", "middle_state", "record", "routine"]

FULL_DISK = (900_000, 1_000_000)  # capacities at which the power routine's captures fail
STORE = "run.snap"  # the power routine's store, at the root of its mount


def routine(mount: ForgettingMount, rounds: int = 2, workload: str = "small") -> list[str]:
    """The command of the power routine (``children power``) on `mount`'s store, capturing
    the `workload` of ``children.WORKLOADS``."""
    return child_command("power", mount.mount / STORE, "--marks", mount.mount / MARKS,
                         "--rounds", rounds, "--workload", workload)


@dataclass(frozen=True, slots=True)
class LiveCut:
    """What one live cut did: whether the writer froze at its hold point (and the next one,
    during its recovery, at its own), the marks made before the cut(s), and what
    :func:`check_after_cut` found wrong."""

    held: bool
    labels: list[str]
    problems: list[str]
    held_again: bool = False


def live_cut(workdir: Path, *, hold_at: int, capacity: int = 0, again_at: int = 0,
             rounds: int = 2) -> LiveCut:
    """Run the power routine on a new forgetting mount, frozen at operation `hold_at`; cut;
    with `again_at`, run it again frozen at that operation of its recovery and cut again;
    then check the store (no further capture on a small disk)."""
    with ForgettingMount(workdir, capacity=capacity, hold_at=hold_at) as mount:
        held = mount.run(routine(mount, rounds))
        labels = mount.cut(hold_at=again_at)
        held_again = False
        if again_at:
            held_again = mount.run(routine(mount, 1))
            labels += mount.cut()
        problems = check_after_cut(mount.mount / STORE, labels, capture=not capacity)
    return LiveCut(held, labels, problems, held_again)


def record(workdir: Path, *, rounds: int = 2, initial: CrashState | None = None,
           workload: str = "small") -> tuple[Path, Journal]:
    """Record one run of the power routine (over `initial`, if given): the folder it began
    with and its journal."""
    with ForgettingMount(workdir, initial=initial) as mount:
        if mount.run(routine(mount, rounds, workload), timeout=600):
            raise RuntimeError("a recording froze: it has no hold point")
        journal = Journal.read(mount.journal_dir)
    shutil.rmtree(workdir / "live-0", ignore_errors=True)
    return workdir / "boot-0", journal


def middle_state(base: Path, journal: Journal) -> tuple[CrashState, list[str]]:
    """The state a cut three fifths of the way through a recorded run leaves (everything
    not durable lost) and the marks made before it: a store whose recovery has work to do."""
    model = FileSystemModel.of_folder(base)
    middle = journal.barriers()[len(journal.barriers()) * 3 // 5]
    journal.apply(model, middle)
    return model.crash_state(), journal.labels(middle)


def check_crash_states(scratch: Path, base: Path, journal: Journal, *, instants: int,
                       seed: int, labels: tuple[str, ...] | list[str] = (),
                       workload: str = "small") -> Iterator[tuple[Cut, list[str]]]:
    """Each crash state of a recorded run (see :func:`crash_states`, two mixtures per
    instant) written to `scratch` and checked, with `labels` made before the run began."""
    for cut in crash_states(base, journal, cuts=instants, variants=2, seed=seed):
        shutil.rmtree(scratch, ignore_errors=True)
        cut.state.write(scratch)
        yield cut, check_after_cut(scratch / STORE, [*labels, *cut.labels],
                                   WORKLOADS[workload])
    shutil.rmtree(scratch, ignore_errors=True)


@dataclass(slots=True)
class Tally:
    """Cuts made and survived, by kind, with the problems of those that were not."""

    made: dict[str, int] = field(default_factory=dict)
    survived: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, problems: list[str]) -> None:
        self.made[kind] = self.made.get(kind, 0) + 1
        self.survived[kind] = self.survived.get(kind, 0) + (not problems)
        self.problems += [f"{kind}: {problem}" for problem in problems]

    def rows(self) -> list[tuple[str, int, int]]:
        return [(kind, self.made[kind], self.survived[kind]) for kind in self.made]

    @property
    def ok(self) -> bool:
        return not self.problems


def campaign(workdir: Path, scale: int = 1, seed: int = 1) -> Tally:
    """The suite's power cuts, `scale` times over (see the module doc)."""
    rng = random.Random(seed)
    tally = Tally()
    for i in range(8 * scale):
        cut = live_cut(workdir / f"live-{i}", hold_at=rng.randrange(1, 1400))
        tally.add("live: frozen at a random operation" if cut.held
                  else "live: the run ended before its cut", cut.problems)
    for i in range(3 * scale):
        cut = live_cut(workdir / f"again-{i}", hold_at=rng.randrange(300, 1200),
                       again_at=rng.randrange(2, 60))
        tally.add("live: then cut again during the recovery", cut.problems)
    for i in range(4 * scale):
        capacity = rng.choice(FULL_DISK)  # the routine makes about 570 or 1,450 operations
        cut = live_cut(workdir / f"full-{i}", capacity=capacity, rounds=3,
                       hold_at=rng.randrange(1, 550 if capacity == FULL_DISK[0] else 1400))
        tally.add("live: on a full disk" if cut.held
                  else "live: on a full disk, the run ended before its cut", cut.problems)
    base, journal = record(workdir / "run")
    for cut, problems in check_crash_states(workdir / "state", base, journal,
                                            instants=60 * scale, seed=seed):
        tally.add("crash states of a run: " + ("at a barrier" if cut.variant == 0
                                               else "random mixture"), problems)
    state, labels = middle_state(base, journal)
    base, journal = record(workdir / "recovery", rounds=1, initial=state)
    for cut, problems in check_crash_states(workdir / "state", base, journal,
                                            instants=30 * scale, seed=seed + 1, labels=labels):
        tally.add("crash states of a recovery: " + ("at a barrier" if cut.variant == 0
                                                    else "random mixture"), problems)
    base, journal = record(workdir / "many", rounds=1, workload="many")
    for cut, problems in check_crash_states(workdir / "state", base, journal,
                                            instants=10 * scale, seed=seed + 2,
                                            workload="many"):
        tally.add("crash states of a run of 2,000 arrays more: " + (
            "at a barrier" if cut.variant == 0 else "random mixture"), problems)
    return tally


def main(argv: list[str] | None = None) -> int:
    """Run :func:`campaign` from the command line and print its counts."""
    parser = argparse.ArgumentParser(prog="python -m arraysnap.testing.powercuts")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    reason = fuse_unavailable()
    if reason is not None:
        print(f"cannot cut the power here: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="arraysnap-powercuts-", dir=Path.cwd()) as work:
        tally = campaign(Path(work), args.scale, args.seed)
    print("| cut | made | survived |\n|---|---:|---:|")
    for kind, made, survived in tally.rows():
        print(f"| {kind} | {made} | {survived} |")
    print(f"| **all** | **{sum(tally.made.values())}** | **{sum(tally.survived.values())}** |")
    for problem in tally.problems[:40]:
        print(problem)
    print(f"elapsed: {time.monotonic() - started:.0f} s")
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
