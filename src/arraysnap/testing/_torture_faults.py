"""The torture's faults: a capture or a prune whose storage or file operation fails.

One :class:`~arraysnap.testing.FaultPlan` covers the whole store: storage calls, the file
operations below them and the baselines' file operations.

>>> import io, tempfile
>>> from pathlib import Path
>>> events = FaultEvents(Path(tempfile.mkdtemp()), seed=3, out=io.StringIO())
>>> events.new_store(); events.fault_in_prune()
>>> events.tally.failures
[]
"""

from __future__ import annotations

import errno

import arraysnap
from arraysnap.errors import ArraysnapError
from arraysnap.testing._damage import (
    leftover_temporaries,
    manifest_files,
    object_intact,
    store_codec,
    store_files,
)
from arraysnap.testing._faults import FILE_OPERATIONS, FaultPlan
from arraysnap.testing._tally import LOST, UNEXPECTED, cause_chain, trace_summary
from arraysnap.testing._torture_base import CHUNK_BYTES, KEEP_LAST, TortureBase, capture_step

__all__ = ["FaultEvents"]

# What a fault may hit: every writing call (reads fail too on a real disk, but a failed
# read is not a failed capture, and is tested where it is read).
WRITING = ("put_if_absent", "put_atomic", "append", "delete", "barrier", *FILE_OPERATIONS)


class FaultEvents(TortureBase):
    """Fault events of the torture."""

    def _open(self, plan: FaultPlan) -> arraysnap.Store:
        return arraysnap.open(plan.storage, chunk_bytes=CHUNK_BYTES,
                              _baseline_ops=plan.baseline_ops, _retry_delays=())

    def _check_raised(self, plan: FaultPlan, raised: list[BaseException], what: str,
                      may_swallow: bool) -> bool:
        """The injected fault was reported (or, where allowed, swallowed); True if injected."""
        if plan.injected is None:
            self.tally.check(not raised, (UNEXPECTED,), f"{what}: no fault was injected")
            for error in raised:
                self.tally.fail((UNEXPECTED,), f"{what}: {type(error).__name__}: {error}",
                                trace_summary(error))
            return False
        for error in raised:
            if not self.tally.check(plan.injected in cause_chain(error), (UNEXPECTED,),
                                    f"{what}: raised {type(error).__name__}: {error}, which "
                                    f"is not the injected {plan.injected}"):
                self.tally.fail((UNEXPECTED,), f"{what}: traceback of the above",
                                trace_summary(error))
        if not raised:
            self.tally.check(may_swallow, (UNEXPECTED,),
                             f"{what}: {plan.injected} was swallowed: nothing was raised")
        return True

    def fault_in_capture(self) -> None:
        """Fail a capture (sometimes with another one queued behind it) at a random call;
        check committed snapshots, then that the next capture stores every change."""
        path = self.store
        plan = FaultPlan(path)
        snap = self._open(plan)
        try:
            latest = snap.latest()
            assert latest is not None and latest.step is not None
            step = latest.step + 1
            # A capture without fault shows which calls one capture makes, and how many.
            plan.reset()
            capture_step(snap, step)
            snap.wait()
            calls = dict(plan.counts)
            before = store_files(path)
            before_seqs = set(manifest_files(path))
            op, area = self.rng.choice(sorted(key for key in calls if key[0] in WRITING))
            index = self.rng.randrange(calls[(op, area)])
            err = self.rng.choice([errno.EIO, errno.ENOSPC])
            queued = self.rng.random() < 0.3
            what = (f"{errno.errorcode[err]} at {op} #{index} in {area}"
                    f"{' with a capture queued' if queued else ''}")
            live_steps = [step + 1, step + 2] if queued else [step + 1]
            raised: list[BaseException] = []
            plan.arm(op, area, index, err)
            for live in live_steps:
                try:
                    capture_step(snap, live)
                except (OSError, ArraysnapError) as error:
                    raised.append(error)
            try:
                snap.wait()
            except (OSError, ArraysnapError) as error:
                raised.append(error)
            plan.disarm()
            injected = self._check_raised(plan, raised, what,
                                          may_swallow=plan.injected_area == "mirror"
                                          or plan.injected_at.endswith("history.jsonl"))
            if injected:
                self.counts["faults"] += 1
                self.counts[f"faults {errno.errorcode[err]}"] += 1
            else:
                self.counts["faults not reached"] += 1
            last = live_steps[-1]
            after = store_files(path)
            for name, data in before.items():
                self.tally.check(after.get(name) == data, (LOST,),
                                 f"{what}: committed file {name} changed or vanished")
            codec = store_codec(path)
            for name in sorted(set(after) - set(before)):
                if name.startswith("chunks/"):
                    self.tally.check(object_intact(path, name, codec), (UNEXPECTED,),
                                     f"{what}: a torn chunk object {name} was left in place")
            leftovers = leftover_temporaries(path, baselines=False)
            self.tally.check(not leftovers, (UNEXPECTED,),
                             f"{what}: temporaries left by the failed capture: {leftovers[:5]}")
            if injected and not raised:
                # A swallowed fault (the marker after a commit) must follow a whole commit.
                steps = [info.step for info in snap.list()]
                self.tally.check(last in steps, (LOST,),
                                 f"{what}: nothing raised, but step {last} was not committed")
            with arraysnap.open(path, mode="r") as reader:  # another Store sees commits only
                report = reader.verify()
                self.tally.check(report.ok, (LOST,), f"{what}: verify after the fault: {report}")
                self.check_all_restore(reader, f"{what}: reader after the fault")
                self.check_prune_explains(before_seqs, [i.seq for i in reader.list()], what)
            if self.rng.random() < 0.5:
                what += ", reopened"
                try:
                    snap.close()
                except ArraysnapError as error:
                    self.tally.check(plan.injected in cause_chain(error), (UNEXPECTED,),
                                     f"{what}: close() raised {error!r}")
                snap = self._open(plan)
            # The baselines already hold the live arrays: the next capture must store them.
            info = capture_step(snap, last)
            snap.wait()
            self.expect_restore(snap, None, last, f"{what}: the capture after the fault "
                                                  "(invariant 3)", expected_seq=info.seq)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after recovery: {report}")
            self.check_all_restore(snap, f"{what}: after recovery")
        finally:
            plan.disarm()
            try:
                snap.close()
            except ArraysnapError:
                pass
        with arraysnap.open(path, mode="r") as reader:
            self.expect_restore(reader, None, last, f"{what}: reader after recovery")

    def fault_in_prune(self) -> None:
        """Fail a prune (or the gc inside it) at a random call; check what remains."""
        path = self.store
        plan = FaultPlan(path)
        with self._open(plan) as snap:
            latest = snap.latest()
            assert latest is not None and latest.step is not None
            for step in range(latest.step + 1, latest.step + 3):
                capture_step(snap, step)
            snap.wait()
            seqs = [info.seq for info in snap.list()]
            keys = [("unlink", "snapshots"), ("unlink", "chunks"), ("fsync_dir", "snapshots"),
                    ("fsync", "snapshots"), ("delete", "snapshots"), ("delete", "chunks"),
                    ("barrier", "root")]
            op, area = self.rng.choice(keys)
            index = self.rng.randrange(self.prune_estimates.get((op, area), 4))
            err = self.rng.choice([errno.EIO, errno.ENOSPC])
            what = f"{errno.errorcode[err]} at {op} #{index} in {area} during prune"
            raised: list[BaseException] = []
            plan.arm(op, area, index, err)
            try:
                snap.prune(keep_last=KEEP_LAST)
            except (OSError, ArraysnapError) as error:
                raised.append(error)
            plan.disarm()
            seen = plan.counts.get((op, area), 0)
            if plan.injected is None:
                self.prune_estimates[(op, area)] = max(1, seen)
            injected = self._check_raised(plan, raised, what, may_swallow=False)
            if injected:
                self.counts["faults"] += 1
                self.counts["faults in prune"] += 1
                self.counts[f"faults {errno.errorcode[err]}"] += 1
            else:
                self.counts["faults not reached"] += 1
            listed = [info.seq for info in snap.list()]
            kept = seqs[-KEEP_LAST:]
            self.tally.check(set(kept) <= set(listed), (LOST,),
                             f"{what}: the newest {kept} must stay, listed {listed}")
            self.check_prune_explains(seqs, listed, what)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after the fault: {report}")
            self.check_all_restore(snap, what)
            snap.prune(keep_last=KEEP_LAST)
            listed = [info.seq for info in snap.list()]
            self.tally.check(listed == kept, (UNEXPECTED,),
                             f"{what}: the next prune left {listed}, expected {kept}")
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after a prune: {report}")
            step = (snap.latest().step or 0) + 1  # type: ignore[union-attr]
            info = capture_step(snap, step)
            snap.wait()
            self.expect_restore(snap, None, step, f"{what}: a capture after it",
                                expected_seq=info.seq)

