"""The capture history: one JSON line per capture in ``history.jsonl``, for ``Store.stats()``.

Only informational: it is appended after each commit or failure without an fsync of its own
(it is synced at close), and a damaged line is skipped rather than failing anything. When
the file passes 32 MiB its older half is dropped. In object storage an append rewrites the
whole object (two requests), so there the lines wait and are appended together, at most
once a minute and at ``sync()``, and the file keeps at most 1 MiB: the history costs no
request per capture.

>>> import tempfile
>>> from arraysnap.results import CaptureStat
>>> from arraysnap.storage import LocalStorage
>>> history = History(LocalStorage(tempfile.mkdtemp()))
>>> history.append(CaptureStat(1, 0, 0.0, "committed", bytes_written=10))
>>> [row.bytes_written for row in history.read()]
[10]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

from .results import CaptureStat, CaptureStats, parse_capture_stat
from .storage import Storage

__all__ = ["History"]

log = logging.getLogger("arraysnap")
KEY = "history.jsonl"
_MAX_BYTES = 32 << 20
_MAX_REMOTE_BYTES = 1 << 20
FLUSH_SECONDS = 60.0  # in object storage: how long lines may wait to be appended


class History:
    """Append and read the storage key ``history.jsonl``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._size: int | None = None  # of the file, once this writer has looked
        self._deferred = storage.local_path is None  # lines wait (see the module doc)
        self._max_bytes = _MAX_REMOTE_BYTES if self._deferred else _MAX_BYTES
        self._waiting: list[bytes] = []
        self._flushed = time.monotonic()

    def append(self, row: CaptureStat) -> None:
        line = json.dumps(dataclasses.asdict(row), separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._waiting.append((line + "\n").encode())
            if not self._deferred or time.monotonic() - self._flushed >= FLUSH_SECONDS:
                self._flush()

    def _flush(self) -> None:
        self._flushed = time.monotonic()
        if not self._waiting:
            return
        try:
            if self._size is None:
                try:
                    self._size = self.storage.size(KEY)
                except FileNotFoundError:
                    self._size = 0
            data = b"".join(self._waiting)
            self.storage.append(KEY, data, at=self._size, durable=False)
            self._waiting.clear()
            self._size += len(data)
            if self._size > self._max_bytes:
                self._shrink()
        except OSError as err:  # the history only informs: never fail a capture for it
            self._size = None
            del self._waiting[:-1000]  # a store that stays down: keep the newest lines
            log.warning("arraysnap: could not append to %s/%s: %r",
                        self.storage.describe(), KEY, err)

    def _shrink(self) -> None:
        data = self.storage.get(KEY, limit=4 * self._max_bytes)
        keep = data[len(data) // 2 :]
        keep = keep[keep.find(b"\n") + 1 :]
        self.storage.put_atomic(KEY, keep, durable=False)
        self._size = len(keep)

    def sync(self) -> None:
        with self._lock:
            self._flush()
            try:
                if self.storage.exists(KEY):
                    self.storage.barrier([KEY])
            except OSError as err:
                log.warning("arraysnap: could not sync %s/%s: %r", self.storage.describe(),
                            KEY, err)

    def read(self) -> CaptureStats:
        """Every line stored, and those of this writer still waiting to be appended."""
        with self._lock:
            waiting = b"".join(self._waiting)
        try:
            data = self.storage.get(KEY, limit=4 * _MAX_BYTES) + waiting
        except FileNotFoundError:
            data = waiting
        except OSError as err:
            log.warning("arraysnap: %s/%s cannot be read: %r", self.storage.describe(), KEY, err)
            data = waiting
        rows = []
        skipped = 0
        for line in data.splitlines():
            try:
                row = parse_capture_stat(json.loads(line))
            except (ValueError, RecursionError):
                row = None
            if row is None:
                skipped += 1
            else:
                rows.append(row)
        if skipped:
            log.warning("arraysnap: skipped %d damaged lines of %s/%s", skipped,
                        self.storage.describe(), KEY)
        return CaptureStats(rows)
