"""Public results: what ``list()``, ``capture()``, ``restore()`` and ``verify()`` return.

>>> report = VerifyReport(snapshots_checked=1, chunks_checked=4, problems=())
>>> report.ok
True
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import ChunkLayout
from .manifest import ArrayEntry, Manifest
from .restored import RestoredArrays

__all__ = ["ArrayInfo", "CaptureInfo", "CaptureStat", "CaptureStats", "CopyReport", "Problem",
           "PruneReport",
           "Restored", "SnapshotInfo", "SnapshotUsage", "StoreUsage", "VerifyReport"]


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """Shape, dtype, memory order and chunking of one captured array.

    ``chunk_shape`` is in the array's own index order (for an F-ordered array too), and
    ``dims`` are its dimension names if it has them.

    >>> ArrayInfo((2, 3), np.dtype("f8"), "C", 1).nbytes
    48
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    order: str
    n_chunks: int
    chunk_shape: tuple[int, ...] = ()
    dims: tuple[str, ...] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@functools.lru_cache(maxsize=4096)
def _array_info(layout: ChunkLayout, dims: tuple[str, ...] | None) -> ArrayInfo:
    """One ArrayInfo per distinct layout: thousands of arrays share a few."""
    return ArrayInfo(layout.shape, layout.dtype, layout.order, layout.n_chunks,
                     layout.chunk_shape if layout.order == "C" else layout.chunk_shape[::-1],
                     dims)


class _ArrayInfos(Mapping[str, ArrayInfo]):
    """A snapshot's arrays as ArrayInfos, each made when asked for: a restore of 10,000
    arrays need not make 10,000 of them first (it spent 5 ms on that)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, ArrayEntry]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> ArrayInfo:
        entry = self._entries[name]
        return _array_info(entry.layout, entry.dims)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return repr(dict(self))


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One committed snapshot: identity, arrays, and the statistics of its capture.

    ``blocked_seconds`` is how long ``capture()`` held the caller: waiting for the previous
    capture to have read its chunks, then the ``pause_seconds`` that compared and copied.
    ``bytes_written`` counts the objects this capture added (chunk objects, packs and table
    objects) plus its manifest;
    ``state`` and ``rng_state`` are the JSON the capture stored (``restore()`` turns the
    latter back into generators); ``parent`` is the seq of the snapshot before it.
    ``remote`` is whether it is committed in object storage: always for a store there,
    once uploaded for one with a local tier (``local=``), never for a local store.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.zeros(4)}, step=1)
    ...     snap.wait()
    ...     info = snap.latest()
    >>> info.seq, info.step, info.arrays["u"].shape, info.chunks_changed
    (1, 1, (4,), 1)
    """

    seq: int
    step: int | None
    time: float
    arrays: Mapping[str, ArrayInfo]
    pause_seconds: float
    chunks_scanned: int
    chunks_changed: int
    chunks_deduplicated: int
    bytes_written: int
    durable_seconds: float
    stats: Mapping[str, Any] = field(default_factory=dict)
    parent: int | None = None
    codec: Mapping[str, Any] = field(default_factory=dict)
    state: Any = None
    rng_state: Any = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    manifest_bytes: int = 0
    blocked_seconds: float = 0.0
    remote: bool = False

    @classmethod
    def from_manifest(cls, manifest: Manifest, manifest_bytes: int) -> SnapshotInfo:
        stats = dict(manifest.stats)

        def number(key: str, kind: type) -> Any:
            value = stats.get(key, 0)
            try:
                return kind(value) if isinstance(value, (int, float)) else kind(0)
            except (OverflowError, ValueError):  # a huge int
                return kind(0)

        arrays = _ArrayInfos(manifest.arrays)
        return cls(
            seq=manifest.seq, step=manifest.step, time=manifest.time, arrays=arrays,
            pause_seconds=number("pause_seconds", float),
            chunks_scanned=number("chunks_scanned", int),
            chunks_changed=number("chunks_changed", int),
            chunks_deduplicated=number("chunks_deduplicated", int),
            bytes_written=number("bytes_written", int) + manifest_bytes,
            durable_seconds=number("durable_seconds", float),
            stats=stats, parent=manifest.parent, codec=dict(manifest.codec),
            state=manifest.state, rng_state=manifest.rng,
            provenance=dict(manifest.provenance), manifest_bytes=manifest_bytes,
            blocked_seconds=number("pause_seconds", float) + number("queue_seconds", float),
        )


class CaptureInfo:
    """What ``capture()`` returns at once: the pause's figures, and the snapshot when durable.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     pending = snap.capture({"u": np.zeros(4)})
    ...     info = pending.result()
    >>> pending.done(), info.seq == pending.seq
    (True, True)
    """

    def __init__(self, seq: int, step: int | None, pause_seconds: float, chunks_scanned: int,
                 chunks_changed: int, chunks_compared: int | None = None,
                 blocked_seconds: float | None = None) -> None:
        self.seq = seq
        self.step = step
        self.pause_seconds = pause_seconds
        # All that capture() held the caller: the wait for the previous capture's reads too.
        self.blocked_seconds = pause_seconds if blocked_seconds is None else blocked_seconds
        self.chunks_scanned = chunks_scanned
        self.chunks_changed = chunks_changed
        # Chunks the pause compared byte by byte: fewer than chunks_scanned when write
        # tracking knew the others were not written.
        self.chunks_compared = chunks_scanned if chunks_compared is None else chunks_compared
        self._done = threading.Event()
        self._info: SnapshotInfo | None = None
        self._error: BaseException | None = None

    def finish(self, info: SnapshotInfo | None, error: BaseException | None) -> None:
        """Settle the capture: durable as `info`, or failed with `error` (the store calls it).

        >>> pending = CaptureInfo(1, 0, 0.001, 1, 1)
        >>> pending.finish(None, OSError(5, "EIO")); pending.done()
        True
        """
        self._info, self._error = info, error
        self._done.set()

    def done(self) -> bool:
        """True once the snapshot is durable or its persistence failed."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> SnapshotInfo:
        """Block until durable; return its SnapshotInfo or raise the persistence error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"snapshot {self.seq} not durable after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return self._info

    def __repr__(self) -> str:
        state = "durable" if self._info else ("failed" if self._error else "pending")
        return (f"CaptureInfo(seq={self.seq}, step={self.step}, {state}, "
                f"blocked={self.blocked_seconds * 1e3:.2f} ms "
                f"(pause {self.pause_seconds * 1e3:.2f} ms), "
                f"changed={self.chunks_changed}/{self.chunks_scanned} chunks)")


@dataclass(frozen=True, slots=True)
class Restored:
    """A restored snapshot. ``arrays`` are copy-on-write memory maps: writing to them is fine
    (a mapping that behaves as a dict, each array made when first used: `RestoredArrays`).

    ``skipped`` lists the newer snapshots that ``restore(fallback=True)`` could not restore.
    ``events`` are the records ``Store.log()`` logged after this snapshot's capture, in order.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.arange(3.0)}, step=7, state={"t": 0.5})
    ...     r = snap.restore()
    >>> r.step, r.state, r.arrays["u"].tolist()
    (7, {'t': 0.5}, [0.0, 1.0, 2.0])
    """

    arrays: RestoredArrays
    step: int | None
    seq: int
    time: float
    state: dict[str, Any] | None
    rng: Any
    info: SnapshotInfo
    skipped: tuple[Problem, ...] = ()
    events: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        arrays = ", ".join(f"{name!r}: {a.shape} {a.dtype}" for name, a in self.arrays.items())
        state = "None" if self.state is None else f"{{{', '.join(map(repr, self.state))}}}"
        extra = (f", skipped={[p.seq for p in self.skipped]}" if self.skipped else "") + (
            f", events={len(self.events)}" if self.events else "")
        return (f"Restored(seq={self.seq}, step={self.step}, arrays={{{arrays}}}, "
                f"state keys {state}{extra})")


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem ``verify()`` found: where (snapshot, array, chunk) and what.

    >>> print(Problem(3, "u", 7, "chunk object is missing"))
    snapshot 3, array 'u', chunk 7: chunk object is missing
    """

    seq: int | None
    array: str | None
    chunk: int | None
    message: str

    def __str__(self) -> str:
        where = [f"snapshot {self.seq}" if self.seq is not None else "store"]
        if self.array is not None:
            where.append(f"array {self.array!r}")
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        return f"{', '.join(where)}: {self.message}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of ``Store.verify()``; ``ok`` is True when nothing is wrong.

    >>> VerifyReport(1, 1, (Problem(3, "u", 0, "missing"),)).ok
    False
    """

    snapshots_checked: int
    chunks_checked: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (f"checked {_count(self.snapshots_checked, 'snapshot')}, "
                f"{_count(self.chunks_checked, 'chunk')}: "
                f"{'ok' if self.ok else _count(len(self.problems), 'problem')}")
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What ``prune()`` or ``gc()`` removed.

    >>> PruneReport((1, 2), 5, 1024).snapshots_removed
    (1, 2)
    """

    snapshots_removed: tuple[int, ...]
    chunks_removed: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What ``arraysnap.copy()`` did: the snapshots it copied, those the destination
    held already (the same snapshots: left as they were), and the objects and bytes it
    put (the replay log's segments included in the bytes).

    >>> CopyReport((3, 4), (1, 2), 10, 4096).copied
    (3, 4)
    """

    copied: tuple[int, ...]
    already_there: tuple[int, ...]
    objects_copied: int
    bytes_copied: int


@dataclass(frozen=True, slots=True)
class CaptureStat:
    """One capture's figures in the store's history (``Store.stats()``).

    ``status`` is ``"committed"`` or ``"failed"`` (then ``error`` says why). Times are in
    seconds: ``blocking_seconds`` is how long ``capture()`` held the caller (``queue_seconds``
    waiting for the previous capture to read the baselines, plus the ``pause_seconds``);
    ``encode_seconds`` reading, hashing and encoding changed chunks, ``write_seconds``
    writing them, ``commit_seconds`` syncing and writing the manifest; ``durable_seconds``
    from the call to the commit. ``chunks_compared`` is how many of the ``chunks_scanned``
    the pause compared byte by byte (fewer with write tracking).

    >>> row = CaptureStat(seq=1, step=10, time=0.0, status="committed", chunks_scanned=8,
    ...                   chunks_changed=2)
    >>> row.changed_fraction
    0.25
    """

    seq: int
    step: int | None
    time: float
    status: str
    pause_seconds: float = 0.0
    queue_seconds: float = 0.0
    blocking_seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    commit_seconds: float = 0.0
    durable_seconds: float = 0.0
    chunks_scanned: int = 0
    chunks_compared: int = 0
    chunks_changed: int = 0
    chunks_deduplicated: int = 0
    bytes_written: int = 0
    retries: int = 0
    error: str | None = None

    @property
    def changed_fraction(self) -> float:
        return self.chunks_changed / self.chunks_scanned if self.chunks_scanned else 0.0


_STAT_FIELDS = tuple(CaptureStat.__dataclass_fields__)


class CaptureStats:
    """The capture history as a table: rows are :class:`CaptureStat`, oldest first.

    ``len()``, iteration and indexing give rows; ``column(name)`` a NumPy array;
    ``to_dict()`` a dict of columns (``pandas.DataFrame(stats.to_dict())`` makes a frame).

    >>> stats = CaptureStats([CaptureStat(1, 0, 0.0, "committed", pause_seconds=0.002,
    ...                                   chunks_scanned=4, chunks_changed=4)])
    >>> len(stats), stats.column("pause_seconds").tolist(), stats.to_dict()["status"]
    (1, [0.002], ['committed'])
    """

    columns: tuple[str, ...] = (*_STAT_FIELDS, "changed_fraction")

    def __init__(self, rows: list[CaptureStat]) -> None:
        self.rows = tuple(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __getitem__(self, index: int) -> CaptureStat:
        return self.rows[index]

    def column(self, name: str) -> np.ndarray:
        """One column as an array (float or int; object for ``status``/``error``/``step``)."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns are {', '.join(self.columns)}")
        values = [getattr(row, name) for row in self.rows]
        if name in ("status", "error", "step"):
            return np.array(values, dtype=object)
        return np.array(values, dtype=np.int64 if name in _INT_COLUMNS else np.float64)

    def to_dict(self) -> dict[str, list[Any]]:
        return {name: [getattr(row, name) for row in self.rows] for name in self.columns}

    def __repr__(self) -> str:
        head = (f"{'seq':>6} {'step':>10} {'status':>9} {'pause ms':>9} {'blocked ms':>10} "
                f"{'durable s':>9} {'changed':>15} {'bytes':>12}")
        lines = [f"CaptureStats: {len(self.rows)} captures", head]
        for row in self.rows[-20:]:
            lines.append(
                f"{row.seq:>6} {'-' if row.step is None else row.step:>10} {row.status:>9} "
                f"{row.pause_seconds * 1e3:>9.2f} {row.blocking_seconds * 1e3:>10.2f} "
                f"{row.durable_seconds:>9.3f} "
                f"{f'{row.chunks_changed}/{row.chunks_scanned}':>15} {row.bytes_written:>12}")
        if len(self.rows) > 20:
            lines.insert(2, f"{'...':>6} (the last 20 shown)")
        return "\n".join(lines)


_INT_COLUMNS = {"seq", "chunks_scanned", "chunks_compared", "chunks_changed",
                "chunks_deduplicated", "bytes_written", "retries"}


def parse_capture_stat(value: object) -> CaptureStat | None:
    """A history line's row, or None if it is not one (hostile files are skipped).

    >>> parse_capture_stat({"seq": 1, "step": None, "time": 0, "status": "failed"}).status
    'failed'
    >>> parse_capture_stat({"seq": "x"}) is None
    True
    """
    if not isinstance(value, dict):
        return None
    fields: dict[str, Any] = {}
    for name in _STAT_FIELDS:
        item = value.get(name)
        if name in ("seq",) or name in _INT_COLUMNS:
            if name == "seq" and type(item) is not int:
                return None
            fields[name] = item if type(item) is int else 0
        elif name == "step":
            fields[name] = item if type(item) is int else None
        elif name == "status":
            if item not in ("committed", "failed"):
                return None
            fields[name] = item
        elif name == "error":
            fields[name] = item if isinstance(item, str) else None
        else:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
            fields[name] = float(item) if ok and abs(item) < 1e300 else 0.0
    if type(value.get("chunks_compared")) is not int:  # written before write tracking
        fields["chunks_compared"] = fields["chunks_scanned"]
    return CaptureStat(**fields)


@dataclass(frozen=True, slots=True)
class SnapshotUsage:
    """Bytes of one snapshot's chunk objects and packs (a pack counted whole): all it uses,
    only it uses, shared, first added.

    ``unique_bytes`` is what pruning this snapshot alone would free; ``new_bytes`` counts
    the objects no older snapshot uses (about what its capture wrote).

    >>> SnapshotUsage(1, 0, 4, 100, 60, 40, 100, 500).shared_bytes
    40
    """

    seq: int
    step: int | None
    chunks: int
    referenced_bytes: int
    unique_bytes: int
    shared_bytes: int
    new_bytes: int
    manifest_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Disk use of a whole store: what ``Store.disk_usage()`` returns.

    >>> StoreUsage([], 0, 0, 0, 0, 0, 0, 0).to_json()["objects"]
    0
    """

    snapshots: list[SnapshotUsage]
    objects: int
    object_bytes: int
    referenced_bytes: int
    unreferenced_objects: int
    unreferenced_bytes: int
    manifest_bytes: int
    baseline_bytes: int
    damaged: list[str] = field(default_factory=list)
    table_bytes: int = 0  # format 2's table objects (shared by snapshots, like chunks)

    def to_json(self) -> dict[str, Any]:
        return {"snapshots": [s.to_json() for s in self.snapshots], "objects": self.objects,
                "object_bytes": self.object_bytes, "referenced_bytes": self.referenced_bytes,
                "unreferenced_objects": self.unreferenced_objects,
                "unreferenced_bytes": self.unreferenced_bytes,
                "manifest_bytes": self.manifest_bytes, "baseline_bytes": self.baseline_bytes,
                "table_bytes": self.table_bytes, "damaged": self.damaged}
