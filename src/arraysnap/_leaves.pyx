# cython: language_level=3, boundscheck=False, wraparound=False
"""Leaf kernel: the rows of a table leaf (formats 2 to 4), or its columns (format 5), as
manifest entries.

Private; `arraysnap.tables` is the only caller, and passes in the checks it relies on
(`check_name`, `where_from_json`), so each rule has one definition. A reader of 10,000
arrays spent 3.5 µs of Python per row here (35 ms, most of a fresh reader's restore); the
loop in C, with each entry's fields set directly (the entry type's ``__init__`` would only
set them, one Python call each), costs about a third of that.
"""

import binascii

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.object cimport Py_TYPE, PyTypeObject


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)

cdef object _a2b = binascii.a2b_base64
cdef object _Error = binascii.Error
cdef str _ROW = ("a leaf row must be [name, layout, chunks] or [name, layout, chunks, "
                 "where]")
# The fields an entry type must have, in the order entry_of() passes them.
FIELDS = ("name", "shape", "dtype", "order", "split_axis", "rows_per_chunk", "digests",
          "dims", "layout", "where")


# The slot descriptors of the entry type's fields, in FIELDS order: setting a field through
# its descriptor skips the attribute lookup that PyObject_GenericSetAttr makes each time.
cdef type _slots_of = None
cdef list _slots = None


cdef inline int _put(object slot, object entry, object value) except -1:
    return (<PyTypeObject*>Py_TYPE(slot)).tp_descr_set(slot, entry, value)


cdef list _slots_for(type entry_type):
    global _slots_of, _slots
    if entry_type is not _slots_of:
        found = [entry_type.__dict__.get(name) for name in FIELDS]
        if any(type(slot).__name__ != "member_descriptor" for slot in found):
            raise TypeError(f"{entry_type.__name__} must be a slotted class of {FIELDS}")
        _slots, _slots_of = found, entry_type
    return _slots


cdef object _entry(type entry_type, object name, object layout, object digests,
                   object where):
    cdef list slots = _slots_for(entry_type)
    entry = entry_type.__new__(entry_type)
    _put(slots[0], entry, name)
    _put(slots[1], entry, layout.shape)
    _put(slots[2], entry, layout.dtype)
    _put(slots[3], entry, layout.order)
    _put(slots[4], entry, layout.split_axis)
    _put(slots[5], entry, layout.rows_per_chunk)
    _put(slots[6], entry, digests)
    _put(slots[7], entry, layout.dims)
    _put(slots[8], entry, layout.layout)
    _put(slots[9], entry, where)
    # The collector need not traverse an entry: it is immutable and holds no container of
    # its own but `where`'s tuples (untracked too), so it is never part of a cycle. The
    # collection that followed a table's parse traversed 30,000 such objects at 10,000
    # arrays (3 ms, a sixth of a fresh reader's restore), and then again in older
    # generations.
    PyObject_GC_UnTrack(<void*>entry)
    return entry


cdef object _untracked(object value):
    """`value` (a tuple of immutable values) no longer traversed by the collector."""
    PyObject_GC_UnTrack(<void*>value)
    return value


cdef object _one_location(object value, Py_ssize_t n_chunks, list packs,
                          type location_type, object max_offset):
    """The `where` of a one-chunk entry in a pack, if `value` is exactly that and valid
    (the fast path of ``packs.where_from_json``, which decides everything else)."""
    if n_chunks != 1 or type(value) is not list or len(<list>value) != 3:
        return None
    index, offset, length = <list>value
    if (type(index) is int and type(offset) is int and type(length) is int
            and 0 <= index < len(packs) and 0 <= offset < max_offset and 0 < length):
        return (tuple.__new__(location_type, (packs[index], offset, length)),)
    return None


def parse_rows(list rows, list layouts, list packs, object check_name,
               object where_from_json, type entry_type, Py_ssize_t digest_bytes,
               type location_type, object max_offset, list result):
    """Append one entry of `entry_type` to `result` per row of a leaf (a pair ``(entry,
    chunks)`` for an entry whose digests are in blocks, its digests left empty); ValueError
    or TypeError naming the problem for anything malformed."""
    cdef Py_ssize_t n_layouts = len(layouts)
    cdef Py_ssize_t size
    cdef list row
    for item in rows:
        if type(item) is not list:
            raise ValueError(_ROW)
        row = <list>item
        size = len(row)
        if size < 3 or size > 4:
            raise ValueError(_ROW)
        index = row[1]
        if type(index) is not int or not 0 <= index < n_layouts:
            raise ValueError(_ROW)
        name = row[0]
        check_name(name)
        layout = layouts[index]
        chunks = row[2]
        if type(chunks) is str:
            try:
                digests = _a2b(chunks, strict_mode=True)
            except (_Error, ValueError):
                raise ValueError(f"array {name!r}: chunks is not valid base64") from None
            where = None
            if size == 4:
                where = _one_location(row[3], layout.n_chunks, packs, location_type,
                                      max_offset)
                if where is None:  # anything but one well-formed chunk: the full rules
                    try:
                        where = where_from_json(row[3], layout.n_chunks, packs)
                    except ValueError as err:
                        raise ValueError(f"array {name!r}: {err}") from None
            if len(digests) != layout.n_chunks * digest_bytes:
                raise ValueError(f"chunk table has {len(digests) // digest_bytes} digests, "
                                 f"layout needs {layout.n_chunks}")
            result.append(_entry(entry_type, name, layout, digests, where))
        elif size == 4:
            raise ValueError(f"array {name!r}: an array whose digests are in blocks is "
                             "never packed")
        else:  # blocks: fetched when the entry is used, checked then
            result.append((_entry(entry_type, name, layout, b"", None), chunks))


cdef inline long long _int64_le(const unsigned char* p) noexcept nogil:
    cdef unsigned long long value = 0
    cdef int k
    for k in range(7, -1, -1):
        value = (value << 8) | p[k]
    return <long long>value


def parse_columns(list names, list layout_of, list layouts, bytes digests, bytes where,
                  list blocks, list packs, type entry_type, Py_ssize_t digest_bytes,
                  type location_type, long long max_offset, list result):
    """Append one entry of `entry_type` to `result` per name of a format-5 leaf (a pair
    ``(entry, {"blocks": refs})`` for a row listed in `blocks`, its digests left empty).
    `names` (checked by the caller) and `layout_of` have one item per array; `digests` and
    `where` (three little-endian int64 a chunk: pack, offset, length; pack -1 and 0, 0 for
    a chunk object of its own) hold the chunks of the other rows, in order, and nothing
    else. ValueError naming the problem for anything malformed."""
    cdef Py_ssize_t n = len(names), n_layouts = len(layouts), n_packs = len(packs)
    cdef Py_ssize_t n_digests = len(digests), n_where = len(where) // 24
    cdef Py_ssize_t i, k, n_chunks, taken = 0, placed = 0, block = 0
    cdef Py_ssize_t next_block = -1
    cdef const unsigned char* at = <const unsigned char*>PyBytes_AS_STRING(where)
    cdef long long pack, offset, length
    cdef bint packed
    cdef list item
    if len(layout_of) != n or len(where) % 24:
        raise ValueError("a leaf must give one layout for each name, and where a whole "
                         "number of [pack, offset, length]")
    if blocks:
        next_block = _block_row(blocks, 0, -1, n)
    for i in range(n):
        name = names[i]
        index = layout_of[i]
        if type(index) is not int or not 0 <= index < n_layouts:
            raise ValueError(f"array {name!r}: layout {index!r} is not one of the leaf's "
                             f"{n_layouts}")
        layout = layouts[index]
        if i == next_block:
            item = <list>blocks[block]
            result.append((_entry(entry_type, name, layout, b"", None), {"blocks": item[1]}))
            block += 1
            next_block = _block_row(blocks, block, i, n) if block < len(blocks) else -1
            continue
        n_chunks = layout.n_chunks
        # (In this order, with no product that a hostile layout's count could overflow.)
        if n_chunks > n_where - placed or n_chunks > (n_digests - taken) // digest_bytes:
            raise ValueError(f"array {name!r}: the leaf's digests or where end before its "
                             f"{n_chunks} chunks")
        chunk_digests = digests[taken : taken + n_chunks * digest_bytes]
        taken += n_chunks * digest_bytes
        locations = [None] * n_chunks
        packed = False
        for k in range(n_chunks):
            pack = _int64_le(at + 24 * (placed + k))
            offset = _int64_le(at + 24 * (placed + k) + 8)
            length = _int64_le(at + 24 * (placed + k) + 16)
            if pack == -1 and offset == 0 and length == 0:
                continue
            if not (0 <= pack < n_packs and 0 <= offset < max_offset and 0 < length):
                raise ValueError(f"array {name!r}: chunk {k} is in pack {pack} at "
                                 f"{offset}+{length}: out of range")
            locations[k] = _untracked(tuple.__new__(location_type,
                                                    (packs[pack], offset, length)))
            packed = True
        placed += n_chunks
        result.append(_entry(entry_type, name, layout, chunk_digests,
                             _untracked(tuple(locations)) if packed else None))
    if taken != n_digests or placed != n_where:
        raise ValueError("a leaf's digests or where hold more than its arrays' chunks")


cdef Py_ssize_t _block_row(list blocks, Py_ssize_t block, Py_ssize_t after,
                           Py_ssize_t n) except -2:
    """The row of ``blocks[block]``, an item ``[row, refs]`` with `after` < row < `n`."""
    item = blocks[block]
    if (type(item) is not list or len(<list>item) != 2 or type((<list>item)[0]) is not int
            or not after < (<list>item)[0] < n):
        raise ValueError("a leaf's blocks must be [row, refs] items, rows in increasing "
                         "order, each a row of the leaf")
    return (<list>item)[0]


def add_entries(list items, dict entries, object last, object blocks_of):
    """Add a parsed leaf's entries to `entries` (a pair ``(entry, chunks)`` completed by
    `blocks_of` first); names must increase after `last` (None at the first leaf).
    Returns the first and the last name added (None, `last` for an empty leaf)."""
    first = None
    for item in items:
        entry = blocks_of(item) if type(item) is tuple else item
        name = entry.name
        if last is not None and name <= last:
            raise ValueError("table names are not in order (or repeat)")
        last = name
        entries[name] = entry
        if first is None:
            first = name
    return first, last
