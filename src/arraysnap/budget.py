"""The buffer budget: encoded chunks waiting for a writer, held in counted private mappings.

An encoded chunk waiting for a writer is copied into a private anonymous mapping (``mmap``)
of its own, and the budget counts that mapping in whole pages: what is held is what is
counted. Once written, the mapping is kept for the next chunk (still counted), and all are
unmapped when the pipeline has been idle for a few seconds, or on ``wait()``. Keeping them
matters while captures come every second or so: unmapping a populated range flushes the TLB
of every core running the program (an interrupt, and then page walks, in the middle of its
loop), and a new mapping's pages must be zeroed again.

Holding the codec's output (a ~1 MiB ``bytes`` from ``malloc``) instead let glibc keep a
heap per thread (the pool threads allocate, the writer frees, out of order), each grown to
its own high-water mark and fragmented: at 100 % change that doubled or tripled the resident
memory the budget claims to bound.

>>> budget = Budget(1 << 20)
>>> held, counted = budget.hold(b"x" * 5000)
>>> budget.used == counted == held_bytes(5000), held.write_with(bytes)[:3]
(True, b'xxx')
>>> budget.give(held, counted); budget.trim(); budget.used
0
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .codecs import RawFrame

__all__ = ["Budget", "Held", "held_bytes"]

T = TypeVar("T")
PAGE_BYTES = mmap.PAGESIZE
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in with the mmap call


def held_bytes(size: int) -> int:
    """What a held buffer of `size` bytes takes in memory: whole pages (at least one),
    rounded up to a size class (1/32 of its power of two) so that mappings can be reused.

    >>> held_bytes(1), held_bytes((1 << 20) + 33) - (1 << 20)
    (4096, 65536)
    """
    pages = max(PAGE_BYTES, -(-size // PAGE_BYTES) * PAGE_BYTES)
    granule = max(PAGE_BYTES, 1 << max(0, pages.bit_length() - 5))
    return -(-pages // granule) * granule


class Held:
    """An encoded chunk waiting for a writer, in a private anonymous mapping (see Budget)."""

    __slots__ = ("map", "size")

    def __init__(self, mapping: mmap.mmap, data: memoryview | RawFrame) -> None:
        self.map: mmap.mmap | None = mapping
        if isinstance(data, RawFrame):  # framed as it is copied: one copy, not three
            with memoryview(mapping) as whole:
                self.size = data.write_into(whole)
        else:
            self.size = data.nbytes
            mapping[: self.size] = data

    @classmethod
    def empty(cls, mapping: mmap.mmap) -> Held:
        """A buffer over `mapping` that `append` fills (a pack)."""
        held = cls.__new__(cls)
        held.map, held.size = mapping, 0
        return held

    def append(self, data: memoryview | RawFrame) -> int:
        """Copy `data` (bytes-like, or a `RawFrame`) after what is held; return its offset."""
        assert self.map is not None, "appended after release"
        offset = self.size
        with memoryview(self.map) as whole, whole[offset:] as rest:
            if isinstance(data, RawFrame):
                self.size += data.write_into(rest)
            else:
                view = memoryview(data).cast("B")
                rest[: view.nbytes] = view
                self.size += view.nbytes
        return offset

    def write_with(self, put: Callable[[memoryview], T]) -> T:
        assert self.map is not None, "written after release"
        with memoryview(self.map) as whole, whole[: self.size] as data:
            return put(data)


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view is still exported (a test's storage kept one): GC unmaps it
        pass


class Budget:
    """Bytes of chunk data held in memory between the reader and the writers.

    The encoded chunks live in private anonymous mappings (``mmap``), not in ``malloc``
    memory: a buffer made on one thread and freed on another, out of order, leaves glibc's
    per-thread heaps grown and fragmented (freed memory stays resident). `used` counts every
    mapping, in use or kept for reuse, in whole pages: what is held is what is counted.
    Freed mappings are kept for the next chunks (no page faults, no syscalls, no TLB
    flushes); they are unmapped when the pipeline goes idle (`trim`) or when a chunk waits
    for room.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # Called (without the lock) before waiting for room: the pack being filled holds
        # room that only its write gives back, so it is written first (see packer.py).
        self.before_wait: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._waiting = 0
        self._free: list[mmap.mmap] = []

    def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)  # one chunk larger than the budget still passes
        while True:
            with self._cond:
                self._waiting += 1
                try:
                    while self.used + amount > self.limit:
                        if self._free:
                            # Kept for reuse: they make way first, before any wait (one
                            # given back after this chunk's _reuse() was kept, as nobody
                            # waited yet: waiting for it would be waiting for ever).
                            self._drop(self._free.pop())
                            continue
                        if self.before_wait is not None:
                            break
                        self._cond.wait()
                    else:
                        self.used += amount
                        return amount
                finally:
                    self._waiting -= 1
            assert self.before_wait is not None
            self.before_wait()
            with self._cond:
                if self.used + amount > self.limit:
                    # Briefly: a pack opened since holds room again, and is written next time.
                    self._cond.wait(0.05)

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()

    def hold(self, data: Any) -> tuple[Held, int]:
        """Copy `data` (bytes-like, or a `RawFrame`) into a mapping counted by the budget
        (waiting for room); return it and the bytes counted for it, which `give` hands back."""
        view = data if isinstance(data, RawFrame) else memoryview(data).cast("B")
        try:
            mapping, counted = self._mapping(held_bytes(view.nbytes))
            return Held(mapping, view), counted
        finally:
            if isinstance(view, memoryview):
                view.release()

    def hold_empty(self, capacity: int) -> tuple[Held, int]:
        """An empty buffer of at least `capacity` bytes for `Held.append` (a pack), counted
        whole (waiting for room); return it and the bytes counted, which `give` hands back."""
        mapping, counted = self._mapping(held_bytes(capacity))
        return Held.empty(mapping), counted

    def _mapping(self, need: int) -> tuple[mmap.mmap, int]:
        """A mapping of `need` bytes (one kept for reuse, or a new one once there is room)
        and the bytes counted for it."""
        mapping = self._reuse(need)
        if mapping is not None:
            return mapping, min(len(mapping), self.limit)
        counted = self.acquire(need)
        try:
            mapping = mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | _MAP_POPULATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.release(counted)
            raise
        return mapping, counted

    def _reuse(self, need: int) -> mmap.mmap | None:
        with self._cond:
            fits = [m for m in self._free if need <= len(m) <= need + need // 4]
            if fits:
                best = min(fits, key=len)
                self._free.remove(best)
                return best
            return None  # acquire() makes room for a new one: kept mappings go first

    def give(self, held: Held, counted: int) -> None:
        """The writer is done with `held`: keep its mapping for reuse or unmap it."""
        mapping, held.map = held.map, None
        if mapping is None:
            return
        with self._cond:
            if self._waiting or counted != len(mapping):
                _unmap(mapping)
                self.used -= counted
            else:
                self._free.append(mapping)
            self._cond.notify_all()

    def trim(self) -> None:
        """Unmap the mappings kept for reuse (the pipeline is idle)."""
        with self._cond:
            while self._free:
                self._drop(self._free.pop())
            self._cond.notify_all()

    def _drop(self, mapping: mmap.mmap) -> None:
        self.used -= len(mapping)
        _unmap(mapping)
