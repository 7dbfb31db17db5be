"""Diff: which chunks and rows of each array differ between two snapshots, and by how much.

``Store.diff()`` and ``arraysnap diff`` report it. Chunks are compared by digest; only the
differing ones are read (and verified) to measure the largest difference.

>>> import arraysnap, numpy as np, tempfile
>>> with arraysnap.open(tempfile.mkdtemp() + "/run.snap") as snap:
...     _ = snap.capture({"u": np.zeros(3), "v": np.zeros(2)}, step=0)
...     _ = snap.capture({"u": np.zeros(3), "w": np.ones(2)}, step=1)
...     [(d.name, d.status) for d in snap.diff("~1", "latest").arrays]
[('u', 'same'), ('v', 'removed'), ('w', 'added')]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .chunks import load_chunk
from .codecs import CodecSpec
from .manifest import ArrayEntry
from .objects import ChunkObjects

if TYPE_CHECKING:
    from ._store.catalog import Catalog

__all__ = ["ArrayDiff", "SnapshotDiff", "diff_snapshots"]

Progress = Callable[[int, int], None]


class _Source(NamedTuple):
    catalog: Catalog
    objects: ChunkObjects
    codec: CodecSpec


@dataclass(frozen=True, slots=True)
class ArrayDiff:
    """How one array differs between two snapshots.

    `status` is ``same``, ``changed``, ``added`` (only in B), ``removed`` (only in A) or
    ``replaced`` (shape or dtype differ: nothing to compare element by element).
    `row_ranges` are half-open index ranges along the leading axis holding every difference.

    >>> ArrayDiff("u", "changed", 4, [1], [(8, 16)], 0.5).fraction
    0.25
    """

    name: str
    status: str
    n_chunks: int
    chunks_differing: list[int] | None
    row_ranges: list[tuple[int, int]] | None
    max_abs_difference: float | int | None = None
    note: str = ""

    @property
    def fraction(self) -> float:
        """Fraction of B's chunks that differ (1.0 when added, removed or replaced)."""
        if self.status in ("added", "removed", "replaced"):
            return 1.0
        if not self.n_chunks or self.chunks_differing is None:
            return 0.0
        return len(self.chunks_differing) / self.n_chunks

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (a NaN difference becomes the string "nan").

        >>> ArrayDiff("u", "same", 2, [], [], None).to_json()["fraction"]
        0.0
        """
        value = self.max_abs_difference
        if isinstance(value, float) and math.isnan(value):
            value = "nan"  # type: ignore[assignment]
        return {"name": self.name, "status": self.status, "n_chunks": self.n_chunks,
                "chunks_differing": self.chunks_differing, "fraction": self.fraction,
                "row_ranges": None if self.row_ranges is None
                else [list(r) for r in self.row_ranges],
                "max_abs_difference": value, "note": self.note}


@dataclass(frozen=True, slots=True)
class SnapshotDiff:
    """The differences between snapshots `a` and `b`, array by array (sorted by name).

    >>> SnapshotDiff(1, 2, []).to_json()
    {'a': 1, 'b': 2, 'arrays': []}
    """

    a: int
    b: int
    arrays: list[ArrayDiff]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "arrays": [d.to_json() for d in self.arrays]}


def _array_order_chunk_shape(entry: ArrayEntry) -> tuple[int, ...]:
    shape = entry.layout.chunk_shape
    return shape if entry.order == "C" else shape[::-1]


def _row_range(entry: ArrayEntry, index: int) -> tuple[int, int] | None:
    """The range along axis 0 that chunk `index` covers (None for a 0-d array)."""
    if not entry.shape:
        return None
    coords = entry.layout.chunk_coords(index)
    size = _array_order_chunk_shape(entry)[0]
    start = coords[0] * size
    return start, min(start + size, entry.shape[0])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float | int | None:
    """Largest |b - a| over elements, exact for integers; None for non-numeric dtypes."""
    if a.size == 0:
        return None
    kind = a.dtype.kind
    if kind == "b":
        return int(np.any(a != b))
    if kind in "iu":
        # Differences of 64-bit integers overflow their type; computed modulo 2**64 in
        # uint64 on the side where b >= a, they are exact.
        wide_a, wide_b = a.astype(np.uint64), b.astype(np.uint64)
        larger = (b >= a) if kind == "u" else (b.astype(np.int64) >= a.astype(np.int64))
        spread = np.where(larger, wide_b - wide_a, wide_a - wide_b)
        return int(spread.max())
    if kind in "fc":
        precise = np.longdouble if a.dtype.itemsize > 8 and kind == "f" else None
        work = a.astype(precise or (np.complex128 if kind == "c" else np.float64))
        other = b.astype(work.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            unchanged = (work == other) | (np.isnan(work) & np.isnan(other))
            spread = np.abs(other[~unchanged] - work[~unchanged])
        if not spread.size:
            return 0.0
        # A value that became (or stopped being) NaN has no size of difference: say NaN
        # rather than let a smaller finite change hide it.
        return float("nan") if np.isnan(spread).any() else float(spread.max())
    return None


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _read_array(source: _Source, entry: ArrayEntry, seq: int) -> np.ndarray:
    """A whole array read from its chunk objects (verified)."""
    layout = entry.layout
    buffer = np.empty(layout.nbytes, dtype=np.uint8)
    for index in range(entry.n_chunks):
        raw = load_chunk(source.objects, source.codec, entry, index, verify=True, seq=seq)
        start, stop = layout.chunk_range(index)
        buffer[start:stop] = np.frombuffer(raw, dtype=np.uint8, count=stop - start)
    flat = buffer.view(entry.dtype)
    return flat.reshape(layout.memory_shape).T if entry.order == "F" else flat.reshape(
        entry.shape)


def _describe(entry: ArrayEntry) -> str:
    return f"{entry.shape} {entry.dtype} {entry.order}"


def diff_snapshots(catalog: Catalog, objects: ChunkObjects, codec: CodecSpec, a: int, b: int,
                   *, values: bool = True, progress: Progress | None = None) -> SnapshotDiff:
    """Compare snapshots with seqs `a` and `b` array by array.

    Chunks are compared by digest (nothing is read); with ``values=True`` the differing
    chunks of both snapshots are read (and verified) to find the largest absolute
    difference of numeric arrays. `progress(done, total)` is called per chunk pair read.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.arange(4), "v": np.zeros(2)})
    ...     _ = snap.capture({"u": np.arange(4) * 2})
    ...     [(d.name, d.status, d.max_abs_difference) for d in snap.diff(1, 2).arrays]
    [('u', 'changed', 3), ('v', 'removed', None)]
    """
    source = _Source(catalog, objects, codec)
    old, new = catalog.load(a)[0], catalog.load(b)[0]
    diffs: list[ArrayDiff] = []
    to_read: list[tuple[int, ArrayEntry, ArrayEntry, list[int]]] = []
    for name in sorted(set(old.arrays) | set(new.arrays)):
        first, second = old.arrays.get(name), new.arrays.get(name)
        if first is None or second is None:
            present = second if first is None else first
            assert present is not None
            status = "added" if first is None else "removed"
            diffs.append(ArrayDiff(name, status, present.n_chunks, None, None, None,
                                   _describe(present)))
            continue
        if first.shape != second.shape or first.dtype != second.dtype:
            diffs.append(ArrayDiff(name, "replaced", second.n_chunks, None, None, None,
                                   f"{_describe(first)} -> {_describe(second)}"))
            continue
        if first.layout != second.layout:
            # Same values may sit in different chunks (the memory order or chunk size
            # changed): compare element by element instead.
            diffs.append(_diff_relaid(source, a, b, first, second, values))
            continue
        differing = [i for i in range(second.n_chunks) if first.digest(i) != second.digest(i)]
        ranges = [r for i in differing if (r := _row_range(second, i)) is not None]
        diffs.append(ArrayDiff(name, "changed" if differing else "same", second.n_chunks,
                               differing, _merge(ranges)))
        if values and differing and second.dtype.kind in "biufc":
            to_read.append((len(diffs) - 1, first, second, differing))
    total = sum(len(indices) for *_, indices in to_read)
    done = 0
    for position, first, second, indices in to_read:
        largest: float | int | None = None
        for index in indices:
            start, stop = second.layout.chunk_range(index)
            raw_a = load_chunk(objects, codec, first, index, verify=True, seq=a)
            raw_b = load_chunk(objects, codec, second, index, verify=True, seq=b)
            count = (stop - start) // second.dtype.itemsize
            spread = _max_abs_difference(np.frombuffer(raw_a, second.dtype, count),
                                         np.frombuffer(raw_b, second.dtype, count))
            if spread is None or _is_nan(largest):
                pass
            elif largest is None or _is_nan(spread):
                largest = spread
            else:
                largest = max(largest, spread)
            done += 1
            if progress is not None:
                progress(done, total)
        previous = diffs[position]
        diffs[position] = ArrayDiff(previous.name, previous.status, previous.n_chunks,
                                    previous.chunks_differing, previous.row_ranges, largest,
                                    previous.note)
    return SnapshotDiff(a, b, diffs)


def _diff_relaid(source: _Source, a: int, b: int, first: ArrayEntry, second: ArrayEntry,
                 values: bool) -> ArrayDiff:
    old, new = _read_array(source, first, a), _read_array(source, second, b)
    note = "chunk layouts differ (memory order or chunk size changed); compared elements"
    if old.ndim == 0:
        same = old.tobytes() == new.tobytes()
        rows: list[tuple[int, int]] | None = None
    else:
        unequal = np.ascontiguousarray(old).view(np.uint8).reshape(old.shape[0], -1) != \
            np.ascontiguousarray(new).view(np.uint8).reshape(new.shape[0], -1)
        changed_rows = np.flatnonzero(unequal.any(axis=1)) if unequal.size else np.array([])
        same = not len(changed_rows)
        rows = _merge([(int(r), int(r) + 1) for r in changed_rows])
    largest = None
    if values and not same and second.dtype.kind in "biufc":
        largest = _max_abs_difference(np.ravel(old), np.ravel(new))
    return ArrayDiff(second.name, "same" if same else "changed", second.n_chunks, None, rows,
                     largest, note)
