"""The storage interface: every implementation passes StorageTests; LocalStorage's own
durability (what a barrier syncs, and in which order) and its refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arraysnap.fsio import FileOps
from arraysnap.storage import LocalStorage, LoggingStorage
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


class Recorder(FileOps):
    """Records the fsyncs of files and folders, relative to `root`, in order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.synced: list[str] = []

    def fsync(self, fd: int) -> None:
        self.synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), self.root))
        super().fsync(fd)


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[LocalStorage, Recorder]:
    ops = Recorder(tmp_path / "s")
    storage = LocalStorage(tmp_path / "s", ops)
    storage.create()
    storage.barrier()
    ops.synced.clear()
    return storage, ops


def test_a_barrier_syncs_every_folder_written_deepest_first(recorded):
    storage, ops = recorded
    storage.put_if_absent("chunks/ab/" + "c" * 62, b"1")
    storage.put_if_absent("chunks/ab/" + "d" * 62, b"2")
    objects = list(ops.synced)
    assert len(objects) == 2 and all(p.startswith("chunks/ab/.tmp-") for p in objects)
    ops.synced.clear()
    storage.barrier()
    # Once per folder, however many objects; a new folder before the entry naming it.
    assert ops.synced == ["chunks/ab", "chunks"]
    ops.synced.clear()
    storage.barrier()
    assert ops.synced == []  # nothing owed


def test_a_barrier_syncs_the_names_it_is_given_but_not_their_synced_data(recorded):
    storage, ops = recorded
    storage.put_if_absent("chunks/ab/" + "c" * 62, b"1")
    storage.barrier()
    ops.synced.clear()
    # A reused object, perhaps renamed into place by a writer killed before its barrier.
    storage.barrier(["chunks/ab/" + "c" * 62])
    assert sorted(ops.synced) == ["chunks", "chunks/ab"]


def test_appends_are_synced_by_the_next_barrier_or_only_when_named(recorded):
    storage, ops = recorded
    storage.append("journal/0000000000000000.jsonl", b"r\n", at=0)
    storage.append("history.jsonl", b"h\n", at=0, durable=False)
    storage.barrier()
    assert "journal/0000000000000000.jsonl" in ops.synced
    assert "history.jsonl" not in ops.synced
    ops.synced.clear()
    storage.barrier(["history.jsonl"])
    assert "history.jsonl" in ops.synced


def test_deletions_are_made_durable_by_the_next_barrier(recorded):
    storage, ops = recorded
    storage.put_if_absent("snapshots/000000000001.json", b"m")
    storage.barrier()
    ops.synced.clear()
    storage.delete("snapshots/000000000001.json")
    storage.barrier()
    assert ops.synced == ["snapshots"]


def test_a_failed_barrier_still_owes_what_it_did_not_sync(tmp_path: Path):
    class FailOnce(FileOps):
        failed = False

        def fsync_dir(self, path: Path) -> None:
            if not self.failed:
                self.failed = True
                raise OSError(5, "injected")
            super().fsync_dir(path)

    storage = LocalStorage(tmp_path / "s", FailOnce())
    storage.put_if_absent("chunks/ab/cd", b"x")
    with pytest.raises(OSError):
        storage.barrier()
    synced = []
    storage.ops.fsync_dir = lambda path: synced.append(Path(path).name)  # type: ignore[method-assign]
    storage.barrier()
    assert "ab" in synced


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
    for leftover in ("chunks/ab/.tmp-cd.1", "snapshots/.tmp-000000000001.json.2", ".tmp-x.3"):
        (tmp_path / "s" / leftover).write_bytes(b"half")
    assert sorted(storage.list_prefix("")) == ["chunks/ab/cd"]
    assert storage.remove_temporaries() == 3


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
