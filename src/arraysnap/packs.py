"""Pack objects (format 3): the chunks of small arrays, many to an object.

Before format 3 every chunk was an object of its own (``chunks/ab/cdef…``): one file with
an fsync here, one request on an object store. For a state of many small arrays that made
the first capture 15-25 times slower than ``np.savez`` of the same arrays, and a capture's
requests followed the number of arrays instead of its bytes. In format 3 a capture packs
the encoded chunks of arrays of at most ``PACKED_CHUNKS`` chunks into *pack objects*
(``packs/ab/cdef…``, see ``objects.pack_key``; named by 16 random bytes: a pack is written
once, create-only), and an array's entry says where each of its chunks is:
``Location(pack, offset, length)``. Larger arrays, and chunks too large to be worth packing,
stay chunk objects of their own.

A pack holds encoded chunks back to back and nothing else: what is in it and where is in
the entries that use it, and each chunk is checked against its blake3 digest (of the raw
bytes) as before. A pack is kept while any kept snapshot uses any chunk of it.

>>> where = (Location(b"p" * 16, 0, 10), None)
>>> packs, listed = [], {}
>>> text = where_to_json(where, packs, listed)
>>> text, where_from_json(text, 2, [bytes(p) for p in packs]) == where
([0, 0, 10, -1, 0, 0], True)
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["MAX_OFFSET", "PACKED_CHUNKS", "PACK_BYTES", "PACK_ID_BYTES", "PACK_PREFIX", "Location",
           "new_pack_id", "pack_list_to_json", "parse_pack_list",
           "where_from_json", "where_to_json"]

PACK_PREFIX = "packs/"
PACK_ID_BYTES = 16
PACK_BYTES = 4 << 20  # a pack is written once it holds this much (less with a small budget)
PACKED_CHUNKS = 64  # arrays of at most this many chunks are packed (their entries list them)
MAX_OFFSET = 1 << 40  # a location's offset is below this (a pack is far smaller)


class Location(NamedTuple):
    """Where a packed chunk's encoded bytes are: `length` bytes at `offset` of `pack`."""

    pack: bytes
    offset: int
    length: int


_tuple_new = tuple.__new__  # a Location without NamedTuple's Python-level __new__


def new_pack_id() -> bytes:
    """A new pack's id: random, so that no two writers, attempts or crashed captures ever
    name two packs the same (a pack is not named by its content, which is not known until
    it is full)."""
    return os.urandom(PACK_ID_BYTES)


def where_to_json(where: Sequence[Location | None], packs: list[bytes],
                  listed: dict[bytes, int]) -> list[int]:
    """An entry's locations as the flat list ``[pack, offset, length, …]`` that tables
    store, one triple a chunk; ``pack`` indexes `packs` (the container's list, extended
    here; `listed` maps each id in it to its index) and is -1 for a chunk object."""
    flat: list[int] = []
    for location in where:
        if location is None:
            flat += (-1, 0, 0)
            continue
        index = listed.get(location.pack)
        if index is None:
            index = listed[location.pack] = len(packs)
            packs.append(location.pack)
        flat += (index, location.offset, location.length)
    return flat


def where_from_json(value: object, n_chunks: int,
                    packs: Sequence[bytes]) -> tuple[Location | None, ...]:
    """Validate an entry's ``where`` list against its chunk count and its container's
    `packs`; ValueError for anything malformed."""
    if n_chunks == 1 and type(value) is list and len(value) == 3:  # most entries: one chunk
        index, offset, length = value
        if (type(index) is int and type(offset) is int and type(length) is int
                and 0 <= index < len(packs) and 0 <= offset < MAX_OFFSET and 0 < length):
            return (_tuple_new(Location, (packs[index], offset, length)),)
    if (not isinstance(value, list) or len(value) != 3 * n_chunks
            or not all(type(item) is int for item in value)):
        raise ValueError(f"where must list [pack, offset, length] for each of {n_chunks} "
                         "chunks")
    where: list[Location | None] = []
    for start in range(0, len(value), 3):
        index, offset, length = value[start : start + 3]
        if index == -1:
            where.append(None)
            continue
        if not 0 <= index < len(packs) or not 0 <= offset < MAX_OFFSET or not 0 < length:
            raise ValueError(f"where names pack {index} at {offset}+{length}: out of range")
        where.append(Location(packs[index], offset, length))
    return tuple(where)


def parse_pack_list(value: object) -> list[bytes]:
    """A container's ``packs`` list (base64 pack ids); ValueError unless well formed.

    >>> parse_pack_list(pack_list_to_json([bytes(16)])) == [bytes(16)]
    True
    """
    if not isinstance(value, list):
        raise ValueError("packs must be a list of pack ids")
    packs = []
    for item in value:
        try:
            pack = base64.b64decode(item, validate=True) if isinstance(item, str) else b""
        except (binascii.Error, ValueError):
            pack = b""
        if len(pack) != PACK_ID_BYTES:
            raise ValueError(f"pack id {str(item)[:40]!r} is not {PACK_ID_BYTES} bytes in "
                             "base64")
        packs.append(pack)
    return packs


def pack_list_to_json(packs: Sequence[bytes]) -> list[str]:
    """The ``packs`` list of a container, as tables store it."""
    return [base64.b64encode(pack).decode("ascii") for pack in packs]
