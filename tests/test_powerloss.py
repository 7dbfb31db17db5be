"""Invariant 8, durable means durable: power cuts at every barrier and at random instants.

The crash-state model is tested on its own (no FUSE); the rest runs arraysnap on the
forgetting file system of :mod:`arraysnap.testing.powerloss`. Without FUSE those tests are
skipped with the reason, unless ``ARRAYSNAP_REQUIRE_FUSE=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import mmap
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SCALE
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap.testing.powercuts import (
    FULL_DISK,
    Tally,
    check_crash_states,
    live_cut,
    middle_state,
    record,
    routine,
)
from arraysnap.testing.powerloss import (
    MARKS,
    FileSystemModel,
    ForgettingMount,
    Journal,
    check_after_cut,
    expected_snapshots,
    fuse_unavailable,
)

REASON = fuse_unavailable()
if REASON is not None and os.environ.get("ARRAYSNAP_REQUIRE_FUSE") == "1":
    raise RuntimeError(f"ARRAYSNAP_REQUIRE_FUSE=1 but {REASON}")
needs_fuse = pytest.mark.skipif(REASON is not None, reason=str(REASON))


# -- the model, on its own -------------------------------------------------------------------
def _model(*ops: tuple[dict, bytes | None]) -> FileSystemModel:
    model = FileSystemModel.empty()
    for op, data in ops:
        model.apply(op, data)
    return model


CREATE = ({"op": "create", "path": "/a", "fh": 1}, None)
WRITE = ({"op": "write", "fh": 1, "offset": 0}, b"new")
SYNC = ({"op": "fsync", "fh": 1}, None)
SYNC_ROOT = ({"op": "fsyncdir", "path": "/"}, None)


def test_model_data_needs_the_files_fsync_and_a_name_its_folders() -> None:
    assert _model(CREATE, WRITE, SYNC).crash_state().files == {}  # name never synced
    assert _model(CREATE, WRITE, SYNC_ROOT).crash_state().files == {"a": b""}  # data not
    assert _model(CREATE, WRITE, SYNC, SYNC_ROOT).crash_state().files == {"a": b"new"}
    # After the barriers, later writes and names are lost again.
    model = _model(CREATE, WRITE, SYNC, SYNC_ROOT, ({"op": "write", "fh": 1, "offset": 1},
                                                     b"XX"),
                   ({"op": "mkdir", "path": "/d"}, None))
    assert model.crash_state().files == {"a": b"new"}
    assert model.crash_state().folders == frozenset()
    assert model.live_state().files == {"a": b"nXX"}


def test_model_renames_and_unlinks_are_lost_without_the_folders_fsync() -> None:
    temp = ({"op": "create", "path": "/.tmp", "fh": 2}, None)
    write = ({"op": "write", "fh": 2, "offset": 0}, b"v2")
    rename = ({"op": "rename", "old": "/.tmp", "new": "/a"}, None)
    base = (CREATE, WRITE, SYNC, SYNC_ROOT)
    # The replaced file comes back; the temporary's name was never durable either.
    assert _model(*base, temp, write, rename).crash_state().files == {"a": b"new"}
    # The rename durable but not the new file's data: an empty file under the old name.
    assert _model(*base, temp, write, rename, SYNC_ROOT).crash_state().files == {"a": b""}
    assert _model(*base, temp, write, ({"op": "fsync", "fh": 2}, None), rename,
                  SYNC_ROOT).crash_state().files == {"a": b"v2"}
    unlink = ({"op": "unlink", "path": "/a"}, None)
    assert _model(*base, unlink).crash_state().files == {"a": b"new"}
    assert _model(*base, unlink, SYNC_ROOT).crash_state().files == {}
    # A write through a handle reaches the file after its name moved.
    moved = _model(CREATE, ({"op": "rename", "old": "/a", "new": "/b"}, None), WRITE, SYNC,
                   SYNC_ROOT)
    assert moved.crash_state().files == {"b": b"new"}


def test_model_folders_a_new_folders_entries_need_its_own_fsync() -> None:
    ops = (({"op": "mkdir", "path": "/d"}, None),
           ({"op": "create", "path": "/d/f", "fh": 1}, None), SYNC, SYNC_ROOT)
    assert _model(*ops).crash_state().files == {}
    assert _model(*ops).crash_state().folders == frozenset({"d"})
    assert _model(*ops, ({"op": "fsyncdir", "path": "/d"}, None)).crash_state().files == {
        "d/f": b""}


_NAMES = st.sampled_from(["a", "b", "c"])


@st.composite
def _operations(draw: st.DrawFn) -> tuple[list[tuple[dict, bytes | None]], list[int]]:
    """Random operations on three names in the root, each valid where it is applied; and
    the handles of every file created."""
    ops: list[tuple[dict, bytes | None]] = []
    live: dict[str, int] = {}
    handles: list[int] = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["create", "write", "truncate", "fsync", "fsyncdir",
                                     "rename", "unlink"]))
        name = draw(_NAMES)
        if kind == "create" and name not in live:
            handles.append(len(handles) + 10)
            live[name] = handles[-1]
            ops.append(({"op": "create", "path": f"/{name}", "fh": handles[-1]}, None))
        elif kind in ("write", "truncate", "fsync") and name in live:
            fh = live[name]
            if kind == "write":
                data = draw(st.binary(min_size=1, max_size=6))
                ops.append(({"op": "write", "fh": fh, "offset": draw(st.integers(0, 8))}, data))
            elif kind == "truncate":
                ops.append(({"op": "truncate", "fh": fh, "size": draw(st.integers(0, 10))}, None))
            else:
                ops.append(({"op": "fsync", "fh": fh}, None))
        elif kind == "fsyncdir":
            ops.append(({"op": "fsyncdir", "path": "/"}, None))
        elif kind == "rename" and name in live:
            target = draw(_NAMES)
            if target != name:
                live[target] = live.pop(name)
                ops.append(({"op": "rename", "old": f"/{name}", "new": f"/{target}"}, None))
        elif kind == "unlink" and name in live:
            del live[name]
            ops.append(({"op": "unlink", "path": f"/{name}"}, None))
    return ops, handles


def _barrier(op: tuple[dict, bytes | None]) -> bool:
    return op[0]["op"] in ("fsync", "fsyncdir")


@given(_operations(), st.integers(0, 2**32), st.data())
@settings(max_examples=200 * SCALE, deadline=None)
def test_model_what_a_cut_keeps_changes_only_at_barriers(
        drawn: tuple[list[tuple[dict, bytes | None]], list[int]], seed: int,
        data: st.DataObject) -> None:
    ops, handles = drawn
    split = data.draw(st.integers(0, len(ops)))
    # Changes without a barrier after them: a cut loses every one of them.
    head, tail = ops[:split], [op for op in ops[split:] if not _barrier(op)]
    model = _model(*head, *tail)
    assert model.crash_state() == _model(*head).crash_state()
    if not any(_barrier(op) for op in head):
        assert model.crash_state() == FileSystemModel.empty().crash_state()
    # Everything synced: nothing left to lose, every crash state is the live state.
    synced = _model(*ops, *[({"op": "fsync", "fh": fh}, None) for fh in handles], SYNC_ROOT)
    assert synced.pending_changes() == 0
    assert synced.crash_state() == synced.live_state()
    assert synced.crash_state(random.Random(seed)) == synced.live_state()
    # With changes pending, the random states include ones that keep some of them.
    if model.pending_changes():
        lost = model.crash_state()
        assert (any(model.crash_state(random.Random(seed + i)) != lost for i in range(40))
                or model.live_state() == lost)


def test_expected_snapshots_pruned_and_in_flight_prunes() -> None:
    labels = ["committed-1-0", "committed-2-1", "committed-3-2", "pruning"]
    assert expected_snapshots(labels) == ({3: 2}, {1: 0, 2: 1})
    assert expected_snapshots([*labels, "pruned-1", "committed-4-3"]) == (
        {2: 1, 3: 2, 4: 3}, {1: 0})
    assert expected_snapshots(["committed-1-0", "pruning", "prune-failed"]) == ({1: 0}, {})
    # A failed prune may have removed what it was allowed to; a later one too.
    assert expected_snapshots([*labels, "prune-failed", "committed-4-3"]) == (
        {3: 2, 4: 3}, {1: 0, 2: 1})
    # A prune cut by the power: the next boot's snapshots are certain again.
    assert expected_snapshots([*labels, "opened", "committed-4-3", "committed-5-4"]) == (
        {3: 2, 4: 3, 5: 4}, {1: 0, 2: 1})


def test_journal_read_leaves_a_torn_line_out(tmp_path: Path) -> None:
    (tmp_path / "ops.jsonl").write_bytes(b'{"op": "mark", "label": "a"}\n{"op": "ma')
    (tmp_path / "data.bin").write_bytes(b"")
    assert Journal.read(tmp_path).marks() == [(0, "a")]


def test_check_after_cut_finds_a_lost_snapshot(store_path: Path) -> None:
    """The check itself: it must report a durable snapshot that is missing or wrong."""
    from arraysnap.testing import SMALL_WORKLOAD
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        first = SMALL_WORKLOAD.capture(snap, 0).result()
    labels = [f"committed-{first.seq}-0"]
    assert check_after_cut(store_path, labels, capture=False) == []
    assert check_after_cut(store_path, [*labels, "committed-9-1"], capture=False) == [
        "snapshot 9 (step 1) was durable before the cut and is missing"]
    assert check_after_cut(store_path, [f"committed-{first.seq}-5"], capture=False)[0] == (
        f"snapshot {first.seq} (step 5) was durable before the cut and is changed")
    shutil.rmtree(store_path)
    assert check_after_cut(store_path, labels) != []


# -- the forgetting file system ---------------------------------------------------------------
@needs_fuse
def test_forgetting_fs_carries_maps_fallocate_flock_and_forgets_what_was_not_synced(
        tmp_path: Path) -> None:
    with ForgettingMount(tmp_path) as mount:
        root = mount.mount
        (root / "d").mkdir()
        fd = os.open(root / "d" / "mapped", os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, 8192)
        view = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        view[4096:4101] = b"kept."
        view.flush()  # msync: the kernel writes the page back, then fsyncs
        view[0:5] = b"lost."  # written after the barrier: gone at the cut
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = os.open(root / "d" / "mapped", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
        view.close()
        os.close(fd)
        for folder in (root / "d", root):
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
        (root / "d" / "unsynced").write_bytes(b"x")  # a name no folder fsync made durable
        assert os.path.exists(root / MARKS / "seen") is False
        labels = mount.cut()
        data = (root / "d" / "mapped").read_bytes()
        mount.cut()  # a second boot mounts as well as the first
        assert (root / "d" / "mapped").read_bytes() == data
    assert str(root) not in Path("/proc/self/mounts").read_text()  # nothing left mounted
    assert labels == ["seen"]
    assert data[4096:4101] == b"kept." and data[:5] == bytes(5) and len(data) == 8192
    assert not (tmp_path / "boot-1" / "d" / "unsynced").exists()


@needs_fuse
def test_journal_replays_to_exactly_what_the_file_system_holds(tmp_path: Path) -> None:
    """The journal misses nothing arraysnap does: replayed, it gives the backing folder."""
    with ForgettingMount(tmp_path) as mount:
        assert mount.run(routine(mount)) is False, mount.writer_output()
        journal = Journal.read(mount.journal_dir)
    model = FileSystemModel.of_folder(tmp_path / "boot-0")
    journal.apply(model)
    assert model.live_state() == FileSystemModel.of_folder(tmp_path / "live-0").live_state()
    kinds = collections.Counter(op["op"] for op in journal.ops)
    for kind in ("create", "write", "fsync", "fsyncdir", "rename", "unlink", "fallocate",
                 "mkdir", "mark"):
        assert kinds[kind] > 0, kind


@needs_fuse
def test_live_power_cuts_lose_no_snapshot_wait_returned_for(tmp_path: Path) -> None:
    """Level 1: a real writer process frozen and killed at an operation, what was not
    durable dropped, the store opened again after a new boot, through the file system."""
    total = sum(1 for op in record(tmp_path / "count")[1].ops
                if op["op"] not in ("open", "release", "mark"))
    rng = random.Random(8)
    holds = sorted({3, 12, *rng.sample(range(1, total), 6 * SCALE)})
    made = 0
    for i, hold in enumerate(holds):
        cut = live_cut(tmp_path / f"cut-{i}", hold_at=hold)
        assert cut.problems == [], (hold, cut.labels, cut.problems)
        made += cut.held
    assert made >= len(holds) - 1


@needs_fuse
def test_live_power_cuts_during_recovery(tmp_path: Path) -> None:
    """A cut, then another one while the next process opens and recovers the store."""
    rng = random.Random(3)
    for i in range(2 * SCALE):
        cut = live_cut(tmp_path / f"r{i}", hold_at=rng.randrange(300, 1200),
                       again_at=rng.randrange(2, 60))
        assert cut.held and cut.held_again, cut.labels
        assert cut.problems == [], (cut.labels, cut.problems)


@needs_fuse
def test_live_power_cuts_on_a_full_disk(tmp_path: Path) -> None:
    """The file system fills up mid-run (captures fail, prune and gc free space): cuts
    then lose nothing either, and the store still reads on the full disk (an old snapshot
    restores into the caller's arrays, which needs no space)."""
    labels_seen = []
    for i, (capacity, hold) in enumerate(((FULL_DISK[0], 0), (FULL_DISK[1], 0),
                                          (FULL_DISK[0], 300), (FULL_DISK[1], 1100))):
        cut = live_cut(tmp_path / f"f{i}", capacity=capacity, hold_at=hold, rounds=3)
        assert cut.problems == [], (capacity, hold, cut.labels, cut.problems)
        assert cut.held == bool(hold)
        labels_seen += cut.labels
    assert any(label.startswith("failed-") for label in labels_seen), labels_seen


@needs_fuse
def test_restore_on_a_full_disk_names_the_space_and_restore_into_works(tmp_path: Path) -> None:
    from arraysnap.testing import SMALL_WORKLOAD
    with ForgettingMount(tmp_path, capacity=1_200_000) as mount:
        mount.run(routine(mount, rounds=1))
        store = mount.mount / "run.snap"
        with arraysnap.open(store) as snap:  # a writer assembles old snapshots in the store
            oldest = snap.list()[0]
            filler = os.open(mount.mount / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
            with pytest.raises(OSError):
                for _ in range(1000):
                    os.write(filler, bytes(4096))
            os.close(filler)
            with pytest.raises(arraysnap.StoreWriteError, match="restore_into") as caught:
                snap.restore(seq=oldest.seq)
            assert caught.value.errno == errno.ENOSPC
            buffers = {name: np.zeros_like(array) for name, array in
                       SMALL_WORKLOAD.arrays(oldest.step).items() if name in oldest.arrays}
            restored = snap.restore_into(buffers, seq=oldest.seq)
            assert SMALL_WORKLOAD.difference(restored, oldest.step) is None
            assert all(restored.arrays[name] is buffers[name] for name in buffers)


# Random instants of a recorded run: 60 here, 1,200 with ARRAYSNAP_TORTURE=1.
INSTANTS = 60 if SCALE == 1 else 1200


def _all_survive(checked) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for cut, problems in checked:
        assert problems == [], (cut.index, cut.variant, problems)
        counts["barrier" if cut.variant == 0 else "random"] += 1
    return counts


@needs_fuse
def test_crash_states_of_a_recorded_run(tmp_path: Path) -> None:
    """Level 2: every barrier of one recorded run (captures, two in flight, a held
    restore, prune, gc, close), and random instants with random mixtures of lost and kept
    changes, each checked without FUSE."""
    base, journal = record(tmp_path / "record")
    counts = _all_survive(check_crash_states(tmp_path / "state", base, journal,
                                             instants=INSTANTS, seed=11))
    assert counts["barrier"] >= 50 and counts["random"] >= INSTANTS, counts


@needs_fuse
def test_crash_states_of_a_recovery(tmp_path: Path) -> None:
    """Level 2 of the recovery: a state a cut left in the middle of a run (baselines not
    to be trusted), recorded while the next writer opens, repairs and goes on; then every
    barrier of that recovery and random instants in it."""
    state, labels = middle_state(*record(tmp_path / "first"))
    assert any(label.startswith("committed") for label in labels)
    base, journal = record(tmp_path / "second", rounds=1, initial=state)
    counts = _all_survive(check_crash_states(tmp_path / "state", base, journal,
                                             instants=INSTANTS // 2, seed=12, labels=labels))
    assert counts["barrier"] >= 20, counts


@needs_fuse
def test_crash_states_of_a_run_of_many_arrays(tmp_path: Path) -> None:
    """Level 2 with 2,000 arrays more: a tree of table nodes in packs (format 4), shared
    baseline files; every barrier of a recorded run and random instants."""
    base, journal = record(tmp_path / "record", rounds=1, workload="many")
    counts = _all_survive(check_crash_states(tmp_path / "state", base, journal,
                                             instants=INSTANTS // 6, seed=3, workload="many"))
    assert counts["barrier"] >= 20, counts


@needs_fuse
def test_the_counting_campaign_counts_what_it_checks(tmp_path: Path) -> None:
    """`python -m arraysnap.testing.powercuts` (the counts in docs/recovery.md): a failed
    check is counted as not survived."""
    tally = Tally()
    tally.add("x", [])
    tally.add("x", ["snapshot 3 is missing"])
    assert tally.rows() == [("x", 2, 1)] and not tally.ok
    assert tally.problems == ["x: snapshot 3 is missing"]
