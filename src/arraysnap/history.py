"""The capture history: one JSON line per capture in ``history.jsonl``, for ``Store.stats()``.

Only informational: it is appended after each commit or failure without an fsync of its own
(it is synced at close), and a damaged line is skipped rather than failing anything. When
the file passes 32 MiB its older half is dropped.

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

from .results import CaptureStat, CaptureStats, parse_capture_stat
from .storage import Storage

__all__ = ["History"]

log = logging.getLogger("arraysnap")
KEY = "history.jsonl"
_MAX_BYTES = 32 << 20


class History:
    """Append and read the storage key ``history.jsonl``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._size: int | None = None  # of the file, once this writer has looked

    def append(self, row: CaptureStat) -> None:
        line = json.dumps(dataclasses.asdict(row), separators=(",", ":"), allow_nan=False)
        with self._lock:
            try:
                if self._size is None:
                    try:
                        self._size = self.storage.size(KEY)
                    except FileNotFoundError:
                        self._size = 0
                data = (line + "\n").encode()
                self.storage.append(KEY, data, at=self._size, durable=False)
                self._size += len(data)
                if self._size > _MAX_BYTES:
                    self._shrink()
            except OSError as err:  # the history only informs: never fail a capture for it
                self._size = None
                log.warning("arraysnap: could not append to %s/%s: %r",
                            self.storage.describe(), KEY, err)

    def _shrink(self) -> None:
        data = self.storage.get(KEY, limit=4 * _MAX_BYTES)
        keep = data[len(data) // 2 :]
        keep = keep[keep.find(b"\n") + 1 :]
        self.storage.put_atomic(KEY, keep, durable=False)
        self._size = len(keep)

    def sync(self) -> None:
        with self._lock:
            try:
                if self.storage.exists(KEY):
                    self.storage.barrier([KEY])
            except OSError as err:
                log.warning("arraysnap: could not sync %s/%s: %r", self.storage.describe(),
                            KEY, err)

    def read(self) -> CaptureStats:
        try:
            data = self.storage.get(KEY, limit=4 * _MAX_BYTES)
        except FileNotFoundError:
            return CaptureStats([])
        except OSError as err:
            log.warning("arraysnap: %s/%s cannot be read: %r", self.storage.describe(), KEY, err)
            return CaptureStats([])
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
