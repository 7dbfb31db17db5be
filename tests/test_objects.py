"""The chunk object store: atomic puts, dedup, listing, temporaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from arraysnap.fsio import FileOps
from arraysnap.objects import ChunkObjects, object_key
from arraysnap.storage import LocalStorage


def test_put_get_has_delete(tmp_path):
    objects = ChunkObjects(LocalStorage(tmp_path))
    digest = bytes(range(32))
    assert not objects.has(digest)
    assert objects.put(digest, b"payload") == 7
    assert objects.put(digest, b"payload") == 0  # present: not written again
    objects.sync()
    assert objects.get(digest) == b"payload"
    assert list(objects.digests()) == [digest]
    assert (tmp_path / object_key(digest)).parent.name == digest.hex()[:2]
    objects.delete(digest)
    objects.delete(digest)  # absent is fine
    assert not objects.has(digest)
    with pytest.raises(FileNotFoundError):
        objects.get(digest)


class FailingRename(FileOps):
    def replace(self, source, target):
        raise OSError(28, "No space left on device")


def test_failed_put_leaves_no_object_and_no_temporary(tmp_path):
    objects = ChunkObjects(LocalStorage(tmp_path, FailingRename()))
    digest = bytes(32)
    with pytest.raises(OSError):
        objects.put(digest, b"x" * 100)
    assert not objects.has(digest)
    assert [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()] == []


def test_stray_temporaries_are_removed_and_strange_names_ignored(tmp_path):
    objects = ChunkObjects(LocalStorage(tmp_path))
    objects.put(bytes(32), b"a")
    folder = (tmp_path / object_key(bytes(32))).parent
    (folder / ".tmp-leftover").write_bytes(b"half")
    (folder / "not-hex-name").write_bytes(b"?")
    assert objects.storage.remove_temporaries() == 1
    assert list(objects.digests()) == [bytes(32)]


def test_get_refuses_objects_over_the_limit(tmp_path):
    objects = ChunkObjects(LocalStorage(tmp_path))
    objects.put(bytes(32), b"x" * 1000)
    assert objects.get(bytes(32), limit=1000) == b"x" * 1000
    with pytest.raises(OSError, match="more than 999"):
        objects.get(bytes(32), limit=999)


def test_an_object_reused_by_a_new_snapshot_gets_its_folder_synced(tmp_path):
    # Left by a writer killed before it fsynced the folder: the next snapshot that reuses the
    # object must make its name durable before a manifest names it.
    synced = []

    class Record(FileOps):
        def fsync_dir(self, path):
            synced.append(Path(path))
            super().fsync_dir(path)

    objects = ChunkObjects(LocalStorage(tmp_path, Record()))
    digest = bytes.fromhex("ab" * 32)
    objects.put(digest, b"x")
    objects.sync()
    synced.clear()
    objects.reuse(digest)
    objects.sync()
    assert (tmp_path / object_key(digest)).parent in synced


def test_assemble_raises_only_after_every_chunk_task_ended(monkeypatch):
    """A chunk that fails must not leave others writing into the buffer after the error
    (a restore_into() caller may reuse it at once)."""
    import threading
    import types
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from arraysnap import chunks
    from arraysnap.errors import CorruptSnapshotError

    release = threading.Event()

    def load(objects, codec, entry, index, *, verify, seq):
        if index == 0:
            raise CorruptSnapshotError("damaged on purpose", seq=seq)
        release.wait(10)
        return bytes([index]) * 4

    monkeypatch.setattr(chunks, "load_chunk", load)
    layout = types.SimpleNamespace(chunk_range=lambda i: (4 * i, 4 * i + 4))
    entry = types.SimpleNamespace(layout=layout, n_chunks=2)
    buffer = np.zeros(8, dtype=np.uint8)
    outcome = []

    def run():
        try:
            chunks.assemble(buffer, None, None, entry, pool, verify=True, seq=1)
        except CorruptSnapshotError as err:
            outcome.append(err)

    with ThreadPoolExecutor(2) as pool:
        caller = threading.Thread(target=run)
        caller.start()
        caller.join(0.5)
        assert caller.is_alive()  # chunk 0 failed, chunk 1 still running: not returned yet
        release.set()
        caller.join(10)
    assert len(outcome) == 1 and buffer[4:].tolist() == [1] * 4
