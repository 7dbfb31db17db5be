"""Find and set aside the chunks of a live array that changed since its baseline.

The thin, validating wrapper around the private Cython kernel ``arraysnap._delta``: it
checks sizes and contiguity, allocates, and raises; the kernel only compares and copies,
without the GIL.

>>> import numpy as np
>>> from arraysnap.layout import plan_layout
>>> live = np.arange(8, dtype="u1")
>>> baseline = np.zeros(8, dtype="u1")
>>> layout = plan_layout(live.shape, live.dtype, "C", 4)
>>> scan_and_copy(live, baseline, layout).tolist(), baseline.tolist() == live.tolist()
([0, 1], True)
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

import numpy as np

from ._delta import compare_many as _compare_many
from ._delta import scan_and_copy as _kernel
from .layout import ChunkLayout

__all__ = ["PARALLEL_BYTES", "as_bytes", "compare_many", "scan_and_copy"]

# Below this much to compare, a second thread costs more than it saves.
PARALLEL_BYTES = 16 << 20
_ONE = np.ones(1, dtype=np.uint8)
_ONE.flags.writeable = False
_FIRST = np.zeros(1, dtype=np.intp)
_FIRST.flags.writeable = False
_NONE = np.zeros(0, dtype=np.intp)
_NONE.flags.writeable = False


def as_bytes(array: np.ndarray) -> np.ndarray:
    """The raw bytes of a contiguous array, in memory order, as a flat uint8 view (no copy).

    >>> as_bytes(np.array([1], dtype=">u2")).tolist()
    [0, 1]
    """
    if array.flags.c_contiguous:
        flat = array.reshape(-1)
    elif array.flags.f_contiguous:
        flat = array.T.reshape(-1)
    else:
        raise ValueError("as_bytes needs a contiguous array; copy it with np.ascontiguousarray")
    return flat.view(np.uint8)


def scan_and_copy(
    live: np.ndarray,
    baseline: np.ndarray,
    layout: ChunkLayout,
    changed: np.ndarray | None = None,
    pool: Executor | None = None,
    candidates: np.ndarray | None = None,
    *,
    copy: bool = True,
) -> np.ndarray:
    """Copy the chunks of `live` that differ from `baseline` into it; return their indices.

    `baseline` is a flat, writable uint8 buffer of ``layout.nbytes``. `changed` (uint8 flags,
    one per chunk) may mark chunks to report whatever their content. `live` may be
    non-contiguous, in which case each chunk is gathered into a scratch buffer first. With a
    `pool`, a contiguous array with PARALLEL_BYTES or more to compare is scanned in two
    parts at once (the kernel releases the GIL), which on most machines takes more of the
    memory bandwidth than one core can; the cut gives each part about half of the chunks to
    compare.
    `candidates` (uint8 flags, one per chunk) limits the comparison to the flagged chunks:
    the others are known not to have been written since the baseline was taken (see
    ``arraysnap.tracking``); without it every chunk is compared. With ``copy=False`` the
    chunks are only compared: `baseline` is left as it was (it may be read-only then).
    """
    if (changed is None and candidates is None and layout.n_chunks == 1 and copy
            and live.flags.c_contiguous and live.shape == layout.shape
            and live.dtype == layout.dtype and baseline.size == layout.nbytes
            and baseline.dtype == np.uint8 and baseline.flags.writeable):
        # One chunk, C-contiguous, every argument as the kernel needs it: the common case of
        # a store of many small arrays, where the checks below would cost more than the
        # comparison.
        flag = np.zeros(1, dtype=np.uint8)
        _kernel(live.reshape(-1).view(np.uint8), baseline, layout.nbytes, layout.nbytes,
                _ONE, flag, True)
        return _FIRST if flag[0] else _NONE
    if live.shape != layout.shape or live.dtype != layout.dtype:
        raise ValueError(
            f"live array {live.shape} {live.dtype} does not match the layout "
            f"{layout.shape} {layout.dtype}"
        )
    if baseline.dtype != np.uint8 or baseline.ndim != 1 or baseline.size != layout.nbytes:
        raise ValueError(f"baseline must be a flat uint8 buffer of {layout.nbytes} bytes")
    if (copy and not baseline.flags.writeable) or not baseline.flags.c_contiguous:
        raise ValueError("baseline must be writable and contiguous")
    if changed is None:
        changed = np.zeros(layout.n_chunks, dtype=np.uint8)
    elif changed.dtype != np.uint8 or changed.shape != (layout.n_chunks,):
        raise ValueError(f"changed must be {layout.n_chunks} uint8 flags")
    if candidates is None:
        candidates = np.ones(layout.n_chunks, dtype=np.uint8)
    elif candidates.dtype != np.uint8 or candidates.shape != (layout.n_chunks,):
        raise ValueError(f"candidates must be {layout.n_chunks} uint8 flags")
    if layout.nbytes == 0:
        return np.flatnonzero(changed)

    contiguous = live.flags.c_contiguous if layout.order == "C" else live.flags.f_contiguous
    compared = int(np.count_nonzero(candidates))
    if contiguous and pool is not None and compared > 1 \
            and compared * layout.chunk_bytes >= PARALLEL_BYTES:
        first, second = _halves(as_bytes(live), baseline, layout, candidates, changed)
        other = pool.submit(_kernel, *second, copy)
        try:
            _kernel(*first, copy)
        finally:
            other.result()
    elif contiguous:
        _kernel(as_bytes(live), baseline, layout.segment_bytes, layout.chunk_bytes,
                candidates, changed, copy)
    else:
        _scan_gathered(live, baseline, layout, candidates, changed, copy)
    return np.flatnonzero(changed)


def _halves(live: np.ndarray, baseline: np.ndarray, layout: ChunkLayout,
            candidates: np.ndarray,
            changed: np.ndarray) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Kernel arguments for two parts of the buffer, cut between whole chunks where each part
    has about half the chunks to compare (written memory is often in one place: a front, a
    band, the audit's slice, and a cut in the middle of the bytes would leave one thread
    all of it)."""
    segment, chunk = layout.segment_bytes, layout.chunk_bytes
    segments = layout.nbytes // segment
    # work[i]: the chunks to compare among chunks 0..i.
    work = np.cumsum(candidates, dtype=np.int64)
    half = work[-1] / 2
    if segments >= 2:  # cut between segments: each part is a run of whole segments
        per = layout.chunks_per_segment
        before_cuts = work[np.arange(1, segments) * per - 1]
        cut_segment = 1 + int(np.argmin(np.abs(before_cuts - half)))
        cut_chunk = cut_segment * per
        cut = cut_segment * segment
        first_segment = second_segment = segment
    else:  # one segment: cut between chunks; each part is then one segment of its own
        cut_chunk = 1 + int(np.argmin(np.abs(work[:-1] - half)))
        cut = cut_chunk * chunk
        first_segment, second_segment = cut, layout.nbytes - cut
    return ((live[:cut], baseline[:cut], first_segment, chunk, candidates[:cut_chunk],
             changed[:cut_chunk]),
            (live[cut:], baseline[cut:], second_segment, chunk, candidates[cut_chunk:],
             changed[cut_chunk:]))


def _scan_gathered(live: np.ndarray, baseline: np.ndarray, layout: ChunkLayout,
                   candidates: np.ndarray, changed: np.ndarray, copy: bool) -> None:
    in_memory_order = live if layout.order == "C" else live.T
    head_shape = layout.memory_shape[: layout.split_axis]
    rows = layout.rows_per_chunk
    for index in np.flatnonzero(candidates).tolist():
        segment, within = divmod(index, layout.chunks_per_segment)
        head = tuple(int(i) for i in np.unravel_index(segment, head_shape)) if head_shape else ()
        block = in_memory_order[(*head, slice(within * rows, (within + 1) * rows))]
        start, stop = layout.chunk_range(index)
        gathered = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        length = stop - start
        _kernel(gathered, baseline[start:stop], length, length, candidates[index : index + 1],
                changed[index : index + 1], copy)


def compare_many(live: np.ndarray, baseline: np.ndarray, nbytes: np.ndarray,
                 which: np.ndarray, pool: Executor | None = None, *,
                 copy: bool = True) -> np.ndarray:
    """Compare many whole buffers with their baselines; copy those that differ (unless not
    `copy`); return uint8 flags, one per buffer, set for each buffer found changed.

    `live` and `baseline` are int64 addresses of the buffers, `nbytes` their sizes; only the
    buffers at the indices `which` are compared. The caller keeps every buffer alive, of at
    least that size, and the baselines writable: the addresses are only as good as that
    promise (the pause over a roster of small arrays is the one caller). With a `pool` and
    PARALLEL_BYTES or more to compare, two threads share the work.

    >>> a, b = np.arange(4, dtype="u1"), np.zeros(4, dtype="u1")
    >>> flags = compare_many(np.array([a.ctypes.data]), np.array([b.ctypes.data]),
    ...                      np.array([4]), np.array([0]))
    >>> flags.tolist(), b.tolist()
    ([1], [0, 1, 2, 3])
    """
    count = len(nbytes)
    live = np.ascontiguousarray(live, dtype=np.int64)
    baseline = np.ascontiguousarray(baseline, dtype=np.int64)
    nbytes = np.ascontiguousarray(nbytes, dtype=np.int64)
    which = np.ascontiguousarray(which, dtype=np.intp)
    if live.shape != (count,) or baseline.shape != (count,):
        raise ValueError(f"compare_many needs {count} live and baseline addresses")
    if len(which) and (which.min() < 0 or which.max() >= count):
        raise ValueError(f"compare_many: indices must be in [0, {count})")
    if (nbytes < 0).any():
        raise ValueError("compare_many: sizes must not be negative")
    changed = np.zeros(count, dtype=np.uint8)
    if pool is not None and len(which) > 1 and int(nbytes[which].sum()) >= PARALLEL_BYTES:
        work = np.cumsum(nbytes[which])
        cut = 1 + int(np.searchsorted(work, work[-1] / 2))
        cut = min(cut, len(which) - 1)
        other = pool.submit(_compare_many, live, baseline, nbytes, which[cut:], changed,
                            copy)
        try:
            _compare_many(live, baseline, nbytes, which[:cut], changed, copy)
        finally:
            other.result()
    else:
        _compare_many(live, baseline, nbytes, which, changed, copy)
    return changed
