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
from arraysnap.testing import child_command, read_marker
from arraysnap.testing.powerloss import (
    MARKS,
    FileSystemModel,
    ForgettingMount,
    Journal,
    check_after_cut,
    crash_states,
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


# -- the forgetting file system ----------------------------------------------------------------
def _power_command(mount: ForgettingMount, rounds: int = 2) -> list[str]:
    return child_command("power", mount.mount / "run.snap", "--marks", mount.mount / MARKS,
                         "--rounds", rounds)


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
    assert labels == ["seen"]
    assert data[4096:4101] == b"kept." and data[:5] == bytes(5) and len(data) == 8192
    assert not (tmp_path / "boot-1" / "d" / "unsynced").exists()


@needs_fuse
def test_journal_replays_to_exactly_what_the_file_system_holds(tmp_path: Path) -> None:
    """The journal misses nothing arraysnap does: replayed, it gives the backing folder."""
    with ForgettingMount(tmp_path) as mount:
        assert mount.run(_power_command(mount)) is False, mount.writer_output()
        journal = Journal.read(mount.journal_dir)
    model = FileSystemModel.of_folder(tmp_path / "boot-0")
    for _ in journal.replay(model, set()):
        pass
    assert model.live_state() == FileSystemModel.of_folder(tmp_path / "live-0").live_state()
    kinds = collections.Counter(op["op"] for op in journal.ops)
    for kind in ("create", "write", "fsync", "fsyncdir", "rename", "unlink", "fallocate",
                 "mkdir", "mark"):
        assert kinds[kind] > 0, kind


def _marker(store: Path) -> dict | None:
    try:
        return read_marker(store)
    except (OSError, ValueError):
        return None


def _hold_points(total: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted({3, 12, *rng.sample(range(1, total), min(count, total - 1))})


@needs_fuse
def test_live_power_cuts_lose_no_snapshot_wait_returned_for(tmp_path: Path) -> None:
    """Level 1: a real writer process frozen and killed at an operation, what was not
    durable dropped, the store opened again after a new boot, through the file system."""
    with ForgettingMount(tmp_path / "count") as mount:
        mount.run(_power_command(mount))
        total = sum(1 for op in Journal.read(mount.journal_dir).ops
                    if op["op"] not in ("open", "release", "mark"))
    cuts = collections.Counter()
    for i, hold in enumerate(_hold_points(total, 6 * SCALE, seed=8)):
        with ForgettingMount(tmp_path / f"cut-{i}", hold_at=hold) as mount:
            held = mount.run(_power_command(mount))
            labels = mount.cut()
            marker = _marker(mount.mount / "run.snap")
            problems = check_after_cut(mount.mount / "run.snap", labels)
        assert problems == [], (hold, labels, problems, mount.writer_output()[-3000:])
        cuts["made" if held else "past the end"] += 1
        if marker is not None and marker.get("clean") and not marker.get("synced"):
            cuts["unsynced clean marker not trusted"] += 1
    assert cuts["made"] >= 5, cuts


@needs_fuse
def test_live_power_cuts_during_recovery(tmp_path: Path) -> None:
    """A cut, then another one while the next process opens and recovers the store."""
    rng = random.Random(3)
    for i in range(2 * SCALE):
        with ForgettingMount(tmp_path / f"r{i}", hold_at=rng.randrange(300, 1200)) as mount:
            mount.run(_power_command(mount))
            labels = mount.cut(hold_at=rng.randrange(2, 60))
            held = mount.run(_power_command(mount, rounds=1))
            labels += mount.cut()
            problems = check_after_cut(mount.mount / "run.snap", labels)
        assert held
        assert problems == [], (labels, problems)


@needs_fuse
def test_live_power_cuts_on_a_full_disk(tmp_path: Path) -> None:
    """The file system fills up mid-run (captures fail, prune and gc free space): cuts
    then lose nothing either, and the store still reads on the full disk (an old snapshot
    restores into the caller's arrays, which needs no space)."""
    labels_seen = []
    for i, (capacity, hold) in enumerate(((900_000, 0), (1_000_000, 0), (900_000, 700),
                                          (1_000_000, 1100))):
        with ForgettingMount(tmp_path / f"f{i}", capacity=capacity, hold_at=hold) as mount:
            mount.run(_power_command(mount, rounds=3))
            labels = mount.cut()
            problems = check_after_cut(mount.mount / "run.snap", labels, capture=False)
        assert problems == [], (capacity, hold, labels, problems)
        labels_seen += labels
    assert any(label.startswith("failed-") for label in labels_seen), labels_seen


@needs_fuse
def test_restore_on_a_full_disk_names_the_space_and_restore_into_works(tmp_path: Path) -> None:
    from arraysnap.testing import SMALL_WORKLOAD
    with ForgettingMount(tmp_path, capacity=1_200_000) as mount:
        mount.run(_power_command(mount, rounds=1))
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


def _check_states(tmp_path: Path, base: Path, journal: Journal, labels: list[str],
                  cuts: int, seed: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for cut in crash_states(base, journal, cuts=cuts, variants=2, seed=seed):
        target = tmp_path / "state"
        cut.state.write(target)
        problems = check_after_cut(target / "run.snap", [*labels, *cut.labels])
        assert problems == [], (cut.index, cut.variant, journal.ops[cut.index - 1], problems)
        counts["barrier" if cut.variant == 0 else "random"] += 1
        shutil.rmtree(target)
    return counts


# Random instants of a recorded run: 60 here, 1,200 with ARRAYSNAP_TORTURE=1.
INSTANTS = 60 if SCALE == 1 else 1200


@needs_fuse
def test_crash_states_of_a_recorded_run(tmp_path: Path) -> None:
    """Level 2: every barrier of one recorded run (captures, two in flight, a held
    restore, prune, gc, close), and random instants with random mixtures of lost and kept
    changes, each checked without FUSE."""
    with ForgettingMount(tmp_path / "record") as mount:
        assert mount.run(_power_command(mount)) is False, mount.writer_output()
        journal = Journal.read(mount.journal_dir)
    counts = _check_states(tmp_path, tmp_path / "record" / "boot-0", journal, [], INSTANTS,
                           seed=11)
    assert counts["barrier"] >= 50 and counts["random"] >= INSTANTS, counts


@needs_fuse
def test_crash_states_of_a_recovery(tmp_path: Path) -> None:
    """Level 2 of the recovery: a state a cut left in the middle of a run (baselines not
    to be trusted), recorded while the next writer opens, repairs and goes on; then every
    barrier of that recovery and random instants in it."""
    with ForgettingMount(tmp_path / "first") as mount:
        mount.run(_power_command(mount))
        first = Journal.read(mount.journal_dir)
    model = FileSystemModel.of_folder(tmp_path / "first" / "boot-0")
    middle = first.barriers()[len(first.barriers()) * 3 // 5]
    for _ in first.replay(model, {middle}):
        break
    labels = [label for i, label in first.marks() if i < middle]
    with ForgettingMount(tmp_path / "second", initial=model.crash_state()) as mount:
        assert mount.run(_power_command(mount, rounds=1)) is False, mount.writer_output()
        second = Journal.read(mount.journal_dir)
    counts = _check_states(tmp_path, tmp_path / "second" / "boot-0", second, labels,
                           INSTANTS // 2, seed=12)
    assert counts["barrier"] >= 20, counts
