"""The leaf kernel (``arraysnap._leaves``) against a pure-Python reference of it: the same
entries from well-formed rows, the same error from malformed ones."""

from __future__ import annotations

import base64
import binascii
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arraysnap import _leaves
from arraysnap.manifest import ArrayEntry, check_array_name, entry_of, parse_layout
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
    expected, got = _outcome(reference_rows, rows), _outcome(kernel_rows, rows)
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
