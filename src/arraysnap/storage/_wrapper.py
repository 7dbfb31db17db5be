"""Storages that decorate another: forward everything (``WrapperStorage``), or log each call.

As zarr's ``WrapperStore`` and ``LoggingStore`` do for a zarr store: subclass
``WrapperStorage`` and override the calls to observe or change; the fault injection of
``arraysnap.testing`` is one.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage
>>> logged = LoggingStorage(LocalStorage(tempfile.mkdtemp()))
>>> logged.put_if_absent("chunks/ab/cd", b"x"); logged.barrier()
True
>>> logged.calls
[('put_if_absent', 'chunks/ab/cd'), ('barrier', '')]
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._abc import DEFAULT_GET_LIMIT, Storage, WriterLock

__all__ = ["LoggingStorage", "WrapperStorage"]


class WrapperStorage(Storage):
    """A storage that forwards every call to `inner`; override what you want to change.

    >>> import tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> inner = LocalStorage(tempfile.mkdtemp())
    >>> WrapperStorage(inner).local_path == inner.local_path
    True
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    @property
    def local_path(self) -> Path | None:
        return self.inner.local_path

    def describe(self) -> str:
        return self.inner.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        return self.inner.get(key, limit=limit)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def modified(self, key: str) -> float:
        return self.inner.modified(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list_prefix(self, prefix: str) -> Iterator[str]:
        return self.inner.list_prefix(prefix)

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        return self.inner.put_if_absent(key, data)

    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.inner.put_atomic(key, data, durable=durable)

    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        self.inner.append(key, data, at=at, durable=durable)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def barrier(self, keys: Iterable[str] = ()) -> None:
        self.inner.barrier(keys)

    def create(self) -> None:
        self.inner.create()

    def lock_writer(self, holder: str) -> WriterLock:
        return self.inner.lock_writer(holder)

    def remove_temporaries(self) -> int:
        return self.inner.remove_temporaries()

    def close(self) -> None:
        self.inner.close()


class LoggingStorage(WrapperStorage):
    """Records every writing call as ``(operation, key)`` in ``calls``, in order.

    Reads are recorded too with ``reads=True``. A barrier's key is ``""``.

    >>> import tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> logged = LoggingStorage(LocalStorage(tempfile.mkdtemp()), reads=True)
    >>> logged.exists("x"), logged.calls
    (False, [('exists', 'x')])
    """

    def __init__(self, inner: Storage, *, reads: bool = False) -> None:
        super().__init__(inner)
        self.reads = reads
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _note(self, operation: str, key: str) -> None:
        with self._lock:
            self.calls.append((operation, key))

    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        if self.reads:
            self._note("get", key)
        return super().get(key, limit=limit)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if self.reads:
            self._note("get_range", key)
        return super().get_range(key, start, length)

    def exists(self, key: str) -> bool:
        if self.reads:
            self._note("exists", key)
        return super().exists(key)

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        self._note("put_if_absent", key)
        return super().put_if_absent(key, data)

    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._note("put_atomic", key)
        super().put_atomic(key, data, durable=durable)

    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        self._note("append", key)
        super().append(key, data, at=at, durable=durable)

    def delete(self, key: str) -> None:
        self._note("delete", key)
        super().delete(key)

    def barrier(self, keys: Iterable[str] = ()) -> None:
        self._note("barrier", "")
        super().barrier(keys)
