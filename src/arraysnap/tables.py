"""Chunk tables of format 2: a snapshot's arrays in table objects shared between snapshots.

A format-1 manifest lists every array and every chunk digest, so each capture wrote the whole
table again: 43 KiB per GiB of state, and 1.3 MB for 9,500 small arrays, also when nothing
changed. In format 2 a manifest lists what a snapshot holds through immutable,
content-addressed *table objects* (``tables/ab/cdef…``, named by the blake3 of their own
bytes), which snapshots share as they share chunk objects:

- an array of more than ``INLINE_CHUNKS`` chunks keeps its digests in *blocks* of
  ``BLOCK_CHUNKS`` digests (raw 32-byte digests, concatenated); its entry names the blocks;
- a snapshot of more than ``INLINE_ARRAYS`` arrays keeps its entries in a tree of *nodes*:
  leaves hold entries in name order, inner nodes hold ``[first name, arrays, digest]`` of
  their children. Where a node ends is decided by the name it ends with (about one name in
  ``FANOUT``), so adding or removing an array changes the nodes around it, not all after it.

A capture that changes one array writes that array's blocks that changed, one leaf, the
nodes above it and the manifest; unchanged ones are the objects earlier snapshots wrote.

In format 4 the nodes a commit writes go into one *pack* (``packs/ab/cdef…``, as packed
chunks do) instead of a file each, and a parent names each child by its digest and its
``Location``: ``[first name, arrays, digest, pack, offset, length]``, ``pack`` indexing the
parent's ``packs`` list. The first capture of 10,000 arrays writes one pack where it wrote
540 files, each with its fsync (on an object store, one request where it made 540), and a
capture that changes one array writes one small pack. Blocks stay objects of their own:
an array with blocks is large, and its chunks are most of what a capture writes.

In format 5 a leaf holds its arrays by column, not by row: their names, the index of each
one's layout, every chunk digest in one base64 string and every chunk's location in
another (three little-endian int64 a chunk). Decoding a leaf's rows, a list of four JSON
values for each array, took a fresh reader of 10,000 arrays 13 ms of its 20.

>>> import numpy as np
>>> from arraysnap.manifest import ArrayEntry
>>> from arraysnap.tablewriter import TableWriter
>>> stored, packs = {}, {}
>>> writer = TableWriter(4)
>>> entries = {f"a{i:03d}": ArrayEntry(f"a{i:03d}", (1,), np.dtype("f8"), "C", 0, 1,
...                                    bytes([i]) * 32) for i in range(200)}
>>> built = writer.build(entries, lambda digest, data: stored.setdefault(digest, data),
...                      lambda pack, data: packs.setdefault(pack, data))
>>> built.arrays, built.tables["arrays"], len(packs), stored
({}, 200, 1, {})
>>> def fetch(digest, location):
...     return packs[location.pack][location.offset : location.offset + location.length]
>>> read, objects, nodes = TableReader(fetch).read(built.tables, 4)
>>> read == entries and {where.pack for where in nodes.values()} == built.table_packs == set(packs)
True
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from ._leaves import add_entries, parse_columns, parse_rows
from .bulk import paused_collector
from .manifest import (
    ArrayEntry,
    ParsedLayout,
    check_array_name,
    check_array_names,
    parse_layout,
)
from .objects import DIGEST_BYTES, object_key
from .packs import (
    MAX_OFFSET,
    PACKED_CHUNKS,
    Location,
    parse_pack_list,
    where_from_json,
)

__all__ = ["BLOCK_CHUNKS", "COLUMNAR_LEAVES", "FANOUT", "INLINE_ARRAYS", "INLINE_CHUNKS",
           "MAX_FANOUT", "MIN_FANOUT", "PACKED_NODES", "PREFIX", "READ_AHEAD_BYTES", "Built",
           "TableReader", "remembered", "table_key"]

PREFIX = "tables/"
INLINE_ARRAYS = 64  # a snapshot of at most this many arrays lists them in its manifest
INLINE_CHUNKS = PACKED_CHUNKS  # an array of at most this many chunks lists its digests itself
BLOCK_CHUNKS = 1024  # digests per block of a larger array's table (32 KiB)
# Entries (or children) a node holds: at least MIN_FANOUT, then each name ends it with a
# chance of 1 in FANOUT, at most MAX_FANOUT. A capture that changes one array rewrites the
# nodes on its path, each of the size a node has: a floor and a cap keep that size close to
# the mean (a median of 6 KiB of table objects for one change in 10,000 arrays, against
# 11 KiB with no floor, FANOUT 32 and a cap of 128).
FANOUT = 16
MIN_FANOUT = FANOUT // 2
MAX_FANOUT = 2 * FANOUT
MAX_DEPTH = 8
MAX_NODE_BYTES = 1 << 24
MAX_ARRAYS = 1 << 24
PACKED_NODES = 4  # the format from which nodes are written into packs
COLUMNAR_LEAVES = 5  # the format from which leaves hold their arrays by column
_CACHED_BYTES = 64 << 20  # table objects kept by a reader, by their stored size
# Read by a reader ahead of checking them, for one parent's children (whose first capture
# of 10,000 arrays wrote about 60 KiB): a hostile tree made it read every pack it named.
READ_AHEAD_BYTES = 4 << 20


def table_key(digest: bytes) -> str:
    """The storage key of the table object with `digest`.

    >>> table_key(bytes(32))[:10]
    'tables/00/'
    """
    return object_key(digest, PREFIX)


@dataclass(frozen=True, slots=True)
class Built:
    """What a manifest says of its arrays: `arrays` (entries listed in the manifest, the
    format-1 form) or `tables` (the root of a node tree), every table object used, the
    manifest's format `version` and (format 3) the `packs` its listed entries refer to."""

    arrays: dict[str, Any]
    tables: dict[str, Any] | None
    digests: frozenset[bytes]
    version: int = 2
    packs: list[str] = field(default_factory=list)
    # Format 4: where each node of `digests` in a pack is (the others are objects of their
    # own under ``tables/``).
    nodes: Mapping[bytes, Location] = field(default_factory=dict)

    @property
    def table_packs(self) -> frozenset[bytes]:
        """The packs holding nodes of the tree (format 4)."""
        return frozenset(location.pack for location in self.nodes.values())

    @property
    def packed(self) -> frozenset[bytes]:
        """The table objects the manifest uses that are nodes in packs."""
        return frozenset(self.nodes)

    @property
    def objects(self) -> frozenset[bytes]:
        """The table objects of their own (``tables/…``) the manifest uses."""
        return self.digests - self.packed


_REMEMBERED_LAYOUTS = 4096  # distinct layouts a writer or reader keeps parsed or encoded


def remembered(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by `make` the first time; a full cache starts again empty."""
    found = cache.get(key)
    if found is None:
        found = make()
        if len(cache) >= _REMEMBERED_LAYOUTS:
            cache.clear()
        cache[key] = found
    return found


class TableReader:
    """Reads table objects (`fetch(digest, location)` returns the stored bytes: of the
    object of its own with `digest` when `location` is None, else the range of a pack),
    checking each against its name, and keeps recently read nodes: snapshots share most of
    them. With `fetch_range(location)` (a pack's range), the children of a node that lie
    close together in one pack are read at once: a first capture writes its nodes into
    one pack, so a fresh reader of 10,000 arrays reads 29 ranges instead of 514."""

    def __init__(self, fetch: Callable[[bytes, Location | None], bytes],
                 fetch_range: Callable[[Location], bytes] | None = None) -> None:
        self._fetch = fetch
        self._fetch_range = fetch_range
        self._lock = threading.Lock()
        # By digest and the parse that made the value: a hostile tree may name one object
        # as a leaf in one place and as an inner node in another.
        self._cache: OrderedDict[tuple[bytes, Any], tuple[Any, int]] = OrderedDict()
        self._cached_bytes = 0
        self._layouts: dict[tuple[Any, ...], ParsedLayout] = {}

    def _object(self, digest: bytes, location: Location | None, read: bytes | None) -> bytes:
        if location is not None and location.length > MAX_NODE_BYTES:
            raise ValueError(f"table object {digest.hex()[:16]} is too large")
        data = self._fetch(digest, location) if read is None else read
        if len(data) > MAX_NODE_BYTES:
            raise ValueError(f"table object {digest.hex()[:16]} is too large")
        if blake3.blake3(data).digest() != digest:
            raise ValueError(f"table object {digest.hex()[:16]} does not match its name "
                             "(damaged)")
        return data

    def _cached(self, digest: bytes, parse: Callable[[bytes], Any],
                location: Location | None = None, read: bytes | None = None) -> Any:
        """The object `digest` parsed by `parse`: from the cache, else from `read` (its
        bytes, read with others) or fetched, and checked."""
        with self._lock:
            found = self._cache.get((digest, parse))
            if found is not None:
                self._cache.move_to_end((digest, parse))
                return found[0]
        data = self._object(digest, location, read)
        value = parse(data)
        with self._lock:
            if (digest, parse) not in self._cache:
                self._cache[digest, parse] = (value, len(data))
                self._cached_bytes += len(data)
            while self._cached_bytes > _CACHED_BYTES and len(self._cache) > 1:
                _, (_, size) = self._cache.popitem(last=False)
                self._cached_bytes -= size
        return value

    def chunks(self, name: str, value: object, used: set[bytes]) -> bytes:
        """The digests an entry's ``chunks`` field gives: inline, or from its blocks."""
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"array {name!r}: chunks is not valid base64") from None
        blocks = value.get("blocks") if isinstance(value, dict) else None
        if not isinstance(blocks, list) or len(blocks) > MAX_ARRAYS:
            raise ValueError(f"array {name!r}: chunks must be a base64 string or blocks")
        parts = []
        for ref in blocks:
            digest = _digest_of(ref)
            used.add(digest)
            part = self._cached(digest, bytes)
            if len(part) % DIGEST_BYTES or not part:
                raise ValueError(f"array {name!r}: digest block {digest.hex()[:16]} is "
                                 "malformed")
            parts.append(part)
        return b"".join(parts)

    def read(self, tables: object, version: int = 2
             ) -> tuple[dict[str, ArrayEntry], frozenset[bytes], dict[bytes, Location]]:
        """The entries of a manifest's ``tables`` field (of a manifest of format `version`),
        the table objects of their own it uses and (format 4) where each of its nodes is;
        ValueError for anything malformed (the caller says which snapshot)."""
        if not isinstance(tables, dict):
            raise ValueError("tables must be an object")
        count, depth, children = tables.get("arrays"), tables.get("depth"), tables.get("children")
        if (type(count) is not int or not 0 <= count <= MAX_ARRAYS or type(depth) is not int
                or not 1 <= depth <= MAX_DEPTH or not isinstance(children, list)):
            raise ValueError("tables must give arrays, depth (1 to 8) and children")
        packs = _packs_of(tables, version >= PACKED_NODES)
        used: set[bytes] = set()
        nodes: dict[bytes, Location] = {}
        entries: dict[str, ArrayEntry] = {}
        leaf = self._parse_columns if version >= COLUMNAR_LEAVES else self._parse_leaf
        with paused_collector():
            self._children(children, packs, depth, entries, (used, nodes), [], leaf)
        if len(entries) != count:
            raise ValueError(f"tables hold {len(entries)} arrays, the manifest says {count}")
        return entries, frozenset(used), nodes

    def _children(self, children: list[Any], packs: list[bytes] | None, depth: int,
                  entries: dict[str, ArrayEntry],
                  used: tuple[set[bytes], dict[bytes, Location]], last: list[str],
                  leaf: Callable[[bytes], list[Any]]) -> str | None:
        """Read `children` (at `depth`; `packs`: their parent's, format 4) into `entries`;
        return the first name read. `last` holds the last name read so far (names must
        increase across the whole tree). `used` collects the objects of their own and where
        the packed nodes are; `leaf` parses a leaf of the tree's format."""
        if not children:  # the writer makes none: a child holds at least one array
            raise ValueError("a table node has no children")
        first_read = None
        refs = [_child_of(child, packs) for child in children]
        parse = leaf if depth == 1 else _parse_inner
        read = self._read_together(refs, parse) if packs else {}
        for child, (digest, location) in zip(children, refs, strict=True):
            if location is None:
                used[0].add(digest)
            else:
                used[1][digest] = location
            before = len(entries)
            if depth == 1:
                first, newest = add_entries(
                    self._cached(digest, leaf, location, read.get(location)),
                    entries, last[0] if last else None,
                    lambda item: self._blocks_of(item, used[0]))
                if newest is not None:
                    last[:] = [newest]
            else:
                inner = self._cached(digest, _parse_inner, location, read.get(location))
                first = self._children(inner[0], _packs_of(inner[1], packs is not None),
                                       depth - 1, entries, used, last, leaf)
            if len(entries) - before != child[1] or (first is not None and first != child[0]):
                raise ValueError(f"table node {digest.hex()[:16]} does not hold what its "
                                 "parent says")
            first_read = first if first_read is None else first_read
        return first_read

    def _read_together(self, refs: list[tuple[bytes, Location | None]],
                       parse: Callable[[bytes], Any]) -> dict[Location, bytes]:
        """The bytes of the nodes of `refs` not cached, read by pack: one range a pack
        holding two or more of them, if they fill at least half of it and no more than all
        of it, up to ``READ_AHEAD_BYTES`` in all (else, or if that read fails, each is
        fetched alone and fails on its own)."""
        if self._fetch_range is None:
            return {}
        by_pack: dict[bytes, set[Location]] = {}
        with self._lock:
            for digest, location in refs:
                if (location is not None and location.length <= MAX_NODE_BYTES
                        and (digest, parse) not in self._cache):
                    by_pack.setdefault(location.pack, set()).add(location)
        read: dict[Location, bytes] = {}
        budget = READ_AHEAD_BYTES
        for pack, locations in by_pack.items():
            if len(locations) < 2:
                continue
            start = min(location.offset for location in locations)
            stop = max(location.offset + location.length for location in locations)
            total = sum(location.length for location in locations)
            # Nodes a writer packed never overlap: when they add up to more than the range
            # (a hostile tree's copies could be far more) each is fetched alone.
            if not total <= stop - start <= min(2 * total, budget):
                continue
            budget -= stop - start
            try:
                data = self._fetch_range(Location(pack, start, stop - start))
            except (OSError, ValueError):
                continue
            if len(data) != stop - start:
                continue
            view = memoryview(data)
            for location in locations:
                offset = location.offset - start
                read[location] = bytes(view[offset : offset + location.length])
        return read

    def _blocks_of(self, entry: ArrayEntry | tuple[ArrayEntry, Any], used: set[bytes]
                   ) -> ArrayEntry:
        if isinstance(entry, ArrayEntry):
            return entry
        partial, chunks = entry
        digests = self.chunks(partial.name, chunks, used)
        return _with_digests(partial, digests)

    def _layout(self, value: object) -> ParsedLayout:
        """``parse_layout(value)``, remembered: the leaves of a store of many arrays repeat
        a few layouts (parsing one took 14 µs, for each of 500 leaves at 10,000 arrays).
        Only layouts of plain field types are remembered, keyed by their values and so by
        their types too (a JSON ``true`` must not pass for the ``1`` it equals)."""
        if type(value) is dict:
            shape, dtype, dims = value.get("shape"), value.get("dtype"), value.get("dims")
            fields = (value.get("order"), value.get("split_axis"), value.get("rows_per_chunk"))
            if (type(shape) is list and all(type(d) is int for d in shape)
                    and type(dtype) is str and type(fields[0]) is str
                    and type(fields[1]) is int and type(fields[2]) is int
                    and (dims is None or (type(dims) is list
                                          and all(type(d) is str for d in dims)))):
                key = (tuple(shape), dtype, *fields, None if dims is None else tuple(dims))
                return remembered(self._layouts, key, lambda: parse_layout(value))
        return parse_layout(value)

    def _parse_leaf(self, data: bytes) -> list[ArrayEntry | tuple[ArrayEntry, Any]]:
        body = _json(data)
        layouts, rows = body.get("layouts"), body.get("arrays")
        if not isinstance(layouts, list) or not isinstance(rows, list) or len(rows) > MAX_ARRAYS:
            raise ValueError("a leaf must hold layouts and arrays")
        parsed = [self._layout(layout) for layout in layouts]
        packs = parse_pack_list(body.get("packs", []))
        result: list[ArrayEntry | tuple[ArrayEntry, Any]] = []
        try:
            parse_rows(rows, parsed, packs, check_array_name, where_from_json, ArrayEntry,
                       DIGEST_BYTES, Location, MAX_OFFSET, result)
        except TypeError as err:  # a name that is not a string: damage, as any other
            raise ValueError(f"a leaf row: {err}") from None
        return result

    def _parse_columns(self, data: bytes) -> list[ArrayEntry | tuple[ArrayEntry, Any]]:
        """A format-5 leaf: its arrays by column."""
        body = _json(data)
        layouts, names, layout_of = body.get("layouts"), body.get("names"), body.get("layout")
        blocks = body.get("blocks", [])
        if (not isinstance(layouts, list) or not isinstance(names, list)
                or not isinstance(layout_of, list) or not isinstance(blocks, list)
                or len(names) > MAX_ARRAYS):
            raise ValueError("a leaf must hold layouts, names and layout lists")
        parsed = [self._layout(layout) for layout in layouts]
        packs = parse_pack_list(body.get("packs", []))
        try:
            check_array_names(names)
        except TypeError as err:  # a name that is not a string: damage, as any other
            raise ValueError(f"a leaf's names: {err}") from None
        result: list[ArrayEntry | tuple[ArrayEntry, Any]] = []
        parse_columns(names, layout_of, parsed, _base64(body, "digests"),
                      _base64(body, "where"), blocks, packs, ArrayEntry, DIGEST_BYTES,
                      Location, MAX_OFFSET, result)
        return result


def _base64(body: dict[str, Any], field: str) -> bytes:
    """A leaf's base64 column `field` ("" when absent)."""
    value = body.get(field, "")
    try:
        if type(value) is str:
            return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    raise ValueError(f"a leaf's {field} is not a base64 string")


def _with_digests(entry: ArrayEntry, digests: bytes) -> ArrayEntry:
    complete = ArrayEntry(entry.name, entry.shape, entry.dtype, entry.order, entry.split_axis,
                          entry.rows_per_chunk, digests, entry.dims)
    if len(digests) != complete.layout.n_chunks * DIGEST_BYTES:
        raise ValueError(f"array {entry.name!r}: chunk table has "
                         f"{len(digests) // DIGEST_BYTES} digests, layout needs "
                         f"{complete.layout.n_chunks}")
    return complete


def _parse_inner(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    body = _json(data)
    children = body.get("children")
    if not isinstance(children, list) or len(children) > MAX_ARRAYS:
        raise ValueError("an inner node must hold children")
    return children, body


def _packs_of(parent: dict[str, Any], packed: bool) -> list[bytes] | None:
    """The ``packs`` list of a parent whose children are `packed` (format 4), else None;
    a tree is packed throughout or not at all."""
    if not packed:
        if "packs" in parent:
            raise ValueError("a node of a table tree before format 4 has packs")
        return None
    if "packs" not in parent:
        raise ValueError("a node of a format-4 table tree must list its children's packs")
    return parse_pack_list(parent["packs"])


def _child_of(child: object, packs: list[bytes] | None) -> tuple[bytes, Location | None]:
    """A parent's reference to a child: its digest and (format 4) its location."""
    if packs is None:
        if (not isinstance(child, list) or len(child) != 3 or not isinstance(child[0], str)
                or type(child[1]) is not int or child[1] < 1):
            raise ValueError("a child must be [first name, arrays (1 or more), digest]")
        return _digest_of(child[2]), None
    if (not isinstance(child, list) or len(child) != 6 or not isinstance(child[0], str)
            or not all(type(item) is int for item in (child[1], *child[3:])) or child[1] < 1):
        raise ValueError("a child must be [first name, arrays (1 or more), digest, pack, "
                         "offset, length]")
    index, offset, length = child[3:]
    if not 0 <= index < len(packs) or not 0 <= offset < MAX_OFFSET or not 0 < length:
        raise ValueError(f"a child names pack {index} at {offset}+{length}: out of range")
    return _digest_of(child[2]), Location(packs[index], offset, length)


def _json(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"table object is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ValueError("table object is not a JSON object")
    return body


def _digest_of(ref: object) -> bytes:
    try:
        digest = base64.b64decode(ref, validate=True) if isinstance(ref, str) else b""
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"table reference {str(ref)[:60]!r} is not a base64 digest")
    return digest
