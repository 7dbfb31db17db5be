"""The roster: what the last capture saw of each array, so that the next pause can vouch for
thousands of them at once instead of looking at each.

A pause over 10,000 small arrays spent about 5 µs of Python on each (the checks, the
baseline, the comparison's call), 50 ms in all, where one changed array is worth far less.
The roster records, at the end of a pause, each array's name, data address, dimensions,
strides and dtype, its layout and baseline. At the next capture one C loop
(``arraysnap._roster``) tells which items of the caller's dict are still exactly those
arrays; for them nothing needs checking again (the layout follows from shape, dtype and
strides). The small ones among them are then compared in one call of the kernel
``arraysnap.delta.compare_many``, only where write tracking's spans
(``Tracking.candidates_many``) saw their pages written, and their entries for the engine
are reused from the last capture unless they changed. Anything the roster cannot vouch for
(a new name, an array at a new address or with a new shape, a large array, a baseline the
store moved or a restore still holds) takes the path of one array at a time.

>>> import numpy as np
>>> from arraysnap.layout import plan_layout
>>> u = np.zeros(4)
>>> layout = plan_layout(u.shape, u.dtype, "C", 1 << 20)
>>> roster = Roster(["u"], [u], [layout])
>>> roster.match({"u": u})[0].tolist(), roster.match({"u": u.copy()})[0].tolist()
([2], [1])
"""

from __future__ import annotations

import numpy as np

from .._roster import MAX_DIMS, describe, match
from ..jobs import ArrayDelta
from ..layout import ChunkLayout
from ..tracking import MIN_TRACKED_BYTES

__all__ = ["HIT", "Roster"]

HIT = 2  # match(): the array is the one recorded
SAME_NAME = 1  # the name is, the array is not
_UNCHANGED = np.zeros(0, dtype=np.intp)
_UNCHANGED.flags.writeable = False
_FIRST = np.zeros(1, dtype=np.intp)
_FIRST.flags.writeable = False


def _signature(values: list[object]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                               np.ndarray, list[object]]:
    count = len(values)
    addresses = np.zeros(count, dtype=np.int64)
    dims = np.zeros((count, MAX_DIMS), dtype=np.int64)
    strides = np.zeros((count, MAX_DIMS), dtype=np.int64)
    ndims = np.zeros(count, dtype=np.int8)
    descrs: list[object] = []
    describe(values, addresses, dims, strides, ndims, descrs)
    return addresses, dims, strides, ndims, descrs


def _bulk(array: np.ndarray, layout: ChunkLayout) -> bool:
    """Whether the roster compares `array` in bulk: one chunk, contiguous in its layout's
    memory order, small (a larger array is tracked and compared chunk by chunk)."""
    contiguous = array.flags.c_contiguous if layout.order == "C" else array.flags.f_contiguous
    return (layout.n_chunks == 1 and 0 < layout.nbytes < MIN_TRACKED_BYTES and contiguous
            and array.nbytes == layout.nbytes)


class Roster:
    """The arrays of one capture, in the order of the caller's dict; see the module doc.

    Built in two steps: the arrays (``Roster(names, values, layouts)``, before the pause
    compares them, so that write tracking can watch them first) and their baselines
    (``settle``, after it). `bulk` flags the positions compared in bulk, `starts` and `ends`
    their bytes (zero elsewhere).
    """

    def __init__(self, names: list[str], values: list[np.ndarray],
                 layouts: list[ChunkLayout]) -> None:
        self.names = names
        self.layouts = layouts
        (self._addresses, self._dims, self._strides, self._ndims,
         self._descrs) = _signature(values)
        self.bulk = np.array([_bulk(value, layout) for value, layout
                              in zip(values, layouts, strict=True)], dtype=bool)
        self.bulk &= self._ndims >= 0
        self.nbytes = np.array([layout.nbytes for layout in layouts], dtype=np.int64)
        self.starts = np.where(self.bulk, self._addresses, 0)
        self.ends = np.where(self.bulk, self._addresses + self.nbytes, 0)
        self.baselines = np.zeros(len(names), dtype=np.int64)
        self.unchanged: list[ArrayDelta] = []
        self.epoch = -1
        self.dims: dict[str, tuple[str, ...]] | None = None
        self.n_chunks = sum(layout.n_chunks for layout in layouts)

    def __len__(self) -> int:
        return len(self.names)

    def settle(self, deltas: list[ArrayDelta], epoch: int,
               dims: dict[str, tuple[str, ...]]) -> None:
        """Record the baselines the pause compared against (`deltas`, in roster order), the
        baselines' `epoch` after it, and the `dims` it captured with."""
        buffers: list[object] = [delta.baseline for delta in deltas]
        self.baselines = _signature(buffers)[0]
        self.bulk &= np.array([delta.baseline.size == delta.layout.nbytes
                               and delta.baseline.flags.writeable for delta in deltas])
        self.unchanged = [delta if not len(delta.changed) and not delta.fresh else
                          ArrayDelta(delta.name, delta.layout, delta.baseline, _UNCHANGED,
                                     False, delta.dims) for delta in deltas]
        self.epoch, self.dims = epoch, dims

    def match(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per position of `arrays` (a dict of as many items as the roster): HIT where the
        item is the array recorded there, SAME_NAME where only its name is, 0 where the
        name differs; and the dict's values in order."""
        codes = np.zeros(len(self.names), dtype=np.uint8)
        values: list[np.ndarray] = []
        match(arrays, self.names, self._descrs, self._addresses, self._dims, self._strides,
              self._ndims, codes, values)
        return codes, values

    def deltas(self, changed: np.ndarray) -> list[ArrayDelta]:
        """The engine's entries of the roster's arrays, for bulk positions `changed` (the
        rest of the bulk positions unchanged); the caller replaces the positions it
        compared itself."""
        deltas = list(self.unchanged)
        for position in changed.tolist():
            delta = deltas[position]
            deltas[position] = ArrayDelta(delta.name, delta.layout, delta.baseline, _FIRST,
                                          False, delta.dims)
        return deltas

    def replace(self, position: int, value: np.ndarray, delta: ArrayDelta) -> None:
        """Position `position` holds a new array now (same name), compared on its own as
        `delta`: record it, so that the next capture vouches for it."""
        addresses, dims, strides, ndims, descrs = _signature([value])
        self._addresses[position], self._dims[position] = addresses[0], dims[0]
        self._strides[position], self._ndims[position] = strides[0], ndims[0]
        self._descrs[position] = descrs[0]
        layout = delta.layout
        self.n_chunks += layout.n_chunks - self.layouts[position].n_chunks
        self.layouts[position] = layout
        bulk = (ndims[0] >= 0 and _bulk(value, layout) and delta.baseline.size == layout.nbytes
                and delta.baseline.flags.writeable)
        self.bulk[position] = bulk
        self.nbytes[position] = layout.nbytes
        self.starts[position] = addresses[0] if bulk else 0
        self.ends[position] = addresses[0] + layout.nbytes if bulk else 0
        self.baselines[position] = _signature([delta.baseline])[0][0]
        self.unchanged[position] = ArrayDelta(delta.name, layout, delta.baseline, _UNCHANGED,
                                              False, delta.dims)

    def redim(self, dims: dict[str, tuple[str, ...]]) -> None:
        """The captures go on with other dimension names."""
        self.unchanged = [ArrayDelta(delta.name, delta.layout, delta.baseline, delta.changed,
                                     False, dims.get(delta.name)) for delta in self.unchanged]
        self.dims = dims
