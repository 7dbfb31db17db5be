"""The storage interface: every implementation passes StorageTests; LocalStorage's own
durability (what a barrier syncs, and in which order) and its refusals."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from arraysnap.fsio import FileOps
from arraysnap.storage import LocalStorage, LoggingStorage
from arraysnap.storage._local import UNCACHED_BYTES
from arraysnap.testing import FaultPlan
from arraysnap.testing.storage_tests import StorageTests


class TestLocalStorage(StorageTests):
    def make(self, tmp_path: Path) -> LocalStorage:
        return LocalStorage(tmp_path / "s.snap")


class TestLoggingStorage(StorageTests):
    def make(self, tmp_path: Path) -> LoggingStorage:
        return LoggingStorage(LocalStorage(tmp_path / "s.snap"), reads=True)


class TestFaultyStorageUnarmed(StorageTests):
    """A fault plan with nothing armed changes nothing."""

    def make(self, tmp_path: Path):
        return FaultPlan(tmp_path / "s.snap").storage


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[LocalStorage, list[str]]:
    """A fresh local storage under a fault plan that records each fsync (of a file or a
    folder) relative to the store, in order."""
    plan = FaultPlan(tmp_path / "s")
    synced: list[str] = []
    plan.before("fsync", None, lambda call: synced.append(call.where))
    storage = plan.storage
    storage.create()
    storage.barrier()
    synced.clear()
    return storage, synced


def test_a_barrier_syncs_every_folder_written_deepest_first(recorded):
    storage, synced = recorded
    storage.put_if_absent("chunks/ab/" + "c" * 62, b"1")
    storage.put_if_absent("chunks/ab/" + "d" * 62, b"2")
    objects = list(synced)
    assert len(objects) == 2 and all(p.startswith("chunks/ab/.tmp-") for p in objects)
    synced.clear()
    storage.barrier()
    # Once per folder, however many objects; a new folder before the entry naming it.
    assert synced == ["chunks/ab", "chunks"]
    synced.clear()
    storage.barrier()
    assert synced == []  # nothing owed


def test_a_barrier_syncs_the_names_it_is_given_but_not_their_synced_data(recorded):
    storage, synced = recorded
    storage.put_if_absent("chunks/ab/" + "c" * 62, b"1")
    storage.barrier()
    synced.clear()
    # A reused object, perhaps renamed into place by a writer killed before its barrier.
    storage.barrier(["chunks/ab/" + "c" * 62])
    assert sorted(synced) == ["chunks", "chunks/ab"]


def test_appends_are_synced_by_the_next_barrier_or_only_when_named(recorded):
    storage, synced = recorded
    storage.append("journal/0000000000000000.jsonl", b"r\n", at=0)
    storage.append("history.jsonl", b"h\n", at=0, durable=False)
    storage.barrier()
    assert "journal/0000000000000000.jsonl" in synced
    assert "history.jsonl" not in synced
    synced.clear()
    storage.barrier(["history.jsonl"])
    assert "history.jsonl" in synced


def test_deletions_are_made_durable_by_the_next_barrier(recorded):
    storage, synced = recorded
    storage.put_if_absent("snapshots/000000000001.json", b"m")
    storage.barrier()
    synced.clear()
    storage.delete("snapshots/000000000001.json")
    storage.barrier()
    assert synced == ["snapshots"]


def test_a_failed_barrier_still_owes_what_it_did_not_sync(tmp_path: Path):
    plan = FaultPlan(tmp_path / "s")
    failed = plan.fail("fsync_dir", None, errno.EIO)
    storage = plan.storage
    storage.put_if_absent("chunks/ab/cd", b"x")
    with pytest.raises(OSError):
        storage.barrier()
    assert failed.errors
    synced: list[str] = []
    plan.before("fsync_dir", None, lambda call: synced.append(call.where))
    storage.barrier()
    assert "chunks/ab" in synced


def test_writes_never_follow_a_link_planted_in_place_of_a_folder(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "s")
    storage.create()
    (tmp_path / "s" / "journal").symlink_to(outside)
    storage.append("journal/0000000000000000.jsonl", b"r\n", at=0)
    assert list(outside.iterdir()) == []
    assert (tmp_path / "s" / "journal").is_dir() and not (tmp_path / "s" / "journal").is_symlink()


def test_listing_never_follows_a_link_below_the_prefix(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    storage = LocalStorage(tmp_path / "s")
    storage.create()
    (tmp_path / "s" / "chunks" / "ab").symlink_to(outside)
    assert list(storage.list_prefix("chunks/")) == ["chunks/ab"]  # the link, not into it


def test_temporaries_are_removed_and_listed_never(tmp_path: Path):
    storage = LocalStorage(tmp_path / "s")
    storage.create()
    storage.put_if_absent("chunks/ab/cd", b"x")
    storage.put_if_absent("tables/ef/01", b"y")  # format 2's table objects: the same
    for leftover in ("chunks/ab/.tmp-cd.1", "snapshots/.tmp-000000000001.json.2", ".tmp-x.3",
                     "tables/ef/.tmp-01.4"):
        (tmp_path / "s" / leftover).write_bytes(b"half")
    assert sorted(storage.list_prefix("")) == ["chunks/ab/cd", "tables/ef/01"]
    assert storage.remove_temporaries() == 4


def test_create_refuses_a_folder_that_holds_something_else(tmp_path: Path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and not an arraysnap store"):
        LocalStorage(tmp_path / "s").create()
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        LocalStorage(tmp_path / "f").create()
    # What a creation that died leaves behind is fine.
    (tmp_path / "d" / "chunks").mkdir(parents=True)
    (tmp_path / "d" / "lock").write_text("")
    LocalStorage(tmp_path / "d").create()


def test_large_values_leave_the_page_cache_once_durable_small_ones_stay(tmp_path: Path):
    # Chunk objects and packs are seldom read back: cached, they push the program's own data
    # out (and on a VM with lazily backed memory, fresh cache pages cost ~4x the write).
    events: list[tuple[str, int]] = []

    class Record(FileOps):
        def fsync(self, fd: int) -> None:
            events.append(("fsync", fd))
            super().fsync(fd)

        def drop_cached(self, fd: int) -> None:
            events.append(("drop", fd))
            super().drop_cached(fd)

    storage = LocalStorage(tmp_path / "s", Record())
    storage.create()
    events.clear()
    storage.put_if_absent("chunks/ab/" + "c" * 62, bytes(UNCACHED_BYTES))
    assert [op for op, _ in events] == ["fsync", "drop"]  # dropped once clean, not before
    assert events[0][1] == events[1][1]
    events.clear()
    # Its size in bytes, not in items: a memoryview of float64 has len() of an eighth.
    storage.put_if_absent("chunks/ab/" + "d" * 62,
                          memoryview(np.ones(UNCACHED_BYTES // 8)))
    assert [op for op, _ in events] == ["fsync", "drop"]
    events.clear()
    storage.put_if_absent("chunks/ab/" + "e" * 62, bytes(UNCACHED_BYTES - 1))
    storage.put_atomic("snapshots/1.json", bytes(UNCACHED_BYTES))  # a commit point: kept
    assert "drop" not in [op for op, _ in events] and events
    assert storage.get("chunks/ab/" + "c" * 62) == bytes(UNCACHED_BYTES)
