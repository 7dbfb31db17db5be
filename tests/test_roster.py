"""The roster: a pause over many small arrays that vouches for most of them in bulk.

Against the truth (copies of what each step captured) and against a pure-NumPy reference
of the kernels: the bulk path may compare fewer arrays than the one-by-one path, never miss
a change, never store a wrong byte.
"""

from __future__ import annotations

import mmap
import os
import warnings

import numpy as np
import pytest
from conftest import assert_bit_exact
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap import tracking
from arraysnap._store.roster import HIT, SAME_NAME, Roster
from arraysnap.delta import compare_many
from arraysnap.layout import plan_layout
from arraysnap.tracking import WriteTracker, tracking_unavailable_reason

REASON = tracking_unavailable_reason()
needs_tracking = pytest.mark.skipif(REASON is not None, reason=f"no write tracking: {REASON}")
PAGE = mmap.PAGESIZE


def _roster(arrays: dict[str, np.ndarray]) -> Roster:
    layouts = [plan_layout(a.shape, a.dtype, "F" if a.flags.f_contiguous and not
                           a.flags.c_contiguous else "C", 1 << 20) for a in arrays.values()]
    return Roster(list(arrays), list(arrays.values()), layouts)


# -- the kernels against a reference -------------------------------------------------------
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40), data=st.data())
def test_compare_many_copies_exactly_the_buffers_that_differ(sizes, data):
    rng = np.random.default_rng(len(sizes))
    live = [rng.integers(0, 3, size, dtype=np.uint8) for size in sizes]
    base = [np.where(rng.random(size) < 0.02, 9, b).astype(np.uint8) if size else b.copy()
            for size, b in zip(sizes, live, strict=True)]
    base = [b if data.draw(st.booleans()) else same.copy()
            for b, same in zip(base, live, strict=True)]
    before = [b.copy() for b in base]
    which = sorted(data.draw(st.sets(st.integers(0, len(sizes) - 1))))
    flags = compare_many(np.array([a.ctypes.data for a in live]),
                         np.array([b.ctypes.data for b in base]), np.array(sizes),
                         np.array(which, dtype=np.intp))
    expected = [int(i in which and not np.array_equal(live[i], before[i]))
                for i in range(len(sizes))]
    assert flags.tolist() == expected
    for i in range(len(sizes)):
        assert np.array_equal(base[i], live[i] if i in which else before[i])


def test_compare_many_refuses_indices_out_of_range():
    with pytest.raises(ValueError, match="indices"):
        compare_many(np.zeros(2), np.zeros(2), np.zeros(2), np.array([2]))


def test_match_tells_the_same_array_from_a_new_one_and_a_new_name():
    a, b = np.zeros(4), np.ones((2, 3), order="F")
    roster = _roster({"a": a, "b": b})
    assert roster.match({"a": a, "b": b})[0].tolist() == [HIT, HIT]
    assert roster.match({"a": a.copy(), "b": b})[0].tolist() == [SAME_NAME, HIT]
    assert roster.match({"a": a, "c": b})[0].tolist() == [HIT, 0]
    assert roster.match({"b": b, "a": a})[0].tolist() == [0, 0]
    assert roster.match({"a": a.view(np.int64), "b": b})[0].tolist() == [SAME_NAME, HIT]
    assert roster.match({"a": a, "b": b.T})[0].tolist() == [HIT, SAME_NAME]
    assert roster.match({"a": a[:2], "b": b})[0].tolist() == [SAME_NAME, HIT]
    reshaped = a.view()
    reshaped.shape = (2, 2)  # the same memory, other dimensions
    assert roster.match({"a": reshaped, "b": b})[0].tolist() == [SAME_NAME, HIT]
    assert roster.match({"a": np.memmap, "b": b})[0].tolist() == [SAME_NAME, HIT]
    values = roster.match({"a": a, "b": b})[1]
    assert values[0] is a and values[1] is b


def test_only_small_contiguous_one_chunk_arrays_are_compared_in_bulk():
    arrays = {"small": np.zeros(10), "fortran": np.zeros((3, 4), order="F"),
              "strided": np.zeros(20)[::2], "empty": np.zeros(0),
              "large": np.zeros(1 << 18), "many-dims": np.zeros((1,) * 9)}
    assert dict(zip(arrays, _roster(arrays).bulk.tolist(), strict=True)) == {
        "small": True, "fortran": True, "strided": False, "empty": False, "large": False,
        "many-dims": False}


# -- captures against the truth ------------------------------------------------------------
def capture_twice(snap, arrays):
    for step in (0, 1):
        snap.capture(arrays, step=step)
        snap.wait()


_DTYPES = ["f8", "i4", "u1", ">f4", "c16", [("x", "i2"), ("y", "f8")]]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), steps=st.lists(st.lists(st.tuples(
    st.sampled_from(["write", "replace", "reshape", "grow", "drop", "add", "same"]),
    st.integers(0, 10**6)), max_size=6), min_size=1, max_size=6),
    track=st.sampled_from(["auto", False]))
def test_many_small_arrays_captured_in_any_sequence_restore_exactly(tmp_path_factory, n,
                                                                    steps, track):
    rng = np.random.default_rng(n)
    arrays = {f"a{i}": rng.random(int(rng.integers(1, 600))).astype(_DTYPES[i % 6])
              for i in range(n)}
    path = tmp_path_factory.mktemp("roster") / "s.snap"
    with arraysnap.open(path, track_writes=track) as snap:
        snap.capture(arrays, step=0)
        snap.wait()
        before = {name: array.copy() for name, array in arrays.items()}
        for step, actions in enumerate(steps, 1):
            for action, pick in actions:
                names = list(arrays)
                name = names[pick % len(names)] if names else None
                if action == "write" and name and arrays[name].size:
                    flat = arrays[name].reshape(-1).view(np.uint8)
                    flat[pick % flat.size] ^= 0x5A
                elif action == "replace" and name:
                    arrays[name] = arrays[name].copy()
                elif action == "reshape" and name and arrays[name].size % 2 == 0:
                    arrays[name] = arrays[name].reshape(2, -1)
                elif action == "grow" and name:
                    arrays[name] = np.concatenate([arrays[name], arrays[name][:1]])
                elif action == "drop" and name and len(arrays) > 1:
                    del arrays[name]
                elif action == "add":
                    arrays[f"new{step}-{pick}"] = np.full(pick % 50, step, dtype="i8")
            truth = {name: array.copy() for name, array in arrays.items()}
            info = snap.capture(arrays, step=step)
            snap.wait()
            restored = snap.restore().arrays
            assert list(restored) == list(truth)
            for name, array in truth.items():
                assert_bit_exact(restored[name], array)
            # Each array whose bytes changed is a chunk found changed (all are one chunk).
            changed = [name for name, array in truth.items() if name in before
                       and before[name].shape == array.shape
                       and before[name].dtype == array.dtype
                       and before[name].tobytes() != array.tobytes()]
            assert info.chunks_changed >= len(changed)
            before = truth


def test_a_capture_of_many_arrays_stores_exactly_the_arrays_that_changed(store_path):
    rng = np.random.default_rng(3)
    arrays = {f"a{i:04d}": rng.random(1024) for i in range(3000)}
    with arraysnap.open(store_path) as snap:
        snap.capture(arrays, step=0)
        snap.wait()
        for step in range(1, 40):
            changed = {f"a{(step * 7 + k * 131) % 3000:04d}" for k in range(step % 4)}
            for name in changed:
                arrays[name][step % 1024] += 1.0
            info = snap.capture(arrays, step=step)
            snap.wait()
            assert info.chunks_changed == len(changed)
            assert info.chunks_scanned == 3000
        restored = snap.restore().arrays
        assert all(np.array_equal(restored[name], array) for name, array in arrays.items())
    with arraysnap.open(store_path, mode="r") as reader:
        diff = reader.diff("step:38", "step:39")
        assert {d.name for d in diff.arrays if d.status == "changed"} == {
            f"a{(39 * 7 + k * 131) % 3000:04d}" for k in range(39 % 4)}


@needs_tracking
def test_the_pause_compares_only_small_arrays_whose_pages_were_written(store_path):
    rng = np.random.default_rng(4)
    arrays = {f"a{i:04d}": rng.random(1024) for i in range(2048)}  # 8 KiB each
    with arraysnap.open(store_path) as snap:
        assert snap.capture(arrays, step=0).chunks_compared == 2048
        snap.wait()
        for step in (1, 2):  # the roster's first captures
            snap.capture(arrays, step=step)
            snap.wait()
        arrays["a0900"][500] = -1.0  # not in this capture's audit slice
        info = snap.capture(arrays, step=3)
        snap.wait()
        # The written array and the neighbours sharing its pages, the audit's 1/32 slice
        # (64 arrays), those written at the capture before, and those on pages the heap
        # shares with other allocations: a small part of the 2048.
        assert info.chunks_changed == 1
        assert info.chunks_compared <= 2048 // 8, info
        assert_bit_exact(snap.restore().arrays["a0900"], arrays["a0900"])


@needs_tracking
def test_a_change_tracking_missed_among_small_arrays_is_caught_by_the_audit(store_path,
                                                                          monkeypatch):
    rng = np.random.default_rng(5)
    arrays = {f"a{i:03d}": rng.random(512) for i in range(64)}
    real_written = WriteTracker.written
    with arraysnap.open(store_path) as snap:
        snap.capture(arrays, step=0)
        snap.wait()
        arrays["a040"][3] = 7.0  # found by the first roster capture? not before its audit
        monkeypatch.setattr(WriteTracker, "written", lambda self, start, length: (
            real_written(self, start, length), [])[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 40):
                info = snap.capture(arrays, step=step)
                snap.wait()
                if info.chunks_changed:
                    break
        assert info.chunks_changed == 1
        assert [w.category for w in caught] == [arraysnap.ArraysnapWarning]
        assert "'a040'" in str(caught[0].message) and "did not see" in str(caught[0].message)
        assert_bit_exact(snap.restore().arrays["a040"], arrays["a040"])
        monkeypatch.setattr(WriteTracker, "written", real_written)
        arrays["a001"][0] = 1.5
        info = snap.capture(arrays, step=99)  # tracking is off: all compared
        assert info.chunks_compared == 64 and info.chunks_changed == 1


@needs_tracking
def test_small_arrays_in_a_shared_mapping_are_compared_every_time(store_path, tmp_path):
    """A write() to a file changes its shared mappings without this process's page tables:
    their arrays stay outside every span."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(64 * PAGE))
    fd = os.open(path, os.O_RDWR)
    region = mmap.mmap(fd, 64 * PAGE, flags=mmap.MAP_SHARED)
    whole = np.frombuffer(region, dtype=np.uint8)
    arrays = {f"s{i}": whole[i * PAGE : (i + 1) * PAGE] for i in range(64)}
    heap = {f"h{i}": np.zeros(PAGE, dtype=np.uint8) for i in range(64)}  # tracked ones
    try:
        with arraysnap.open(store_path) as snap:
            for step in range(4):
                os.pwrite(fd, b"\x05", step * PAGE + 7)
                info = snap.capture({**heap, **arrays}, step=step)
                snap.wait()
                assert step == 0 or 64 <= info.chunks_compared < 64 + 64
                assert info.chunks_changed == (128 if step == 0 else 1)
                assert_bit_exact(snap.restore().arrays[f"s{step}"], arrays[f"s{step}"])
    finally:
        del arrays, whole
        os.close(fd)


def test_arrays_held_from_a_restore_keep_their_bytes_while_small_arrays_change(store_path):
    rng = np.random.default_rng(6)
    arrays = {f"a{i:03d}": rng.random(256) for i in range(300)}
    with arraysnap.open(store_path) as snap:
        capture_twice(snap, arrays)  # the second one through the roster
        held = snap.restore(verify=False).arrays
        truth = {name: array.copy() for name, array in arrays.items()}
        for step in range(2, 6):
            for i in range(0, 300, 7):
                arrays[f"a{i:03d}"][step] = -step
            info = snap.capture(arrays, step=step)
            snap.wait()
            assert info.chunks_changed == len(range(0, 300, 7))
            if REASON is None:  # the roster vouched for the rest, held maps or not
                assert info.chunks_compared < 300
            for name in ("a000", "a007", "a001"):
                assert_bit_exact(held[name], truth[name])
        restored = snap.restore().arrays
        assert all(np.array_equal(restored[name], arrays[name]) for name in arrays)


@pytest.mark.parametrize("live", ["mapping", "dict"])
def test_a_run_resumed_from_restored_arrays_updates_them_in_place_and_keeps_older_maps(
        store_path, live, monkeypatch):
    """The resume pattern: the arrays restore() returned are the live state from then on,
    as the mapping restore() gave or a dict of it, and the roster vouches for those not
    written (it took only a dict, and a run resumed from the mapping compared every array
    at every capture); an earlier restore's maps keep their bytes."""
    rng = np.random.default_rng(8)
    with arraysnap.open(store_path) as snap:
        capture_twice(snap, {f"a{i:03d}": rng.random(64) for i in range(200)})
    from arraysnap._store import capture

    checked: list[str] = []
    check_one = capture._prepare_one
    monkeypatch.setattr(capture, "_prepare_one",
                        lambda name, *rest: checked.append(name) or check_one(name, *rest))
    with arraysnap.open(store_path) as snap:
        arrays = snap.restore().arrays  # maps of the baselines, written in place
        if live == "dict":
            arrays = dict(arrays)
        before = snap.restore().arrays  # another restore, held throughout
        truth = {name: np.array(array) for name, array in before.items()}
        for step in range(2, 8):
            for i in range(step, 200, 9):
                arrays[f"a{i:03d}"][i % 64] += 1.0
            checked.clear()
            info = snap.capture(arrays, step=step)
            snap.wait()
            assert info.chunks_changed == len(range(step, 200, 9))
            if step > 2:  # the roster vouches for every array: none is checked again
                assert checked == []
            for name in ("a002", "a011", "a100"):
                assert_bit_exact(before[name], truth[name])
        latest = snap.restore().arrays
        assert all(np.array_equal(latest[name], arrays[name]) for name in arrays)
    with arraysnap.open(store_path, mode="r") as reader:
        assert all(np.array_equal(reader.restore().arrays[name], arrays[name])
                   for name in arrays)


def test_a_failed_pause_drops_the_roster_and_the_next_capture_stores_everything(
        store_path, monkeypatch):
    from arraysnap._store import capture

    rng = np.random.default_rng(7)
    arrays = {f"a{i:03d}": rng.random(128) for i in range(100)}
    with arraysnap.open(store_path) as snap:
        capture_twice(snap, arrays)  # the second one through the roster
        arrays["a050"][0] = 5.0
        real = capture.compare_many

        def fail(*args, **kwargs):
            real(*args, **kwargs)  # the baselines now hold the change
            raise RuntimeError("injected")
        monkeypatch.setattr(capture, "compare_many", fail)
        with pytest.raises(RuntimeError, match="injected"):
            snap.capture(arrays, step=2)
        monkeypatch.setattr(capture, "compare_many", real)
        info = snap.capture(arrays, step=3)
        snap.wait()
        assert info.chunks_compared == 100
        assert_bit_exact(snap.restore().arrays["a050"], arrays["a050"])


def test_dims_given_later_reach_arrays_the_roster_vouches_for(store_path):
    arrays = {f"a{i}": np.zeros((2, 3)) for i in range(20)}
    with arraysnap.open(store_path) as snap:
        snap.capture(arrays, step=0)
        snap.capture(arrays, step=1)
        snap.capture(arrays, step=2, dims={"a3": ("y", "x")})
        snap.capture(arrays, step=3)
        snap.wait()
    group = arraysnap.open_zarr(store_path)
    assert group["a3"].metadata.dimension_names == ("y", "x")
    assert group["a4"].metadata.dimension_names != ("y", "x")


@needs_tracking
def test_spans_overlapping_another_watch_are_left_untracked():
    tracked = tracking.Tracking("auto")
    try:
        buffer = np.zeros(4 << 20, dtype=np.uint8)
        layout = plan_layout(buffer.shape, buffer.dtype, "C", 1 << 16)
        tracked.candidates("big", buffer, layout, fresh=True)  # a watch over the buffer
        start = buffer.ctypes.data + (1 << 20)
        starts = np.array([start, start + 8192], dtype=np.int64)
        ends = starts + 4096
        tracked.watch_many(starts, ends)
        flags, _ = tracked.candidates_many(starts, ends)
        assert flags is None or flags.tolist() == [1, 1]  # inside no span: always compared
    finally:
        tracked.close()


def test_where_maps_cannot_be_preserved_a_held_restore_makes_the_pause_move_arrays(
        store_path, monkeypatch):
    from arraysnap import baselines as baselines_module

    monkeypatch.setattr(baselines_module, "preserving_supported", lambda: False)
    monkeypatch.setattr(baselines_module, "preserve", lambda *args: False)  # before 5.14
    rng = np.random.default_rng(9)
    arrays = {f"a{i:03d}": rng.random(100) for i in range(120)}
    with arraysnap.open(store_path) as snap:
        capture_twice(snap, arrays)
        held = snap.restore(verify=False).arrays
        truth = {name: np.array(array) for name, array in held.items()}
        arrays["a005"][3] = -1.0
        info = snap.capture(arrays, step=2)
        snap.wait()
        assert info.chunks_changed == 1
        assert all(np.array_equal(held[name], truth[name]) for name in held)
        assert_bit_exact(snap.restore().arrays["a005"], arrays["a005"])
