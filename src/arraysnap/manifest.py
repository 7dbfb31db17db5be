"""Snapshot manifests: frozen dataclasses, their JSON form, and strict ``parse_*`` validators.

A manifest is ``snapshots/<seq>.json``; its appearance is a snapshot's commit point. It lists
every array's layout and the blake3 digest of every chunk (a base64 string of 32-byte
digests, 43 characters per chunk), the user's state and RNG state, the capture's statistics
and its own checksum. Anything read from disk is validated before it is used.

>>> entry = ArrayEntry("u", (4,), np.dtype("f8"), "C", 0, 4, bytes(32))
>>> m = Manifest(seq=1, step=10, time=0.0, parent=None, codec={"name": "none", "level": 0},
...              arrays={"u": entry})
>>> parse_manifest(m.to_json(), expected_seq=1).arrays["u"].shape
(4,)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import numpy as np

from .dtypes import dtype_from_json, dtype_to_json
from .errors import CorruptSnapshotError, FormatVersionError
from .layout import ChunkLayout, Order
from .objects import DIGEST_BYTES
from .packs import Location, parse_pack_list, where_from_json

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "ArrayEntry",
    "DeferredArrays",
    "Manifest",
    "ParsedLayout",
    "TableSource",
    "check_array_name",
    "check_array_names",
    "check_dims",
    "entry_of",
    "layout_to_json",
    "parse_array_entry",
    "parse_layout",
    "parse_manifest",
    "seal_manifest",
]

MANIFEST_FORMAT = "arraysnap-snapshot"
# 5: leaves by column; 4: packed table nodes; 3: packed chunks; 2: table objects; 1: whole
# tables.
MANIFEST_VERSION = 5
MAX_MANIFEST_BYTES = 1 << 28
_MAX_NDIM = 64
_MAX_ELEMENTS = 1 << 60


# A name of printable ASCII but / and \, not reserved, at most 255 bytes: the names the
# checks of check_array_name() pass among those, in one match (tables of 100,000 arrays).
_PLAIN_NAME = re.compile(r"(?!__)(?!\.\.?\Z)(?!zarr\.json\Z)[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255}")
# The same for names each followed by a newline (which no name holds): a leaf's at once.
_PLAIN_NAMES = re.compile(
    r"(?:(?!__)(?!\.\.?\n)(?!zarr\.json\n)[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255}\n)*")


def check_array_name(name: object) -> str:
    """Return `name` if it can name an array, else raise ValueError/TypeError saying why.

    >>> check_array_name("u")
    'u'
    >>> check_array_name("a/b")
    Traceback (most recent call last):
    ...
    ValueError: array name 'a/b' must not contain '/' or '\\\\'; use e.g. 'a_b'
    """
    if type(name) is str and _PLAIN_NAME.fullmatch(name):  # the checks below, at once
        return name
    if not isinstance(name, str):
        raise TypeError(f"array names must be strings, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError("array name must not be empty")
    if "/" in name or "\\" in name:
        raise ValueError(
            f"array name {name!r} must not contain '/' or '\\\\'; use e.g. "
            f"{name.replace('/', '_').replace(chr(92), '_')!r}"
        )
    if name in (".", ".."):
        raise ValueError(f"array name {name!r} is reserved; choose another")
    if name == "zarr.json":
        raise ValueError("array name 'zarr.json' is reserved: zarr keeps a group's metadata "
                         "under that name; choose another")
    if name.startswith("__"):
        raise ValueError(f"array name {name!r} is reserved by zarr (names starting with '__')")
    if not (name.isascii() and name.isprintable()) and any(  # printable ASCII: none of them
            unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn") for char in name):
        raise ValueError(f"array name {name!r} contains control or unassigned characters")
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"array name {name[:20]!r}... is longer than 255 bytes")
    return name


def check_array_names(names: list[Any]) -> None:
    """``check_array_name`` of each of `names`, in one match when all are plain (a match a
    name cost a fresh reader of 10,000 arrays 3.5 ms).

    >>> check_array_names(["u", "v"])
    >>> check_array_names(["u", "a/b"])
    Traceback (most recent call last):
    ...
    ValueError: array name 'a/b' must not contain '/' or '\\\\'; use e.g. 'a_b'
    """
    try:
        joined = "\n".join(names) + "\n" if names else ""
    except TypeError:  # a name that is not a string: named below
        joined = "/"
    # A name holding a newline would read as two names.
    if joined.count("\n") == len(names) and _PLAIN_NAMES.fullmatch(joined):
        return
    for name in names:
        check_array_name(name)


def check_dims(name: str, ndim: int, dims: object) -> tuple[str, ...]:
    """Dimension names for array `name`: one non-empty, distinct string per axis.

    >>> check_dims("u", 2, ["y", "x"])
    ('y', 'x')
    >>> check_dims("u", 2, ["x"])
    Traceback (most recent call last):
    ...
    ValueError: array 'u' has 2 dimensions but 1 dimension names were given: ['x']
    """
    if isinstance(dims, str) or not isinstance(dims, (list, tuple)) or not all(
            isinstance(dim, str) and dim and len(dim) <= 256 for dim in dims):
        raise ValueError(f"dimension names of array {name!r} must be a list of non-empty "
                         f"strings, got {dims!r}")
    if len(dims) != ndim:
        raise ValueError(f"array {name!r} has {ndim} dimensions but {len(dims)} dimension "
                         f"names were given: {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dimension names of array {name!r} repeat a name: {list(dims)}")
    return tuple(dims)


_LAYOUTS: dict[tuple[Any, ...], ChunkLayout] = {}


def _layout(shape: tuple[int, ...], dtype: np.dtype, order: Order, split_axis: int,
            rows: int) -> ChunkLayout:
    """The layout of these fields, shared by the entries that have the same: a table of
    thousands of arrays has a few distinct layouts."""
    key = (shape, dtype, order, split_axis, rows)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) >= 4096:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = ChunkLayout(shape, dtype, order, split_axis, rows)
    return layout


@dataclass(frozen=True, slots=True)
class ArrayEntry:
    """One array of a snapshot: its layout and the digest of each chunk.

    >>> ArrayEntry("u", (2,), np.dtype("u1"), "C", 0, 2, bytes(32)).digest(0) == bytes(32)
    True
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    order: Order
    split_axis: int
    rows_per_chunk: int
    digests: bytes
    dims: tuple[str, ...] | None = None
    # Derived from the fields above; given by a reader that parsed it once for many entries.
    layout: ChunkLayout = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    # Format 3: where each chunk is, a Location in a pack or None for a chunk object of its
    # own; None when every chunk is an object of its own.
    where: tuple[Location | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", _layout(self.shape, self.dtype, self.order,
                                                       self.split_axis, self.rows_per_chunk))

    @property
    def n_chunks(self) -> int:
        return len(self.digests) // DIGEST_BYTES

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES]

    def location(self, index: int) -> Location | None:
        """Where chunk `index` is packed; None when it is a chunk object of its own."""
        return None if self.where is None else self.where[index]

    def to_json(self) -> dict[str, Any]:
        """The entry of a format-1 manifest (which has no packs)."""
        if self.where is not None:
            raise ValueError(f"array {self.name!r} has packed chunks: format 1 cannot list it")
        return {**layout_to_json(self), "chunks": base64.b64encode(self.digests).decode("ascii")}


def layout_to_json(entry: ArrayEntry) -> dict[str, Any]:
    """An entry's fields but its chunk table, as a manifest stores them.

    >>> layout_to_json(ArrayEntry("u", (2,), np.dtype("u1"), "C", 0, 2, bytes(32)))["shape"]
    [2]
    """
    body: dict[str, Any] = {
        "shape": list(entry.shape),
        "dtype": dtype_to_json(entry.dtype),
        "order": entry.order,
        "split_axis": entry.split_axis,
        "rows_per_chunk": entry.rows_per_chunk,
    }
    if entry.dims is not None:  # absent unless given to capture(dims=...)
        body["dims"] = list(entry.dims)
    return body


@dataclass(frozen=True, slots=True)
class Manifest:
    """A committed snapshot's manifest. ``to_json`` adds the checksum; ``parse_manifest`` checks it.

    >>> Manifest(seq=3, step=None, time=1.5, parent=2, codec={"name": "none", "level": 0}).seq
    3
    """

    seq: int
    step: int | None
    time: float
    parent: int | None
    codec: Mapping[str, Any]
    arrays: Mapping[str, ArrayEntry] = field(default_factory=dict)
    state: Mapping[str, Any] | None = None
    rng: Any = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    # The replay log's position at this capture (the JSON field "journal").
    replay_position: int | None = None
    # The table objects of their own (format 2) it uses, by digest: kept while the
    # snapshot is.
    table_digests: frozenset[bytes] = frozenset()
    # Format 4: where each of its table nodes is (a writer that opens the store goes on
    # from them instead of packing the whole tree again).
    table_nodes: Mapping[bytes, Location] = field(default_factory=dict, repr=False,
                                                  compare=False)

    @property
    def table_packs(self) -> frozenset[bytes]:
        """The packs holding its table nodes (format 4), by id: kept while it is."""
        return frozenset(location.pack for location in self.table_nodes.values())

    def body(self, tables: Any = None) -> dict[str, Any]:
        """The manifest's JSON body: format 1, or format 2 to 4 with `tables` (a
        ``tables.Built``) in place of the full chunk table."""
        body: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": 1 if tables is None else tables.version,
            "seq": self.seq,
            "step": self.step,
            "time": self.time,
            "parent": self.parent,
            "codec": dict(self.codec),
            "arrays": ({name: entry.to_json() for name, entry in self.arrays.items()}
                       if tables is None else tables.arrays),
            "state": self.state,
            "rng": self.rng,
            "stats": dict(self.stats),
            "provenance": dict(self.provenance),
        }
        if self.replay_position is not None:  # absent in manifests from before the replay log
            body["journal"] = self.replay_position
        if tables is not None and tables.tables is not None:
            body["tables"] = tables.tables
        if tables is not None and tables.packs:
            body["packs"] = tables.packs
        return body

    def chunk_digests(self) -> set[bytes]:
        """Every chunk object this snapshot uses, by digest (packed chunks are not objects
        of their own: see `pack_ids`)."""
        found: set[bytes] = set()
        for entry in self.arrays.values():
            table = entry.digests
            if entry.where is None:
                found.update(table[i : i + DIGEST_BYTES]
                             for i in range(0, len(table), DIGEST_BYTES))
            else:
                found.update(table[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
                             for i, location in enumerate(entry.where) if location is None)
        return found

    def pack_ids(self) -> set[bytes]:
        """Every pack object (format 3) this snapshot uses a chunk of."""
        return {location.pack for entry in self.arrays.values() if entry.where is not None
                for location in entry.where if location is not None}

    def to_json(self, tables: Any = None) -> bytes:
        return seal_manifest(self.body(tables))


def seal_manifest(body: Mapping[str, Any]) -> bytes:
    """The bytes of a manifest of `body` with the checksum that matches it (any
    ``checksum`` in `body` is replaced): what a writer stores, and how the tests and the
    fuzzer make a hostile manifest that passes its checksum.

    >>> parse_manifest(seal_manifest({"format": "x"}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    arraysnap.errors.CorruptSnapshotError: manifest: not an arraysnap manifest
    """
    sealed = {key: value for key, value in body.items() if key != "checksum"}
    sealed["checksum"] = _checksum(sealed)
    return json.dumps(sealed, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return blake3.blake3(canonical.encode("utf-8")).hexdigest()


def _corrupt(seq: int | None, reason: str) -> CorruptSnapshotError:
    if seq is None:
        return CorruptSnapshotError(f"manifest: {reason}")
    return CorruptSnapshotError(reason, seq=seq)


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return type(value) is int


@dataclass(frozen=True, slots=True)
class ParsedLayout:
    """The layout fields of an entry, validated (shared by the entries of a table leaf)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    order: Order
    split_axis: int
    rows_per_chunk: int
    dims: tuple[str, ...] | None
    n_chunks: int
    layout: ChunkLayout


def parse_layout(value: object, name: str = "array") -> ParsedLayout:
    """Validate the layout fields of an entry (all but its name and chunk table).

    >>> parse_layout({"shape": [4], "dtype": "<f8", "order": "C", "split_axis": 0,
    ...               "rows_per_chunk": 2}).n_chunks
    2
    """
    _require(isinstance(value, dict), "array entry must be an object")
    assert isinstance(value, dict)
    shape = value.get("shape")
    _require(isinstance(shape, list) and len(shape) <= _MAX_NDIM, "shape must be a short list")
    assert isinstance(shape, list)
    _require(all(_is_int(d) and 0 <= d < _MAX_ELEMENTS for d in shape),
             "shape entries must be non-negative integers")
    _require(math.prod(shape) < _MAX_ELEMENTS, "shape is too large")
    dtype = dtype_from_json(value.get("dtype"))
    _require(dtype.itemsize * math.prod(shape) < _MAX_ELEMENTS, "array is too large")
    order = value.get("order")
    _require(order in ("C", "F"), "order must be 'C' or 'F'")
    split_axis, rows = value.get("split_axis"), value.get("rows_per_chunk")
    _require(_is_int(split_axis) and 0 <= split_axis <= max(0, len(shape) - 1),  # type: ignore[operator]
             "split_axis out of range")
    _require(_is_int(rows) and 1 <= rows < _MAX_ELEMENTS, "rows_per_chunk must be positive")  # type: ignore[operator]
    dims = value.get("dims")
    if dims is not None:
        dims = check_dims(name, len(shape), dims)
    layout = ChunkLayout(tuple(shape), dtype, order, split_axis, rows)  # type: ignore[arg-type]
    return ParsedLayout(tuple(shape), dtype, order, split_axis, rows, dims,  # type: ignore[arg-type]
                        layout.n_chunks, layout)


def parse_array_entry(name: str, value: object, *, layout: ParsedLayout | None = None,
                      check_table: bool = True, packs: list[bytes] | None = None) -> ArrayEntry:
    """Validate one array entry of a manifest (or of a table leaf, whose `layout` is
    parsed once for all entries that share it); `packs` is the manifest's list of packs
    (format 3), which an entry's ``where`` refers to."""
    check_array_name(name)
    if layout is None:
        layout = parse_layout(value, name)
    assert isinstance(value, dict)
    chunks = value.get("chunks")
    _require(isinstance(chunks, str), "chunks must be a base64 string")
    try:
        digests = base64.b64decode(chunks, validate=True)  # type: ignore[arg-type]
    except (binascii.Error, ValueError):
        raise ValueError("chunks is not valid base64") from None
    where = None
    if "where" in value:
        _require(packs is not None, "where is only valid in format 3")
        where = where_from_json(value["where"], layout.n_chunks, packs or [])
    return entry_of(name, layout, digests, check_table=check_table, where=where)


def entry_of(name: str, layout: ParsedLayout, digests: bytes, *,
             check_table: bool = True,
             where: tuple[Location | None, ...] | None = None) -> ArrayEntry:
    """The entry of array `name` (already checked) with `layout`, chunk `digests` and
    (format 3) `where` its chunks are; ValueError unless there is one digest per chunk."""
    _require(not check_table or len(digests) == layout.n_chunks * DIGEST_BYTES,
             f"chunk table has {len(digests) // DIGEST_BYTES} digests, layout needs "
             f"{layout.n_chunks}")
    return ArrayEntry(name, layout.shape, layout.dtype, layout.order, layout.split_axis,
                      layout.rows_per_chunk, digests, layout.dims, layout.layout, where)


class TableSource(Protocol):
    """Where a format-2 manifest's table objects are read (``tables.TableReader``)."""

    def chunks(self, name: str, value: object, used: set[bytes]) -> bytes: ...

    def read(self, tables: object, version: int = 2
             ) -> tuple[dict[str, ArrayEntry], frozenset[bytes], dict[bytes, Location]]: ...


class DeferredArrays(Mapping[str, ArrayEntry]):
    """A manifest's arrays whose chunk tables are read when first needed, by `load` (which
    raises what reading them raises: a snapshot pruned since, or damaged tables). `count`
    and `first_names` are what the manifest itself says of them: how many there are, and
    the first name of each subtree.

    >>> arrays = DeferredArrays(lambda: {"u": None}, 1, ["u"])
    >>> arrays.count, list(arrays), len(arrays)
    (1, ['u'], 1)
    """

    __slots__ = ("_load", "_loaded", "count", "first_names")

    def __init__(self, load: Any, count: object, first_names: list[object]) -> None:
        self._load = load
        self._loaded: Mapping[str, ArrayEntry] | None = None
        self.count = count if _is_int(count) else None
        self.first_names = first_names

    def _arrays(self) -> Mapping[str, ArrayEntry]:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def __getitem__(self, name: str) -> ArrayEntry:
        return self._arrays()[name]

    def __iter__(self) -> Any:
        return iter(self._arrays())

    def __len__(self) -> int:
        return len(self._arrays())

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self._arrays()),))  # copied or saved as a dict, read now


def parse_manifest(data: bytes, expected_seq: int | None = None,
                   tables: TableSource | None = None, *, defer: Any = None) -> Manifest:
    """Validate and parse a manifest file's bytes; `tables` reads the table objects a
    format-2 manifest refers to (each checked against its digest). With `defer` (a
    function that returns the arrays), a manifest whose arrays are in table objects gets
    ``DeferredArrays`` instead, and nothing of its tables is read or checked here.

    Raises FormatVersionError for a newer format, CorruptSnapshotError for anything else wrong.
    """
    label = f"snapshot {expected_seq}" if expected_seq is not None else "manifest"
    if len(data) > MAX_MANIFEST_BYTES:
        raise _corrupt(expected_seq, f"manifest is {len(data)} bytes, too large")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _corrupt(expected_seq, f"manifest is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise _corrupt(expected_seq, "manifest is not a JSON object")
    if body.get("format") != MANIFEST_FORMAT:
        raise _corrupt(expected_seq, "not an arraysnap manifest")
    version = body.get("version")
    if _is_int(version) and version > MANIFEST_VERSION:
        raise FormatVersionError(
            f"{label} was written with manifest version {version}, this arraysnap reads "
            f"version {MANIFEST_VERSION} and older; upgrade arraysnap"
        )
    try:
        _require(version in (1, 2, 3, 4, MANIFEST_VERSION),
                 f"unknown manifest version {version!r}")
        checksum = body.pop("checksum", None)
        _require(isinstance(checksum, str), "checksum missing")
        try:
            actual = _checksum(body)
        except (ValueError, RecursionError):
            raise ValueError("manifest holds values that cannot be checksummed") from None
        _require(actual == checksum, "checksum mismatch (the manifest was altered or damaged)")
        seq = body.get("seq")
        _require(_is_int(seq) and seq >= 0, "seq must be a non-negative integer")
        _require(expected_seq is None or seq == expected_seq,
                 f"seq {seq} does not match its file name")
        step, parent, time = body.get("step"), body.get("parent"), body.get("time")
        _require(step is None or _is_int(step), "step must be an integer or null")
        _require(parent is None or _is_int(parent), "parent must be an integer or null")
        _require(isinstance(time, (int, float)) and not isinstance(time, bool), "time")
        time = float(time)  # OverflowError for a huge int: caught below
        arrays_json = body.get("arrays")
        _require(isinstance(arrays_json, dict), "arrays must be an object")
        used: set[bytes] = set()
        table_nodes: dict[bytes, Location] = {}
        if version == 1:
            arrays = {name: parse_array_entry(name, value) for name, value in arrays_json.items()}
        elif defer is not None and isinstance(body.get("tables"), dict) and not arrays_json:
            root = body["tables"]
            children = root.get("children")
            arrays = DeferredArrays(defer, root.get("arrays"),
                                    [child[0] for child in children if isinstance(child, list)
                                     and child] if isinstance(children, list) else [])
        else:
            packs = parse_pack_list(body.get("packs", [])) if version >= 3 else None
            arrays = _parse_arrays_v2(arrays_json, body.get("tables"), tables, version,
                                      (used, table_nodes), packs)
        state = body.get("state")
        _require(state is None or isinstance(state, dict), "state must be an object or null")
        codec = body.get("codec")
        _require(isinstance(codec, dict), "codec must be an object")
        stats, provenance = body.get("stats", {}), body.get("provenance", {})
        _require(isinstance(stats, dict) and isinstance(provenance, dict), "stats/provenance")
        journal = body.get("journal")
        _require(journal is None or (_is_int(journal) and journal >= 0),
                 "journal must be a non-negative integer")
    except (ValueError, OverflowError, TypeError) as err:  # TypeError: a value's type
        raise _corrupt(expected_seq, str(err)) from None
    return Manifest(seq, step, time, parent, codec, arrays, state, body.get("rng"),
                    stats, provenance, journal, frozenset(used), table_nodes)


def _parse_arrays_v2(arrays_json: dict[str, Any], tables_json: object,
                     tables: TableSource | None, version: int,
                     used: tuple[set[bytes], dict[bytes, Location]],
                     packs: list[bytes] | None) -> dict[str, ArrayEntry]:
    needs_tables = tables_json is not None or any(
        isinstance(value, dict) and not isinstance(value.get("chunks"), str)
        for value in arrays_json.values())
    if needs_tables and tables is None:
        raise ValueError("the manifest refers to table objects, and none can be read here")
    arrays = {}
    for name, value in arrays_json.items():
        if isinstance(value, dict) and not isinstance(value.get("chunks"), str):
            assert tables is not None
            check_array_name(name)
            _require("where" not in value, f"array {name!r}: an array whose digests are in "
                     "blocks is never packed")
            arrays[name] = entry_of(name, parse_layout(value, name),
                                    tables.chunks(name, value.get("chunks"), used[0]))
        else:
            arrays[name] = parse_array_entry(name, value, packs=packs)
    if tables_json is not None:
        _require(not arrays, "a manifest lists its arrays or refers to tables, not both")
        assert tables is not None
        arrays, table_digests, table_nodes = tables.read(tables_json, version)
        used[0].update(table_digests)
        used[1].update(table_nodes)
    return arrays
