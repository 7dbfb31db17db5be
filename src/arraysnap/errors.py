"""The exceptions arraysnap raises.

Every error derives from :class:`ArraysnapError` and also from the builtin that fits, so
``except LookupError`` and ``except ArraysnapError`` both work.

>>> issubclass(SnapshotNotFoundError, LookupError)
True
"""

from __future__ import annotations

import errno

__all__ = [
    "ArraysnapWarning",
    "StoreWriteError",
    "ArraysnapError",
    "CorruptSnapshotError",
    "FormatVersionError",
    "ReadOnlyStoreError",
    "SnapshotNotFoundError",
    "StoreLockedError",
    "space_error",
]


class ArraysnapError(Exception):
    """Base class of every error arraysnap raises on purpose.

    >>> try:
    ...     raise SnapshotNotFoundError("nothing captured yet")
    ... except ArraysnapError as err:
    ...     print(err)
    nothing captured yet
    """


class SnapshotNotFoundError(ArraysnapError, LookupError):
    """The requested snapshot does not exist (or the store holds none).

    >>> isinstance(SnapshotNotFoundError("x"), LookupError)
    True
    """


class CorruptSnapshotError(ArraysnapError, ValueError):
    """Stored data does not match its checksum or is malformed.

    The message names the snapshot, array and chunk where that is known; so do the
    attributes ``seq``, ``array`` and ``chunk`` (None where unknown), and ``reason`` is the
    message without the location.

    >>> err = CorruptSnapshotError("missing", seq=3, array="u", chunk=7)
    >>> str(err), err.seq, err.array, err.chunk, isinstance(err, ValueError)
    ("snapshot 3, array 'u', chunk 7: missing", 3, 'u', 7, True)
    """

    def __init__(self, reason: str, *, seq: int | None = None, array: str | None = None,
                 chunk: int | None = None, detail: str = "") -> None:
        where = [f"snapshot {seq}"] if seq is not None else []
        if array is not None:
            where.append(f"array {array!r}")
        if chunk is not None:
            where.append(f"chunk {chunk}{detail}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
        self.reason = reason
        self.seq = seq
        self.array = array
        self.chunk = chunk


class StoreLockedError(ArraysnapError, BlockingIOError):
    """Another writer holds the store's lock.

    >>> isinstance(StoreLockedError("x"), OSError)
    True
    """


class FormatVersionError(ArraysnapError, ValueError):
    """The store was written by a newer (or unknown) format version.

    >>> isinstance(FormatVersionError("x"), ValueError)
    True
    """


class ReadOnlyStoreError(ArraysnapError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``, or on one this user
    cannot write (another user's store, a read-only folder): ``mode="r"`` reads it.

    >>> isinstance(ReadOnlyStoreError("x"), PermissionError)
    True
    """


class StoreWriteError(ArraysnapError, OSError):
    """The store could not be written (disk full, I/O error) even after retries.

    ``errno`` is the cause's; the cause itself is chained. Nothing committed was touched, and
    the changes stay pending for the next capture.

    >>> import errno
    >>> error = StoreWriteError(errno.ENOSPC, "capture failed: disk full")
    >>> error.errno == errno.ENOSPC, isinstance(error, OSError)
    (True, True)
    """


def space_error(err: OSError, what: str, otherwise: str) -> StoreWriteError:
    """A :class:`StoreWriteError` for `err`, met while `what`: the fix it names is to free
    space on a full disk, to check the disk otherwise, or `otherwise`.

    >>> import errno
    >>> error = space_error(OSError(errno.ENOSPC, "full"), "writing x", "write elsewhere")
    >>> error.errno == errno.ENOSPC, error.strerror
    (True, 'writing x ([Errno 28] full); free some space there, or write elsewhere')
    """
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    advice = "free some space there" if full else "check that disk and its permissions"
    return StoreWriteError(err.errno or errno.EIO, f"{what} ({err}); {advice}, or {otherwise}")


class ArraysnapWarning(UserWarning):
    """Warned once per kind of failure when ``open(..., on_error="warn")`` lets a run go on.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.warn("disk full; changes stay pending", ArraysnapWarning)
    >>> caught[0].category.__name__
    'ArraysnapWarning'
    """
