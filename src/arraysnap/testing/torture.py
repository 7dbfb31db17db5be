"""Torture arraysnap: kill writers, fail their storage and corrupt their stores, in rotation.

This is ``python -m arraysnap.torture`` (see that module for the usage); :func:`main` is
its command line and :class:`Torture` the rotation of events.

>>> import io, tempfile
>>> from pathlib import Path
>>> torture = Torture(Path(tempfile.mkdtemp()), seed=5, out=io.StringIO())
>>> elapsed = torture.run(0.0)
>>> torture.ok, torture.summary(elapsed)[-1]
(True, '0 passed, 0 failed')
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from arraysnap.testing._tally import CATEGORY_LINES, LOST, UNEXPECTED, WRONG, filesystem_type
from arraysnap.testing._torture_base import EVENTS_PER_STORE
from arraysnap.testing._torture_damage import CorruptionEvents
from arraysnap.testing._torture_faults import FaultEvents
from arraysnap.testing._torture_kills import KillEvents
from arraysnap.testing._torture_power import PowerEvents

__all__ = ["Torture", "main"]

PROGRESS_EVERY = 30.0


class Torture(KillEvents, FaultEvents, CorruptionEvents, PowerEvents):
    """Runs kill, fault, corruption and power-cut events in rotation on small stores under
    `workdir` (see the module doc for an example)."""

    def run(self, seconds: float) -> float:
        """Rotate events for `seconds`; return the time taken."""
        started = time.monotonic()
        deadline = started + seconds
        next_progress = started + PROGRESS_EVERY
        kills = [("random moment", self.kill_at_random_moment),
                 ("file operation", self.kill_at_operation)]
        faults = [("capture", self.fault_in_capture), ("capture", self.fault_in_capture),
                  ("prune", self.fault_in_prune)]
        corruptions = [("chunk objects", self.corrupt_chunks), ("mirror", self.corrupt_baselines),
                       ("manifest", self.corrupt_manifest), ("settings", self.corrupt_settings)]
        powers = [("live cut", self.power_cut_live), ("crash states", self.power_cut_states)]
        rounds = 0
        while time.monotonic() < deadline:
            for family, choices in (("kill", kills), ("fault", faults),
                                    ("corruption", corruptions), ("power", powers)):
                if time.monotonic() >= deadline:
                    break
                if self.needs_fresh_store or self.events_on_store >= EVENTS_PER_STORE:
                    self.new_store()
                kind, action = choices[rounds % len(choices)]
                self.run_event(family, kind, action)
                now = time.monotonic()
                if now >= next_progress:
                    self.say(self.progress_line(now - started))
                    next_progress = now + PROGRESS_EVERY
            rounds += 1
        return time.monotonic() - started

    def progress_line(self, elapsed: float) -> str:
        """A one-line summary so far."""
        c = self.counts
        return (f"[{elapsed:5.0f} s] {self.events} events on {self.stores} stores: "
                f"{c['kills']} kills survived, {c['faults']} faults, "
                f"{c['corruptions detected']} corruptions detected, "
                f"{c['power cuts']} power cuts, "
                f"{c['mirror damage repaired']} mirror repairs; "
                f"{self.tally.passed} checks passed, {len(self.tally.failures)} failed")

    def summary(self, elapsed: float) -> list[str]:
        """The final report, one line per count; the last line is ``N passed, M failed``."""
        c = self.counts
        lines = [
            f"arraysnap torture: seed {self.seed}, {self.events} events on {self.stores} "
            f"stores in {self.workdir}",
            f"  kills: {c['kills at random moments']} at random moments, "
            f"{c['kills at file operations']} at file operation n, "
            f"{c['kills during recovery']} more during the recovery of one "
            f"({c['kill points past the end']} children finished before their kill point)",
            f"  faults: {c['faults EIO']} EIO, {c['faults ENOSPC']} ENOSPC; "
            f"{c['faults in prune']} in prune/gc; {c['faults not reached']} armed past the "
            "last call",
            f"  power cuts: {c['power cuts live']} live at random operations "
            f"({c['power cuts during recovery']} cut again during the recovery, "
            f"{c['power cuts on a full disk']} on a full disk, {c['power cuts past the end']} "
            f"runs finished first); {c['crash states checked']} crash states of "
            f"{c['power routines recorded']} recorded runs ({c['crash states at barriers']} at "
            f"barriers, {c['crash states mixed']} random mixtures)"
            + (f"; {c['power cuts skipped']} skipped: no FUSE" if c['power cuts skipped']
               else ""),
            f"  corruptions: {c['chunk objects damaged']} chunk objects, "
            f"{c['manifests damaged']} manifests, {c['settings damaged']} arraysnap.json; "
            f"{c['corruptions harmless']} changed nothing that matters (checked)",
        ]
        for failure in self.tally.failures[:40]:
            lines.append(f"  {failure}")
        if len(self.tally.failures) > 40:
            lines.append(f"  ... and {len(self.tally.failures) - 40} more failures")
        lines += [
            f"kills survived: {c['kills']}",
            f"faults injected: {c['faults']}",
            f"corruptions detected: {c['corruptions detected']}",
            f"power cuts survived: {c['power cuts']}",
            f"mirror damage repaired: {c['mirror damage repaired']}",
            *(f"{line}: {self.tally.category(key)}" for key, line in CATEGORY_LINES.items()),
            f"elapsed: {elapsed:.1f} s",
            f"{self.tally.passed} passed, {len(self.tally.failures)} failed",
        ]
        return lines

    def report(self, elapsed: float) -> dict[str, Any]:
        """The outcome as a JSON-ready dict."""
        c = self.counts
        return {
            "seed": self.seed,
            "elapsed_seconds": round(elapsed, 3),
            "events": self.events,
            "stores": self.stores,
            "kills_survived": c["kills"],
            "faults_injected": c["faults"],
            "corruptions_detected": c["corruptions detected"],
            "power_cuts_survived": c["power cuts"],
            "mirror_damage_repaired": c["mirror damage repaired"],
            "snapshots_lost": self.tally.category(LOST),
            "wrong_data_returned": self.tally.category(WRONG),
            "unexpected_errors": self.tally.category(UNEXPECTED),
            "passed": self.tally.passed,
            "failed": len(self.tally.failures),
            "counts": dict(sorted(c.items())),
            "failures": [{"categories": list(f.categories), "event": f.event,
                          "message": f.message, "trace": list(f.trace)}
                         for f in self.tally.failures],
            "kept": [str(path) for path in self.kept],
        }

    @property
    def ok(self) -> bool:
        """No snapshot lost, no wrong data, no unexpected error."""
        return all(self.tally.category(key) == 0 for key in CATEGORY_LINES)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arraysnap.torture",
        description="Kill, fail and corrupt arraysnap stores in rotation and check that no "
                    "committed snapshot is lost and no wrong data is returned.",
        epilog="Exit code 0 if and only if no snapshot was lost, no wrong data was returned "
               "and no unexpected error happened.")
    parser.add_argument("--minutes", type=float, default=None,
                        help="how long to run (default 10)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="how long to run, in seconds (overrides --minutes)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to put the stores (default: a new temporary folder under "
                             "the current directory, removed at the end unless something "
                             "failed)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random choices (default: from the clock)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the counts and failures to FILE as JSON")
    return parser


def _run(args: argparse.Namespace, seconds: float, seed: int) -> tuple[Torture, bool]:
    if args.dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="arraysnap-torture-", dir=Path.cwd()))
        owned = True
    else:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        owned = False
    torture = Torture(workdir, seed)
    kind = filesystem_type(workdir)
    torture.say(f"arraysnap torture: {seconds:.0f} s, seed {seed}, stores in {workdir} ({kind})")
    if kind in ("tmpfs", "ramfs"):
        torture.say("  note: that is a RAM file system, where fsync does nothing; "
                    "use --dir on a real disk to torture durability too")
    elapsed = 0.0
    interrupted = False
    began = time.monotonic()
    try:
        torture.run(seconds)
    except KeyboardInterrupt:
        interrupted = True
        torture.say("interrupted")
    elapsed = time.monotonic() - began
    for line in torture.summary(elapsed):
        torture.say(line)
    if args.json is not None:
        args.json.write_text(json.dumps(torture.report(elapsed), indent=2) + "\n")
    if torture.ok and not interrupted:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for child in workdir.iterdir():
                if child.name.startswith(("store-", "scratch-", "saved-mirror-",
                                          "child-stderr", "power-")):
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
    return torture, interrupted


def main(argv: list[str] | None = None) -> int:
    """Run the torture from the command line; return the exit code.

    >>> import tempfile, contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()) as out:
    ...     code = main(["--seconds", "0", "--dir", tempfile.mkdtemp(), "--seed", "7"])
    >>> code, out.getvalue().splitlines()[-1]
    (0, '0 passed, 0 failed')
    """
    args_list = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(args_list)
    seconds = (args.seconds if args.seconds is not None
               else 60.0 * (args.minutes if args.minutes is not None else 10.0))
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    # Damaged stores make arraysnap log warnings by design: counted here, not printed
    # (and printed again once the torture is over, for a caller in the same process).
    logger = logging.getLogger("arraysnap")
    quiet, propagate = logging.NullHandler(), logger.propagate
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        torture, interrupted = _run(args, seconds, seed)
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate
    if interrupted:
        return 130
    return 0 if torture.ok else 1


if __name__ == "__main__":
    sys.exit(main())
