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

>>> import numpy as np
>>> from arraysnap.manifest import ArrayEntry
>>> stored = {}
>>> writer = TableWriter()
>>> entries = {f"a{i:03d}": ArrayEntry(f"a{i:03d}", (1,), np.dtype("f8"), "C", 0, 1,
...                                    bytes([i]) * 32) for i in range(200)}
>>> built = writer.build(entries, lambda digest, data: stored.setdefault(digest, data))
>>> built.arrays, built.tables["arrays"], len(stored) == len(built.digests)
({}, 200, True)
>>> tables = TableReader(lambda digest: stored[digest])
>>> read, used = tables.read(built.tables)
>>> read == entries and used == built.digests
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

from ._leaves import add_entries, parse_rows
from .bulk import paused_collector
from .manifest import ArrayEntry, ParsedLayout, check_array_name, layout_to_json, parse_layout
from .objects import DIGEST_BYTES, object_key
from .packs import (
    MAX_OFFSET,
    PACKED_CHUNKS,
    Location,
    pack_list_to_json,
    parse_pack_list,
    where_from_json,
    where_to_json,
)

__all__ = ["BLOCK_CHUNKS", "FANOUT", "INLINE_ARRAYS", "INLINE_CHUNKS", "PREFIX", "Built",
           "TableReader", "TableWriter", "table_key"]

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
_CACHED_BYTES = 64 << 20  # table objects kept by a reader, by their stored size


def table_key(digest: bytes) -> str:
    """The storage key of the table object with `digest`.

    >>> table_key(bytes(32))[:10]
    'tables/00/'
    """
    return object_key(digest, PREFIX)


def _ends_node(name: str, level: int) -> bool:
    return blake3.blake3(b"%d:" % level + name.encode("utf-8")).digest()[0] < 256 // FANOUT


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


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


_REMEMBERED_LAYOUTS = 4096  # distinct layouts a writer or reader keeps parsed or encoded


def _remembered(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by `make` the first time; a full cache starts again empty."""
    found = cache.get(key)
    if found is None:
        found = make()
        if len(cache) >= _REMEMBERED_LAYOUTS:
            cache.clear()
        cache[key] = found
    return found


class TableWriter:
    """Turns a snapshot's entries into table objects, writing only those not written before.

    ``build``'s `put(digest, data)` stores a table object (create-only). What was built is
    remembered by
    the identity of the entries, so an unchanged array costs a dictionary lookup. Every
    object a build uses that the last committed snapshot did not is put again (the
    storage finds most present): one written for a capture that failed may have been
    collected since.
    """

    def __init__(self, version: int = 2) -> None:
        self.version = version  # of the manifests built: 3 lists where packed chunks are
        self._put: Callable[[bytes, bytes], object] = _no_put  # the build's, while it runs
        self._entries: dict[str, tuple[ArrayEntry, Any, frozenset[bytes]]] = {}
        # Leaves by their names: the entries they were built of (held, so that identity
        # means what it says), their digest and the blocks below them.
        self._leaves: dict[tuple[str, ...], tuple[tuple[ArrayEntry, ...], bytes,
                                                 frozenset[bytes]]] = {}
        # Inner nodes by their children's digests.
        self._inners: dict[tuple[bytes, ...], bytes] = {}
        # Every table object under a node (blocks, nodes), the node included.
        self._subtree: dict[bytes, frozenset[bytes]] = {}
        self._data: dict[bytes, bytes] = {}  # what each object built holds
        self._committed: frozenset[bytes] = frozenset()
        self._written: set[bytes] = set()  # put during the build under way
        self._names: list[str] = []
        self._ends: dict[tuple[str, int], bool] = {}
        self._layout_texts: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}

    def _chunks(self, entry: ArrayEntry) -> tuple[Any, frozenset[bytes]]:
        """The entry's ``chunks`` field: the digests, or the blocks holding them."""
        if entry.n_chunks <= INLINE_CHUNKS:
            return _b64(entry.digests), frozenset()
        blocks = []
        step = BLOCK_CHUNKS * DIGEST_BYTES
        for start in range(0, len(entry.digests), step):
            block = entry.digests[start : start + step]
            blocks.append(self._store(block))
        return {"blocks": [_b64(d) for d in blocks]}, frozenset(blocks)

    def _entry(self, entry: ArrayEntry) -> tuple[Any, frozenset[bytes]]:
        cached = self._entries.get(entry.name)
        if cached is not None and cached[0] is entry:
            return cached[1], cached[2]
        chunks, blocks = self._chunks(entry)
        self._entries[entry.name] = (entry, chunks, blocks)
        return chunks, blocks

    def _store(self, data: bytes) -> bytes:
        digest = blake3.blake3(data).digest()
        self._put(digest, data)
        self._data[digest] = data
        self._written.add(digest)
        return digest

    def build(self, entries: Mapping[str, ArrayEntry],
              put: Callable[[bytes, bytes], object]) -> Built:
        """The manifest's view of `entries`, writing the table objects it needs with `put`
        first."""
        self._put, self._written = put, set()
        try:
            built = self._build(entries)
            for digest in built.digests - self._committed - self._written:
                put(digest, self._data[digest])
        finally:
            self._put = _no_put
        return built

    def committed(self, built: Built) -> None:
        """`built` is in a committed snapshot: its objects need not be put again."""
        self._committed = built.digests
        self.trim()

    def _build(self, entries: Mapping[str, ArrayEntry]) -> Built:
        used: set[bytes] = set()
        for name in set(self._entries) - set(entries):
            del self._entries[name]
        if len(entries) <= INLINE_ARRAYS:
            arrays = {}
            packs: list[bytes] = []
            listed: dict[bytes, int] = {}
            for name, entry in entries.items():
                chunks, blocks = self._entry(entry)
                arrays[name] = {**layout_to_json(entry), "chunks": chunks}
                if entry.where is not None:
                    arrays[name]["where"] = where_to_json(entry.where, packs, listed)
                used |= blocks
            return Built(arrays, None, frozenset(used), self.version, pack_list_to_json(packs))
        if len(self._names) != len(entries) or set(self._names) != set(entries):
            self._names = sorted(entries)
        level: list[tuple[str, int, bytes]] = []
        group: list[str] = []
        for name in self._names:
            group.append(name)
            if ((len(group) >= MIN_FANOUT and self._ends_at(name, 0))
                    or len(group) >= MAX_FANOUT):
                level.append(self._leaf(group, entries, used))
                group = []
        if group:
            level.append(self._leaf(group, entries, used))
        depth = 1
        while len(level) > FANOUT:
            level = self._inner_level(level, depth, used)
            depth += 1
        tables = {"arrays": len(entries), "depth": depth,
                  "children": [[first, count, _b64(digest)] for first, count, digest in level]}
        return Built({}, tables, frozenset(used), self.version)

    def _ends_at(self, name: str, level: int) -> bool:
        key = (name, level)
        ends = self._ends.get(key)
        if ends is None:
            ends = self._ends[key] = _ends_node(name, level)
        return ends

    def _leaf(self, names: list[str], entries: Mapping[str, ArrayEntry],
              used: set[bytes]) -> tuple[str, int, bytes]:
        members = tuple(entries[name] for name in names)
        key = tuple(names)
        cached = self._leaves.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[0], members, strict=True)):
            layouts: dict[str, int] = {}
            layout_list: list[Any] = []
            rows = []
            blocks: set[bytes] = set()
            packs: list[bytes] = []
            listed: dict[bytes, int] = {}
            for entry in members:
                chunks, entry_blocks = self._entry(entry)
                blocks |= entry_blocks
                layout, text = self._layout_json(entry)
                index = layouts.get(text)
                if index is None:
                    index = layouts[text] = len(layout_list)
                    layout_list.append(layout)
                row = [entry.name, index, chunks]
                if entry.where is not None:
                    row.append(where_to_json(entry.where, packs, listed))
                rows.append(row)
            body: dict[str, Any] = {"layouts": layout_list, "arrays": rows}
            if packs:
                body["packs"] = pack_list_to_json(packs)
            digest = self._node(body, blocks)
            cached = self._leaves[key] = (members, digest, frozenset(blocks))
        used |= self._subtree[cached[1]]
        return names[0], len(names), cached[1]

    def _layout_json(self, entry: ArrayEntry) -> tuple[dict[str, Any], str]:
        """An entry's layout fields as JSON, and their text (which tells equal layouts of a
        leaf apart), remembered by layout: many arrays share a few, and a JSON text an entry
        cost a fifth of building a leaf."""
        def encode() -> tuple[dict[str, Any], str]:
            layout = layout_to_json(entry)
            return layout, json.dumps(layout, sort_keys=True)

        return _remembered(self._layout_texts, (entry.layout, entry.dims), encode)

    def _inner_level(self, children: list[tuple[str, int, bytes]], depth: int,
                     used: set[bytes]) -> list[tuple[str, int, bytes]]:
        level = []
        group: list[tuple[str, int, bytes]] = []
        for child in children:
            group.append(child)
            if ((len(group) >= MIN_FANOUT and self._ends_at(child[0], depth))
                    or len(group) >= MAX_FANOUT):
                level.append(self._inner(group, used))
                group = []
        if group:
            level.append(self._inner(group, used))
        return level

    def _inner(self, group: list[tuple[str, int, bytes]],
               used: set[bytes]) -> tuple[str, int, bytes]:
        key = tuple(child[2] for child in group)
        digest = self._inners.get(key)
        if digest is None or digest not in self._subtree:
            below: set[bytes] = set()
            for child in group:
                below |= self._subtree[child[2]]
            digest = self._node({"children": [[first, count, _b64(child_digest)]
                                              for first, count, child_digest in group]}, below)
            self._inners[key] = digest
        used |= self._subtree[digest]
        return group[0][0], sum(child[1] for child in group), digest

    def _node(self, body: dict[str, Any], below: set[bytes]) -> bytes:
        digest = self._store(json.dumps(body, separators=(",", ":")).encode("utf-8"))
        self._subtree[digest] = frozenset(below | {digest})
        return digest

    def trim(self) -> None:
        """Forget nodes built long ago (call after a commit): past a few times the nodes of
        one snapshot, all are forgotten, and the next build writes its nodes anew (the
        storage finds them present)."""
        if len(self._data) > 4 * (len(self._entries) // FANOUT + 16) + len(self._entries):
            self._leaves.clear()
            self._inners.clear()
            self._subtree.clear()
            self._entries.clear()
            self._data.clear()
        if len(self._ends) > 4 * len(self._entries) + 1024:  # names that came and went
            self._ends.clear()


class TableReader:
    """Reads table objects (`fetch(digest)` returns the stored bytes), checking each
    against its name, and keeps recently read nodes: snapshots share most of them."""

    def __init__(self, fetch: Callable[[bytes], bytes]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._cached_bytes = 0
        self._layouts: dict[tuple[Any, ...], ParsedLayout] = {}

    def _object(self, digest: bytes) -> bytes:
        data = self._fetch(digest)
        if len(data) > MAX_NODE_BYTES:
            raise ValueError(f"table object {digest.hex()[:16]} is too large")
        if blake3.blake3(data).digest() != digest:
            raise ValueError(f"table object {digest.hex()[:16]} does not match its name "
                             "(damaged)")
        return data

    def _cached(self, digest: bytes, parse: Callable[[bytes], Any]) -> Any:
        with self._lock:
            found = self._cache.get(digest)
            if found is not None:
                self._cache.move_to_end(digest)
                return found[0]
        data = self._object(digest)
        value = parse(data)
        with self._lock:
            if digest not in self._cache:
                self._cache[digest] = (value, len(data))
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

    def read(self, tables: object) -> tuple[dict[str, ArrayEntry], frozenset[bytes]]:
        """The entries of a manifest's ``tables`` field, and every table object used;
        ValueError for anything malformed (the caller says which snapshot)."""
        if not isinstance(tables, dict):
            raise ValueError("tables must be an object")
        count, depth, children = tables.get("arrays"), tables.get("depth"), tables.get("children")
        if (type(count) is not int or not 0 <= count <= MAX_ARRAYS or type(depth) is not int
                or not 1 <= depth <= MAX_DEPTH or not isinstance(children, list)):
            raise ValueError("tables must give arrays, depth (1 to 8) and children")
        used: set[bytes] = set()
        entries: dict[str, ArrayEntry] = {}
        with paused_collector():
            self._children(children, depth, entries, used, [])
        if len(entries) != count:
            raise ValueError(f"tables hold {len(entries)} arrays, the manifest says {count}")
        return entries, frozenset(used)

    def _children(self, children: list[Any], depth: int, entries: dict[str, ArrayEntry],
                  used: set[bytes], last: list[str]) -> str | None:
        """Read `children` (at `depth`) into `entries`; return the first name read. `last`
        holds the last name read so far (names must increase across the whole tree)."""
        first_read = None
        for child in children:
            if (not isinstance(child, list) or len(child) != 3 or not isinstance(child[0], str)
                    or type(child[1]) is not int):
                raise ValueError("a child must be [first name, arrays, digest]")
            digest = _digest_of(child[2])
            used.add(digest)
            before = len(entries)
            if depth == 1:
                first, newest = add_entries(self._cached(digest, self._parse_leaf), entries,
                                            last[0] if last else None,
                                            lambda item: self._blocks_of(item, used))
                if newest is not None:
                    last[:] = [newest]
            else:
                first = self._children(self._cached(digest, _parse_inner), depth - 1, entries,
                                       used, last)
            if len(entries) - before != child[1] or (first is not None and first != child[0]):
                raise ValueError(f"table node {digest.hex()[:16]} does not hold what its "
                                 "parent says")
            first_read = first if first_read is None else first_read
        return first_read

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
                return _remembered(self._layouts, key, lambda: parse_layout(value))
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


def _no_put(digest: bytes, data: bytes) -> None:
    raise RuntimeError("table objects are written only during TableWriter.build")


def _with_digests(entry: ArrayEntry, digests: bytes) -> ArrayEntry:
    complete = ArrayEntry(entry.name, entry.shape, entry.dtype, entry.order, entry.split_axis,
                          entry.rows_per_chunk, digests, entry.dims)
    if len(digests) != complete.layout.n_chunks * DIGEST_BYTES:
        raise ValueError(f"array {entry.name!r}: chunk table has "
                         f"{len(digests) // DIGEST_BYTES} digests, layout needs "
                         f"{complete.layout.n_chunks}")
    return complete


def _parse_inner(data: bytes) -> list[Any]:
    body = _json(data)
    children = body.get("children")
    if not isinstance(children, list) or len(children) > MAX_ARRAYS:
        raise ValueError("an inner node must hold children")
    return children


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
