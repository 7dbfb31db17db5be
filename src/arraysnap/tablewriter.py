"""Writing format 2's table objects (see ``arraysnap.tables``): a snapshot's entries made a
tree of nodes and digest blocks, built incrementally, writing only what earlier snapshots
did not.

>>> import numpy as np
>>> from arraysnap.manifest import ArrayEntry
>>> stored = {}
>>> entries = {f"a{i:03d}": ArrayEntry(f"a{i:03d}", (1,), np.dtype("f8"), "C", 0, 1,
...                                    bytes([i]) * 32) for i in range(100)}
>>> built = TableWriter(2).build(entries, lambda digest, data: stored.setdefault(digest, data))
>>> built.tables["arrays"], len(stored) == len(built.digests)
(100, True)
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import blake3

from .manifest import ArrayEntry, layout_to_json
from .objects import DIGEST_BYTES
from .packs import Location, new_pack_id, pack_list_to_json, where_to_json
from .tables import (
    BLOCK_CHUNKS,
    COLUMNAR_LEAVES,
    FANOUT,
    INLINE_ARRAYS,
    INLINE_CHUNKS,
    MAX_FANOUT,
    MIN_FANOUT,
    PACKED_NODES,
    Built,
    remembered,
)

__all__ = ["TableWriter"]


def _ends_node(name: str, level: int) -> bool:
    return blake3.blake3(b"%d:" % level + name.encode("utf-8")).digest()[0] < 256 // FANOUT


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class TableWriter:
    """Turns a snapshot's entries into table objects, writing only those not written before.

    ``build``'s `put(digest, data)` stores a table object (create-only), and (format 4)
    `put_pack(pack, data)` the pack of the nodes it wrote. What was built is remembered by
    the identity of the entries, so an unchanged array costs a dictionary lookup. Every
    object a build uses that the last committed snapshot did not is put again (the
    storage finds most present), and every such node goes into the build's pack again:
    one written for a capture that failed may have been collected since, or its pack never
    written. A parent is remembered by where its children are, so a child placed anew
    makes a new parent.
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
        # Format 4: where the last committed snapshot's nodes are, the nodes the build under
        # way placed (in its pack, or where that snapshot has them), and its pack.
        self._committed_nodes: Mapping[bytes, Location] = {}
        self._placed: dict[bytes, Location] = {}
        self._pack = b""
        self._pack_data = bytearray()

    def _chunks(self, entry: ArrayEntry) -> tuple[Any, frozenset[bytes]]:
        """The entry's ``chunks`` field: the digests, or the blocks holding them."""
        if entry.n_chunks <= INLINE_CHUNKS:
            return _b64(entry.digests), frozenset()
        blocks = []
        step = BLOCK_CHUNKS * DIGEST_BYTES
        for start in range(0, len(entry.digests), step):
            block = entry.digests[start : start + step]
            blocks.append(self._store_object(block))
        return {"blocks": [_b64(d) for d in blocks]}, frozenset(blocks)

    def _entry(self, entry: ArrayEntry) -> tuple[Any, frozenset[bytes]]:
        cached = self._entries.get(entry.name)
        if cached is not None and cached[0] is entry:
            return cached[1], cached[2]
        chunks, blocks = self._chunks(entry)
        self._entries[entry.name] = (entry, chunks, blocks)
        return chunks, blocks

    def _store_object(self, data: bytes) -> bytes:
        digest = blake3.blake3(data).digest()
        self._put(digest, data)
        self._data[digest] = data
        self._written.add(digest)
        return digest

    def _place(self, digest: bytes) -> Location:
        """Where the packed node `digest` is for the build under way: where the last
        committed snapshot or this build has it, else appended to this build's pack."""
        location = self._placed.get(digest)
        if location is not None:
            return location
        location = self._committed_nodes.get(digest)
        if location is None:
            data = self._data[digest]
            if not self._pack_data:
                self._pack = new_pack_id()
            location = Location(self._pack, len(self._pack_data), len(data))
            self._pack_data += data
        self._placed[digest] = location
        return location

    def build(self, entries: Mapping[str, ArrayEntry], put: Callable[[bytes, bytes], object],
              put_pack: Callable[[bytes, bytes], object] | None = None) -> Built:
        """The manifest's view of `entries`, writing the table objects it needs with `put`
        (and, format 4, the pack of its new nodes with `put_pack`) first."""
        if self.version >= PACKED_NODES and put_pack is None:
            raise ValueError(f"format {self.version} writes its nodes with put_pack")
        self._put, self._written, self._placed = put, set(), {}
        self._pack_data = bytearray()
        try:
            built = self._build(entries)
            for digest in built.digests - self._committed - self._written - built.packed:
                put(digest, self._data[digest])
            if self._pack_data:
                assert put_pack is not None
                put_pack(self._pack, bytes(self._pack_data))
        finally:
            self._put = _no_put
            self._pack_data = bytearray()
        return built

    def committed(self, built: Built) -> None:
        """`built` is in a committed snapshot: its objects need not be put again."""
        self._committed, self._committed_nodes = built.digests, built.nodes
        self.trim()

    def resume(self, objects: frozenset[bytes], nodes: Mapping[bytes, Location]) -> None:
        """Go on from a committed snapshot this writer did not build (the newest, when a
        store is opened): its table objects of their own and where its nodes are. A node
        built again from the same entries has the same bytes, so it stays where it is;
        without this, the first capture after an open packed the whole tree again (0.85 MB
        at 10,000 arrays)."""
        self._committed, self._committed_nodes = objects | frozenset(nodes), dict(nodes)

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
        tables = {"arrays": len(entries), "depth": depth, **self._refs(level)}
        return Built({}, tables, frozenset(used), self.version, nodes=dict(self._placed))

    def _refs(self, children: list[tuple[str, int, bytes]]) -> dict[str, Any]:
        """A parent's fields naming `children`: their digests and (format 4) locations."""
        if self.version < PACKED_NODES:
            return {"children": [[first, count, _b64(digest)]
                                 for first, count, digest in children]}
        packs: list[bytes] = []
        listed: dict[bytes, int] = {}
        rows = []
        for first, count, digest in children:
            location = self._place(digest)
            index = listed.get(location.pack)
            if index is None:
                index = listed[location.pack] = len(packs)
                packs.append(location.pack)
            rows.append([first, count, _b64(digest), index, location.offset, location.length])
        return {"packs": pack_list_to_json(packs), "children": rows}

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
            blocks: set[bytes] = set()
            body = (self._columns(members, blocks) if self.version >= COLUMNAR_LEAVES
                    else self._rows(members, blocks))
            digest = self._node(body, blocks)
            cached = self._leaves[key] = (members, digest, frozenset(blocks))
        used |= self._subtree[cached[1]]
        return names[0], len(names), cached[1]

    def _rows(self, members: tuple[ArrayEntry, ...], blocks: set[bytes]) -> dict[str, Any]:
        """A leaf before format 5: a row ``[name, layout, chunks(, where)]`` an array."""
        layouts: dict[str, int] = {}
        layout_list: list[Any] = []
        rows = []
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
        return body

    def _columns(self, members: tuple[ArrayEntry, ...], blocks: set[bytes]) -> dict[str, Any]:
        """A format-5 leaf: its arrays by column (see ``arraysnap.tables``)."""
        layouts: dict[str, int] = {}
        layout_list: list[Any] = []
        names, layout_of, digests, where, in_blocks = [], [], [], [], []
        packs: list[bytes] = []
        listed: dict[bytes, int] = {}
        for row, entry in enumerate(members):
            layout, text = self._layout_json(entry)
            index = layouts.get(text)
            if index is None:
                index = layouts[text] = len(layout_list)
                layout_list.append(layout)
            names.append(entry.name)
            layout_of.append(index)
            if entry.n_chunks > INLINE_CHUNKS:
                chunks, entry_blocks = self._entry(entry)
                blocks |= entry_blocks
                in_blocks.append([row, chunks["blocks"]])
                continue
            digests.append(entry.digests)
            if entry.where is None:
                where += (-1, 0, 0) * entry.n_chunks
            else:
                where += where_to_json(entry.where, packs, listed)
        body: dict[str, Any] = {
            "layouts": layout_list, "names": names, "layout": layout_of,
            "digests": _b64(b"".join(digests)),
            "where": _b64(struct.pack(f"<{len(where)}q", *where)),
        }
        if packs:
            body["packs"] = pack_list_to_json(packs)
        if in_blocks:
            body["blocks"] = in_blocks
        return body

    def _layout_json(self, entry: ArrayEntry) -> tuple[dict[str, Any], str]:
        """An entry's layout fields as JSON, and their text (which tells equal layouts of a
        leaf apart), remembered by layout: many arrays share a few, and a JSON text an entry
        cost a fifth of building a leaf."""
        def encode() -> tuple[dict[str, Any], str]:
            layout = layout_to_json(entry)
            return layout, json.dumps(layout, sort_keys=True)

        return remembered(self._layout_texts, (entry.layout, entry.dims), encode)

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
        refs = self._refs(group)
        # By the children's digests and, format 4, where this build has them.
        key = tuple((child[2], self._placed.get(child[2])) for child in group)
        digest = self._inners.get(key)
        if digest is None or digest not in self._subtree:
            below: set[bytes] = set()
            for child in group:
                below |= self._subtree[child[2]]
            digest = self._node(refs, below)
            self._inners[key] = digest
        used |= self._subtree[digest]
        return group[0][0], sum(child[1] for child in group), digest

    def _node(self, body: dict[str, Any], below: set[bytes]) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        if self.version < PACKED_NODES:
            digest = self._store_object(data)
        else:  # placed in the build's pack by its parent (_refs)
            digest = blake3.blake3(data).digest()
            self._data[digest] = data
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


def _no_put(digest: bytes, data: bytes) -> None:
    raise RuntimeError("table objects are written only during TableWriter.build")
