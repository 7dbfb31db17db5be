"""The public store API: capture, restore, list, verify, prune; invariants 1 and 6."""

from __future__ import annotations

import copy
import errno
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WORKLOAD, assert_bit_exact, capture_step, object_files, store_files

import arraysnap
from arraysnap._store.maintenance import stored_objects
from arraysnap.codecs import parse_codec
from arraysnap.manifest import MANIFEST_VERSION
from arraysnap.objects import pack_key
from arraysnap.testing import FaultPlan, chunk_file, read_marker


def dtype_zoo() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=4096, dtype=np.uint8)

    def of(dtype: str | list, shape: tuple[int, ...]) -> np.ndarray:
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        return np.frombuffer(raw[: count * dt.itemsize].tobytes(), dtype=dt).reshape(shape)

    return [
        of("<f8", (7, 5)), of(">f8", (7, 5)), of("<f4", (3, 4, 5)), of("<f2", (9,)),
        of(">i2", (11,)), of("<u8", (6,)), of("i1", (5, 5)), of("?", (13,)),
        of("<c8", (4, 3)), of(">c16", (3,)), of("<M8[ns]", (5,)), of(">m8[s]", (5,)),
        of("S5", (4,)), of("<U3", (4, 2)), of("V7", (3,)),
        of([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")], (4,)),
        np.zeros((4, 3), dtype=np.dtype([("x", "u1"), ("y", "<f8")], align=True)),
        np.array(3.5), np.array(7, dtype=">i8"), np.zeros((0,)), np.zeros((3, 0, 2)),
        np.asfortranarray(of("<f8", (6, 7))), np.asfortranarray(of(">i4", (2, 3, 4))),
        of("<f8", (8, 9))[::2, 1::3], of("<i4", (10, 10)).T[2:, :5], of("u1", (64,))[::-3],
    ]


@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
def test_bit_exact_for_every_dtype_shape_and_order(store_path: Path, codec: str):
    arrays = {f"a{i}": a for i, a in enumerate(dtype_zoo())}
    # tobytes(), not copy(): a copy of a padded structured array need not keep padding bytes.
    originals = {name: a.tobytes() for name, a in arrays.items()}
    with arraysnap.open(store_path, chunk_bytes=24, codec=codec) as snap:
        snap.capture(arrays, step=1)
        latest = snap.restore()  # from the baseline files
        for name, array in arrays.items():
            assert_bit_exact(latest.arrays[name], array)
            # Hands off: capture did not touch the inputs.
            assert array.tobytes() == originals[name]
        # A second, changed capture makes the first one an "older" snapshot.
        snap.capture({name: np.zeros_like(a) for name, a in arrays.items()}, step=2)
        older = snap.restore(step=1)  # assembled from chunk objects
        for name, array in arrays.items():
            assert_bit_exact(older.arrays[name], array)
    with arraysnap.open(store_path, mode="r") as reader:
        again = reader.restore(step=1)
        for name, array in arrays.items():
            assert_bit_exact(again.arrays[name], array)


def test_object_dtype_is_refused_with_a_type_error(snap):
    with pytest.raises(TypeError, match="Python objects"):
        snap.capture({"o": np.array([1, "x"], dtype=object)})
    with pytest.raises(TypeError, match="Python objects"):
        snap.capture({"s": np.zeros(2, dtype=[("a", "O")])})


def test_step_state_and_rng_come_back(snap):
    rng = np.random.default_rng(42)
    rngs = {"a": np.random.Generator(np.random.Philox(1)), "b": np.random.default_rng(2)}
    rng.random(10)
    state = {"t": 0.25, "offset": 981, "nested": {"list": [1, 2.5, None, True, "x"]},
             "np": np.int64(3)}
    snap.capture({"u": np.zeros(3)}, step=np.int64(12), state=state, rng=rng)
    snap.capture({"u": np.zeros(3)}, step=13, rng=rngs)
    first = snap.restore(step=12)
    assert first.step == 12 and first.seq == 1
    assert first.state == {"t": 0.25, "offset": 981, "nested": {"list": [1, 2.5, None, True, "x"]},
                           "np": 3}
    assert np.array_equal(first.rng.random(5), rng.random(5))
    second = snap.restore()
    assert second.state is None and set(second.rng) == {"a", "b"}
    assert second.rng["a"].integers(1 << 40) == rngs["a"].integers(1 << 40)
    assert second.rng["b"].standard_normal() == rngs["b"].standard_normal()


def test_nothing_to_restore(snap):
    with pytest.raises(arraysnap.SnapshotNotFoundError, match="no snapshot"):
        snap.restore()
    snap.capture({"u": np.zeros(1)}, step=1)
    with pytest.raises(arraysnap.SnapshotNotFoundError, match="step 5"):
        snap.restore(step=5)
    with pytest.raises(LookupError, match="seq 9"):
        snap.restore(seq=9)


@pytest.mark.parametrize("bad, error, match", [
    ({"": np.zeros(2)}, ValueError, "empty"),
    ({"a/b": np.zeros(2)}, ValueError, "must not contain"),
    ({"..": np.zeros(2)}, ValueError, "reserved"),
    ({"x\n": np.zeros(2)}, ValueError, "control"),
    ({"__meta": np.zeros(2)}, ValueError, "reserved by zarr"),
    ({3: np.zeros(2)}, TypeError, "strings"),
    ({"u": [1, 2, 3]}, TypeError, "not a numpy array"),
    ([np.zeros(2)], TypeError, "dict of name"),
])
def test_bad_arrays_raise_before_anything_is_written(snap, store_path, bad, error, match):
    snap.capture({"u": np.ones(100)}, step=1)
    snap.wait()
    before = store_files(store_path)
    with pytest.raises(error, match=match):
        snap.capture(bad, step=2)
    snap.wait()
    assert store_files(store_path) == before
    assert [s.step for s in snap.list()] == [1]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"state": {"x": object()}}, TypeError, "JSON"),
    ({"state": {"x": float("nan")}}, ValueError, "JSON"),
    ({"state": {1: 2}}, TypeError, "keys must be strings"),
    ({"state": [1]}, TypeError, "dict"),
    ({"step": 1.5}, TypeError, "step"),
    ({"step": True}, TypeError, "step"),
    ({"rng": np.random.RandomState(0)}, TypeError, "Generator"),
    ({"rng": {"a": 1}}, TypeError, "Generator"),
])
def test_bad_metadata_raises_before_anything_is_written(snap, store_path, kwargs, error, match):
    u = np.ones(100)
    snap.capture({"u": u}, step=1)
    snap.wait()
    before = store_files(store_path)
    u[0] = 5  # a real change, which must not be captured by the refused call
    with pytest.raises(error, match=match):
        snap.capture({"u": u}, **{"step": 2, **kwargs})
    snap.wait()
    assert store_files(store_path) == before
    # The refused capture did not move the baseline either: the change is still found.
    assert snap.capture({"u": u}, step=3).chunks_changed == 1


def test_arrays_appear_disappear_and_change_shape_and_dtype(snap):
    snap.capture({"a": np.arange(10.0), "b": np.ones(5)}, step=1)
    snap.capture({"a": np.arange(12.0)}, step=2)  # b gone, a grew
    snap.capture({"a": np.arange(12, dtype="i4"), "c": np.zeros((2, 2), order="F")}, step=3)
    snap.capture({"a": np.arange(12, dtype="i4"), "b": np.full(5, 2.0)}, step=4)
    r = {s: snap.restore(step=s).arrays for s in (1, 2, 3, 4)}
    assert set(r[1]) == {"a", "b"} and set(r[2]) == {"a"} and set(r[3]) == {"a", "c"}
    assert_bit_exact(r[2]["a"], np.arange(12.0))
    assert_bit_exact(r[3]["a"], np.arange(12, dtype="i4"))
    assert_bit_exact(r[3]["c"], np.zeros((2, 2), order="F"))
    assert_bit_exact(r[4]["b"], np.full(5, 2.0))
    assert_bit_exact(r[1]["b"], np.ones(5))


def test_memmap_inputs(snap, tmp_path):
    mm = np.memmap(tmp_path / "input.bin", dtype="<f4", mode="w+", shape=(300, 7))
    mm[:] = np.arange(2100, dtype="<f4").reshape(300, 7)
    snap.capture({"mm": mm}, step=1)
    mm[150, 3] = -1
    info = snap.capture({"mm": mm}, step=2)
    assert info.chunks_changed == 1
    assert_bit_exact(snap.restore().arrays["mm"], np.array(mm))


def test_proportional_writes_only_changed_chunks(store_path):
    """Invariant 6: bytes written are the changed chunks (encoded) plus a small manifest."""
    rng = np.random.default_rng(0)
    state = rng.standard_normal((256, 1024))  # 2 MiB: 32 chunks of 8 rows (64 KiB)
    with arraysnap.open(store_path, chunk_bytes=64 << 10) as snap:
        first = snap.capture({"u": state}, step=0).result()
        assert first.chunks_changed == 32
        unchanged = snap.capture({"u": state}, step=1).result()
        assert unchanged.chunks_changed == 0
        objects_before = object_files(store_path)
        state[10, 0] += 1.0     # chunk 1 (rows 8-15)
        state[200, 5] += 1.0    # chunk 25
        two = snap.capture({"u": state}, step=2).result()
    new = object_files(store_path) - objects_before
    # Both changed chunks in one pack (format 3): one object, one fsync.
    assert two.chunks_changed == 2 and len(new) == 1 and next(iter(new)).startswith("packs/")
    codec = parse_codec("zstd")
    encoded = sum(len(codec.encode(state[r : r + 8].tobytes(), 8)) for r in (8, 200))
    manifest = (store_path / "snapshots" / f"{two.seq:012d}.json").stat().st_size
    assert two.bytes_written == encoded + manifest
    assert manifest < 8 << 10
    assert unchanged.bytes_written < 8 << 10  # a manifest only


def test_identical_chunks_are_stored_once_across_arrays_and_snapshots(snap, store_path):
    zeros = np.zeros(4096 * 8, dtype="u1")  # 8 identical chunks
    info = snap.capture({"a": zeros, "b": zeros.copy()}, step=1).result()
    assert info.chunks_changed == 16 and info.chunks_deduplicated == 15
    (pack,) = object_files(store_path)  # one pack holding the one chunk
    assert (store_path / pack).stat().st_size == len(parse_codec("zstd").encode(bytes(4096), 1))
    # A chunk object of its own (an array too large for packs) is shared across snapshots.
    big = np.zeros(4096 * 70, dtype="u1")
    first = snap.capture({"big": big}, step=2).result()
    second = snap.capture({"big": big.copy(), "again": big.copy()}, step=3).result()
    assert first.chunks_deduplicated == 69 and second.chunks_deduplicated == 70
    assert sum(1 for f in object_files(store_path) if f.startswith("chunks/")) == 1


def test_list_latest_and_stats(snap):
    assert snap.latest() is None and snap.list() == []
    u = np.zeros((64, 128))
    for step in range(3):
        u[step * 10] = step
        snap.capture({"u": u}, step=step * 100)
    snap.wait()
    infos = snap.list()
    assert [i.step for i in infos] == [0, 100, 200] and [i.seq for i in infos] == [1, 2, 3]
    assert snap.latest() == infos[-1]
    last = infos[-1]
    assert last.arrays["u"].shape == (64, 128) and last.arrays["u"].dtype == np.float64
    assert last.chunks_scanned == 16 and last.chunks_changed == 1
    assert last.pause_seconds > 0 and last.bytes_written > 0 and last.durable_seconds > 0


def test_restore_into_fills_caller_buffers(snap):
    snap.capture({"u": np.arange(6.0).reshape(2, 3), "v": np.ones(4, "i2")}, step=1)
    out = np.empty((2, 3))
    restored = snap.restore_into({"u": out})
    assert out.tolist() == [[0, 1, 2], [3, 4, 5]] and restored.arrays["u"] is out
    with pytest.raises(ValueError, match="allocate a matching array"):
        snap.restore_into({"v": np.empty(4)})
    with pytest.raises(KeyError, match="no array 'w'"):
        snap.restore_into({"w": np.empty(4)})


def test_restore_into_an_old_snapshot_decodes_into_any_target_layout(store_path):
    """An older snapshot is decoded from chunk objects straight into the caller's arrays:
    C and Fortran order, a strided view, structured, 0-d and empty arrays."""
    rec = np.zeros(50, dtype=[("a", "<i4"), ("b", ">f8")])
    rec["a"], rec["b"] = np.arange(50), np.sqrt(np.arange(50))
    first = {"c": np.arange(3000.0).reshape(30, 100), "f": np.asfortranarray(
        np.arange(600, dtype=">i4").reshape(20, 30)), "r": rec, "z": np.array(7.5),
        "e": np.zeros((0, 4))}
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        old = snap.capture(first, step=1).result()
        snap.capture({n: np.asarray(a + 1) if a.dtype.names is None else a
                      for n, a in first.items()},
                     step=2).result()
        backing = np.full((30, 200), -1.0)
        targets = {"c": backing[:, ::2], "f": np.zeros((20, 30), ">i4", order="F"),
                   "r": np.zeros_like(rec), "z": np.zeros(()), "e": np.zeros((0, 4))}
        restored = snap.restore_into(targets, seq=old.seq)
    for name, array in first.items():
        assert restored.arrays[name] is targets[name]
        assert np.array_equal(targets[name], array), name
    assert (backing[:, 1::2] == -1.0).all()  # the view's gaps are untouched


def test_close_and_open_on_a_full_disk_keep_the_store(store_path):
    """A disk full when close() marks the baselines clean: close does not raise, the
    marker is not a synced one (trusted across a reboot), and the store opens and restores."""
    plan = FaultPlan(store_path)
    with arraysnap.open(plan.storage, chunk_bytes=4096, _baseline_ops=plan.baseline_ops,
                        _retry_delays=()) as snap:
        capture_step(snap, 0).result()
        capture_step(snap, 1).result()
        full = plan.fail("write", "mirror", errno.ENOSPC, times=None)
    assert full.errors  # close() met the full disk, and said so only in a warning
    plan.remove(full)
    assert read_marker(store_path).get("synced") is not True
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        assert WORKLOAD.difference(snap.restore(verify=False), 1) is None
        assert snap.verify().ok


def test_restored_arrays_are_copy_on_write(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.arange(1000.0)}, step=1)
        first = snap.restore().arrays["u"]
        first[:] = -1  # allowed, private to the caller
        assert snap.restore().arrays["u"][5] == 5.0
    with arraysnap.open(store_path, mode="r") as reader:
        mapped = reader.restore(verify=False).arrays["u"]
        mapped[0] = 42
        assert reader.restore().arrays["u"][0] == 0.0


@pytest.mark.parametrize("source", ["writer", "reader", "assembled"])
def test_restored_arrays_behave_as_a_dict_of_the_snapshot(store_path, source):
    """Restored.arrays makes its arrays when first looked up; otherwise it is the dict it
    was: the snapshot's order, the same array for a name every time (a write through one
    lookup is seen by the next), names set and deleted as in a dict, and a KeyError for a
    name the snapshot does not have."""
    captured = {name: np.arange(i + 3.0) for i, name in enumerate(["w", "b", "a", "c"])}
    with arraysnap.open(store_path) as snap:
        snap.capture(captured, step=1)
        snap.capture({**captured, "c": np.zeros(9)}, step=2)
        snap.wait()
        with arraysnap.open(store_path, mode="r") as reader:
            holder = reader if source == "reader" else snap
            arrays = holder.restore(seq=1 if source == "assembled" else None).arrays
            expected = captured if source == "assembled" else {**captured, "c": np.zeros(9)}
            assert isinstance(arrays, arraysnap.RestoredArrays)
            assert list(arrays) == ["w", "b", "a", "c"] and len(arrays) == 4
            assert "b" in arrays and "zz" not in arrays
            assert arrays["b"] is arrays["b"]
            arrays["b"][0] = 7.0
            assert arrays["b"][0] == 7.0 and arrays.copy()["b"][0] == 7.0
            with pytest.raises(KeyError, match="zz"):
                arrays["zz"]
            arrays["new"] = np.ones(2)
            del arrays["w"]
            assert list(arrays) == ["b", "a", "c", "new"]
            with pytest.raises(KeyError):
                del arrays["w"]
            assert arrays.get("w") is None and arrays["new"].tolist() == [1.0, 1.0]
            for name in ("a", "c"):
                assert_bit_exact(arrays[name], expected[name])
            assert list(dict(arrays)) == ["b", "a", "c", "new"]
            assert repr(arrays).startswith("{'b': array([7.,")
            assert list(arrays | {"z": 1}) == ["b", "a", "c", "new", "z"]
            assert list({"z": 1} | arrays) == ["z", "b", "a", "c", "new"]
            copied = copy.deepcopy(arrays)
            assert type(copied) is dict and copied["b"][0] == 7.0
            assert copied["b"] is not arrays["b"]
            assert type(copy.copy(arrays)) is dict
            arrays |= {"z": np.zeros(1)}
            assert type(arrays) is arraysnap.RestoredArrays and list(arrays)[-1] == "z"
            with pytest.raises(TypeError):
                arrays | 5  # noqa: B018 - as a dict refuses it
            assert list(reversed(arrays)) == ["z", "new", "c", "a", "b"]
            name, last = arrays.popitem()  # the last, as a dict pops
            assert name == "z" and "z" not in arrays and last.tolist() == [0.0]
            arrays.clear()
            assert len(arrays) == 0 and list(arrays) == []
            with pytest.raises(KeyError):
                arrays.popitem()


def test_read_only_store_never_writes(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.arange(10)}, step=1)
    before = {p: p.stat().st_mtime_ns for p in store_path.rglob("*")}
    with arraysnap.open(store_path, mode="r") as reader:
        with pytest.raises(arraysnap.ReadOnlyStoreError, match="mode='a'"):
            reader.capture({"u": np.arange(10)})
        with pytest.raises(PermissionError):
            reader.prune(keep_last=1)
        assert reader.restore().step == 1 and reader.verify().ok
    assert {p: p.stat().st_mtime_ns for p in store_path.rglob("*")} == before


def test_prune_and_gc(snap, store_path):
    u = np.zeros(4096 * 70, dtype="u1")  # 70 chunks: chunk objects of their own
    for step in range(5):
        u[step * 4096] = step + 1  # one new chunk per snapshot
        u[1] = step + 1  # and a new version of chunk 0, so old versions become garbage
        # w changes whole at every step: its chunks are packed, each snapshot's in a pack
        # that no later snapshot uses.
        snap.capture({"u": u, "w": np.full(8192, step, dtype="u1")}, step=step)
    report = snap.prune(keep_last=2)
    assert report.snapshots_removed == (1, 2, 3)
    assert [s.step for s in snap.list()] == [3, 4]
    assert snap.verify().ok
    assert_bit_exact(snap.restore(step=3).arrays["u"], _expected_after(3))
    used = set().union(*(stored_objects(snap._catalog.load(s)[0]) for s in (4, 5)))
    assert {len(d) for d in used} == {32, 16}  # chunk objects and packs
    assert set(snap._objects.digests()) | set(snap._objects.pack_ids()) == used
    assert report.chunks_removed >= 3 + 3 and report.bytes_freed > 0  # 3 of u's, 3 packs
    with pytest.raises(ValueError, match="positive integer"):
        snap.prune(keep_last=0)


def _expected_after(step: int) -> np.ndarray:
    u = np.zeros(4096 * 70, dtype="u1")
    for s in range(step + 1):
        u[s * 4096] = s + 1
    u[1] = step + 1
    return u


def test_second_writer_is_refused(store_path):
    with arraysnap.open(store_path):
        with pytest.raises(arraysnap.StoreLockedError, match="mode='r'"):
            arraysnap.open(store_path)
        with arraysnap.open(store_path, mode="r") as reader:
            assert reader.latest() is None


def test_format_version_and_codec_checks(store_path, tmp_path):
    arraysnap.open(store_path).close()
    config = store_path / "arraysnap.json"
    settings = json.loads(config.read_text())
    with pytest.raises(ValueError, match="created with codec zstd"):
        arraysnap.open(store_path, codec="blosc")
    settings["version"] = 99
    config.write_text(json.dumps(settings))
    with pytest.raises(arraysnap.FormatVersionError,
                       match=rf"version 99.*format version {arraysnap.FORMAT_VERSION}\b"):
        arraysnap.open(store_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        arraysnap.open(tmp_path / "nothing", mode="r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an arraysnap store"):
        arraysnap.open(tmp_path / "empty", mode="r")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        arraysnap.open(busy)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "w"}, "mode must be"), ({"chunk_bytes": 0}, "chunk_bytes"),
    ({"codec": "gzip"}, "unknown codec"), ({"codec": "zstd:99"}, "level"),
])
def test_open_argument_errors(store_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        arraysnap.open(store_path, **kwargs)
    assert not (store_path / "snapshots").exists() or not os.listdir(store_path / "snapshots")


def test_closed_store_refuses_work(store_path):
    snap = arraysnap.open(store_path)
    snap.close()
    snap.close()  # idempotent
    with pytest.raises(arraysnap.ArraysnapError, match="closed"):
        snap.capture({"u": np.zeros(1)})


def test_chunk_size_change_keeps_existing_layouts(store_path):
    u = np.zeros(1 << 16)
    with arraysnap.open(store_path, chunk_bytes=1 << 12) as snap:
        snap.capture({"u": u}, step=1)
    with arraysnap.open(store_path, chunk_bytes=1 << 14) as snap:
        u[0] = 1
        info = snap.capture({"u": u, "v": u.copy()}, step=2).result()
    assert info.arrays["u"].n_chunks == 128 and info.arrays["v"].n_chunks == 32
    assert info.chunks_changed == 1 + 32


def test_restore_fallback_skips_damaged_snapshots_and_says_why(snap, store_path):
    for step in range(4):
        snap.capture({"u": np.full(4096, step, dtype="u1"), "w": np.arange(10) + step}, step=step)
    snap.wait()
    chunk_file(store_path, 3, "u", 0).unlink()  # seq 3 loses a chunk
    newest = store_path / "snapshots" / f"{4:012d}.json"
    newest.write_bytes(newest.read_bytes()[:-5])  # seq 4 is torn
    snap.close()
    reader = arraysnap.open(store_path, mode="r")  # reads the damaged files afresh
    with pytest.raises(arraysnap.CorruptSnapshotError):
        reader.restore()
    with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
        reader.restore(seq=3, verify=False)
    assert (caught.value.seq, caught.value.array, caught.value.chunk) == (3, "u", 0)

    restored = reader.restore(fallback=True)

    assert restored.step == 1 and restored.arrays["u"][0] == 1
    assert [(p.seq, p.array, p.chunk) for p in restored.skipped] == [(4, None, None), (3, "u", 0)]
    assert "JSON" in restored.skipped[0].message
    assert "missing" in restored.skipped[1].message
    assert reader.restore(step=2, fallback=True).step == 1
    assert reader.restore(seq=2, fallback=True).skipped == ()
    for seq in (1, 2):
        (store_path / "snapshots" / f"{seq:012d}.json").unlink()
    with pytest.raises(arraysnap.SnapshotNotFoundError, match="could be restored"):
        reader.restore(fallback=True)


def test_verify_names_snapshot_array_and_chunk(snap):
    snap.capture({"u": np.arange(4096, dtype="u1"), "v": np.zeros(100)}, step=1)
    snap.wait()
    path = chunk_file(snap.path, 1, "u", 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = snap.verify()
    assert not report.ok
    assert [(p.seq, p.array, p.chunk) for p in report.problems] == [(1, "u", 0)]
    assert "snapshot 1, array 'u', chunk 0" in str(report)


def test_verify_reads_manifests_from_disk_not_from_the_writers_memory(snap, store_path):
    snap.capture({"u": np.zeros(10)}, step=1)
    snap.wait()
    assert snap.verify().ok
    manifest = store_path / "snapshots" / f"{1:012d}.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":1', b'"step":2'))
    report = snap.verify()
    assert [(p.seq, p.array) for p in report.problems] == [(1, None)]
    assert "checksum" in report.problems[0].message


def test_latest_is_always_the_last_listed(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.arange(3.0)}, step=1)
        snap.capture({"u": np.arange(3.0) * 2}, step=2)
    newest = store_path / "snapshots" / f"{2:012d}.json"
    newest.write_bytes(newest.read_bytes().replace(b'"version":%d' % MANIFEST_VERSION,
                                                   b'"version":%d' % (MANIFEST_VERSION + 1)))
    with arraysnap.open(store_path, mode="r") as reader:
        assert [info.seq for info in reader.list()] == [1]
        assert reader.latest() == reader.list()[-1]


# -- cadence and preemption ------------------------------------------------------------------
def test_due_follows_the_every_policy(store_path):
    with arraysnap.open(store_path, every=arraysnap.every(steps=7)) as snap:
        u = np.zeros(16)
        for step in range(30):
            u += 1
            if snap.due(step):
                snap.capture({"u": u}, step=step)
        snap.wait()
        assert [info.step for info in snap.list()] == [7, 14, 21, 28]
    with arraysnap.open(store_path) as snap:
        assert not snap.due(1000)  # no policy, no preemption: never due


def test_young_daly_policy_measures_this_runs_captures(store_path):
    policy = arraysnap.young_daly(mtbf="1h")
    with arraysnap.open(store_path, every=policy) as snap:
        assert snap.due(0)  # before any capture: capture to measure the cost
        snap.capture({"u": np.zeros(1000)}, step=0)
        snap.capture({"u": np.ones(1000)}, step=1)
        cost = policy.cost()
        assert cost is not None and 0 < cost < 5
        assert policy.interval() == pytest.approx((2 * cost * 3600) ** 0.5)
        assert not snap.due(2)  # the interval is far longer than this test


PREEMPTED_CHILD = """
import sys, arraysnap, numpy as np
snap = arraysnap.open(sys.argv[1], every=10**9, signals=True)
u = np.zeros(1000)
step = 0
print("ready", flush=True)
while True:
    step += 1
    u += 1.0
    if snap.due(step):
        snap.capture({"u": u}, step=step, state={"preempted": snap.preempted})
    if snap.preempted:
        break
snap.close()
print("stopped at", step, flush=True)
"""


def test_sigterm_makes_the_loop_capture_at_its_next_safe_point_and_exit(store_path):
    import signal
    import subprocess
    import sys
    import textwrap

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PREEMPTED_CHILD),
                              str(store_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, "SIGTERM killed the job instead of stopping it"
    stopped_at = int(out.split()[-1])
    with arraysnap.open(store_path, mode="r") as reader:
        restored = reader.restore()
    assert restored.step == stopped_at and restored.state == {"preempted": True}
    assert restored.arrays["u"][0] == float(stopped_at)
    assert len(reader.list()) == 1  # one capture: at the signal, not from inside the handler


def test_signal_handlers_are_restored_at_close(store_path):
    import os
    import signal

    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        snap = arraysnap.open(store_path, signals=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert snap.preempted and seen == [signal.SIGUSR1]  # the old handler still runs
        assert snap.due(None)
        snap.capture({"u": np.zeros(3)})
        assert not snap.due(None) and snap.preempted  # due once; preempted stays
        snap.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] * 2
        assert signal.getsignal(signal.SIGUSR1) is not None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(ValueError, match="not a signal"):
        arraysnap.open(store_path, signals=["TERM"])
    with pytest.raises(ValueError, match="mode='a'"):
        arraysnap.open(store_path, mode="r", signals=True)


# -- retention -------------------------------------------------------------------------------
def test_retention_is_applied_after_each_commit_and_frees_chunks(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096, keep_last=2, keep_every=10) as snap:
        u = np.zeros(4096)
        for step in range(26):
            u[step * 100 : step * 100 + 100] = step + 1  # new chunks every step
            snap.capture({"u": u}, step=step)
        snap.wait()
        assert [info.step for info in snap.list()] == [0, 10, 20, 24, 25]
        assert snap.gc().chunks_removed == 0  # retention already freed what it removed
        assert snap.verify().ok
        assert_bit_exact(snap.restore(step=10).arrays["u"][:1200],
                         np.r_[np.arange(1, 12).repeat(100), np.zeros(100)])


def test_max_bytes_keeps_the_store_under_its_quota(store_path):
    rng = np.random.default_rng(3)
    quota = 400_000
    with arraysnap.open(store_path, chunk_bytes=4096, max_bytes=quota, codec="none") as snap:
        for step in range(12):
            snap.capture({"u": rng.random(8192)}, step=step)  # 64 KiB of new data each
        snap.wait()
        used = sum(f.stat().st_size for sub in ("chunks", "snapshots")
                   for f in (store_path / sub).rglob("*") if f.is_file())
        assert used <= quota
        steps = [info.step for info in snap.list()]
        assert steps[-1] == 11 and len(steps) < 12
        assert steps == list(range(steps[0], 12))  # the oldest went first
        assert snap.verify().ok


def test_prune_applies_rules_given_or_the_stores_own(store_path):
    with arraysnap.open(store_path, keep_last=1) as snap:
        with pytest.raises(ValueError, match="needs a rule"):
            arraysnap.open(store_path.with_name("other.snap")).prune()
        for step in range(3):
            snap.capture({"u": np.full(4, step)}, step=step)
        snap.wait()
        assert [info.step for info in snap.list()] == [2]
    with arraysnap.open(store_path) as snap:
        for step in range(3, 6):
            snap.capture({"u": np.full(4, step)}, step=step)
        assert snap.prune(keep_within="1h").snapshots_removed == ()
        assert snap.prune(keep_last=2).snapshots_removed == (3, 4)


def test_a_reader_keeps_what_it_restored_and_gets_a_clear_error_for_pruned_chunks(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        for step in range(3):
            snap.capture({"u": np.full(2048, float(step))}, step=step)
        snap.wait()
        reader = arraysnap.open(store_path, mode="r")
        restored = reader.restore(step=0)
        lazy = zarr.open_group(reader.zarr_store(step=0), mode="r")
        snap.prune(keep_last=1)
        assert (restored.arrays["u"] == 0.0).all()  # still readable, still right
        with pytest.raises(arraysnap.CorruptSnapshotError, match="missing"):
            lazy["u"][:]
        with pytest.raises(arraysnap.SnapshotNotFoundError):
            reader.restore(step=0)
        reader.close()


# -- replay log and stats --------------------------------------------------------------------
def test_events_are_the_records_logged_after_the_restored_snapshot(store_path):
    with arraysnap.open(store_path) as snap:
        snap.log({"before": "any snapshot"})
        snap.capture({"u": np.zeros(3)}, step=1)
        snap.log({"sent": 1})
        snap.log({"sent": 2})
        snap.capture({"u": np.ones(3)}, step=2)
        snap.log({"sent": 3})
        snap.wait()
        assert snap.restore(step=1).events == ({"sent": 1}, {"sent": 2}, {"sent": 3})
        assert snap.restore().events == ({"sent": 3},)
    with arraysnap.open(store_path, mode="r") as reader:
        assert reader.restore().events == ({"sent": 3},)


def test_logged_records_survive_a_kill_after_wait_and_keep_their_order(store_path):
    from conftest import run_python

    killed = run_python(f"""
        import os, signal, arraysnap, numpy as np
        snap = arraysnap.open({str(store_path)!r})
        snap.capture({{"u": np.zeros(3)}}, step=1)
        snap.log({{"offset": 10}})
        snap.wait()  # durable from here
        snap.capture({{"u": np.ones(3)}}, step=2)
        snap.log({{"offset": 20}})
        snap.wait()
        snap.log({{"offset": 30}})  # after the last commit, made durable by wait()
        snap.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert killed.returncode == -9
    with arraysnap.open(store_path) as snap:
        assert snap.restore().events == ({"offset": 20}, {"offset": 30})
        assert snap.restore(step=1).events == ({"offset": 10}, {"offset": 20}, {"offset": 30})
        snap.log({"offset": 40})  # the resumed run goes on numbering after the dead one
        snap.capture({"u": np.full(3, 2.0)}, step=3)
        snap.wait()
        assert snap.restore(step=2).events == ({"offset": 20}, {"offset": 30}, {"offset": 40})
        assert snap.restore().events == ()


def test_retention_trims_the_replay_log(store_path, monkeypatch):
    from arraysnap import replaylog as journal

    monkeypatch.setattr(journal, "_SEGMENT_BYTES", 100)
    with arraysnap.open(store_path, keep_last=2) as snap:
        for step in range(10):
            snap.capture({"u": np.full(3, step)}, step=step)
            for i in range(3):
                snap.log({"step": step, "i": i})
            snap.wait()
        first = min(int(p.stem) for p in (store_path / "journal").iterdir())
        assert first > 0  # old segments are gone
        events = snap.restore(step=8).events
        assert [e["step"] for e in events] == [8, 8, 8, 9, 9, 9]


def test_stats_record_every_capture(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        u = np.zeros(4096)
        for step in range(3):
            u[:1000] = step
            snap.capture({"u": u}, step=step)
        snap.wait()
        stats = snap.stats()
    assert [row.step for row in stats] == [0, 1, 2]
    assert stats.column("chunks_scanned").tolist() == [8, 8, 8]
    assert stats.column("chunks_changed").tolist() == [8, 2, 2]
    assert all(row.status == "committed" and row.durable_seconds >= row.pause_seconds > 0
               for row in stats)
    assert (stats.column("bytes_written") > 0).all()
    with arraysnap.open(store_path, mode="r") as reader:
        assert len(reader.stats()) == 3


def test_log_refuses_what_is_not_json_before_writing(snap):
    with pytest.raises(ValueError, match="JSON"):
        snap.log({"x": object()})
    with pytest.raises(arraysnap.ReadOnlyStoreError):
        arraysnap.open(snap.path, mode="r").log({"x": 1})


def test_a_signal_during_a_capture_due_anyway_still_stops_the_loop(store_path):
    import os
    import signal

    with arraysnap.open(store_path, every=10, signals=[signal.SIGUSR2]) as snap:
        stopped = None
        for step in range(1, 100):
            if snap.due(step):
                if step == 10:  # lands after due() said True for the policy's own reason
                    os.kill(os.getpid(), signal.SIGUSR2)
                snap.capture({"u": np.full(3, step)}, step=step)
            if snap.preempted:
                stopped = step
                break
    assert stopped == 10


def test_two_stores_watching_signals_hand_the_default_back(store_path, tmp_path):
    from conftest import run_python

    done = run_python(f"""
        import os, signal, arraysnap
        a = arraysnap.open({str(tmp_path / "a.snap")!r}, signals=True)
        b = arraysnap.open({str(tmp_path / "b.snap")!r}, signals=True)
        a.close(); b.close()
        os.kill(os.getpid(), signal.SIGTERM)
        print("still alive")
    """)
    assert done.returncode == -15 and "still alive" not in done.stdout


def test_a_store_dropped_without_close_still_commits_what_it_captured(store_path):
    """The engine keeps its store alive while captures are in flight: a CaptureInfo whose
    store nobody holds any more still resolves (and the snapshot is listed)."""
    info = arraysnap.open(store_path, chunk_bytes=4096).capture({"u": np.arange(5000.0)}, step=1)
    gc.collect()
    assert info.result(timeout=20).step == 1
    with arraysnap.open(store_path, mode="r") as reader:
        assert [s.step for s in reader.list()] == [1]


def test_a_pack_mostly_replaced_is_packed_again_and_then_freed(store_path):
    """A pack whose chunks later captures mostly replaced is not kept alive for ever by the
    few that stayed: the next capture packs those again, and once the snapshots that used
    the old pack are pruned, it is deleted."""
    arrays = {f"a{i:03d}": np.full(512, float(i)) for i in range(100)}
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture(arrays, step=0).result()
        (first,) = snap._catalog.load(1)[0].pack_ids()
        for i in range(60):  # 60 of the 100 chunks of the first pack are replaced
            arrays[f"a{i:03d}"] = arrays[f"a{i:03d}"] + 1
        changed = snap.capture(arrays, step=1).result()
        assert changed.chunks_changed == 60
        assert first in stored_objects(snap._catalog.load(2)[0])  # 40 % of it still used
        again = snap.capture(arrays, step=2).result()  # nothing changed: the 40 move
        assert again.chunks_changed == 0
        assert first not in stored_objects(snap._catalog.load(3)[0])
        assert (store_path / pack_key(first)).exists()  # snapshots 1 and 2 still use it
        snap.prune(keep_last=1)
        assert not (store_path / pack_key(first)).exists()
        assert snap.verify().ok
        restored = snap.restore()
        for name, array in arrays.items():
            assert_bit_exact(restored.arrays[name], array)
        settled = snap.capture(arrays, step=3).result()  # nothing more to move
        assert stored_objects(snap._catalog.load(4)[0]) == stored_objects(
            snap._catalog.load(3)[0]) and settled.bytes_written < 4096


def test_packing_again_an_array_whose_shape_changed_reads_its_new_chunks_only(store_path):
    """The chunks to pack again are those of the array's old layout: an array that also
    changed shape is written whole in its new one (an old chunk index is no index of it)."""
    rng = np.random.default_rng(12)
    arrays = {f"a{i:03d}": rng.random(2048) for i in range(100)}  # 4 distinct chunks each
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture(arrays, step=0).result()
        for i in range(60):
            arrays[f"a{i:03d}"] = arrays[f"a{i:03d}"] + 1
        snap.capture(arrays, step=1).result()  # the first pack is now mostly dead
        (first,) = snap._catalog.load(1)[0].pack_ids()
        arrays["a080"] = np.arange(512.0)  # 1 chunk now, 4 before
        info = snap.capture(arrays, step=2).result()
        assert info.arrays["a080"].n_chunks == 1
        assert first not in stored_objects(snap._catalog.load(3)[0])  # packed again
        restored = snap.restore()
        for name, array in arrays.items():
            assert_bit_exact(restored.arrays[name], array)
        assert snap.verify().ok
