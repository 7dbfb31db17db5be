"""The delta kernel against a pure-NumPy reference, across dtypes, shapes, orders, chunk sizes."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arraysnap import _delta, delta
from arraysnap.delta import as_bytes, scan_and_copy
from arraysnap.layout import ChunkLayout, memory_order, plan_layout

POOL = ThreadPoolExecutor(max_workers=1)


def reference_scan(live: np.ndarray, baseline: np.ndarray, layout: ChunkLayout,
                   forced: np.ndarray, candidates: np.ndarray | None = None,
                   ) -> tuple[list[int], np.ndarray]:
    """What the kernel must do, written the slow, obvious way."""
    live_bytes = np.ascontiguousarray(live if layout.order == "C" else live.T).reshape(-1)
    live_bytes = live_bytes.view(np.uint8)
    result = baseline.copy()
    changed = []
    for index in range(layout.n_chunks):
        start, stop = layout.chunk_range(index)
        if candidates is not None and not candidates[index]:  # not compared, not copied
            if forced[index]:
                changed.append(index)
            continue
        if forced[index] or not np.array_equal(live_bytes[start:stop], baseline[start:stop]):
            changed.append(index)
        result[start:stop] = live_bytes[start:stop]
    return changed, result


DTYPES = ["u1", "<i2", ">i4", "<f8", ">f8", "<c16", "?", "<M8[ns]", "<U3", "S5", "V3",
          [("a", "<i4"), ("b", ">f8", (2,))]]


@st.composite
def cases(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    order = draw(st.sampled_from(["C", "F"]))
    target = draw(st.integers(1, 300))
    count = int(np.prod(shape)) * dtype.itemsize
    before = np.frombuffer(draw(st.binary(min_size=count, max_size=count)), dtype=np.uint8)
    flips = draw(st.lists(st.integers(0, count - 1), max_size=5)) if count else []
    view = draw(st.sampled_from(["contiguous", "strided"]))
    return dtype, tuple(shape), order, target, before, flips, view


def make_live(dtype, shape, order, raw, view):
    if view == "strided" and len(shape) >= 1:
        # Build a non-contiguous view holding exactly `raw`: every other element of a
        # larger array.
        doubled = np.zeros((*shape[:-1], shape[-1] * 2), dtype=dtype)
        doubled[..., ::2] = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
        return doubled[..., ::2]
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape, order=order).copy(order=order)


@settings(max_examples=300, deadline=None)
@given(cases(), st.data())
def test_kernel_matches_reference(case, data):
    dtype, shape, order, target, before, flips, view = case
    live_raw = before.copy()
    for position in flips:
        live_raw[position] ^= 0xFF
    live = make_live(dtype, shape, order, live_raw, view)
    layout = plan_layout(live.shape, live.dtype, memory_order(live), target)
    # make_live lays `raw` out as the array's memory (C, F, or C for strided views), so the
    # baseline holding the old state is simply the old bytes.
    baseline = before.copy()
    forced = np.array(data.draw(st.lists(st.booleans(), min_size=layout.n_chunks,
                                         max_size=layout.n_chunks)), dtype=np.uint8)
    # Some examples pass neither flags nor candidates (the one-chunk fast path, when the
    # array is one C-contiguous chunk).
    defaults = data.draw(st.booleans())
    if defaults:
        forced[:] = 0
    # Half the others compare only some chunks, as with write tracking.
    candidates = None
    if not defaults and data.draw(st.booleans()):
        candidates = np.array(data.draw(st.lists(st.booleans(), min_size=layout.n_chunks,
                                                 max_size=layout.n_chunks)), dtype=np.uint8)
    expected_changed, expected_baseline = reference_scan(live, baseline, layout, forced,
                                                         candidates)
    snapshot_of_live = live.copy()

    # Half the examples scan in two halves on a pool (every size counts as large here).
    parallel = data.draw(st.booleans())
    pool = POOL if parallel else None
    # Some examples only compare (copy=False): the same chunks, and the baseline untouched.
    copy = defaults or data.draw(st.booleans())
    with patch.object(delta, "PARALLEL_BYTES", 0):
        changed = scan_and_copy(live, baseline, layout, None if defaults else forced.copy(),
                                pool, candidates, copy=copy)

    assert changed.tolist() == expected_changed
    assert baseline.tobytes() == (expected_baseline if copy else before).tobytes()
    # The caller's array is never modified.
    assert live.tobytes() == snapshot_of_live.tobytes()


class RecordingPool:
    """An executor that runs each task at once and keeps its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def submit(self, fn, *args):
        self.calls.append(args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@pytest.mark.parametrize("shape, order", [((4096, 64), "C"), ((64, 4096), "C"),
                                          ((64, 4096), "F")])
def test_two_threads_share_the_chunks_to_compare_not_the_bytes(shape, order):
    """Candidates bunched at one end (a band being solved, the audit's slice): each part
    gets about half of them, cut between whole chunks (and segments, where there are
    several), and the result is the one-thread result."""
    live = np.asarray(np.random.default_rng(3).random(shape), order=order)
    layout = plan_layout(live.shape, live.dtype, order, 1 << 12)  # 512 elements a chunk
    candidates = np.zeros(layout.n_chunks, dtype=np.uint8)
    candidates[: layout.n_chunks // 8] = 1  # the first eighth only
    baseline = np.zeros(layout.nbytes, dtype=np.uint8)
    pool = RecordingPool()
    with patch.object(delta, "PARALLEL_BYTES", 0):
        changed = scan_and_copy(live, baseline, layout, pool=pool, candidates=candidates)
    assert changed.tolist() == np.flatnonzero(candidates).tolist()
    ((_live, part, _segment, _chunk, submitted, _changed, _copy),) = pool.calls
    given = int(submitted.sum())
    per_cut = layout.chunks_per_segment if layout.nbytes > layout.segment_bytes else 1
    assert abs(given - candidates.sum() / 2) <= per_cut  # was 0 with a cut in the middle
    assert part.size % layout.chunk_bytes == 0 or part.size % layout.segment_bytes == 0


def test_little_to_compare_stays_on_one_thread():
    live = np.zeros(1 << 22, dtype=np.uint8)  # 4 MiB, 64 chunks
    layout = plan_layout(live.shape, live.dtype, "C", 1 << 16)
    candidates = np.zeros(layout.n_chunks, dtype=np.uint8)
    candidates[[3, 40]] = 1
    pool = RecordingPool()
    with patch.object(delta, "PARALLEL_BYTES", 2 << 16):
        scan_and_copy(live, np.zeros(layout.nbytes, np.uint8), layout, pool=pool,
                      candidates=candidates)
        assert pool.calls != []  # two chunks of 64 KiB: enough
        pool.calls.clear()
        candidates[40] = 0
        scan_and_copy(live, np.zeros(layout.nbytes, np.uint8), layout, pool=pool,
                      candidates=candidates)
    assert pool.calls == []  # one chunk to compare: nothing to share


def test_chunk_boundaries_exactly():
    live = np.arange(10, dtype="u1")
    baseline = live.copy()
    layout = plan_layout(live.shape, live.dtype, "C", 3)  # chunks 0-2, 3-5, 6-8, 9
    live[3] = 99  # first byte of chunk 1
    live[9] = 99  # the ragged last chunk
    assert scan_and_copy(live, baseline, layout).tolist() == [1, 3]
    assert baseline.tolist() == live.tolist()


def test_ragged_segments_in_a_2d_split():
    # Rows of 6 bytes, target 4 bytes: split on axis 1, 2 elements per chunk, 3 chunks a row
    # of which the last is ragged... with 3 columns of 2 bytes: chunks of 2 columns + 1 column.
    live = np.zeros((3, 3), dtype="<u2")
    layout = plan_layout(live.shape, live.dtype, "C", 4)
    assert (layout.split_axis, layout.rows_per_chunk, layout.n_chunks) == (1, 2, 6)
    baseline = as_bytes(live).copy()
    live[1, 2] = 7  # row 1, ragged chunk
    assert scan_and_copy(live, baseline, layout).tolist() == [3]


def test_read_only_input_is_accepted():
    live = np.arange(100, dtype="f8")
    live.flags.writeable = False
    layout = plan_layout(live.shape, live.dtype, "C", 64)
    baseline = np.zeros(live.nbytes, dtype=np.uint8)
    assert len(scan_and_copy(live, baseline, layout)) == layout.n_chunks - 0
    assert baseline.tobytes() == live.tobytes()


def test_wrapper_validates_before_the_kernel_runs():
    live = np.zeros(8, dtype="u1")
    layout = plan_layout(live.shape, live.dtype, "C", 4)
    with pytest.raises(ValueError, match="baseline"):
        scan_and_copy(live, np.zeros(7, dtype=np.uint8), layout)
    with pytest.raises(ValueError, match="baseline must be writable"):
        frozen = np.zeros(8, dtype=np.uint8)
        frozen.flags.writeable = False
        scan_and_copy(live, frozen, layout)
    with pytest.raises(ValueError, match="does not match the layout"):
        scan_and_copy(np.zeros(9, dtype="u1"), np.zeros(8, dtype=np.uint8), layout)
    with pytest.raises(ValueError, match="changed must be"):
        scan_and_copy(live, np.zeros(8, dtype=np.uint8), layout, np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="candidates must be"):
        scan_and_copy(live, np.zeros(8, dtype=np.uint8), layout,
                      candidates=np.ones(3, dtype=np.uint8))


def test_kernel_releases_the_gil_and_counts():
    live = np.frombuffer(bytes(range(16)), dtype=np.uint8)
    baseline = np.zeros(16, dtype=np.uint8)
    flags = np.zeros(4, dtype=np.uint8)
    flags[3] = 1  # preset flags stay set and are counted
    every = np.ones(4, dtype=np.uint8)
    assert _delta.scan_and_copy(live, baseline, 16, 4, every, flags) == 4
    assert flags.tolist() == [1, 1, 1, 1]
    live2 = baseline.copy()
    flags[:] = 0
    assert _delta.scan_and_copy(live2, baseline, 16, 4, every, flags) == 0
    # Chunks that are not candidates are neither compared nor copied.
    live3 = live2 + 1
    only_second = np.array([0, 1, 0, 0], dtype=np.uint8)
    assert _delta.scan_and_copy(live3, baseline, 16, 4, only_second, flags) == 1
    assert flags.tolist() == [0, 1, 0, 0]
    assert baseline[4:8].tolist() == live3[4:8].tolist()
    assert baseline[:4].tolist() == live2[:4].tolist()
