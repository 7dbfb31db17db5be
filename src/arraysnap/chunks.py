"""Reading and writing the chunks of one array: padding, digests, verification, assembly.

A chunk's digest is blake3 of its raw bytes at full chunk size: a ragged last chunk is
padded with zero bytes (zarr v3 stores every chunk at full chunk shape).

>>> from arraysnap.layout import plan_layout
>>> layout = plan_layout((3,), np.dtype("u1"), "C", 2)
>>> buffer = np.array([1, 2, 3], dtype="u1")
>>> bytes(padded_chunk(buffer, layout, 1))
b'\\x03\\x00'
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np

from .codecs import CodecSpec
from .errors import CorruptSnapshotError
from .layout import ChunkLayout
from .manifest import ArrayEntry
from .objects import ChunkObjects

__all__ = ["assemble", "chunk_digest", "decode_chunk", "find_bad_chunks", "load_chunk",
           "padded_chunk", "read_object", "scratch_chunk"]


def padded_chunk(buffer: np.ndarray, layout: ChunkLayout, index: int,
                 scratch: np.ndarray | None = None) -> np.ndarray:
    """Chunk `index` of a flat uint8 buffer at full chunk size (a view unless it is ragged).

    A ragged chunk is zero-padded in `scratch` (uint8, at least a chunk long) when given,
    so that a caller padding many chunks reuses one buffer; else in a new array.
    """
    start, stop = layout.chunk_range(index)
    if stop - start == layout.chunk_bytes:
        return buffer[start:stop]
    if scratch is None:
        scratch = np.empty(layout.chunk_bytes, dtype=np.uint8)
    padded = scratch[: layout.chunk_bytes]
    padded[: stop - start] = buffer[start:stop]
    padded[stop - start :] = 0
    return padded


_scratch = threading.local()


def scratch_chunk(buffer: np.ndarray, layout: ChunkLayout, index: int) -> np.ndarray:
    """`padded_chunk` in this thread's scratch buffer (kept, grown as needed, never freed per
    chunk): a ragged chunk is valid until this thread pads another.

    >>> from arraysnap.layout import plan_layout
    >>> layout = plan_layout((3,), np.dtype("u1"), "C", 2)
    >>> scratch_chunk(np.arange(3, dtype=np.uint8), layout, 1).tolist()
    [2, 0]
    """
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None or scratch.size < layout.chunk_bytes:
        scratch = _scratch.buffer = np.empty(layout.chunk_bytes, dtype=np.uint8)
    return padded_chunk(buffer, layout, index, scratch)


def chunk_digest(buffer: np.ndarray, layout: ChunkLayout, index: int) -> bytes:
    """blake3 digest of chunk `index` of `buffer` (without copying full chunks)."""
    start, stop = layout.chunk_range(index)
    hasher = blake3.blake3(buffer[start:stop])
    if stop - start < layout.chunk_bytes:
        hasher.update(bytes(layout.chunk_bytes - (stop - start)))
    return hasher.digest()


def find_bad_chunks(
    buffer: np.ndarray, entry: ArrayEntry, pool: ThreadPoolExecutor
) -> list[int]:
    """Indices of chunks of `buffer` whose digest differs from the entry's."""
    layout = entry.layout
    checks = pool.map(lambda i: chunk_digest(buffer, layout, i) == entry.digest(i),
                      range(entry.n_chunks))
    return [index for index, ok in enumerate(checks) if not ok]


def _corrupt(entry: ArrayEntry, index: int, seq: int, reason: str) -> CorruptSnapshotError:
    location = entry.location(index)
    detail = (f" (object {entry.digest(index).hex()[:16]})" if location is None else
              f" (in pack {location.pack.hex()[:16]} at {location.offset}+{location.length})")
    return CorruptSnapshotError(reason, seq=seq, array=entry.name, chunk=index, detail=detail)


def decode_chunk(data: bytes, codec: CodecSpec, entry: ArrayEntry, index: int, *,
                 verify: bool, seq: int) -> bytes:
    """Decode a chunk object of `entry` and (optionally) check it against its digest."""
    try:
        raw = codec.decode(data)
    except Exception as err:  # numcodecs raises plain RuntimeError/ValueError on bad input
        raise _corrupt(entry, index, seq, f"chunk object does not decode: {err}") from None
    if len(raw) != entry.layout.chunk_bytes:
        raise _corrupt(entry, index, seq, f"decoded to {len(raw)} bytes, expected "
                                           f"{entry.layout.chunk_bytes}")
    if verify and blake3.blake3(raw).digest() != entry.digest(index):
        raise _corrupt(entry, index, seq, "content does not match its blake3 digest")
    return raw


def read_object(objects: ChunkObjects, entry: ArrayEntry, index: int, seq: int) -> bytes:
    """The stored (encoded) bytes of chunk `index`; CorruptSnapshotError if unreadable."""
    try:
        # Compressed data never grows much; a bound per chunk keeps a hostile object small.
        return objects.read(entry.digest(index), entry.location(index),
                            limit=2 * entry.layout.chunk_bytes + 65536)
    except FileNotFoundError:
        what = "chunk object" if entry.location(index) is None else "pack"
        raise _corrupt(entry, index, seq, f"{what} is missing") from None
    except (OSError, ValueError) as err:
        raise _corrupt(entry, index, seq, f"chunk object cannot be read: {err}") from None


def load_chunk(
    objects: ChunkObjects, codec: CodecSpec, entry: ArrayEntry, index: int, *,
    verify: bool, seq: int,
) -> bytes:
    """Read, decode and optionally verify chunk `index`; raise CorruptSnapshotError if bad."""
    data = read_object(objects, entry, index, seq)
    return decode_chunk(data, codec, entry, index, verify=verify, seq=seq)


def assemble(
    buffer: np.ndarray, objects: ChunkObjects, codec: CodecSpec, entry: ArrayEntry,
    pool: ThreadPoolExecutor, *, verify: bool, seq: int, indices: Iterable[int] | None = None,
) -> None:
    """Write chunks (all, or `indices`) of `entry` from chunk objects into a flat buffer."""
    layout = entry.layout

    def fill(index: int) -> None:
        raw = load_chunk(objects, codec, entry, index, verify=verify, seq=seq)
        start, stop = layout.chunk_range(index)
        buffer[start:stop] = np.frombuffer(raw, dtype=np.uint8, count=stop - start)

    tasks = [pool.submit(fill, index)
             for index in (range(entry.n_chunks) if indices is None else indices)]
    # Every task ends before an error is raised: none may write into `buffer` after this
    # returns (the caller may reuse it, or unmap it).
    concurrent.futures.wait(tasks)
    for task in tasks:
        task.result()

