"""The torture's corruptions: damaged chunk objects, manifests, settings and baselines.

Each works on a copy of the current store. Damage must be detected (``verify()`` names
snapshot, array and chunk; ``restore()`` raises
:class:`~arraysnap.CorruptSnapshotError`) or, for the baselines, repaired; wrong data must
never be returned.

>>> import io, tempfile
>>> from pathlib import Path
>>> events = CorruptionEvents(Path(tempfile.mkdtemp()), seed=4, out=io.StringIO())
>>> events.new_store(); events.corrupt_chunks(); events.corrupt_baselines()
>>> events.tally.failures
[]
"""

from __future__ import annotations

import json
import shutil

import arraysnap
from arraysnap.errors import (
    ArraysnapError,
    CorruptSnapshotError,
    FormatVersionError,
    SnapshotNotFoundError,
)
from arraysnap.testing._damage import (
    chunk_references,
    damage_baselines,
    damaged_chunks,
    flip_bits,
    manifest_files,
    store_codec,
    truncate,
)
from arraysnap.testing._tally import LOST, UNEXPECTED, WRONG
from arraysnap.testing._torture_base import (
    CHUNK_BYTES,
    TortureBase,
    capture_step,
    restored_difference,
)

__all__ = ["CorruptionEvents"]


class CorruptionEvents(TortureBase):
    """Corruption events of the torture."""

    def _restore_outcome(self, snap: arraysnap.Store, seq: int
                         ) -> tuple[BaseException | None, str | None, int | None]:
        """(error, difference from the workload of its recorded step, step) of a restore."""
        try:
            restored = snap.restore(seq=seq)
        except (CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError) as err:
            return err, None, None
        step = restored.step
        problem = restored_difference(restored, step)
        del restored
        return None, problem, step

    def corrupt_chunks(self) -> None:
        """Flip bits in, truncate, empty, delete, overwrite or swap chunk objects and packs;
        the damage must be named by verify() and make restore() of older snapshots raise."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        refs = chunk_references(scratch)
        codec = store_codec(scratch)
        objects = sorted(refs)
        how = self.rng.choice(["flip", "flip", "flip-many", "truncate", "empty", "delete",
                               "garbage", "swap"])
        victim = self.rng.choice(objects)
        touched = [victim]
        file = scratch / victim
        if how == "flip":
            flip_bits(file, self.rng, 1)
        elif how == "flip-many":
            flip_bits(file, self.rng, self.rng.randint(2, 40))
        elif how == "truncate":
            truncate(file, self.rng.randrange(max(1, file.stat().st_size)))
        elif how == "empty":
            file.write_bytes(b"")
        elif how == "delete":
            file.unlink()
        elif how == "garbage":
            file.write_bytes(self.rng.randbytes(file.stat().st_size))
        else:
            other = self.rng.choice([obj for obj in objects if obj != victim])
            touched.append(other)
            first, second = file.read_bytes(), (scratch / other).read_bytes()
            file.write_bytes(second)
            (scratch / other).write_bytes(first)
        # Exactly the chunks whose bytes changed: in a pack, those whose ranges were hit.
        expected = damaged_chunks(scratch, set(touched), codec)
        damaged = sorted({obj for obj in touched
                          if any(refs_use in expected for refs_use in refs[obj])})
        kind = "pack" if victim.startswith("packs/") else "chunk object"
        what = f"{kind} {how} ({len(damaged)} damaged, used {len(expected)} times)"
        for mode in ("r", "a"):
            with arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES) as snap:
                here = f"{what}, mode {mode!r}"
                problems = {(p.seq, p.array, p.chunk) for p in snap.verify().problems}
                self.tally.check(problems == expected, (UNEXPECTED,),
                                 f"{here}: verify() reported {sorted(problems)[:6]}, expected "
                                 f"{sorted(expected)[:6]}")
                infos = snap.list()
                newest = infos[-1].seq
                for info in infos:
                    hits = {(name, index) for seq, name, index in expected if seq == info.seq}
                    error, problem, step = self._restore_outcome(snap, info.seq)
                    if error is not None:
                        if not hits:
                            self.tally.fail((LOST,), f"{here}: undamaged snapshot {info.seq} "
                                                     f"does not restore: {error}")
                            continue
                        names = getattr(error, "array", None), getattr(error, "chunk", None)
                        self.tally.check(
                            isinstance(error, CorruptSnapshotError) and names in hits
                            and f"array {names[0]!r}, chunk {names[1]}" in str(error),
                            (UNEXPECTED,),
                            f"{here}: restore(seq={info.seq}) raised {error!r}, which does "
                            f"not name one of the damaged chunks {sorted(hits)[:4]}")
                        continue
                    self.tally.check(problem is None and step == info.step,
                                     (WRONG,) if hits else (LOST, WRONG),
                                     f"{here}: snapshot {info.seq} restored wrong data: "
                                     f"{problem}")
                    # The latest may come from its (verified) baseline; older ones may not.
                    self.tally.check(not hits or info.seq == newest, (UNEXPECTED,),
                                     f"{here}: snapshot {info.seq} restored although its "
                                     f"chunks {sorted(hits)[:4]} are damaged")
        if not damaged:
            self.counts["corruptions harmless"] += 1
        elif len(self.tally.failures) == failures:
            self.counts["corruptions detected"] += 1
            self.counts["chunk objects damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_manifest(self) -> None:
        """Flip bits in or truncate a manifest: detected, left out, never misread."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        manifests = manifest_files(scratch)
        seq = self.rng.choice(sorted(manifests))
        pristine = manifests[seq]
        original = json.loads(pristine)
        file = scratch / "snapshots" / f"{seq:012d}.json"
        if self.rng.random() < 0.3:
            cut = self.rng.randrange(len(pristine))
            file.write_bytes(pristine[:cut])
            how = f"truncated to {cut} of {len(pristine)} bytes"
        else:
            offsets = flip_bits(file, self.rng, self.rng.randint(1, 3))
            how = f"bits flipped at {offsets}"
        data = file.read_bytes()
        try:
            same = json.loads(data) == original
        except ValueError:
            same = False
        others = sorted(s for s in manifests if s != seq)
        what = f"manifest {seq} {how}"
        if same:  # e.g. the case of a hex digit in a \\u escape: the same manifest
            with arraysnap.open(scratch, mode="r") as reader:
                self.check_all_restore(reader, f"{what} (harmless)")
            self.counts["corruptions harmless"] += 1
            self._done_with(scratch, failures)
            return
        for mode in ("r", "a"):
            here = f"{what}, mode {mode!r}"
            try:
                snap = arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES)
            except FormatVersionError as err:
                # The writer refuses a store holding a manifest from the future.
                self.tally.check(mode == "a" and seq == max(manifests), (UNEXPECTED,),
                                 f"{here}: open() raised {err!r}")
                continue
            with snap:
                error, problem, _ = self._restore_outcome(snap, seq)
                if error is None:
                    outcome = problem or "the right data, yet the manifest differs"
                    self.tally.fail((WRONG,) if problem else (UNEXPECTED,),
                                    f"{here}: the damaged snapshot restored ({outcome})")
                else:
                    self.tally.check(
                        isinstance(error, (CorruptSnapshotError, FormatVersionError))
                        and f"snapshot {seq}" in str(error), (UNEXPECTED,),
                        f"{here}: restore(seq={seq}) raised {error!r}")
                listed = [info.seq for info in snap.list()]
                self.tally.check(listed == others, (UNEXPECTED,),
                                 f"{here}: list() gives {listed}, expected {others}")
                latest = snap.latest()
                self.tally.check((latest.seq if latest else None) == (others or [None])[-1],
                                 (UNEXPECTED,), f"{here}: latest() gives {latest}")
                problems = [(p.seq, p.array) for p in snap.verify().problems]
                self.tally.check(problems == [(seq, None)], (UNEXPECTED,),
                                 f"{here}: verify() reported {problems[:6]}")
                self.check_all_restore(snap, here)
                if others:
                    newest = others[-1]
                    newest_step = json.loads(manifests[newest])["step"]
                    self.expect_restore(snap, None, newest_step, f"{here}: fallback",
                                        expected_seq=newest, fallback=True)
                    if seq < newest:
                        self.expect_restore(snap, None, newest_step, f"{here}: latest",
                                            expected_seq=newest)
                if mode == "a":
                    step = max(info.step or 0 for info in snap.list()) + 1
                    info = capture_step(snap, step)
                    snap.wait()
                    self.expect_restore(snap, None, step, f"{here}: a capture after it",
                                        expected_seq=info.seq)
        if len(self.tally.failures) == failures:
            self.counts["corruptions detected"] += 1
            self.counts["manifests damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_settings(self) -> None:
        """Damage arraysnap.json: open() refuses it, or it still means the same store."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        file = scratch / "arraysnap.json"
        pristine = file.read_bytes()
        how = self.rng.choice(["flip", "flip", "truncate", "garbage", "empty"])
        if how == "flip":
            flip_bits(file, self.rng, self.rng.randint(1, 2))
        elif how == "truncate":
            file.write_bytes(pristine[: self.rng.randrange(len(pristine))])
        elif how == "garbage":
            file.write_bytes(self.rng.randbytes(len(pristine)))
        else:
            file.write_bytes(b"")
        what = f"arraysnap.json {how}"
        refused = 0
        for mode in ("r", "a"):
            here = f"{what}, mode {mode!r}"
            try:
                snap = arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES)
            except ArraysnapError:
                refused += 1
                self.tally.passed += 1
                continue
            with snap:
                # Still readable: it must still mean the same store.
                report = snap.verify()
                self.tally.check(report.ok, (LOST,), f"{here}: opened, then {report}")
                self.check_all_restore(snap, f"{here} (opened)")
                if mode == "a":
                    step = max(info.step or 0 for info in snap.list()) + 1
                    info = capture_step(snap, step)
                    snap.wait()
                    self.expect_restore(snap, None, step, f"{here}: a capture after it",
                                        expected_seq=info.seq)
        self.tally.check(refused in (0, 2), (UNEXPECTED,),
                         f"{what}: refused in one mode only")
        if len(self.tally.failures) == failures:
            key = "corruptions detected" if refused else "corruptions harmless"
            self.counts[key] += 1
            if refused:
                self.counts["settings damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_baselines(self) -> None:
        """Damage the baseline files or their marker; restore and capture must repair it."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        mirror = scratch / "mirror"
        how = self.rng.choice(["flip", "flip", "flip-many", "truncate", "extend", "delete",
                               "marker-flip", "marker-garbage", "marker-delete", "stale"])
        if how == "stale":
            # The baselines of the snapshot before the latest come back (an older copy).
            saved = self.workdir / f"saved-mirror-{self.events:05d}"
            shutil.copytree(mirror, saved)
            with arraysnap.open(scratch, chunk_bytes=CHUNK_BYTES) as snap:
                capture_step(snap, (snap.latest().step or 0) + 1)  # type: ignore[union-attr]
            shutil.rmtree(mirror)
            shutil.move(saved, mirror)
        else:
            how = damage_baselines(scratch, how, self.rng)
        what = f"mirror {how}"
        with arraysnap.open(scratch, mode="r") as reader:
            latest = reader.latest()
            assert latest is not None
            self.expect_restore(reader, None, latest.step, f"{what}: reader",
                                expected_seq=latest.seq)
            report = reader.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify: {report}")
        with arraysnap.open(scratch, chunk_bytes=CHUNK_BYTES) as snap:
            step = (latest.step or 0) + 1
            if self.rng.random() < 0.5:
                # Capture first: only open()'s recovery can have made the baseline right.
                info = capture_step(snap, step)
                snap.wait()
                self.expect_restore(snap, latest.seq, latest.step, f"{what}: previous")
            else:
                self.expect_restore(snap, None, latest.step, f"{what}: writer",
                                    expected_seq=latest.seq)
                info = capture_step(snap, step)
                snap.wait()
            self.expect_restore(snap, None, step, f"{what}: capture after the damage",
                                expected_seq=info.seq)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after a capture: {report}")
        with arraysnap.open(scratch, mode="r") as reader:
            self.expect_restore(reader, None, step, f"{what}: reader after a capture",
                                expected_seq=info.seq)
        if len(self.tally.failures) == failures:
            self.counts["mirror damage repaired"] += 1
        self._done_with(scratch, failures)
