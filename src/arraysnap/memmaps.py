"""This process's memory mappings: whether a range of addresses may be write-tracked.

Write tracking (``arraysnap.tracking``) may only watch memory that changes through writes
in this process's page tables: private, writable, anonymous memory (the heap, anonymous
maps), or a private map of one of the store's own baseline files. This module reads
``/proc/self/maps`` once for any number of ranges.

>>> import numpy as np
>>> u = np.zeros(1 << 16)
>>> start = -(-u.ctypes.data // 4096) * 4096
>>> mapping_kinds([(start, start + 4096)], None)
[False]
"""

from __future__ import annotations

__all__ = ["mapping_kinds"]


def _read_maps() -> list[tuple[int, int, str, str]] | str:
    """The mappings as (low, high, permissions, path), sorted; or why they are unknown."""
    mappings = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(part, 16) for part in fields[0].split("-"))
                path = fields[5].strip() if len(fields) == 6 else ""
                mappings.append((low, high, fields[1], path))
    except OSError as err:
        return f"/proc/self/maps: {err}"
    return mappings


def mapping_kinds(ranges: list[tuple[int, int]],
                  baseline_dir: str | None) -> list[bool | str]:
    """For each range ``[start, end)``: False if it lies in private writable anonymous
    mappings, True if (also) in a private map of a file in `baseline_dir`, else a string
    saying why it may not be tracked.

    Shared mappings change without writes through our page tables; a private file map shows
    changes to the file in pages it has not copied. The store's baseline files are the ones
    known never to change under a map it handed out: its writer preserves those maps' pages
    before it writes, or moves what it writes elsewhere, and any other store's writer finds
    them under a lease (see ``arraysnap.baselines``).
    """
    mappings = _read_maps()
    if isinstance(mappings, str):
        return [mappings] * len(ranges)
    return [_kind(mappings, start, end, baseline_dir) for start, end in ranges]


def _kind(mappings: list[tuple[int, int, str, str]], start: int, end: int,
          baseline_dir: str | None) -> bool | str:
    position = start
    file_backed = False
    for low, high, permissions, path in mappings:
        if high <= position or low >= end:
            continue
        if low > position:
            return "a gap in the mapping"
        if not permissions.startswith("rw") or permissions[3] != "p":
            return f"mapping {permissions} is not private and writable"
        if path and not (path == "[heap]" or path.startswith("[anon:")):
            if baseline_dir is None or not path.startswith(baseline_dir + "/"):
                return f"mapping of {path}"
            file_backed = True
        position = high
        if position >= end:
            return file_backed
    return "not mapped"
