"""A reader restores the latest snapshot from the writer's baselines alone (the extent
table with every array's layout), without its chunk tables, and goes the usual way whenever
the baselines do not say exactly that snapshot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import arraysnap
from arraysnap._store.catalog import Catalog
from arraysnap.extents import MARKER, TABLE, TABLE_DIGEST, table_digest
from arraysnap.manifest import DeferredArrays, seal_manifest
from arraysnap.storage import LocalStorage, LoggingStorage
from arraysnap.tables import INLINE_ARRAYS

MANY = INLINE_ARRAYS * 3  # a snapshot whose arrays are in table objects


def _arrays(count: int) -> dict[str, np.ndarray]:
    # Not in name order, of several layouts, one of them empty.
    arrays = {f"a{i:04d}": np.full(3 + i % 4, float(i)) for i in reversed(range(count))}
    arrays["empty"] = np.zeros((0, 2))
    arrays["grid"] = np.arange(12, dtype=np.int32).reshape(3, 4, order="F").copy(order="F")
    return arrays


def _reader(path: Path) -> tuple[arraysnap.Store, LoggingStorage]:
    logged = LoggingStorage(LocalStorage(path), reads=True)
    return arraysnap.open(logged, mode="r"), logged


def _table_reads(logged: LoggingStorage) -> list[str]:
    return [key for op, key in logged.calls
            if op in ("get", "get_range") and key.startswith(("tables/", "packs/"))]


def _same(fast: arraysnap.Restored, usual: arraysnap.Restored) -> None:
    assert list(fast.arrays) == list(usual.arrays)
    for name in usual.arrays:
        a, b = fast.arrays[name], usual.arrays[name]
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        assert a.flags.f_contiguous == b.flags.f_contiguous
    assert (fast.seq, fast.step, fast.state) == (usual.seq, usual.step, usual.state)
    assert (fast.rng is None) == (usual.rng is None)
    if usual.rng is not None:
        assert fast.rng.bit_generator.state == usual.rng.bit_generator.state
    assert dict(fast.info.arrays) == dict(usual.info.arrays)
    assert fast.info.bytes_written == usual.info.bytes_written


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "s.snap"
    arrays = _arrays(MANY)
    with arraysnap.open(path) as snap:
        snap.capture(arrays, step=1, rng=np.random.default_rng(1)).result()
        arrays["a0007"][0] = -1.0
        snap.capture(arrays, step=2, state={"t": 2.0},
                     rng=np.random.default_rng(2)).result()
    return path, arrays


def test_the_latest_snapshot_comes_from_the_baselines_without_its_tables(store):
    path, arrays = store
    reader, logged = _reader(path)
    with reader:
        fast = reader.restore(verify=False)
        assert _table_reads(logged) == []  # not one table node or leaf read
        assert isinstance(fast.info.arrays._entries, DeferredArrays)
        with arraysnap.open(path, mode="r") as other:
            usual = other.restore(verify=True)  # verifying goes the usual way
        _same(fast, usual)
        assert fast.arrays["a0007"][0] == -1.0 and fast.step == 2
        assert list(fast.arrays) == sorted(arrays)  # a reader's order, as before
        # Asked for, the arrays' entries are read then, from the tables.
        assert fast.info.arrays["grid"].shape == (3, 4) and _table_reads(logged)


def _rewrite_table(path: Path, change, *, reseal: bool = False) -> None:
    """Change the extent table; `reseal`: and name the new one in the marker, as a writer
    would have (a writer's mistake, not damage)."""
    table_file = path / "mirror" / TABLE
    table = json.loads(table_file.read_text())
    change(table)
    data = json.dumps(table).encode()
    table_file.write_bytes(data)
    if reseal:
        marker_file = path / "mirror" / MARKER
        marker = json.loads(marker_file.read_text())
        marker[TABLE_DIGEST] = table_digest(data)
        marker_file.write_text(json.dumps(marker))


def _drop_last(table: dict) -> None:
    for key in ("names", "file", "offsets", "layout"):
        table[key].pop()


def _wrong_layout(table: dict) -> None:
    table["layouts"][table["layout"][0]]["shape"] = [1]


def _no_layouts(table: dict) -> None:
    del table["layouts"], table["layout"]


def _huge_layout(table: dict) -> None:
    table["layouts"][table["layout"][0]]["shape"] = [1 << 30]


@pytest.mark.parametrize(("change", "reseal", "count"), [
    # Damaged (the marker's digest no longer matches): never read.
    (_drop_last, False, MANY), (_wrong_layout, False, MANY), (_wrong_layout, False, 3),
    # As a writer might have got it wrong: what the manifest says refuses it.
    (_drop_last, True, MANY), (_drop_last, True, 3), (_wrong_layout, True, 3),
    (_no_layouts, True, MANY),
    # A layout past the end of its file maps nothing.
    (_huge_layout, True, MANY),
])
def test_a_mirror_that_does_not_say_exactly_the_snapshot_is_not_used(tmp_path, change,
                                                                       reseal, count):
    path = tmp_path / "s.snap"
    arrays = _arrays(count)
    with arraysnap.open(path) as snap:
        snap.capture(arrays, step=1).result()
    with arraysnap.open(path, mode="r") as reader:
        usual = reader.restore(verify=True)
    _rewrite_table(path, change, reseal=reseal)
    reader, logged = _reader(path)
    with reader:
        _same(reader.restore(verify=False), usual)
        if count == MANY:
            assert _table_reads(logged)  # the usual way


def test_a_moved_on_writer_or_an_older_snapshot_goes_the_usual_way(store):
    path, arrays = store
    with arraysnap.open(path) as snap:
        reader, logged = _reader(path)
        with reader:
            older = reader.restore(seq=1, verify=False)  # not the baselines' snapshot
            assert older.arrays["a0007"][0] == 7.0 and _table_reads(logged)
            logged.calls.clear()
            arrays["a0001"][0] = 5.0
            snap.capture(arrays, step=3)  # the baselines change while the reader looks
            restored = reader.restore(verify=False)
            assert restored.step in (2, 3)
            assert restored.arrays["a0001"][0] == (5.0 if restored.step == 3 else 1.0)
            snap.wait()
            assert reader.restore(verify=False).step == 3


def test_an_earlier_writers_table_is_written_again_with_layouts(store):
    path, _ = store
    _rewrite_table(path, _no_layouts)
    with arraysnap.open(path) as snap:  # adopts the baselines, rewrites their table
        snap.capture(_arrays(MANY), step=3).result()
    assert "layouts" in json.loads((path / "mirror" / TABLE).read_text())
    reader, logged = _reader(path)
    with reader:
        assert reader.restore(verify=False).step == 3 and _table_reads(logged) == []


def test_the_head_of_a_manifest_defers_only_arrays_in_table_objects(tmp_path):
    path = tmp_path / "s.snap"
    few = {"u": np.arange(3.0), "long": np.arange(20_000.0)}  # "long": digest blocks
    with arraysnap.open(path, chunk_bytes=1024) as snap:
        snap.capture(few, step=1).result()
        snap.capture(_arrays(MANY), step=2).result()
    catalog = Catalog(LocalStorage(path))
    listed, _ = catalog.head(1)  # lists its arrays: read whole, blocks included
    assert not isinstance(listed.arrays, DeferredArrays)
    assert listed.arrays["long"].n_chunks == 157
    deferred, size = catalog.head(2)
    assert isinstance(deferred.arrays, DeferredArrays) and deferred.arrays.count == MANY + 2
    assert size == (path / "snapshots" / "000000000002.json").stat().st_size
    assert deferred.arrays["grid"].shape == (3, 4)  # read when asked for
    copied = copy.copy(deferred.arrays)  # as a plain dict of what it holds (not the loader)
    assert type(copied) is dict and copied == dict(deferred.arrays)


def test_a_table_of_a_snapshot_recovery_went_back_from_is_written_again(tmp_path):
    # Snapshot 2 gives "x" another shape and dtype of the same size; its manifest is then
    # damaged, so the next writer goes back to snapshot 1. The table it adopts lists the
    # same names with snapshot 2's layouts: it must not vouch for snapshot 3.
    path = tmp_path / "s.snap"
    arrays = _arrays(MANY)
    with arraysnap.open(path) as snap:
        snap.capture({**arrays, "x": np.arange(8.0).reshape(4, 2)}, step=1).result()
        snap.capture({**arrays, "x": np.arange(8).reshape(2, 4)}, step=2).result()
    damaged = path / "snapshots" / "000000000002.json"
    data = bytearray(damaged.read_bytes())
    data[data.index(b'"step"') + 8] ^= 1  # its checksum no longer matches
    damaged.write_bytes(bytes(data))
    with arraysnap.open(path) as snap:
        back = snap.restore(seq=1, verify=False)
        assert back.arrays["x"].shape == (4, 2)
        snap.capture(dict(back.arrays), step=3).result()
    with arraysnap.open(path, mode="r") as reader:
        restored = reader.restore(verify=False)
        assert restored.seq == 3
        assert restored.arrays["x"].shape == (4, 2) and restored.arrays["x"].dtype == "f8"
        assert np.array_equal(restored.arrays["x"], np.arange(8.0).reshape(4, 2))


def test_a_latest_snapshot_whose_rng_cannot_be_read_falls_back_as_before(store):
    path, arrays = store
    latest = path / "snapshots" / "000000000002.json"
    body = json.loads(latest.read_bytes())
    body.pop("checksum")
    body["rng"] = {"bit_generator": "NoSuchGenerator"}
    latest.write_bytes(seal_manifest(body))
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError):
            reader.restore(verify=False, fallback=False)
        restored = reader.restore(verify=False, fallback=True)  # the older one, reported
        assert restored.seq == 1 and [problem.seq for problem in restored.skipped] == [2]
        assert restored.arrays["a0007"][0] == 7.0
