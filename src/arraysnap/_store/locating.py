"""Where a store is (a folder, a URL, a store object) and where its baselines go.

A store in object storage has no folder of its own for the writer's baselines (the files
a capture compares against), so they go to a local *baseline folder*: ``baseline_dir=``,
or by default one per store under the user's cache (``$XDG_CACHE_HOME/arraysnap``, else
``~/.cache/arraysnap``). It is a cache: deleting it costs the next writer one read of the
newest snapshot, never data. The folder is claimed by one writer at a time (a lock byte
on ``<baseline_dir>/lock``) and its marker names the store whose snapshot it holds (the
store's id), so two stores never share one folder's baselines by mistake.

>>> import tempfile
>>> storage = as_storage(tempfile.mkdtemp() + "/run.snap", None)
>>> type(storage).__name__, is_url("s3://bucket/run.snap"), is_url("/data/run.snap")
('LocalStorage', True, False)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blake3

from ..errors import StoreLockedError
from ..leases import LockFile
from ..storage import LocalStorage, ObjectStorage, Storage

__all__ = ["BaselineClaim", "as_storage", "default_baseline_dir", "is_url"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def is_url(path: object) -> bool:
    """Whether `path` is a URL (``scheme://...``) rather than a local path.

    >>> is_url("gs://bucket/x"), is_url("relative/run.snap"), is_url(Path("/x"))
    (True, False, False)
    """
    return isinstance(path, str) and _URL.match(path) is not None


def _is_store_object(path: object) -> bool:
    # obstore's stores, without importing obstore for a local store.
    return type(path).__module__.split(".")[0] == "obstore"


def as_storage(path: object, storage_options: Mapping[str, Any] | None) -> Storage:
    """The :class:`Storage` `path` names: a :class:`Storage` as it is, a URL or an obstore
    store object as an :class:`ObjectStorage` (`storage_options` configure a URL's), a
    ``file://`` URL or any other path as a :class:`LocalStorage`.

    >>> as_storage("/data/run.snap", {"region": "eu-west-1"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: storage_options configure a store in object storage (...); /data/run.snap is a ...
    """
    if isinstance(path, Storage):
        if storage_options:
            raise ValueError(f"storage_options configure a store opened from a URL; {path!r} "
                             "is configured already")
        return path
    if _is_store_object(path):
        return ObjectStorage(path, storage_options=storage_options)
    if is_url(path):
        assert isinstance(path, str)
        if path.lower().startswith("file://"):
            path = path[len("file://"):]
        else:
            return ObjectStorage(path, storage_options=storage_options)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a store is a folder (str or os.PathLike), a URL (s3://, gs://, "
                        f"az://), an obstore store or an arraysnap Storage, not {path!r}")
    if storage_options:
        raise ValueError("storage_options configure a store in object storage (an s3://, "
                         f"gs:// or az:// URL); {os.fspath(path)} is a local folder")
    return LocalStorage(path)


def cache_root() -> Path:
    """The folder under which remote stores' baselines go by default.

    >>> cache_root().name
    'arraysnap'
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "arraysnap"


def default_baseline_dir(storage: Storage) -> Path:
    """The default baseline folder of a store in object storage: one per store location,
    named after it (``<cache>/baselines/<last part>-<hash>``).

    >>> from arraysnap.storage import ObjectStorage
    >>> from obstore.store import MemoryStore
    >>> default_baseline_dir(ObjectStorage("s3://b/runs/run42.snap")).name[:10]
    'run42.snap'
    """
    where = storage.describe()
    last = _SLUG.sub("-", where.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:48] or "store"
    return cache_root() / "baselines" / f"{last}-{blake3.blake3(where.encode()).hexdigest()[:16]}"


class BaselineClaim:
    """One writer's hold on a baseline folder (``<folder>/lock``), until released.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> claim = BaselineClaim(folder, "s3://b/run.snap")
    >>> BaselineClaim(folder, "s3://b/other.snap")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    arraysnap.errors.StoreLockedError: the baseline folder ... is in use by another writer; ...
    >>> claim.release()
    """

    def __init__(self, folder: Path, store: str) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._file: LockFile | None = LockFile(folder / "lock", writable=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot use {folder} as the baseline folder of {store}: "
                          f"{err.strerror}; give baseline_dir= a writable local folder") from err
        if not self._file.try_lock(0, exclusive=True):
            self._file.close()
            self._file = None
            raise StoreLockedError(
                f"the baseline folder {folder} is in use by another writer; a writer of "
                f"{store} needs a baseline folder of its own: give baseline_dir=")

    def release(self) -> None:
        """Let the folder go (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
