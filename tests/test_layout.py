"""Chunk layouts: contiguous byte ranges of about the target size that tile the buffer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arraysnap.layout import memory_order, plan_layout


@settings(max_examples=400, deadline=None)
@given(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
       st.sampled_from(["u1", "f8", "c16", "S7"]), st.sampled_from(["C", "F"]),
       st.integers(1, 5000))
def test_chunks_tile_the_buffer_in_order(shape, dtype, order, target):
    layout = plan_layout(tuple(shape), np.dtype(dtype), order, target)
    ranges = [layout.chunk_range(i) for i in range(layout.n_chunks)]
    position = 0
    for start, stop in ranges:
        assert start == position and stop > start
        assert stop - start <= layout.chunk_bytes
        position = stop
    assert position == layout.nbytes
    # A chunk is never much larger than the target unless one element is already larger.
    if layout.nbytes:
        assert layout.chunk_bytes <= max(target, np.dtype(dtype).itemsize)
    assert all(c >= 1 for c in layout.chunk_shape)


def test_leading_axis_split_for_ordinary_arrays():
    layout = plan_layout((1000, 512), np.dtype("f8"), "C", 1 << 20)
    assert (layout.split_axis, layout.chunk_shape, layout.n_chunks) == (0, (256, 512), 4)
    assert layout.chunk_range(3) == (3 << 20, 1000 * 512 * 8)


def test_fortran_order_splits_the_last_axis():
    layout = plan_layout((512, 1000), np.dtype("f8"), "F", 1 << 20)
    assert layout.memory_shape == (1000, 512)
    assert layout.chunk_coords(1) == (0, 1)  # in the array's own axes


def test_zero_d_and_empty():
    scalar = plan_layout((), np.dtype("f8"), "C", 4)
    assert (scalar.n_chunks, scalar.chunk_bytes, scalar.chunk_shape) == (1, 8, ())
    empty = plan_layout((0, 5), np.dtype("f8"), "C", 64)
    assert empty.n_chunks == 0 and empty.chunk_shape == (1, 5)


def test_memory_order():
    assert memory_order(np.zeros((3, 4), order="F")) == "F"
    assert memory_order(np.zeros((3, 4))) == "C"
    assert memory_order(np.zeros(4)) == "C"
    assert memory_order(np.zeros((3, 4))[:, ::2]) == "C"
