"""The capture history: one JSON line per capture in ``history.jsonl``, for ``Store.stats()``.

Only informational: it is appended after each commit or failure without an fsync of its own
(it is synced at close), and a damaged line is skipped rather than failing anything. When
the file passes 32 MiB its older half is dropped.

>>> import tempfile, pathlib
>>> from arraysnap.results import CaptureStat
>>> history = History(pathlib.Path(tempfile.mkdtemp()))
>>> history.append(CaptureStat(1, 0, 0.0, "committed", bytes_written=10))
>>> [row.bytes_written for row in history.read()]
[10]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

from .fsio import FileIO, read_regular_file
from .results import CaptureStat, CaptureStats, parse_capture_stat

__all__ = ["History"]

log = logging.getLogger("arraysnap")
_MAX_BYTES = 32 << 20


class History:
    """Append and read ``<root>/history.jsonl``."""

    def __init__(self, root: Path, io: FileIO | None = None) -> None:
        self.path = root / "history.jsonl"
        self.io = io or FileIO()
        self._lock = threading.Lock()

    def append(self, row: CaptureStat) -> None:
        line = json.dumps(dataclasses.asdict(row), separators=(",", ":"), allow_nan=False)
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                             | os.O_NONBLOCK, 0o644)
                try:
                    size = os.fstat(fd).st_size
                    self.io.write(fd, (line + "\n").encode())
                finally:
                    os.close(fd)
                if size > _MAX_BYTES:
                    self._shrink()
            except OSError as err:  # the history only informs: never fail a capture for it
                log.warning("arraysnap: could not append to %s: %r", self.path, err)

    def _shrink(self) -> None:
        data = read_regular_file(self.path, 4 * _MAX_BYTES)
        keep = data[len(data) // 2 :]
        keep = keep[keep.find(b"\n") + 1 :]
        self.io.write_atomic(self.path, keep, durable=False)

    def sync(self) -> None:
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                return
            try:
                self.io.fsync(fd)
            except OSError as err:
                log.warning("arraysnap: could not sync %s: %r", self.path, err)
            finally:
                os.close(fd)

    def read(self) -> CaptureStats:
        try:
            data = read_regular_file(self.path, 4 * _MAX_BYTES)
        except FileNotFoundError:
            return CaptureStats([])
        except OSError as err:
            log.warning("arraysnap: %s cannot be read: %r", self.path, err)
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
            log.warning("arraysnap: skipped %d damaged lines of %s", skipped, self.path)
        return CaptureStats(rows)
