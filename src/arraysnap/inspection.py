"""What the command line computes from a store: snapshot selection, diff, disk use, verify.

Everything here reads a store through its manifests and chunk objects and never writes; the
command line (``arraysnap.cli``) formats the results. Nothing here prints: long loops take a
``progress(done, total)`` callback instead.

>>> import arraysnap, numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/run.snap"
>>> with arraysnap.open(path, chunk_bytes=64) as snap:      # 8 float64 rows per chunk
...     u = np.zeros(32)
...     _ = snap.capture({"u": u}, step=0)
...     u[20] = 3.0
...     _ = snap.capture({"u": u}, step=1)
>>> with arraysnap.open(path, mode="r") as snap:
...     d = diff_snapshots(snap, resolve_snapshot(snap, "step:0"), resolve_snapshot(snap, "~0"))
>>> d.arrays[0].chunks_differing, d.arrays[0].row_ranges, d.arrays[0].max_abs_difference
([2], [(16, 24)], 3.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .chunks import load_chunk
from .errors import ArraysnapError, CorruptSnapshotError, SnapshotNotFoundError
from .manifest import ArrayEntry, Manifest, dtype_to_json
from .results import Problem, VerifyReport

if TYPE_CHECKING:
    from .store import Store

__all__ = ["SNAPSHOT_SPEC_HELP", "ArrayDiff", "SnapshotDiff", "SnapshotUsage", "StoreUsage",
           "diff_snapshots", "disk_usage", "resolve_snapshot", "verify_snapshots"]

Progress = Callable[[int, int], None]

SNAPSHOT_SPEC_HELP = (
    "SNAP selects a snapshot: a seq number (12), 'step:N' (the newest snapshot of step N), "
    "'latest' (the default), '~K' (K snapshots before the latest; ~0 is the latest) or, "
    "after '--', '-K' (Python-style: -1 is the latest)."
)

_STEP = re.compile(r"^step:(-?\d+)$")
_BACK = re.compile(r"^(?:latest)?~(\d+)$")


def resolve_snapshot(store: Store, spec: str | int | None) -> int:
    """The seq of the snapshot that `spec` names (see ``SNAPSHOT_SPEC_HELP``).

    Raises SnapshotNotFoundError if there is no such snapshot, ValueError if `spec` is not
    one of the accepted forms.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     for step in (10, 20, 30):
    ...         _ = snap.capture({"u": np.full(3, step)}, step=step)
    ...     snap.wait()
    ...     [resolve_snapshot(snap, s) for s in ("latest", "2", "step:10", "~1", "-3")]
    [3, 2, 1, 2, 1]
    """
    seqs = store._seqs()
    if not seqs:
        raise SnapshotNotFoundError(f"{store.path} holds no snapshot yet")
    text = "latest" if spec is None else str(spec).strip()
    if text == "latest":
        return seqs[-1]
    if text.isdigit():
        seq = int(text)
        if seq not in seqs:
            raise SnapshotNotFoundError(
                f"no snapshot with seq {seq} in {store.path}; seqs are "
                f"{_describe_seqs(seqs)} (run 'arraysnap ls {store.path}')")
        return seq
    back = _BACK.match(text)
    if back or (text.startswith("-") and text[1:].isdigit() and int(text[1:]) > 0):
        count = int(back.group(1)) if back else int(text[1:]) - 1
        if count >= len(seqs):
            raise SnapshotNotFoundError(
                f"{text!r} goes back {count} snapshots, but {store.path} holds only "
                f"{len(seqs)}")
        return seqs[-1 - count]
    step = _STEP.match(text)
    if step:
        wanted = int(step.group(1))
        steps = []
        for seq in reversed(seqs):
            try:
                manifest = store._load(seq)[0]
            except ArraysnapError:
                continue  # a damaged manifest cannot be the one asked for by step
            if manifest.step == wanted:
                return seq
            if manifest.step is not None:
                steps.append(manifest.step)
        shown = ", ".join(map(str, sorted(set(steps))[-10:])) or "none"
        raise SnapshotNotFoundError(f"no snapshot of step {wanted} in {store.path}; "
                                    f"latest steps are {shown}")
    raise ValueError(f"{text!r} does not name a snapshot. {SNAPSHOT_SPEC_HELP}")


def _describe_seqs(seqs: list[int]) -> str:
    if len(seqs) <= 8:
        return ", ".join(map(str, seqs))
    return f"{', '.join(map(str, seqs[:3]))}, ..., {', '.join(map(str, seqs[-3:]))}"


# -- diff ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ArrayDiff:
    """How one array differs between two snapshots.

    `status` is ``same``, ``changed``, ``added`` (only in B), ``removed`` (only in A) or
    ``replaced`` (shape or dtype differ: nothing to compare element by element).
    `row_ranges` are half-open index ranges along the leading axis holding every difference.

    >>> ArrayDiff("u", "changed", 4, [1], [(8, 16)], 0.5).fraction
    0.25
    """

    name: str
    status: str
    n_chunks: int
    chunks_differing: list[int] | None
    row_ranges: list[tuple[int, int]] | None
    max_abs_difference: float | int | None = None
    note: str = ""

    @property
    def fraction(self) -> float:
        """Fraction of B's chunks that differ (1.0 when added, removed or replaced)."""
        if self.status in ("added", "removed", "replaced"):
            return 1.0
        if not self.n_chunks or self.chunks_differing is None:
            return 0.0
        return len(self.chunks_differing) / self.n_chunks

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (a NaN difference becomes the string "nan").

        >>> ArrayDiff("u", "same", 2, [], [], None).to_json()["fraction"]
        0.0
        """
        value = self.max_abs_difference
        if isinstance(value, float) and math.isnan(value):
            value = "nan"  # type: ignore[assignment]
        return {"name": self.name, "status": self.status, "n_chunks": self.n_chunks,
                "chunks_differing": self.chunks_differing, "fraction": self.fraction,
                "row_ranges": None if self.row_ranges is None
                else [list(r) for r in self.row_ranges],
                "max_abs_difference": value, "note": self.note}


@dataclass(frozen=True, slots=True)
class SnapshotDiff:
    """The differences between snapshots `a` and `b`, array by array (sorted by name).

    >>> SnapshotDiff(1, 2, []).to_json()
    {'a': 1, 'b': 2, 'arrays': []}
    """

    a: int
    b: int
    arrays: list[ArrayDiff]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "arrays": [d.to_json() for d in self.arrays]}


def _array_order_chunk_shape(record: ArrayEntry) -> tuple[int, ...]:
    shape = record.layout.chunk_shape
    return shape if record.order == "C" else shape[::-1]


def _row_range(record: ArrayEntry, index: int) -> tuple[int, int] | None:
    """The range along axis 0 that chunk `index` covers (None for a 0-d array)."""
    if not record.shape:
        return None
    coords = record.layout.chunk_coords(index)
    size = _array_order_chunk_shape(record)[0]
    start = coords[0] * size
    return start, min(start + size, record.shape[0])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float | int | None:
    """Largest |b - a| over elements, exact for integers; None for non-numeric dtypes."""
    if a.size == 0:
        return None
    kind = a.dtype.kind
    if kind == "b":
        return int(np.any(a != b))
    if kind in "iu":
        # Differences of 64-bit integers overflow their type; computed modulo 2**64 in
        # uint64 on the side where b >= a, they are exact.
        wide_a, wide_b = a.astype(np.uint64), b.astype(np.uint64)
        larger = (b >= a) if kind == "u" else (b.astype(np.int64) >= a.astype(np.int64))
        spread = np.where(larger, wide_b - wide_a, wide_a - wide_b)
        return int(spread.max())
    if kind in "fc":
        precise = np.longdouble if a.dtype.itemsize > 8 and kind == "f" else None
        work = a.astype(precise or (np.complex128 if kind == "c" else np.float64))
        other = b.astype(work.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            unchanged = (work == other) | (np.isnan(work) & np.isnan(other))
            spread = np.abs(other[~unchanged] - work[~unchanged])
        if not spread.size:
            return 0.0
        # A value that became (or stopped being) NaN has no size of difference: say NaN
        # rather than let a smaller finite change hide it.
        return float("nan") if np.isnan(spread).any() else float(spread.max())
    return None


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _read_array(store: Store, record: ArrayEntry, seq: int) -> np.ndarray:
    """A whole array read from its chunk objects (verified)."""
    layout = record.layout
    buffer = np.empty(layout.nbytes, dtype=np.uint8)
    for index in range(record.n_chunks):
        raw = load_chunk(store._objects, store.codec, record, index, verify=True, seq=seq)
        start, stop = layout.chunk_range(index)
        buffer[start:stop] = np.frombuffer(raw, dtype=np.uint8, count=stop - start)
    flat = buffer.view(record.dtype)
    return flat.reshape(layout.memory_shape).T if record.order == "F" else flat.reshape(
        record.shape)


def _describe(record: ArrayEntry) -> str:
    return f"{record.shape} {record.dtype} {record.order}"


def diff_snapshots(store: Store, a: int, b: int, *, values: bool = True,
                   progress: Progress | None = None) -> SnapshotDiff:
    """Compare snapshots with seqs `a` and `b` array by array.

    Chunks are compared by digest (nothing is read); with ``values=True`` the differing
    chunks of both snapshots are read (and verified) to find the largest absolute
    difference of numeric arrays. `progress(done, total)` is called per chunk pair read.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.arange(4), "v": np.zeros(2)})
    ...     _ = snap.capture({"u": np.arange(4) * 2})
    ...     snap.wait()
    ...     [(d.name, d.status, d.max_abs_difference) for d in diff_snapshots(snap, 1, 2).arrays]
    [('u', 'changed', 3), ('v', 'removed', None)]
    """
    old, new = store._load(a)[0], store._load(b)[0]
    diffs: list[ArrayDiff] = []
    to_read: list[tuple[int, ArrayEntry, ArrayEntry, list[int]]] = []
    for name in sorted(set(old.arrays) | set(new.arrays)):
        first, second = old.arrays.get(name), new.arrays.get(name)
        if first is None or second is None:
            present = second if first is None else first
            assert present is not None
            status = "added" if first is None else "removed"
            diffs.append(ArrayDiff(name, status, present.n_chunks, None, None, None,
                                   _describe(present)))
            continue
        if first.shape != second.shape or first.dtype != second.dtype:
            diffs.append(ArrayDiff(name, "replaced", second.n_chunks, None, None, None,
                                   f"{_describe(first)} -> {_describe(second)}"))
            continue
        if first.layout != second.layout:
            # Same values may sit in different chunks (the memory order or chunk size
            # changed): compare element by element instead.
            diffs.append(_diff_relaid(store, a, b, first, second, values))
            continue
        differing = [i for i in range(second.n_chunks) if first.digest(i) != second.digest(i)]
        ranges = [r for i in differing if (r := _row_range(second, i)) is not None]
        diffs.append(ArrayDiff(name, "changed" if differing else "same", second.n_chunks,
                               differing, _merge(ranges)))
        if values and differing and second.dtype.kind in "biufc":
            to_read.append((len(diffs) - 1, first, second, differing))
    total = sum(len(indices) for *_, indices in to_read)
    done = 0
    for position, first, second, indices in to_read:
        largest: float | int | None = None
        for index in indices:
            start, stop = second.layout.chunk_range(index)
            raw_a = load_chunk(store._objects, store.codec, first, index, verify=True, seq=a)
            raw_b = load_chunk(store._objects, store.codec, second, index, verify=True, seq=b)
            count = (stop - start) // second.dtype.itemsize
            spread = _max_abs_difference(np.frombuffer(raw_a, second.dtype, count),
                                         np.frombuffer(raw_b, second.dtype, count))
            if spread is None or _is_nan(largest):
                pass
            elif largest is None or _is_nan(spread):
                largest = spread
            else:
                largest = max(largest, spread)
            done += 1
            if progress is not None:
                progress(done, total)
        previous = diffs[position]
        diffs[position] = ArrayDiff(previous.name, previous.status, previous.n_chunks,
                                    previous.chunks_differing, previous.row_ranges, largest,
                                    previous.note)
    return SnapshotDiff(a, b, diffs)


def _diff_relaid(store: Store, a: int, b: int, first: ArrayEntry, second: ArrayEntry,
                 values: bool) -> ArrayDiff:
    old, new = _read_array(store, first, a), _read_array(store, second, b)
    note = "chunk layouts differ (memory order or chunk size changed); compared elements"
    if old.ndim == 0:
        same = old.tobytes() == new.tobytes()
        rows: list[tuple[int, int]] | None = None
    else:
        unequal = np.ascontiguousarray(old).view(np.uint8).reshape(old.shape[0], -1) != \
            np.ascontiguousarray(new).view(np.uint8).reshape(new.shape[0], -1)
        changed_rows = np.flatnonzero(unequal.any(axis=1)) if unequal.size else np.array([])
        same = not len(changed_rows)
        rows = _merge([(int(r), int(r) + 1) for r in changed_rows])
    largest = None
    if values and not same and second.dtype.kind in "biufc":
        largest = _max_abs_difference(np.ravel(old), np.ravel(new))
    return ArrayDiff(second.name, "same" if same else "changed", second.n_chunks, None, rows,
                     largest, note)


# -- disk use ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SnapshotUsage:
    """Bytes of one snapshot's chunk objects: all it uses, only it uses, shared, first added.

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
    """Disk use of a whole store; see :func:`disk_usage`.

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

    def to_json(self) -> dict[str, Any]:
        return {"snapshots": [s.to_json() for s in self.snapshots], "objects": self.objects,
                "object_bytes": self.object_bytes, "referenced_bytes": self.referenced_bytes,
                "unreferenced_objects": self.unreferenced_objects,
                "unreferenced_bytes": self.unreferenced_bytes,
                "manifest_bytes": self.manifest_bytes, "baseline_bytes": self.baseline_bytes,
                "damaged": self.damaged}


def disk_usage(store: Store, progress: Progress | None = None) -> StoreUsage:
    """Bytes per snapshot (unique versus shared) and for the whole store.

    Objects are sized on disk (encoded); a missing object counts 0 bytes (``verify``
    reports it). Damaged manifests are listed in ``damaged`` and left out.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap", codec="none") as snap:
    ...     _ = snap.capture({"u": np.zeros(4), "v": np.ones(4)})
    ...     _ = snap.capture({"u": np.zeros(4), "v": np.full(4, 2.0)})
    ...     snap.wait()
    ...     [(s.unique_bytes, s.shared_bytes) for s in disk_usage(snap).snapshots]
    [(32, 32), (32, 32)]
    """
    seqs = store._seqs()
    used: dict[int, set[bytes]] = {}
    manifests: dict[int, tuple[Manifest, int]] = {}
    damaged: list[str] = []
    for position, seq in enumerate(seqs):
        try:
            manifests[seq] = store._load(seq)
        except ArraysnapError as err:
            damaged.append(str(err))
        else:
            used[seq] = manifests[seq][0].chunk_digests()
        if progress is not None:
            progress(position + 1, len(seqs))
    users: dict[bytes, int] = {}
    for digests in used.values():
        for digest in digests:
            users[digest] = users.get(digest, 0) + 1
    sizes: dict[bytes, int] = {}
    for digest in store._objects.digests():
        try:
            sizes[digest] = store._objects.size(digest)
        except FileNotFoundError:
            continue  # removed by a concurrent gc
    seen: set[bytes] = set()
    rows = []
    for seq, digests in used.items():
        manifest, manifest_bytes = manifests[seq]
        total = sum(sizes.get(d, 0) for d in digests)
        unique = sum(sizes.get(d, 0) for d in digests if users[d] == 1)
        new = sum(sizes.get(d, 0) for d in digests - seen)
        seen |= digests
        rows.append(SnapshotUsage(seq, manifest.step, sum(r.n_chunks for r in
                                                          manifest.arrays.values()),
                                  total, unique, total - unique, new, manifest_bytes))
    referenced = sum(size for digest, size in sizes.items() if digest in users)
    unreferenced = [size for digest, size in sizes.items() if digest not in users]
    mirror = store.path / "mirror"
    baseline = sum(f.stat().st_size for f in mirror.glob("*.bin") if f.is_file()) \
        if mirror.is_dir() and not mirror.is_symlink() else 0
    return StoreUsage(rows, len(sizes), sum(sizes.values()), referenced, len(unreferenced),
                      sum(unreferenced), sum(m[1] for m in manifests.values()), baseline,
                      damaged)


# -- verify --------------------------------------------------------------------------------
def verify_snapshots(store: Store, seqs: list[int] | None = None,
                     progress: Progress | None = None) -> VerifyReport:
    """``Store.verify`` for the snapshots `seqs` (all if None), reporting progress per chunk.

    Like ``Store.verify``: manifests are re-read from disk, each distinct chunk object is
    decoded and checked against its digest once, and every chunk that uses a bad object is
    reported.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.zeros(3)})
    ...     snap.wait()
    ...     print(verify_snapshots(snap))
    checked 1 snapshots, 1 chunks: ok
    """
    seqs = store._seqs() if seqs is None else seqs
    problems: list[Problem] = []
    loaded: list[Manifest] = []
    for seq in seqs:
        try:
            loaded.append(store._load(seq, from_disk=True)[0])
        except ArraysnapError as err:
            problems.append(Problem(seq, None, None, getattr(err, "reason", str(err))))
    total = sum(record.n_chunks for m in loaded for record in m.arrays.values())
    checked: dict[bytes, str | None] = {}
    done = 0
    for manifest in loaded:
        for name, record in manifest.arrays.items():
            for index in range(record.n_chunks):
                digest = record.digest(index)
                if digest not in checked:
                    try:
                        load_chunk(store._objects, store.codec, record, index, verify=True,
                                   seq=manifest.seq)
                        checked[digest] = None
                    except CorruptSnapshotError as err:
                        checked[digest] = err.reason
                reason = checked[digest]
                if reason is not None:
                    problems.append(Problem(manifest.seq, name, index, reason))
                done += 1
                if progress is not None and (done % 64 == 0 or done == total):
                    progress(done, total)
    problems.sort(key=lambda p: (p.seq if p.seq is not None else -1))
    return VerifyReport(len(seqs), total, tuple(problems))


def dtype_text(record: ArrayEntry) -> str:
    """A dtype as users read it (``float64``, ``>i4``, or the .npy description).

    >>> dtype_text(ArrayEntry("u", (2,), np.dtype(">i4"), "C", 0, 2, bytes(32)))
    '>i4'
    """
    dtype = record.dtype
    if dtype.fields is not None:
        return str(dtype_to_json(dtype))
    return dtype.str if dtype.byteorder == ">" else str(dtype)
