"""Where each array's baseline bytes are: the extents and files the baselines keep in
memory, the extent table on disk and the marker's names for it.

The baselines (``arraysnap.baselines``) keep arrays at *extents* of a few shared files. The
table ``mirror/extents.json`` maps each array to its file and offset, by column (the names,
the index of each one's file, -1 for none, and the offsets: a table of a dict of 10,000
lists took 5 ms to decode); the marker ``mirror/state.json`` names the table's generation,
so a table and a marker from different moments are never read together. Readers use this
module to map what a writer left.

>>> table = {"generation": 3, "files": ["s-1.bin"], "names": ["u", "e"], "file": [0, -1],
...          "offsets": [4096, 0]}
>>> import json, pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / TABLE).write_text(json.dumps(table))
>>> read_extents(folder, {"version": MARKER_VERSION, "table": 3})
{'u': ('s-1.bin', 4096), 'e': (None, 0)}
>>> read_extents(folder, {"version": MARKER_VERSION, "table": 2}) is None   # another moment's
True
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import numpy as np

from .dtypes import dtype_to_json
from .fsio import read_regular_file
from .layout import ChunkLayout
from .manifest import parse_layout
from .mapping import PAGE, FileMap

__all__ = ["MARKER", "MARKER_VERSION", "SMALL_ALIGN", "TABLE", "BaselineFile", "Extent",
           "Mirror", "TABLE_DIGEST", "Target", "Views", "align_of", "extent_table",
           "read_extents", "read_mirror", "safe_filename", "same_layouts", "table_digest",
           "view_of"]

MARKER = "state.json"
TABLE = "extents.json"
TABLE_DIGEST = "table_digest"  # the marker's key for its table's digest
MARKER_VERSION = 2
SMALL_ALIGN = 64  # arrays under a page start at a multiple of this, not of a page
_MAX_TABLE_BYTES = 1 << 28


class Target(NamedTuple):
    """Where a capture writes an array: `buffer`, the flat bytes; `fresh`, a new extent
    (every chunk counts as changed); `held`, maps handed out in this process may show
    these bytes: call ``Baselines.preserve`` with the chunks about to change first.
    (A named tuple: a pause over thousands of arrays makes one per array.)"""

    buffer: np.ndarray
    fresh: bool
    held: bool


@dataclass(eq=False, slots=True)
class BaselineFile:
    """One baseline file and the writer's shared map of it (``arraysnap.baselines`` owns
    them; the extents of its arrays point into it)."""

    name: str
    path: Path
    capacity: int  # bytes of address space mapped
    size: int  # bytes allocated (the file's length)
    own: bool  # one array's file, not shared
    map: FileMap
    buffer: np.ndarray
    end: int = 0  # extents are placed below this; above it the file is unused
    holes: list[tuple[int, int]] = field(default_factory=list)
    users: int = 0
    exclusive: bool = False
    handed_out: list[weakref.ref[FileMap]] = field(default_factory=list)

    def live_maps(self) -> list[FileMap]:
        maps = [ref() for ref in self.handed_out]
        self.handed_out = [ref for ref, held in zip(self.handed_out, maps, strict=True)
                           if held is not None]
        return [held for held in maps if held is not None]


@dataclass(eq=False, slots=True)
class Extent:
    """Where one array's baseline bytes are: a file (None for an empty array) and an
    offset."""

    layout: ChunkLayout
    file: BaselineFile | None  # None for an empty array
    offset: int
    # Made when first asked for: an open adopts 10,000 extents, a pause may use a few.
    _target: Target | None = None

    @property
    def in_place(self) -> Target:
        """The target of a capture that updates the array in place."""
        target = self._target
        if target is None:
            buffer = (np.zeros(0, dtype=np.uint8) if self.file is None else
                      self.file.buffer[self.offset : self.offset + self.layout.nbytes])
            target = self._target = Target(buffer, False, False)
        return target

    @property
    def buffer(self) -> np.ndarray:
        """The array's bytes in the file's map."""
        return self.in_place.buffer


def align_of(nbytes: int) -> int:
    """Where an array of `nbytes` may start in a shared file: at a multiple of this.

    >>> align_of(1024), align_of(1 << 20) == PAGE
    (64, True)
    """
    return PAGE if nbytes >= PAGE else SMALL_ALIGN


def safe_filename(name: object) -> bool:
    """Whether `name` can be a baseline file's name (no path, no hidden or odd names).

    >>> safe_filename("s-0a1b.bin"), safe_filename("../etc/passwd.bin"), safe_filename(7)
    (True, False, False)
    """
    return (isinstance(name, str) and name.endswith(".bin") and "/" not in name
            and "\\" not in name and not name.startswith(".") and 4 < len(name) < 100)


def read_extents(directory: Path, marker: dict[str, Any], *,
                 current_only: bool = False) -> dict[str, tuple[str | None, int]] | None:
    """The extent table `marker` names (array -> file name, offset), or None if it is not
    the one on disk or is malformed. A marker from before shared files lists one file per
    array at offset 0 (read unless `current_only`: such files are locked another way)."""
    if marker.get("version") != MARKER_VERSION:
        if current_only:
            return None
        files = marker.get("files")
        if not isinstance(files, dict):
            return None
        return {name: (file, 0) for name, file in files.items()
                if isinstance(name, str) and safe_filename(file)}
    table = _read_table(directory, marker)
    if table is None:
        return None
    if "names" in table:
        return _columns(table)
    if not isinstance(table.get("extents"), dict):  # (a table of an earlier writer)
        return None
    extents = {}
    checked: dict[object, bool] = {None: True}  # thousands of arrays share a few files
    for name, value in table["extents"].items():
        if not (isinstance(value, list) and len(value) == 2):
            continue
        file, offset = value
        safe = checked.get(file) if isinstance(file, str) or file is None else False
        if safe is None:
            safe = checked[file] = safe_filename(file)
        if safe and isinstance(name, str) and type(offset) is int and offset >= 0:
            extents[name] = (file, offset)
    return extents


def _columns(table: dict[str, Any]) -> dict[str, tuple[str | None, int]] | None:
    """An extent table by column (the form ``extent_table`` writes), or None if malformed."""
    files, names, file_of, offsets = (table.get(key) for key in ("files", "names", "file",
                                                                 "offsets"))
    if not (isinstance(files, list) and isinstance(names, list) and isinstance(file_of, list)
            and isinstance(offsets, list) and len(names) == len(file_of) == len(offsets)
            and all(safe_filename(file) for file in files)
            and all(type(name) is str for name in names)
            and all(type(index) is int for index in file_of)
            and all(type(offset) is int for offset in offsets)
            and (not names or (min(file_of) >= -1 and max(file_of) < len(files)
                               and min(offsets) >= 0))):
        return None
    listed = [*files, None]  # index -1: no file
    return dict(zip(names, zip([listed[index] for index in file_of], offsets, strict=True),
                    strict=True))


def extent_table(generation: int, extents: dict[str, Extent]) -> dict[str, Any]:
    """The extent table (of `generation`) of `extents`, as ``read_extents`` reads it: by
    name, with each array's layout (``read_mirror``).

    >>> extent_table(2, {})
    {'generation': 2, 'files': [], 'names': [], 'file': [], 'offsets': [], 'layouts': [], \
'layout': []}
    """
    files: dict[str, int] = {}
    layouts: dict[ChunkLayout, int] = {}
    by_id: dict[int, int] = {}  # arrays share layout objects: hashing one costs more
    names = sorted(extents)  # the order of a snapshot's table: a reader need not sort
    file_of, offsets, layout_of = [], [], []
    for name in names:
        extent = extents[name]
        offsets.append(extent.offset)
        layout = extent.layout
        index = by_id.get(id(layout))
        if index is None:
            index = layouts.get(layout)
            if index is None:
                index = layouts[layout] = len(layouts)
            by_id[id(layout)] = index
        layout_of.append(index)
        if extent.file is None:
            file_of.append(-1)
            continue
        index = files.get(extent.file.name)
        if index is None:
            index = files[extent.file.name] = len(files)
        file_of.append(index)
    return {"generation": generation, "files": list(files), "names": names, "file": file_of,
            "offsets": offsets, "layouts": [_layout_json(layout) for layout in layouts],
            "layout": layout_of}


def _layout_json(layout: ChunkLayout) -> dict[str, Any]:
    return {"shape": list(layout.shape), "dtype": dtype_to_json(layout.dtype),
            "order": layout.order, "split_axis": layout.split_axis,
            "rows_per_chunk": layout.rows_per_chunk}


class Mirror(NamedTuple):
    """What the baselines hold, by the extent table a clean marker names: every array
    (sorted by name), its layout, and where its bytes are (file None: an empty array)."""

    names: list[str]
    layouts: list[ChunkLayout]
    extents: dict[str, tuple[str | None, int]]


def read_mirror(directory: Path, marker: dict[str, Any]) -> Mirror | None:
    """The arrays of the extent table `marker` names, with their layouts; None if the
    table has no layouts (an earlier writer's) or is malformed.

    A clean marker's table lists exactly the arrays of the snapshot the marker names (a
    capture drops the baselines of arrays it no longer has): a reader can restore that
    snapshot from it without reading the snapshot's chunk tables. The marker names the
    table by its digest too (``table_digest``), so a damaged table is never read here.

    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> layout = {"shape": [2], "dtype": "<f8", "order": "C", "split_axis": 0,
    ...           "rows_per_chunk": 2}
    >>> table = {"generation": 1, "files": ["s-1.bin"], "names": ["u"], "file": [0],
    ...          "offsets": [0], "layouts": [layout], "layout": [0]}
    >>> data = json.dumps(table).encode()
    >>> _ = (folder / TABLE).write_bytes(data)
    >>> marker = {"version": MARKER_VERSION, "table": 1, TABLE_DIGEST: table_digest(data)}
    >>> mirror = read_mirror(folder, marker)
    >>> mirror.names, mirror.layouts[0].shape, mirror.extents
    (['u'], (2,), {'u': ('s-1.bin', 0)})
    """
    if marker.get("version") != MARKER_VERSION or not isinstance(marker.get(TABLE_DIGEST),
                                                                   str):
        return None
    table = _read_table(directory, marker, digest=marker[TABLE_DIGEST])
    if table is None:
        return None
    extents = _columns(table)
    layouts_json, layout_of = table.get("layouts"), table.get("layout")
    if (extents is None or not isinstance(layouts_json, list)
            or not isinstance(layout_of, list) or len(layout_of) != len(extents)
            or not all(type(index) is int for index in layout_of)
            or (layout_of and not 0 <= min(layout_of) <= max(layout_of) < len(layouts_json))):
        return None
    try:  # the manifest's checks of a layout: one definition of them
        parsed = [parse_layout(value).layout for value in layouts_json]
    except (ValueError, TypeError, OverflowError):
        return None
    return Mirror(list(extents), [parsed[index] for index in layout_of], extents)


def table_digest(data: bytes) -> str:
    """The digest of an extent table's bytes, which the marker names it by (``read_mirror``
    reads only a table that has it: a damaged one gives no wrong shape)."""
    return blake3.blake3(data).hexdigest()


def same_layouts(mirror: Mirror, layouts: Mapping[str, ChunkLayout]) -> bool:
    """Whether every array of `mirror` has the layout `layouts` gives it (a few distinct
    layout objects on each side: compared once a pair).

    >>> from arraysnap.layout import plan_layout
    >>> u = plan_layout((4,), np.dtype("f8"), "C", 1 << 20)
    >>> mirror = Mirror(["u"], [u], {"u": ("s-1.bin", 0)})
    >>> same_layouts(mirror, {"u": u}), same_layouts(mirror, {"u": plan_layout(
    ...     (2, 2), np.dtype("f8"), "C", 1 << 20)})
    (True, False)
    """
    same: dict[tuple[int, int], bool] = {}
    for name, listed in zip(mirror.names, mirror.layouts, strict=True):
        wanted = layouts.get(name)
        if wanted is None:
            return False
        key = (id(listed), id(wanted))
        verdict = same.get(key)
        if verdict is None:
            verdict = same[key] = listed == wanted
        if not verdict:
            return False
    return True


def _read_table(directory: Path, marker: dict[str, Any],
                digest: str | None = None) -> dict[str, Any] | None:
    try:
        data = read_regular_file(directory / TABLE, _MAX_TABLE_BYTES)
        if digest is not None and table_digest(data) != digest:
            return None
        table = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(table, dict) or table.get("generation") != marker.get("table"):
        return None
    return table


def view_of(file_map: FileMap, offset: int, layout: ChunkLayout) -> np.ndarray:
    """Array `layout` at byte `offset` of `file_map` (kept alive by the view).

    >>> import tempfile
    >>> from arraysnap.layout import plan_layout
    >>> from arraysnap.mapping import map_fd
    >>> with tempfile.TemporaryFile() as handle:
    ...     _ = handle.write(np.arange(4.0).tobytes() * 2)
    ...     shared = map_fd(handle.fileno(), 64, shared=False)
    >>> view_of(shared, 32, plan_layout((2, 2), np.dtype("f8"), "C", 1 << 20)).tolist()
    [[0.0, 1.0], [2.0, 3.0]]
    """
    return np.ndarray(layout.shape, dtype=layout.dtype, buffer=file_map, offset=offset,
                      order=layout.order)


class Views:
    """The arrays a restore hands out, by name: each a view of a file map, most of them not
    made yet (``pending``: the map, offset and layout of each), the others arrays already
    (``made``). Making 10,000 views took 8-15 ms, most of a restore's budget, for arrays a
    program may never look at; ``arraysnap.Restored.arrays`` makes each when first used.

    >>> import tempfile
    >>> from arraysnap.layout import plan_layout
    >>> from arraysnap.mapping import map_fd
    >>> with tempfile.TemporaryFile() as handle:
    ...     _ = handle.write(np.arange(2.0).tobytes())
    ...     shared = map_fd(handle.fileno(), 16, shared=False)
    >>> views = Views()
    >>> views.add("u", shared, 0, plan_layout((2,), np.dtype("f8"), "C", 1 << 20))
    >>> "u" in views, views.array("u").tolist()
    (True, [0.0, 1.0])
    """

    __slots__ = ("made", "pending")

    def __init__(self) -> None:
        self.made: dict[str, np.ndarray] = {}
        self.pending: dict[str, tuple[FileMap, int, ChunkLayout]] = {}

    def add(self, name: str, file_map: FileMap, offset: int, layout: ChunkLayout) -> None:
        """Hand out array `name` at byte `offset` of `file_map`, made when first used."""
        self.pending[name] = (file_map, offset, layout)

    def add_all(self, file_map: FileMap, arrays: list[tuple[str, int, ChunkLayout]]) -> None:
        """``add`` each (name, offset, layout) of `arrays`, all in `file_map`."""
        self.pending.update({name: (file_map, offset, layout)
                             for name, offset, layout in arrays})

    def __contains__(self, name: object) -> bool:
        return name in self.pending or name in self.made

    def lacking(self, names: Iterable[str]) -> list[str]:
        """Those of `names` not handed out (in one loop: a restore asks for every array)."""
        pending, made = self.pending, self.made
        return [name for name in names if name not in pending and name not in made]

    def names(self) -> list[str]:
        """Every array handed out."""
        return [*self.pending, *self.made]

    def array(self, name: str) -> np.ndarray:
        """Array `name`, made now if it was pending (KeyError if not handed out)."""
        spec = self.pending.pop(name, None)
        if spec is not None:
            self.made[name] = view_of(*spec)
        return self.made[name]

    def take(self, name: str) -> np.ndarray:
        """Pending array `name`, made now and handed over: these views keep it no longer
        (KeyError if it is not pending)."""
        return view_of(*self.pending.pop(name))

    def drop(self, name: str) -> None:
        """Hand `name` out no more."""
        self.pending.pop(name, None)
        self.made.pop(name, None)

    def update(self, other: Views) -> None:
        """Hand out `other`'s arrays too."""
        self.pending.update(other.pending)
        self.made.update(other.made)
