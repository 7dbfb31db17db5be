"""The commit point: a snapshot's manifest, written create-only under its seq's key.

A snapshot is committed once its manifest exists (everything it names was made durable
before); nothing else tells a committed snapshot from one that was cut short.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage
>>> storage = LocalStorage(tempfile.mkdtemp())
>>> put_manifest(storage, 3, b"{}"); put_manifest(storage, 3, b"{}")  # a retry: the same bytes
>>> storage.get(manifest_key(3))
b'{}'
"""

from __future__ import annotations

import errno

from .storage import Storage

__all__ = ["manifest_key", "put_manifest"]


def manifest_key(seq: int) -> str:
    """The storage key of snapshot `seq`'s manifest.

    >>> manifest_key(7)
    'snapshots/000000000007.json'
    """
    return f"snapshots/{seq:012d}.json"


def put_manifest(storage: Storage, seq: int, data: bytes) -> None:
    """Write snapshot `seq`'s manifest create-only (the commit point) and make it durable.

    A key that exists already is fine only if it holds these very bytes: an earlier attempt
    of this commit that landed although its reply was lost.
    """
    key = manifest_key(seq)
    if not storage.put_if_absent(key, data) and storage.get(key) != data:
        raise FileExistsError(errno.EEXIST, f"snapshot {seq} exists already in "
                              f"{storage.describe()}: is another writer at work?", key)
    storage.barrier()
