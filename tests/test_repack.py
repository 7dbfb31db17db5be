"""Which packs are packed again (format 3): those the newest tables use less than half of."""

from __future__ import annotations

import numpy as np

from arraysnap.manifest import ArrayEntry
from arraysnap.packs import Location
from arraysnap.repack import PackUsage

P, Q = b"p" * 16, b"q" * 16


def entry(name: str, *where: Location | None) -> ArrayEntry:
    return ArrayEntry(name, (len(where),), np.dtype("u1"), "C", 0, 1, bytes(32) * len(where),
                      where=tuple(where))


def test_equal_chunks_in_one_place_count_once():
    """Ten arrays whose chunk is one deduplicated 10-byte place hold 10 bytes of a pack, not
    100: once the large chunk next to it moves, the pack is mostly dead."""
    usage = PackUsage({P: 100}.__getitem__)
    shared = Location(P, 0, 10)
    entries = {f"a{i}": entry(f"a{i}", shared) for i in range(10)}
    entries["big"] = entry("big", Location(P, 10, 80))
    usage.reset(entries)
    assert usage.to_repack(1 << 20) == {}
    usage.update(entries["big"], entry("big", Location(Q, 0, 80)))
    assert usage.to_repack(1 << 20) == {f"a{i}": [0] for i in range(10)}


def test_a_pack_still_half_used_stays_and_a_dead_one_is_forgotten():
    sizes = {P: 40}
    usage = PackUsage(sizes.__getitem__)
    a, b = entry("a", Location(P, 0, 20)), entry("b", Location(P, 20, 20))
    usage.reset({"a": a, "b": b})
    usage.update(b, entry("b", None))  # 20 of 40 left: half is not less than half
    assert usage.to_repack(1 << 20) == {}
    usage.update(a, None)  # the array is gone: nothing of the pack left to move
    assert usage.to_repack(1 << 20) == {}


def test_what_is_packed_again_in_one_capture_is_bounded():
    sizes = {bytes([n]) * 16: 100 for n in range(4)}
    usage = PackUsage(sizes.__getitem__)
    entries = {}
    for n in range(4):
        pack = bytes([n]) * 16
        entries[f"keep{n}"] = entry(f"keep{n}", Location(pack, 0, 30))
        entries[f"move{n}"] = entry(f"move{n}", Location(pack, 30, 70))
    usage.reset(entries)
    for n in range(4):
        usage.update(entries[f"move{n}"], entry(f"move{n}", None))
    first = usage.to_repack(50)  # 30 bytes a pack: two packs reach the limit
    second = usage.to_repack(50)
    assert len(first) == 2 and len(second) == 2 and not set(first) & set(second)
    assert usage.to_repack(50) == {}
