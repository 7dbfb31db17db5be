"""The replay log: JSON records logged between captures, returned by ``restore().events``.

Records are numbered from 0 for the life of the store. Each manifest notes how many records
had been logged when its capture started (its replay position, the manifest field
``journal``); a restore returns the records from that position on, in order: what happened
after the snapshot, to replay its external effects. Records live in segments
``journal/<first number>.jsonl``, one JSON line each with its number and a short blake3
check. They are buffered, written in batches, and made durable at each commit (by the
barrier before the manifest, so a snapshot never points past durable records) and on
``wait()``. A line torn by a crash at the very end is dropped; anything else
malformed is a :class:`CorruptSnapshotError` naming the file and line.

>>> import tempfile
>>> from arraysnap.storage import LocalStorage
>>> replay_log = ReplayLog(LocalStorage(tempfile.mkdtemp()))
>>> _ = replay_log.log({"sent": 1}); position = replay_log.position
>>> _ = replay_log.log({"sent": 2}); replay_log.flush(durable=True)
>>> [record for record in replay_log.read_from(position)]
[{'sent': 2}]
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import blake3

from .errors import CorruptSnapshotError
from .storage import Storage

__all__ = ["MAX_RECORD_BYTES", "ReplayLog", "encode_record", "record_line"]

log = logging.getLogger("arraysnap")

MAX_RECORD_BYTES = 1 << 20
_SEGMENT_BYTES = 16 << 20
# In object storage an append rewrites the whole segment: smaller segments bound that.
_REMOTE_SEGMENT_BYTES = 256 << 10
_MAX_SEGMENT_BYTES = 1 << 30
PREFIX = "journal/"
_SEGMENT_NAME = re.compile(r"^(\d{16})\.jsonl$")
_LINE = re.compile(rb'^\{"n":(\d{1,18}),"c":"([0-9a-f]{16})","r":(.*)\}$', re.DOTALL)


def _check(text: str) -> str:
    return blake3.blake3(text.encode("utf-8")).hexdigest()[:16]


def record_line(number: int, text: str) -> str:
    """The line of a segment holding record `number`, whose JSON is `text` (with the check
    a reader verifies; the fuzzer writes hostile lines with it).

    >>> record_line(3, "{}")
    '{"n":3,"c":"6e46dd10defc9b56","r":{}}\\n'
    """
    return f'{{"n":{number},"c":"{_check(text)}","r":{text}}}\n'


def encode_record(record: object) -> str:
    """The JSON text of `record`; ValueError/TypeError naming the problem if it has none.

    >>> encode_record({"offset": 17})
    '{"offset":17}'
    """
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"log() takes a JSON-serialisable record (dict, list, str, number, "
                         f"bool, None): {err}") from None
    except RecursionError:
        raise ValueError("log() record is nested too deeply (or refers to itself)") from None
    if len(text) > MAX_RECORD_BYTES:
        raise ValueError(f"log() record is {len(text)} bytes of JSON; keep records under "
                         f"{MAX_RECORD_BYTES} bytes (store bulk data as arrays)")
    return text


class ReplayLog:
    """Append-only, segmented replay log under the storage keys ``journal/``."""

    def __init__(self, storage: Storage, *, writable: bool = True) -> None:
        self.storage = storage
        self._segment_limit = (_SEGMENT_BYTES if storage.local_path is not None
                               else _REMOTE_SEGMENT_BYTES)
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._key: str | None = None  # the segment being appended to
        self._segment_bytes = 0
        self._unsynced = False
        self._closed = False
        self.position = 0  # the number the next record gets
        if writable:
            self._open_for_append()

    # -- reading ---------------------------------------------------------------------------
    def segments(self) -> list[tuple[int, str]]:
        """(first record number, key) of each segment, in order."""
        found = []
        for key in self.storage.list_prefix(PREFIX):
            match = _SEGMENT_NAME.match(key[len(PREFIX):])
            if match:
                found.append((int(match.group(1)), key))
        return sorted(found)

    def _read_segment(self, key: str) -> bytes:
        return self.storage.get(key, limit=_MAX_SEGMENT_BYTES)

    def _lines(self, first: int, key: str, last_segment: bool) -> Iterator[tuple[int, Any]]:
        name = key[len(PREFIX):]
        try:
            data = self._read_segment(key)
        except OSError as err:
            raise CorruptSnapshotError(
                f"replay log segment journal/{name} cannot be read: {err}") from None
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the segment ends with a newline
        if torn and not last_segment:
            raise CorruptSnapshotError(
                f"replay log segment journal/{name} ends in a partial line")
        for offset, line in enumerate(lines):
            number = first + offset
            match = _LINE.match(line)
            record: Any = None
            ok = (match is not None and int(match.group(1)) == number
                  and _check(match.group(3).decode("utf-8", "replace")) == match.group(2).decode())
            if ok:
                try:
                    record = json.loads(match.group(3))  # type: ignore[union-attr]
                except (ValueError, RecursionError):
                    ok = False
            if not ok:
                raise CorruptSnapshotError(
                    f"replay log segment journal/{name}, line {offset + 1} (record {number}) is "
                    "damaged; restore an older snapshot, or remove the segment to give up its "
                    "records")
            yield number, record

    def read_from(self, position: int) -> list[Any]:
        """Every durable or buffered record numbered `position` or later, in order."""
        with self._lock:
            self._write_buffer()
            segments = self.segments()
        records: list[Any] = []
        expected: int | None = None
        for index, (first, key) in enumerate(segments):
            following = segments[index + 1][0] if index + 1 < len(segments) else None
            if following is not None and following <= position:
                continue
            if expected is None and first > position:
                expected = position  # the records from `position` on must all be here
            if expected is not None and first != expected:
                raise CorruptSnapshotError(
                    f"replay log records {expected}..{first - 1} are missing (before segment "
                    f"{key[len(PREFIX):]})")
            for number, record in self._lines(first, key, following is None):
                expected = number + 1
                if number >= position:
                    records.append(record)
            expected = expected if expected is not None else first
        return records

    def _scan_end(self) -> tuple[int, str | None, int, int]:
        """(next record number, last segment, its length up to the last whole line, its
        length)."""
        segments = self.segments()
        if not segments:
            return 0, None, 0, 0
        first, key = segments[-1]
        data = self._read_segment(key)
        whole = data.rfind(b"\n") + 1
        return first + data[:whole].count(b"\n"), key, whole, len(data)

    # -- writing ---------------------------------------------------------------------------
    def _open_for_append(self) -> None:
        try:
            self.position, key, whole, size = self._scan_end()
            if key is not None:
                if size != whole:
                    # A crash tore the last line: it was never durable, so drop it.
                    self.storage.append(key, b"", at=whole)
                self._key, self._segment_bytes = key, whole
        except OSError as err:
            raise CorruptSnapshotError(
                f"the replay log {self.storage.describe()}/journal cannot be opened ({err}); it "
                "must be a folder of regular .jsonl files: move the odd file away") from None

    def log(self, record: object) -> int:
        """Buffer one record; return its number."""
        text = encode_record(record)
        with self._lock:
            if self._closed:
                raise ValueError("the replay log is closed")
            number = self.position
            self.position += 1
            self._buffer.append(record_line(number, text))
            return number

    def _write_buffer(self) -> None:
        """Append the buffered records (the caller holds the lock); all or none of them."""
        if not self._buffer or self._closed:
            return
        first = self.position - len(self._buffer)
        data = "".join(self._buffer).encode("utf-8")
        key, at = self._key, self._segment_bytes
        if key is None or (at and at + len(data) > self._segment_limit):
            # A new segment; anything already under its key is stale: these records are
            # still buffered.
            key, at = f"{PREFIX}{first:016d}.jsonl", 0
        # All or nothing: on failure the records stay buffered and the retry, which writes
        # the whole batch again, leaves no duplicate or torn line.
        self.storage.append(key, data, at=at)
        self._buffer = []
        self._key, self._segment_bytes = key, at + len(data)
        self._unsynced = True

    def flush(self, durable: bool) -> None:
        """Write buffered records; with `durable`, make them durable (a storage barrier)."""
        with self._lock:
            self._write_buffer()
            if durable and self._unsynced:
                self.storage.barrier()
                self._unsynced = False

    def trim(self, position: int) -> int:
        """Delete whole segments holding only records before `position`; return how many."""
        with self._lock:
            segments = self.segments()
            removed = 0
            for (_, key), (following, _) in zip(segments, segments[1:], strict=False):
                if following <= position:
                    self.storage.delete(key)
                    removed += 1
            if removed:
                self.storage.barrier()
            return removed

    def close(self) -> None:
        with self._lock:
            self._key = None
            self._closed = True
