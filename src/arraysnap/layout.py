"""Chunk layout: how an array's bytes are cut into chunks.

A chunk is a contiguous byte range of the array's buffer in its memory order. The buffer is
split along its leading axis (in memory order); only when one step of that axis is larger
than the target is the split moved to a later axis, so chunks stay close to the target size.

>>> layout = plan_layout((1000, 512), np.dtype("f8"), "C", 1 << 20)
>>> layout.chunk_shape, layout.n_chunks
((256, 512), 4)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["ChunkLayout", "memory_order", "plan_layout"]

Order = Literal["C", "F"]


def memory_order(array: np.ndarray) -> Order:
    """The memory order arraysnap records: "F" only for Fortran-only-contiguous arrays.

    >>> memory_order(np.zeros((2, 3), order="F")), memory_order(np.zeros((2, 3))[:, ::2])
    ('F', 'C')
    """
    flags = array.flags
    return "F" if flags.f_contiguous and not flags.c_contiguous else "C"


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """The chunk grid of one array, in memory-order axes (reversed shape for "F").

    >>> plan_layout((10,), np.dtype("i4"), "C", 16).chunk_range(2)
    (32, 40)
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    order: Order
    split_axis: int
    rows_per_chunk: int
    # Derived once: a pause over thousands of arrays asks for them many times.
    nbytes: int = field(init=False, repr=False, compare=False)
    inner_bytes: int = field(init=False, repr=False, compare=False)
    segment_bytes: int = field(init=False, repr=False, compare=False)
    chunk_bytes: int = field(init=False, repr=False, compare=False)
    chunks_per_segment: int = field(init=False, repr=False, compare=False)
    n_chunks: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        itemsize = self.dtype.itemsize
        memory_shape = self.memory_shape
        nbytes = math.prod(self.shape) * itemsize
        inner = math.prod(memory_shape[self.split_axis + 1 :]) * itemsize
        if not self.shape:
            segment = chunk = itemsize
            per_segment = 1
        else:
            segment = memory_shape[self.split_axis] * inner
            chunk = self.rows_per_chunk * inner
            per_segment = -(-memory_shape[self.split_axis] // self.rows_per_chunk)
        n_chunks = 0 if nbytes == 0 else math.prod(memory_shape[: self.split_axis]) * per_segment
        for name, value in (("nbytes", nbytes), ("inner_bytes", inner),
                            ("segment_bytes", segment), ("chunk_bytes", chunk),
                            ("chunks_per_segment", per_segment), ("n_chunks", n_chunks)):
            object.__setattr__(self, name, value)

    @property
    def memory_shape(self) -> tuple[int, ...]:
        return self.shape if self.order == "C" else self.shape[::-1]

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """Chunk shape in memory-order axes; every entry is at least 1 (zarr requires it)."""
        shape = self.memory_shape
        if not shape:
            return ()
        head = (1,) * self.split_axis
        tail = tuple(max(1, d) for d in shape[self.split_axis + 1 :])
        return (*head, max(1, self.rows_per_chunk), *tail)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Byte offsets ``(start, stop)`` of chunk `index` in the buffer."""
        segment, within = divmod(index, self.chunks_per_segment)
        segment_start = segment * self.segment_bytes
        start = segment_start + within * self.chunk_bytes
        return start, min(start + self.chunk_bytes, segment_start + self.segment_bytes)

    def chunk_coords(self, index: int) -> tuple[int, ...]:
        """Zarr grid coordinates of chunk `index`, in the array's own axis order."""
        shape = self.memory_shape
        if not shape:
            return ()
        segment, within = divmod(index, self.chunks_per_segment)
        head = np.unravel_index(segment, shape[: self.split_axis]) if self.split_axis else ()
        coords = (*(int(c) for c in head), within, *(0,) * (len(shape) - self.split_axis - 1))
        return coords if self.order == "C" else coords[::-1]


def plan_layout(shape: tuple[int, ...], dtype: np.dtype, order: Order, target: int) -> ChunkLayout:
    """Choose the chunk layout of an array for a target chunk size in bytes.

    >>> plan_layout((3, 4), np.dtype("u1"), "F", 8).chunk_shape
    (2, 3)
    """
    # Shared: a layout is immutable, and the first capture of 10,000 arrays of a few
    # shapes made 10,000 of them (10 µs each, a third of that pause's Python). Only plain
    # dtypes: equal ones are the same dtype (structured or with metadata, equal dtypes
    # may still differ in what a layout records of them).
    if dtype.fields is None and dtype.metadata is None:
        return _shared_layout(tuple(shape), dtype, order, target)
    return _new_layout(tuple(shape), dtype, order, target)


def _new_layout(shape: tuple[int, ...], dtype: np.dtype, order: Order,
                target: int) -> ChunkLayout:
    memory_shape = shape if order == "C" else shape[::-1]
    if math.prod(shape) * dtype.itemsize == 0 or not shape:
        return ChunkLayout(tuple(shape), dtype, order, 0, 1)
    for axis, length in enumerate(memory_shape):
        inner = math.prod(memory_shape[axis + 1 :]) * dtype.itemsize
        if inner <= target:
            rows = max(1, min(length, target // inner))
            return ChunkLayout(tuple(shape), dtype, order, axis, rows)
    return ChunkLayout(tuple(shape), dtype, order, len(shape) - 1, 1)


_shared_layout = functools.lru_cache(maxsize=4096)(_new_layout)
