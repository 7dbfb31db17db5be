"""The content-addressed chunk objects: key ``chunks/ab/cdef…``, named by blake3 of raw bytes.

An object is written create-only, so a key that exists always holds a whole object. A
commit makes the objects it names durable with one storage barrier before its manifest.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage
>>> objects = ChunkObjects(LocalStorage(tempfile.mkdtemp()))
>>> digest = bytes(32)
>>> objects.put(digest, b"data"), objects.has(digest), objects.get(digest)
(4, True, b'data')
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .packs import PACK_ID_BYTES, PACK_PREFIX, Location
from .storage import DEFAULT_GET_LIMIT, Storage

__all__ = ["DIGEST_BYTES", "ChunkObjects", "object_key", "pack_key", "read_pack_range"]

DIGEST_BYTES = 32
PREFIX = "chunks/"


def object_key(digest: bytes, prefix: str = PREFIX) -> str:
    """The storage key of the object with `digest`.

    >>> object_key(bytes(32))[:10]
    'chunks/00/'
    """
    hexdigest = digest.hex()
    return f"{prefix}{hexdigest[:2]}/{hexdigest[2:]}"


def pack_key(pack: bytes) -> str:
    """The storage key of the pack (format 3) with id `pack`.

    >>> pack_key(bytes(16))
    'packs/00/000000000000000000000000000000'
    """
    return object_key(pack, PACK_PREFIX)


def read_pack_range(storage: Storage, location: Location) -> bytes:
    """The bytes at `location` of its pack (a chunk, or a table node of format 4);
    FileNotFoundError when the pack is absent, OSError when it ends before the range.

    >>> import tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> storage = LocalStorage(tempfile.mkdtemp())
    >>> _ = storage.put_if_absent(pack_key(bytes(16)), b"abcdef")
    >>> read_pack_range(storage, Location(bytes(16), 2, 3))
    b'cde'
    """
    data = storage.get_range(pack_key(location.pack), location.offset, location.length)
    if len(data) != location.length:
        raise OSError(f"pack {location.pack.hex()[:16]} ends before {location.offset}+"
                      f"{location.length}")
    return data


class ChunkObjects:
    """Put, get, test and delete encoded chunk objects in a storage; with another `prefix`,
    any content-addressed objects (the table objects of format 2, under ``tables/``)."""

    def __init__(self, storage: Storage, prefix: str = PREFIX) -> None:
        self.storage = storage
        self.prefix = prefix
        self._lock = threading.Lock()
        self._reused: set[str] = set()

    def key(self, digest: bytes) -> str:
        return object_key(digest, self.prefix)

    def has(self, digest: bytes) -> bool:
        return self.storage.exists(self.key(digest))

    def present(self, digest: bytes) -> bool:
        """Whether the object exists, asked only where asking is cheap (a local folder). In
        object storage a check is a request a chunk, dearer than writing the rare
        duplicate again: a create-only write of an existing object lands nothing."""
        return self.storage.local_path is not None and self.has(digest)

    def size(self, digest: bytes) -> int:
        """The stored (encoded) size; FileNotFoundError when absent."""
        return self.storage.size(self.key(digest))

    def put(self, digest: bytes, data: bytes | memoryview) -> int:
        """Store `data` under `digest` unless present; return the bytes written."""
        if not self.storage.put_if_absent(self.key(digest), data):
            return 0
        return len(memoryview(data).cast("B"))

    def reuse(self, digest: bytes) -> None:
        """Note that a new snapshot relies on an existing object: it must be durable too.

        An object may have been written by a writer that was killed before its barrier; the
        next sync() makes it durable before a manifest names it.
        """
        with self._lock:
            self._reused.add(self.key(digest))

    def sync(self) -> None:
        """Make every object written or reused since the last sync durable."""
        with self._lock:
            reused, self._reused = self._reused, set()
        try:
            self.storage.barrier(reused)
        except BaseException:
            with self._lock:
                self._reused |= reused
            raise

    def get(self, digest: bytes, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        """The stored bytes; FileNotFoundError when absent, OSError when not a plain object
        or larger than `limit` (never blocks on a FIFO, never reads a device without end)."""
        return self.storage.get(self.key(digest), limit=limit)

    def delete(self, digest: bytes) -> None:
        self.storage.delete(self.key(digest))

    def read(self, digest: bytes, location: Location | None,
             limit: int = DEFAULT_GET_LIMIT) -> bytes:
        """A chunk's stored bytes: its own object, or (format 3) its range of a pack;
        FileNotFoundError when absent, OSError when unreadable or larger than `limit`."""
        if location is None:
            return self.get(digest, limit=limit)
        if location.length > limit:
            raise OSError(f"a packed chunk of {location.length} bytes is larger than a chunk "
                          f"can be ({limit})")
        return read_pack_range(self.storage, location)

    # -- packs (format 3) -----------------------------------------------------------------
    def put_pack(self, pack: bytes, data: bytes | memoryview) -> int:
        """Write a pack (create-only); return the bytes written. Present already is an
        earlier attempt of this very write whose reply was lost: ids are never reused."""
        if not self.storage.put_if_absent(pack_key(pack), data):
            return 0
        return len(memoryview(data).cast("B"))

    def has_pack(self, pack: bytes) -> bool:
        return self.storage.exists(pack_key(pack))

    def pack_size(self, pack: bytes) -> int:
        return self.storage.size(pack_key(pack))

    def delete_pack(self, pack: bytes) -> None:
        self.storage.delete(pack_key(pack))

    def pack_ids(self) -> Iterator[bytes]:
        """Every stored pack's id (keys of any other shape are skipped)."""
        return _names(self.storage, PACK_PREFIX, PACK_ID_BYTES)

    def digests(self) -> Iterator[bytes]:
        """Every stored object's digest (keys of any other shape are skipped)."""
        return _names(self.storage, self.prefix, DIGEST_BYTES)


def _names(storage: Storage, prefix: str, nbytes: int) -> Iterator[bytes]:
    """The names (`nbytes` long) of the objects under `prefix`, as ``object_key`` spells
    them; keys of any other shape are skipped."""
    for key in storage.list_prefix(prefix):
        parts = key.split("/")
        if len(parts) == 3 and len(parts[1]) == 2:
            name = parts[1] + parts[2]
            if len(name) == 2 * nbytes and _is_hex(name):
                yield bytes.fromhex(name)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()
