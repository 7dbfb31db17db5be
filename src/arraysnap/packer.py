"""Filling pack objects (format 3) with the small chunks of a capture, on the pool threads.

The pool threads that encode a job's chunks append the small ones to the job's open pack
(one at a time); a full pack, and the last one of a job, goes to the object writers like a
chunk object. A pack is counted by the buffer budget whole, from the moment it is opened,
and its mapping is reused like a held chunk's. A pack being filled holds room that only its
write gives back, so a thread that must wait for room first has the open pack written
(``Budget.before_wait``): without that, a large chunk could wait for room that the pack
holds while the pack waits for the job's last chunk.

>>> from arraysnap.budget import Budget
>>> written = []
>>> packer = Packer(Budget(1 << 20), 1 << 16, lambda job, pack, held, counted:
...                 written.append((job, held.write_with(bytes))))
>>> first, second = packer.add("job", b"abc"), packer.add("job", b"defg")
>>> first.pack == second.pack, first.offset, second.offset, second.length
(True, 0, 3, 4)
>>> packer.add("job", bytes(1 << 15)) is None  # too large: an object of its own
True
>>> packer.flush(); written
[('job', b'abcdefg')]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .budget import Budget, Held
from .codecs import RawFrame
from .packs import Location, new_pack_id

__all__ = ["Packer", "pack_capacity"]

# A pack never holds a chunk larger than this part of it: bigger chunks are their own objects.
_LARGEST_SHARE = 4


def pack_capacity(budget_limit: int, pack_bytes: int) -> int:
    """The bytes a pack holds at most: `pack_bytes`, or a quarter of the budget if that is
    less (several packs are written while the next fills).

    >>> pack_capacity(16 << 20, 4 << 20) == 4 << 20, pack_capacity(1 << 20, 4 << 20)
    (True, 262144)
    """
    return max(1 << 16, min(pack_bytes, budget_limit // 4))


class Packer:
    """Appends encoded chunks to the open pack of a job; `write(job, pack, held, counted)`
    hands a filled pack to a writer (it must not wait for the writing), which gives the
    budget back with ``budget.give(held, counted)`` once it is written; `opened(job,
    pack)` is told of each new pack first (the engine pins it)."""

    def __init__(self, budget: Budget, capacity: int,
                 write: Callable[[Any, bytes, Held, int], None],
                 opened: Callable[[Any, bytes], None] | None = None) -> None:
        self.budget = budget
        self.capacity = capacity
        self._write = write
        self._opened = opened
        self._lock = threading.Lock()  # the open pack
        self._opening = threading.Lock()  # one thread at a time waits for a new pack's room
        self._open: tuple[Any, bytes, Held, int] | None = None

    def add(self, job: Any, data: Any) -> Location | None:
        """Append `data` (bytes-like or a `RawFrame`) to `job`'s open pack (a new one when
        there is none or it is full); None, appending nothing, when it is too large for a
        pack and stays an object of its own."""
        nbytes = data.nbytes if isinstance(data, RawFrame) else memoryview(data).nbytes
        if nbytes > self.capacity // _LARGEST_SHARE:
            return None
        data = data if isinstance(data, RawFrame) else memoryview(data)
        with self._lock:
            location = self._append(job, data, nbytes)
        if location is not None:
            return location
        with self._opening:
            with self._lock:  # another thread may have opened one meanwhile
                location = self._append(job, data, nbytes)
            if location is not None:
                return location
            # Without the pack's lock: waiting for room writes the open pack (before_wait).
            held, counted = self.budget.hold_empty(self.capacity)
            pack = new_pack_id()
            if self._opened is not None:
                self._opened(job, pack)
            with self._lock:  # _append wrote any open pack; only this thread opens one
                self._open = (job, pack, held, counted)
                location = self._append(job, data, nbytes)
        assert location is not None
        return location

    def _append(self, job: Any, data: Any, nbytes: int) -> Location | None:
        """Append to the open pack if it is `job`'s and has room (else write it, if full)."""
        if self._open is None:
            return None
        owner, pack, held, _ = self._open
        if owner is not job or held.size + nbytes > self.capacity:
            self._flush_locked()
            return None
        return Location(pack, held.append(data), nbytes)

    def flush(self) -> None:
        """Hand the open pack, if any, to its writer."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._open is None:
            return
        (job, pack, held, counted), self._open = self._open, None
        if held.size:
            self._write(job, pack, held, counted)
        else:  # never written to: nothing refers to it
            self.budget.give(held, counted)
