"""The leaf kernel (``arraysnap._leaves``) against a pure-Python reference of it: the same
entries from well-formed rows, the same error from malformed ones."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gc
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arraysnap import _leaves
from arraysnap.manifest import (
    ArrayEntry,
    check_array_name,
    check_array_names,
    entry_of,
    parse_layout,
)
from arraysnap.objects import DIGEST_BYTES
from arraysnap.packs import MAX_OFFSET, Location, where_from_json
from arraysnap.tables import TableReader

LAYOUTS = [parse_layout({"shape": [4], "dtype": "<f8", "order": "C", "split_axis": 0,
                         "rows_per_chunk": 4}),
           parse_layout({"shape": [6, 2], "dtype": "<i2", "order": "F", "split_axis": 0,
                         "rows_per_chunk": 1, "dims": ["y", "x"]})]
PACKS = [bytes(range(16)), bytes(16)]


def reference_rows(rows, layouts, packs):
    """The loop of TableReader._parse_leaf before the kernel, in Python."""
    result = []
    for row in rows:
        if (type(row) is not list or not 3 <= len(row) <= 4 or type(row[1]) is not int
                or not 0 <= row[1] < len(layouts)):
            raise ValueError("a leaf row must be [name, layout, chunks] or [name, layout, "
                             "chunks, where]")
        name, index, chunks = row[0], row[1], row[2]
        check_array_name(name)
        if type(chunks) is str:
            try:
                digests = binascii.a2b_base64(chunks, strict_mode=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"array {name!r}: chunks is not valid base64") from None
            where = None
            if len(row) == 4:
                try:
                    where = where_from_json(row[3], layouts[index].n_chunks, packs)
                except ValueError as err:
                    raise ValueError(f"array {name!r}: {err}") from None
            result.append(entry_of(name, layouts[index], digests, where=where))
        elif len(row) == 4:
            raise ValueError(f"array {name!r}: an array whose digests are in blocks is "
                             "never packed")
        else:
            result.append((entry_of(name, layouts[index], b"", check_table=False), chunks))
    return result


def kernel_rows(rows, layouts, packs):
    result: list = []
    _leaves.parse_rows(rows, layouts, packs, check_array_name, where_from_json, ArrayEntry,
                       DIGEST_BYTES, Location, MAX_OFFSET, result)
    return result


def _outcome(parse, rows):
    try:
        return "ok", parse(rows, LAYOUTS, PACKS)
    except (ValueError, TypeError) as err:
        return type(err).__name__, str(err)


def _b64(count: int) -> str:
    return base64.b64encode(bytes(count * DIGEST_BYTES)).decode()


_where = st.one_of(
    st.lists(st.integers(-2, 3), min_size=3, max_size=3),
    st.tuples(st.integers(-1, 2), st.sampled_from([0, 5, MAX_OFFSET - 1, MAX_OFFSET]),
              st.integers(-1, 9)).map(list),
    st.lists(st.sampled_from([0, 1, -1, 7]), min_size=0, max_size=18),
    st.sampled_from([None, "x", [True, 0, 1], [0, 0.5, 1], [0, 1, 2, 3]]))
_chunks = st.one_of(st.integers(0, 7).map(_b64), st.sampled_from(["@@", "", "QQ", 5]),
                    st.just({"blocks": []}))
_row = st.one_of(
    st.tuples(st.sampled_from(["u", "a b", "", "__x", "a/b", 3, "zarr.json"]),
              st.sampled_from([0, 1, 2, -1, True, 0.0]), _chunks).map(list),
    st.tuples(st.sampled_from(["u", "v"]), st.sampled_from([0, 1]), _chunks,
              _where).map(list),
    st.sampled_from([["u"], ["u", 0, "", None, 1], "row", None, ("u", 0, "")]))


@settings(max_examples=400, deadline=None)
@given(rows=st.lists(_row, max_size=6))
def test_the_kernel_parses_rows_exactly_as_the_reference_does(rows):
    _assert_same_outcome(_outcome(kernel_rows, rows), _outcome(reference_rows, rows))


def _assert_same_outcome(got, expected):
    """The kernel's outcome is the reference's: the same error, or the same entries."""
    assert got[0] == expected[0]
    if expected[0] != "ok":
        assert got[1] == expected[1]
        return
    assert len(got[1]) == len(expected[1])
    for mine, theirs in zip(got[1], expected[1], strict=True):
        if isinstance(theirs, tuple):
            assert isinstance(mine, tuple) and mine[1] == theirs[1]
            mine, theirs = mine[0], theirs[0]
        for field in dataclasses.fields(ArrayEntry):
            assert getattr(mine, field.name) == getattr(theirs, field.name), field.name
        assert mine.layout is theirs.layout
        assert mine.where is None or all(type(w) in (Location, type(None)) for w in mine.where)


def test_the_kernel_sets_every_field_an_entry_has():
    assert _leaves.FIELDS == tuple(field.name for field in dataclasses.fields(ArrayEntry))


def test_one_chunk_locations_from_the_kernel_are_locations():
    rows = [["u", 0, _b64(1), [1, 40, 12]]]
    (entry,) = kernel_rows(rows, LAYOUTS, PACKS)
    assert entry.where == (Location(PACKS[1], 40, 12),)
    assert type(entry.where[0]) is Location and entry.location(0).offset == 40


@pytest.mark.parametrize("bad", [
    {"shape": [True], "dtype": "<f8", "order": "C", "split_axis": 0, "rows_per_chunk": 1},
    {"shape": [1], "dtype": "<f8", "order": "C", "split_axis": False, "rows_per_chunk": 1},
    {"shape": [1], "dtype": "<f8", "order": "C", "split_axis": 0, "rows_per_chunk": True},
])
def test_a_remembered_layout_never_stands_for_a_malformed_one_equal_to_it(bad):
    reader = TableReader(lambda digest: b"")
    good = {"shape": [1], "dtype": "<f8", "order": "C", "split_axis": 0, "rows_per_chunk": 1}
    assert reader._layout(good).n_chunks == 1
    assert reader._layout(dict(good)) is reader._layout(good)  # remembered
    with pytest.raises(ValueError):
        reader._layout(bad)
    assert np.dtype("<f8") == reader._layout(good).dtype


# -- format 5: a leaf's columns --------------------------------------------------------------
_COLUMNS = ("a leaf must give one layout for each name, and where a whole number of [pack, "
            "offset, length]")
_BLOCKS = ("a leaf's blocks must be [row, refs] items, rows in increasing order, each a row "
           "of the leaf")


def reference_columns(names, layout_of, layouts, digests, where, blocks, packs):
    """``_leaves.parse_columns`` in Python: the format-5 leaf as docs/format.md gives it."""
    n = len(names)
    if len(layout_of) != n or len(where) % 24:
        raise ValueError(_COLUMNS)
    values = struct.unpack(f"<{len(where) // 8}q", where)

    def block_row(block, after):
        item = blocks[block]
        if (type(item) is not list or len(item) != 2 or type(item[0]) is not int
                or not after < item[0] < n):
            raise ValueError(_BLOCKS)
        return item[0]

    next_block = block_row(0, -1) if blocks else -1
    block = taken = placed = 0
    result = []
    for row, name in enumerate(names):
        index = layout_of[row]
        if type(index) is not int or not 0 <= index < len(layouts):
            raise ValueError(f"array {name!r}: layout {index!r} is not one of the leaf's "
                             f"{len(layouts)}")
        layout = layouts[index]
        if row == next_block:
            result.append((entry_of(name, layout, b"", check_table=False),
                           {"blocks": blocks[block][1]}))
            block += 1
            next_block = block_row(block, row) if block < len(blocks) else -1
            continue
        n_chunks = layout.n_chunks
        if (taken + n_chunks * DIGEST_BYTES > len(digests)
                or placed + n_chunks > len(values) // 3):
            raise ValueError(f"array {name!r}: the leaf's digests or where end before its "
                             f"{n_chunks} chunks")
        chunk_digests = digests[taken : taken + n_chunks * DIGEST_BYTES]
        taken += n_chunks * DIGEST_BYTES
        locations = []
        for chunk in range(n_chunks):
            pack, offset, length = values[3 * (placed + chunk) : 3 * (placed + chunk) + 3]
            if (pack, offset, length) == (-1, 0, 0):
                locations.append(None)
                continue
            if not (0 <= pack < len(packs) and 0 <= offset < MAX_OFFSET and 0 < length):
                raise ValueError(f"array {name!r}: chunk {chunk} is in pack {pack} at "
                                 f"{offset}+{length}: out of range")
            locations.append(Location(packs[pack], offset, length))
        placed += n_chunks
        packed = any(location is not None for location in locations)
        result.append(entry_of(name, layout, chunk_digests,
                               where=tuple(locations) if packed else None))
    if taken != len(digests) or placed != len(values) // 3:
        raise ValueError("a leaf's digests or where hold more than its arrays' chunks")
    return result


def kernel_columns(names, layout_of, layouts, digests, where, blocks, packs):
    result: list = []
    _leaves.parse_columns(names, layout_of, layouts, digests, where, blocks, packs, ArrayEntry,
                          DIGEST_BYTES, Location, MAX_OFFSET, result)
    return result


_triple = st.one_of(
    st.tuples(st.integers(0, 1), st.integers(0, 99), st.integers(1, 50)),
    st.just((-1, 0, 0)),
    st.tuples(st.sampled_from([-2, -1, 0, 1, 2, 1 << 40]),
              st.sampled_from([0, -1, 5, MAX_OFFSET - 1, MAX_OFFSET]),
              st.sampled_from([0, 1, -5, 7])),
)


@st.composite
def _columns(draw):
    names = draw(st.lists(st.sampled_from("uvwxyz"), max_size=5, unique=True))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    layout_of = draw(st.lists(st.sampled_from([0, 0, 1, 1, 2, -1, True, "0"]),
                              min_size=max(0, len(names) + extra),
                              max_size=max(0, len(names) + extra)))
    digests = draw(st.integers(0, 14).map(lambda n: bytes(range(n)) * DIGEST_BYTES))
    triples = draw(st.lists(_triple, max_size=14))
    where = struct.pack(f"<{3 * len(triples)}q", *(v for t in triples for v in t))
    where += draw(st.sampled_from([b"", b"", b"", b"x", bytes(8)]))
    blocks = draw(st.lists(st.one_of(
        st.tuples(st.integers(-1, 6), st.sampled_from([[], ["ref"]])).map(list),
        st.sampled_from([[0], [True, []], ["0", []], (0, []), None])), max_size=3))
    return names, layout_of, digests, where, blocks


@settings(max_examples=600, deadline=None)
@given(columns=_columns())
def test_the_kernel_parses_columns_exactly_as_the_reference_does(columns):
    names, layout_of, digests, where, blocks = columns

    def outcome(parse):
        try:
            return "ok", parse(names, layout_of, LAYOUTS, digests, where, blocks, PACKS)
        except (ValueError, TypeError) as err:
            return type(err).__name__, str(err)

    _assert_same_outcome(outcome(kernel_columns), outcome(reference_columns))


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.one_of(
    st.sampled_from(["u", "a b", "", "__x", "a/b", "..", ".", "zarr.json", "a\nb", "é",
                     "x" * 255, "x" * 256, "\x7f", "a\\b", "zarr.jsonx", "._"]),
    st.text(max_size=4), st.integers(0, 3)), max_size=5))
def test_checking_many_names_at_once_is_checking_each(names):
    def each():
        for name in names:
            check_array_name(name)

    def outcome(check):
        try:
            check()
            return "ok"
        except (ValueError, TypeError) as err:
            return type(err).__name__, str(err)

    assert outcome(lambda: check_array_names(names)) == outcome(each)


def test_entries_of_a_leaf_are_left_out_of_the_cycle_collectors_work():
    """A fresh reader's collector traversed every entry, location and `where` of a table
    after its parse (3 ms at 10,000 arrays): the kernel makes them untracked, which is
    safe as they are immutable and hold no container but each other."""
    packs = [bytes(16)]
    where = struct.pack("<6q", 0, 8, 4, -1, 0, 0)
    (entry,) = kernel_columns(["u"], [1], LAYOUTS, bytes(range(32)) * 2, where, [], packs)
    assert entry.where[0] == Location(packs[0], 8, 4) and entry.where[1] is None
    assert not gc.is_tracked(entry) and not gc.is_tracked(entry.where)
    assert not gc.is_tracked(entry.where[0])
