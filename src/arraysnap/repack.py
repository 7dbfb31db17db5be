"""Which packs the latest snapshot still uses, and how much of each: packs mostly dead are
packed again (format 3).

A pack is kept while any kept snapshot uses any chunk of it. A pack whose chunks were
mostly replaced by later captures would then be kept, whole, by the few that were not
(a constant array among changing ones, say) for as long as the store lives. So the engine
follows, for the newest tables it has read, the chunks each pack holds for them: once
those are less than half of a pack's bytes, the next capture packs them again, from the
baselines (which hold exactly those bytes), into its own pack. The old pack is then used
only by older snapshots, and goes with them when retention removes them. What a capture
packs again is bounded (one pack's worth), so its cost follows what earlier captures
changed.

Owned by the engine's reader thread (``written`` may be called from any thread).

>>> import numpy as np
>>> from arraysnap.manifest import ArrayEntry
>>> from arraysnap.packs import Location
>>> def entry(name, pack): return ArrayEntry(name, (1,), np.dtype("u1"), "C", 0, 1, bytes(32),
...                                        where=(Location(pack, 0, 10),))
>>> usage = PackUsage(lambda pack: 40)
>>> usage.reset({"a": entry("a", b"p" * 16), "b": entry("b", b"p" * 16)})
>>> usage.update(entry("b", b"p" * 16), entry("b", b"q" * 16))  # b moved: 10 of 40 left
>>> usage.to_repack(1 << 20)
{'a': [0]}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .manifest import ArrayEntry

__all__ = ["PackUsage"]

log = logging.getLogger("arraysnap")


class PackUsage:
    """The chunks of the newest tables in each pack; `size_of(pack)` gives a pack's stored
    size when it was not written by this engine (OSError if it cannot)."""

    def __init__(self, size_of: Callable[[bytes], int]) -> None:
        self._size_of = size_of
        # pack -> {(array, chunk): (offset, length)} for the chunks the newest tables have
        # there (equal chunks of a capture share one place)
        self._users: dict[bytes, dict[tuple[str, int], tuple[int, int]]] = {}
        self._sizes: dict[bytes, int] = {}
        self._sparse: dict[bytes, None] = {}  # in the order found

    def written(self, pack: bytes, size: int) -> None:
        """This engine wrote `pack`, of `size` bytes."""
        self._sizes[pack] = size

    def reset(self, entries: Mapping[str, ArrayEntry]) -> None:
        """Start again from `entries` (the tables the reader goes on from)."""
        self._users.clear()
        self._sparse.clear()
        for entry in entries.values():
            self._add(entry, range(entry.n_chunks))
        for pack in [pack for pack in self._users if pack in self._sizes]:  # no request
            self._check(pack)

    def update(self, previous: ArrayEntry | None, entry: ArrayEntry | None) -> None:
        """An array's entry went from `previous` to `entry` (None: absent)."""
        old = () if previous is None or previous.where is None else previous.where
        new = () if entry is None or entry.where is None else entry.where
        if previous is not None and entry is not None and previous.name != entry.name:
            raise ValueError("update() takes two entries of one array")
        changed = [i for i in range(max(len(old), len(new)))
                   if (old[i] if i < len(old) else None) != (new[i] if i < len(new) else None)]
        if not changed:
            return
        touched: set[bytes] = set()
        if previous is not None:
            for index in changed:
                location = old[index] if index < len(old) else None
                if location is not None:
                    users = self._users.get(location.pack)
                    if users is not None:
                        users.pop((previous.name, index), None)
                        touched.add(location.pack)
        if entry is not None:
            self._add(entry, changed)
        for pack in touched:
            self._check(pack)

    def _add(self, entry: ArrayEntry, indices: object) -> None:
        if entry.where is None:
            return
        for index in indices:  # type: ignore[attr-defined]
            location = entry.where[index] if index < len(entry.where) else None
            if location is not None:
                self._users.setdefault(location.pack, {})[(entry.name, index)] = (
                    location.offset, location.length)

    def _check(self, pack: bytes) -> None:
        users = self._users.get(pack)
        if not users:
            self._users.pop(pack, None)
            self._sparse.pop(pack, None)
            self._sizes.pop(pack, None)
            return
        size = self._sizes.get(pack)
        if size is None:
            try:
                size = self._sizes[pack] = self._size_of(pack)
            except OSError as err:  # verify() reports a missing pack; nothing to do here
                log.debug("arraysnap: size of pack %s: %r", pack.hex()[:16], err)
                return
        if 2 * sum(length for _, length in set(users.values())) < size:
            self._sparse[pack] = None

    def to_repack(self, limit: int) -> dict[str, list[int]]:
        """The chunks to pack again in the next capture, by array: those of packs less than
        half used by the newest tables, about `limit` bytes of them (at least one pack's)."""
        chosen: dict[str, list[int]] = {}
        total = 0
        for pack in list(self._sparse):
            if total >= limit:
                break
            del self._sparse[pack]
            for (name, index), (_, length) in self._users.get(pack, {}).items():
                chosen.setdefault(name, []).append(index)
                total += length
        return chosen
