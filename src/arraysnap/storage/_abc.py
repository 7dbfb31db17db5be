"""The storage interface: every byte a store persists goes through a :class:`Storage`.

A store's contents are *keys* (``/``-separated relative names such as
``snapshots/000000000001.json`` or ``chunks/ab/cdef…``) holding bytes. The engine needs only
what an S3-class object store offers too: create-only writes (the commit point, and
content-addressed objects), whole-value replacement, reads and range reads, existence,
listing by prefix, deletion, and a durability *barrier*. Nothing in the engine renames,
seeks or relies on folders; a local directory (:class:`~arraysnap.storage.LocalStorage`)
implements it with temporary files, fsync, rename and directory fsync.

Durability. ``put_if_absent``, ``append`` and ``delete`` are visible at once to every
reader, and durable (they survive a power cut) after the next ``barrier()``; a
``put_atomic`` is durable when it returns (unless ``durable=False``). The engine calls
``barrier()`` before it writes a manifest (so the manifest never names anything a power
cut could take away) and after it (so the snapshot itself is durable).

Errors. An absent key raises :class:`FileNotFoundError`; any other failure is an
:class:`OSError` with its errno (EIO, ENOSPC, ...), which the engine retries or reports. A
storage never raises for bad *contents*: parsing is the caller's job.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage
>>> storage = LocalStorage(tempfile.mkdtemp())
>>> storage.put_if_absent("chunks/ab/cd", b"data"), storage.put_if_absent("chunks/ab/cd", b"x")
(True, False)
>>> storage.barrier(); storage.get("chunks/ab/cd"), list(storage.list_prefix("chunks/"))
(b'data', ['chunks/ab/cd'])
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["DEFAULT_GET_LIMIT", "Storage", "WriterLock", "parse_key"]

# Larger than any object a store writes (a chunk of up to 2**31 bytes, encoded, or a
# manifest): a value past the caller's limit is an error, never a read without end.
DEFAULT_GET_LIMIT = 1 << 34
_BAD_CHARACTER = re.compile(r"[\\\x00-\x1f\x7f]")


def parse_key(key: object) -> str:
    """`key` if it is a valid storage key, else ValueError naming the rule.

    A key is ``/``-separated parts; no part is empty, ``.`` or ``..``, or holds a ``\\`` or
    a control character, so no key can name anything outside its storage.

    >>> parse_key("snapshots/000000000001.json")
    'snapshots/000000000001.json'
    >>> parse_key("../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: bad storage key '../etc/passwd': no part may be empty, '.' or '..', ...
    """
    if isinstance(key, str) and key and not _BAD_CHARACTER.search(key):
        parts = key.split("/")
        if "" not in parts and "." not in parts and ".." not in parts:
            return key
    raise ValueError(f"bad storage key {key!r}: no part may be empty, '.' or '..', or hold "
                     "'\\\\' or a control character")


class WriterLock(ABC):
    """The one writer's claim on a storage, from :meth:`Storage.lock_writer` until released.

    >>> import tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> lock = LocalStorage(tempfile.mkdtemp()).lock_writer("doctest")
    >>> lock.release(); lock.release()  # releasing twice is harmless
    """

    @abstractmethod
    def release(self) -> None:
        """Give the claim up (idempotent)."""


class Storage(ABC):
    """Keys to bytes, with create-only writes and a durability barrier; see the module doc.

    Subclass it for a new kind of storage; wrap one (``WrapperStorage``) to observe or
    change what another does, as the fault injection of ``arraysnap.testing`` does.

    >>> import tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> storage = LocalStorage(tempfile.mkdtemp())
    >>> storage.put_atomic("arraysnap.json", b"{}"); storage.exists("arraysnap.json")
    True
    """

    # -- identity --------------------------------------------------------------------------
    @property
    @abstractmethod
    def local_path(self) -> Path | None:
        """The local directory holding the keys, if there is one (baselines default there)."""

    @abstractmethod
    def describe(self) -> str:
        """How to name this storage in a message: a path or a URL."""

    def __str__(self) -> str:
        return self.describe()

    # -- reading ---------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        """The bytes of `key`: FileNotFoundError if absent; OSError if it is not a plain
        value or holds more than `limit` bytes (never reads without end, never blocks)."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """At most `length` bytes of `key` from offset `start` (fewer at its end)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` holds a value."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The length of `key`'s value in bytes; FileNotFoundError if absent."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> Iterator[str]:
        """Every key that starts with `prefix` (``""`` for all), in no particular order.

        Temporaries of writes in progress are never listed.
        """

    # -- writing ---------------------------------------------------------------------------
    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Write `key` unless it exists (create-only); True if this call wrote it.

        A reader sees either no value or all of `data`. Durable after the next barrier.
        """

    @abstractmethod
    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Replace `key` with `data`: readers see the old value or all of the new one.

        Durable on return; with ``durable=False`` it survives a killed process but not
        necessarily a power cut.
        """

    @abstractmethod
    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        """Make `key` its first `at` bytes followed by `data` (created when absent, `at` 0).

        All or nothing: on failure `key` holds its first `at` bytes (or what it held).
        Durable after the next barrier; with ``durable=False`` only after a barrier that
        names `key`.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` (an absent key is no error). Durable after the next barrier."""

    def modified(self, key: str) -> float:
        """When `key` was last written (Unix seconds): what a grace period is measured
        from. This default knows nothing, and says "now" (nothing is old enough to go)."""
        if not self.exists(key):
            raise FileNotFoundError(key)
        return time.time()

    def read_once(self, key: str) -> bytes:
        """`get` for a value read this once more and not again soon (an object a copy or
        a local tier's uploader sends on): a local storage lets the page cache drop it."""
        return self.get(key)

    @abstractmethod
    def barrier(self, keys: Iterable[str] = ()) -> None:
        """Make every write and delete since the last barrier durable, and `keys` too.

        `keys` names values written earlier that a commit is about to rely on, perhaps by
        a writer that was killed before its own barrier.
        """

    # -- a store's life --------------------------------------------------------------------
    @abstractmethod
    def create(self) -> None:
        """Make the location ready for a new store.

        FileExistsError if it holds anything but what a creation that died left behind.
        """

    @abstractmethod
    def lock_writer(self, holder: str) -> WriterLock:
        """Claim the storage for one writer; StoreLockedError naming the holder if taken.

        `holder` describes this writer (pid and host) for the message another one gets.
        """

    @abstractmethod
    def remove_temporaries(self) -> int:
        """Delete what writes killed in progress left behind; return how many."""

    def close(self) -> None:  # noqa: B027 - most storages hold nothing to release
        """Release what the storage holds (a wrapper closes the storage it wraps)."""
