"""``StorageTests``: the behaviour every :class:`~arraysnap.storage.Storage` must have.

Subclass it in a pytest module and override ``make(tmp_path)`` to make a fresh, empty
storage of your kind (as ``zarr.testing.store.StoreTests`` is subclassed per zarr store);
every ``test_*`` method then runs against it. It needs pytest, so ``arraysnap.testing``
does not import it: ``from arraysnap.testing.storage_tests import StorageTests``.

>>> from arraysnap.storage import LocalStorage
>>> class TestLocal(StorageTests):
...     def make(self, tmp_path):
...         return LocalStorage(tmp_path / "s")
>>> sorted(name for name in dir(TestLocal) if name.startswith("test_"))[:2]
['test_append_cuts_to_its_offset', 'test_append_is_all_or_nothing_across_calls']
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from arraysnap.errors import StoreLockedError
from arraysnap.storage import Storage, parse_key

__all__ = ["StorageTests"]


class StorageTests:
    """What the engine relies on from a storage; see the module doc."""

    def make(self, tmp_path: Path) -> Storage:
        """A fresh, empty storage (override)."""
        raise NotImplementedError("subclass StorageTests and make a storage in make()")

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        storage = self.make(tmp_path)
        storage.create()
        yield storage
        storage.close()

    # -- create-only and replace -----------------------------------------------------------
    def test_put_if_absent_writes_once(self, storage: Storage) -> None:
        assert storage.put_if_absent("chunks/ab/cd", b"first")
        assert not storage.put_if_absent("chunks/ab/cd", b"second")
        assert storage.get("chunks/ab/cd") == b"first"
        assert storage.exists("chunks/ab/cd") and storage.size("chunks/ab/cd") == 5

    def test_put_atomic_replaces(self, storage: Storage) -> None:
        storage.put_atomic("arraysnap.json", b"{}")
        storage.put_atomic("arraysnap.json", b'{"a": 1}')
        assert storage.get("arraysnap.json") == b'{"a": 1}'

    def test_missing_keys_raise_file_not_found(self, storage: Storage) -> None:
        assert not storage.exists("snapshots/000000000001.json")
        for read in (lambda: storage.get("x"), lambda: storage.size("x"),
                     lambda: storage.get_range("x", 0, 1)):
            with pytest.raises(FileNotFoundError):
                read()
        storage.delete("x")  # absent is no error

    def test_get_refuses_more_than_its_limit(self, storage: Storage) -> None:
        storage.put_if_absent("big", b"x" * 100)
        assert storage.get("big", limit=100) == b"x" * 100
        with pytest.raises(OSError):
            storage.get("big", limit=99)

    def test_get_range_reads_a_slice_and_stops_at_the_end(self, storage: Storage) -> None:
        storage.put_if_absent("v", b"0123456789")
        assert storage.get_range("v", 2, 3) == b"234"
        assert storage.get_range("v", 8, 10) == b"89"

    def test_read_once_reads_what_get_reads(self, storage: Storage) -> None:
        large = bytes(range(256)) * 4096  # 1 MiB: a local storage lets its cache go
        storage.put_if_absent("small", b"xyz")
        storage.put_if_absent("large", large)
        storage.barrier()
        assert storage.read_once("small") == b"xyz"
        assert storage.read_once("large") == large == storage.get("large")
        with pytest.raises(FileNotFoundError):
            storage.read_once("absent")

    def test_bad_keys_are_refused_before_anything_is_written(self, storage: Storage) -> None:
        for key in ("", "/abs", "a//b", "../x", "a/./b", "a\\b", "a\x00b"):
            with pytest.raises(ValueError):
                storage.put_if_absent(key, b"x")
        assert list(storage.list_prefix("")) == []
        assert parse_key("my array/c/0") == "my array/c/0"  # array names may hold spaces

    # -- listing and deleting --------------------------------------------------------------
    def test_list_prefix_lists_exactly_the_keys_under_it(self, storage: Storage) -> None:
        keys = ["chunks/ab/cd", "chunks/ef/01", "snapshots/000000000001.json", "history.jsonl",
                "journal/0000000000000000.jsonl"]
        for key in keys:
            storage.put_if_absent(key, b"x")
        assert sorted(storage.list_prefix("")) == sorted(keys)
        assert sorted(storage.list_prefix("chunks/")) == ["chunks/ab/cd", "chunks/ef/01"]
        assert list(storage.list_prefix("chunks/ef")) == ["chunks/ef/01"]
        assert list(storage.list_prefix("snap")) == ["snapshots/000000000001.json"]
        assert list(storage.list_prefix("nothing/")) == []

    def test_delete_removes_from_reads_and_listings(self, storage: Storage) -> None:
        storage.put_if_absent("snapshots/000000000001.json", b"m")
        storage.delete("snapshots/000000000001.json")
        storage.barrier()
        assert not storage.exists("snapshots/000000000001.json")
        assert list(storage.list_prefix("snapshots/")) == []
        assert storage.put_if_absent("snapshots/000000000001.json", b"again")

    # -- append ----------------------------------------------------------------------------
    def test_append_cuts_to_its_offset(self, storage: Storage) -> None:
        storage.append("journal/0.jsonl", b"aaa\n", at=0)
        storage.append("journal/0.jsonl", b"bbb\n", at=4)
        storage.append("journal/0.jsonl", b"ccc\n", at=4)  # a retry of the second batch
        assert storage.get("journal/0.jsonl") == b"aaa\nccc\n"
        storage.append("journal/0.jsonl", b"", at=2)  # cutting a torn tail off
        assert storage.get("journal/0.jsonl") == b"aa"

    def test_append_is_all_or_nothing_across_calls(self, storage: Storage) -> None:
        storage.append("history.jsonl", b"one\n", at=0, durable=False)
        storage.append("history.jsonl", b"two\n", at=4, durable=False)
        storage.barrier(["history.jsonl"])
        assert storage.get("history.jsonl") == b"one\ntwo\n"
        storage.append("journal/0.jsonl", b"new", at=0)  # at 0 starts the value afresh
        storage.append("journal/0.jsonl", b"x", at=0)
        assert storage.get("journal/0.jsonl") == b"x"

    # -- one writer ------------------------------------------------------------------------
    def test_one_writer_at_a_time(self, storage: Storage) -> None:
        lock = storage.lock_writer("pid 1 on here")
        with pytest.raises(StoreLockedError, match="pid 1 on here"):
            storage.lock_writer("pid 2 on there")
        lock.release()
        storage.lock_writer("pid 2 on there").release()

    def test_barrier_with_nothing_pending_and_concurrent_puts(self, storage: Storage) -> None:
        storage.barrier()
        threads = [threading.Thread(target=storage.put_if_absent, args=(f"chunks/{i:02x}/x",
                                                                       b"v"))
                   for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        storage.barrier(["chunks/00/x"])
        assert len(list(storage.list_prefix("chunks/"))) == 16
