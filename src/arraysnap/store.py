"""The store: open, capture, restore, list, verify, prune, export, close.

A store is a directory::

    arraysnap.json          format name and version, creation settings
    lock                    flock-ed by the one writer
    chunks/ab/cdef...       content-addressed chunk objects (zarr v3 chunk encoding)
    snapshots/<seq>.json    one manifest per committed snapshot (the commit point)
    mirror/                 baseline files of the latest capture, and their marker

>>> import arraysnap, numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/run.snap"
>>> with arraysnap.open(path) as snap:
...     u = np.zeros((256, 256))
...     _ = snap.capture({"u": u}, step=0)
...     u[0, 0] = 1.0
...     second = snap.capture({"u": u}, step=1).result()
>>> second.chunks_changed, float(arraysnap.open(path, mode="r").restore().arrays["u"][0, 0])
(1, 1.0)
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import json
import logging
import mmap
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._version import __version__
from .baselines import Baselines, ReaderLease, map_private
from .chunks import assemble, find_bad_chunks, load_chunk
from .codecs import CodecSpec, parse_codec
from .delta import as_bytes, scan_and_copy
from .errors import (
    ArraysnapError,
    ArraysnapWarning,
    CorruptSnapshotError,
    FormatVersionError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreWriteError,
)
from .fsio import FileOps
from .history import History
from .layout import ChunkLayout, memory_order, plan_layout
from .manifest import Manifest, check_array_name, check_dims, parse_manifest
from .objects import ChunkObjects
from .pipeline import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_RETRY_DELAYS,
    ArrayDelta,
    Persister,
    PersistJob,
    lower_thread_priority,
    manifest_key,
)
from .policies import Policy, parse_policy
from .replaylog import ReplayLog
from .results import (
    CaptureInfo,
    CaptureStat,
    CaptureStats,
    Problem,
    PruneReport,
    Restored,
    SnapshotInfo,
    VerifyReport,
)
from .retention import Candidate, Retention
from .rngstate import check_rng, rng_from_json, rng_to_json
from .storage import LocalStorage, Storage, WriterLock
from .tracking import Tracking, check_track_writes

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ArraysnapWarning", "Store", "open"]

log = logging.getLogger("arraysnap")

FORMAT_NAME = "arraysnap"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20
_MANIFEST_NAME = re.compile(r"^(\d{12})\.json$")
SETTINGS_KEY = "arraysnap.json"
_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()
# Store.list shadows the builtin inside the class body; annotations there use this alias.
Prepared = list[tuple[str, np.ndarray, ChunkLayout]]
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str] | Storage,
    mode: Literal["a", "r"] = "a",
    *,
    chunk_bytes: int | None = None,
    codec: str | None = None,
    every: object = None,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_within: float | str | None = None,
    max_bytes: int | None = None,
    on_error: Literal["raise", "warn"] = "raise",
    signals: bool | Iterable[int] = (),
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    track_writes: bool | Literal["auto"] = "auto",
    _io: FileOps | None = None,
    _baseline_ops: FileOps | None = None,
    _retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS,
) -> Store:
    """Open (or, with ``mode="a"``, create) the store at `path` (a folder, or a
    :class:`arraysnap.storage.Storage`).

    ``mode="a"`` takes the store's writer lock (:class:`StoreLockedError` if another writer
    has it); ``mode="r"`` never writes. `chunk_bytes` (default 1 MiB) is the target chunk
    size for arrays captured from now on; `codec` is ``"zstd"`` (default, level 1),
    ``"zstd:<level>"``, ``"blosc"`` or ``"none"`` and is fixed when the store is created.

    When to checkpoint: `every` is an int (steps), a policy (``arraysnap.every(steps=,
    seconds=)``, ``arraysnap.young_daly(mtbf=)``, combined with ``|``) or a list of them;
    ``Store.due(step)`` asks it. What to keep, applied after each commit: ``keep_last`` (the
    newest N), ``keep_every`` (steps that are multiples of K, kept for good), ``keep_within``
    (seconds, or ``"2h"``), ``max_bytes`` (a quota on chunk objects and manifests, pruning
    the oldest unprotected snapshots first); a snapshot is kept if any rule keeps it,
    and the newest is never removed. ``on_error="warn"`` lets the run go on when the store
    cannot be written (changes stay pending; an :class:`ArraysnapWarning` once per kind of
    failure) instead of raising from the next ``capture()``. ``signals=True`` watches
    SIGTERM and SIGUSR1 (or give the signals): one sets ``Store.preempted`` and makes the
    next ``due()`` true. `buffer_bytes` (default 16 MiB) bounds the chunk data held in
    memory between hashing and writing; past it, ``capture()`` waits. `track_writes`
    (``"auto"``) lets the pause compare only the chunks on pages written since the last
    capture, where Linux offers write tracking (6.7+); ``False`` compares everything
    always (see ``docs/tuning.md``, "Write tracking", for when to turn it off).

    >>> import arraysnap, tempfile
    >>> snap = arraysnap.open(tempfile.mkdtemp() + "/run.snap", chunk_bytes=1 << 16)
    >>> snap.latest() is None
    True
    >>> snap.close()
    """
    if isinstance(path, Storage):
        storage = path
    else:
        storage = LocalStorage(path, _io)
    return Store(storage, mode, chunk_bytes=chunk_bytes, codec=codec, every=every,
                 keep_last=keep_last, keep_every=keep_every, keep_within=keep_within,
                 max_bytes=max_bytes, on_error=on_error, signals=signals,
                 buffer_bytes=buffer_bytes, track_writes=track_writes,
                 baseline_ops=_baseline_ops or _io,
                 retry_delays=_retry_delays)


class Store:
    """A snapshot store; see :func:`arraysnap.open`.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"x": np.ones(3)}, step=5)
    ...     snap.wait()  # list() shows committed snapshots only
    ...     [info.step for info in snap.list()]
    [5]
    """

    def __init__(self, storage: Storage, mode: str = "a", *, chunk_bytes: int | None = None,
                 codec: str | None = None, every: object = None,
                 keep_last: int | None = None, keep_every: int | None = None,
                 keep_within: float | str | None = None, max_bytes: int | None = None,
                 on_error: str = "raise", signals: bool | Iterable[int] = (),
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 track_writes: bool | str = "auto", baseline_ops: FileOps | None = None,
                 retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS) -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' (read and write) or 'r' (read only), got {mode!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) \
                or buffer_bytes < 1 << 16:
            raise ValueError(f"buffer_bytes must be an integer of at least 65536, got "
                             f"{buffer_bytes!r}")
        check_track_writes(track_writes)
        self.policy: Policy | None = parse_policy(every)
        self.retention = Retention(keep_last, keep_every, keep_within, max_bytes)  # type: ignore[arg-type]
        self.on_error = on_error
        watched = _parse_signals(signals)
        self._preempted = False  # a watched signal arrived
        self._preempt_pending = False  # ... and no capture has followed it yet
        self._preempt_seen = False  # ... and due() has answered True for it
        self._due_asked = False
        self._old_handlers: dict[int, Any] = {}
        self._closed_handlers: dict[int, Any] = {}
        self._warned: set[str] = set()
        self._buffer_bytes = buffer_bytes
        self._object_sizes: dict[bytes, int] = {}
        self._dims: dict[str, tuple[str, ...]] = {}
        self._retry_delays = tuple(retry_delays)
        if chunk_bytes is not None and (type(chunk_bytes) is not int
                                        or not 1 <= chunk_bytes <= 1 << 31):
            raise ValueError(f"chunk_bytes must be an integer from 1 to 2**31, got {chunk_bytes!r}")
        path = storage.local_path
        if path is None:
            raise ValueError(f"{storage.describe()} is not a local folder; arraysnap keeps "
                             "its baselines beside the store and needs one")
        self.path = path
        self.mode = mode
        self._storage = storage
        self._closed = True
        self._writer_lock: WriterLock | None = None
        self._cache: dict[int, tuple[Manifest, int]] = {}
        self._capture_lock = threading.Lock()
        self._state_lock = threading.Lock()
        settings = self._open_settings(codec)
        self.codec: CodecSpec = parse_codec(settings["codec"])
        self.chunk_bytes: int = chunk_bytes or settings["chunk_bytes"]
        self._objects = ChunkObjects(self._storage)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="arraysnap",
                                        initializer=lower_thread_priority)
        self._baselines = Baselines(path, baseline_ops)
        self._closed = False
        self._persister: Persister | None = None
        self._baseline_seq: int | None = None
        self._last_captured: int | None = None
        self._history = History(self._storage)
        self._replay_log: ReplayLog | None = None
        self._tracking: Tracking | None = None
        if mode == "a":
            try:
                self._take_lock()
                self._tracking = Tracking(track_writes, baseline_file=self._baseline_file)
                self._replay_log = ReplayLog(self._storage)
                self._recover()
                self._watch_signals(watched)
            except BaseException:
                self._release()
                raise
        elif watched:
            raise ValueError("signals= is for a writer (mode='a'): a reader never captures")
        _open_stores.add(self)

    # -- opening -------------------------------------------------------------------------
    def _open_settings(self, codec: str | None) -> dict[str, Any]:
        config = self.path / SETTINGS_KEY
        try:
            data = self._storage.get(SETTINGS_KEY, limit=1 << 20)
        except FileNotFoundError:
            data = None
        except OSError as err:
            raise CorruptSnapshotError(f"{config} cannot be read: {err}") from None
        if data is None:
            if self.mode == "r":
                raise FileNotFoundError(
                    f"{self.path} is not an arraysnap store (no arraysnap.json)")
            return self._create(parse_codec(codec or "zstd"))
        try:
            settings = json.loads(data)
        except (ValueError, RecursionError) as err:
            raise CorruptSnapshotError(f"{config} cannot be read: {err}") from None
        if not isinstance(settings, dict) or settings.get("format") != FORMAT_NAME:
            raise CorruptSnapshotError(f"{config} is not an arraysnap format file")
        version = settings.get("version")
        if type(version) is not int or version > FORMAT_VERSION or version < 1:
            raise FormatVersionError(
                f"{self.path} has store format version {version!r}; this arraysnap "
                f"{__version__} reads format version {FORMAT_VERSION} and older; upgrade arraysnap"
            )
        stored = settings.get("codec")
        chunk_bytes = settings.get("chunk_bytes")
        try:
            stored_codec = parse_codec(stored)
        except (TypeError, ValueError) as err:
            raise CorruptSnapshotError(f"{config}: bad codec: {err}") from None
        if type(chunk_bytes) is not int or chunk_bytes < 1:
            raise CorruptSnapshotError(f"{config}: bad chunk_bytes {chunk_bytes!r}")
        if codec is not None and parse_codec(codec) != stored_codec:
            raise ValueError(
                f"{self.path} was created with codec {stored_codec.name}:{stored_codec.level}; "
                f"open it without codec= (or with that codec), or start a new store for {codec!r}"
            )
        return {"codec": stored_codec, "chunk_bytes": chunk_bytes}

    def _create(self, codec: CodecSpec) -> dict[str, Any]:
        self._storage.create()
        settings = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "chunk_bytes": DEFAULT_CHUNK_BYTES, "codec": codec.to_json(),
                    "created": time.time(), "created_by": f"arraysnap {__version__}"}
        self._storage.put_atomic(SETTINGS_KEY, json.dumps(settings).encode())
        self._storage.barrier()  # the store's own name, in the folder that holds it
        return {"codec": codec, "chunk_bytes": DEFAULT_CHUNK_BYTES}

    def _take_lock(self) -> None:
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._writer_lock = self._storage.lock_writer(holder)

    def _recover(self) -> None:
        """Clean up after a killed writer and make the mirror equal the latest snapshot."""
        if self._baselines.dir.is_symlink():
            # Baselines are created, and stray ones deleted, in there: never somewhere else.
            self._baselines.dir.unlink()
        self._storage.remove_temporaries()
        head = self._newest_valid()
        seqs = self._seqs()
        self._next_seq = (seqs[-1] + 1) if seqs else 1
        self._persister = Persister(
            self._objects, self.codec, self._pool, head,
            on_commit=self._on_commit, on_failure=self._on_failure,
            before_commit=self._sync_replay_log, on_full=self._free_space,
            buffer_bytes=self._buffer_bytes, retry_delays=self._retry_delays)
        if head is None:
            self._baselines.clear_directory()
            return
        self._dims = {name: record.dims for name, record in head.arrays.items()
                      if record.dims is not None}
        trusted = self._baselines.trusted_seq() == head.seq
        files = (self._baselines.read_marker() or {"files": {}})["files"]
        repaired = False
        for name, record in head.arrays.items():
            filename = files.get(name)
            adopted = isinstance(filename, str) and self._baselines.adopt(name, filename,
                                                                       record.layout)
            try:
                if not adopted:
                    if record.n_chunks:  # one real chunk vouches for the size before allocating
                        load_chunk(self._objects, self.codec, record, 0, verify=True,
                                   seq=head.seq)
                    buffer, _ = self._baselines.baseline(name, record.layout)
                    assemble(buffer, self._objects, self.codec, record, self._pool,
                             verify=True, seq=head.seq)
                    repaired = True
                elif not trusted:
                    bad = find_bad_chunks(self._baselines.entries[name].buffer, record, self._pool)
                    if bad:
                        buffer, _ = self._baselines.baseline(name, record.layout)
                        assemble(buffer, self._objects, self.codec, record, self._pool,
                                 verify=True, seq=head.seq, indices=bad)
                        log.warning("arraysnap: repaired %d chunks of the %r baseline",
                                    len(bad), name)
                    repaired = True
            except CorruptSnapshotError as err:
                # The newest snapshot itself is damaged: the next capture of this array
                # is written whole, and verify() reports the damage.
                log.error("arraysnap: cannot rebuild the baseline of %r: %s", name, err)
                self._baselines.retain_only(set(self._baselines.entries) - {name})
                self._persister.tables.pop(name, None)
                self._persister.committed.pop(name, None)
        self._baselines.remove_strays()
        if repaired or not trusted:
            self._baselines.mark_clean(head.seq)
        self._baseline_seq = head.seq

    # -- snapshots on disk ---------------------------------------------------------------
    def _seqs(self) -> list[int]:
        return sorted(int(m.group(1)) for key in self._storage.list_prefix("snapshots/")
                      if (m := _MANIFEST_NAME.match(key[len("snapshots/"):])))

    def _load(self, seq: int, *, from_disk: bool = False) -> tuple[Manifest, int]:
        cached = None if from_disk else self._cache.get(seq)
        if cached is not None:
            return cached
        try:
            data = self._storage.get(manifest_key(seq), limit=1 << 28)
        except FileNotFoundError:
            raise SnapshotNotFoundError(f"snapshot {seq} does not exist in {self.path}") from None
        except OSError as err:
            raise CorruptSnapshotError(f"snapshot {seq}: manifest cannot be read: {err}") from None
        manifest = parse_manifest(data, expected_seq=seq)
        self._cache[seq] = (manifest, len(data))
        return manifest, len(data)

    def _newest_valid(self) -> Manifest | None:
        for seq in reversed(self._seqs()):
            try:
                return self._load(seq)[0]
            except CorruptSnapshotError as err:
                log.error("arraysnap: skipping damaged snapshot %d: %s", seq, err)
        return None

    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first (damaged manifests are left out; see verify()).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").list()
        []
        """
        infos = []
        for seq in self._seqs():
            try:
                infos.append(SnapshotInfo.from_manifest(*self._load(seq)))
            except SnapshotNotFoundError:
                continue  # removed by retention since the folder was listed
            except (CorruptSnapshotError, FormatVersionError) as err:
                log.warning("arraysnap: snapshot %d not listed: %s", seq, err)
        return infos

    def latest(self) -> SnapshotInfo | None:
        """The newest committed snapshot, or None if there is none.

        >>> import arraysnap, tempfile
        >>> print(arraysnap.open(tempfile.mkdtemp() + "/s.snap").latest())
        None
        """
        for seq in reversed(self._seqs()):
            try:
                return SnapshotInfo.from_manifest(*self._load(seq))
            except (CorruptSnapshotError, SnapshotNotFoundError, FormatVersionError) as err:
                # The same rule as list(): latest() is always list()[-1].
                log.warning("arraysnap: snapshot %d skipped: %s", seq, err)
        return None

    def _select(self, step: int | None, seq: int | None) -> Manifest:
        seqs = self._seqs()
        if not seqs:
            raise SnapshotNotFoundError(f"{self.path} holds no snapshot yet; capture one first")
        if seq is not None:
            if seq not in seqs:
                raise SnapshotNotFoundError(
                    f"no snapshot with seq {seq} in {self.path}; seqs are {seqs[0]}..{seqs[-1]}"
                )
            return self._load(seq)[0]
        if step is None:
            return self._load(seqs[-1])[0]
        for candidate in reversed(seqs):
            manifest = self._load(candidate)[0]
            if manifest.step == step:
                return manifest
        steps = sorted({s for s in (self._load(q)[0].step for q in seqs) if s is not None})
        shown = ", ".join(map(str, steps[-10:]))
        raise SnapshotNotFoundError(f"no snapshot of step {step} in {self.path}; "
                                    f"latest steps are {shown or 'none'}")

    # -- capture -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ArraysnapError(f"store {self.path} is closed; open it again")

    def _check_writable(self, action: str) -> None:
        self._check_open()
        if self.mode != "a":
            raise ReadOnlyStoreError(
                f"cannot {action}: {self.path} was opened with mode='r'; open it with mode='a'"
            )

    def capture(self, arrays: Mapping[str, np.ndarray], *, step: int | None = None,
                state: Mapping[str, Any] | None = None, rng: Any = None,
                dims: Mapping[str, Any] | None = None) -> CaptureInfo:
        """Snapshot `arrays`; return as soon as the changed chunks are set aside.

        Only chunks that differ from the previous capture are hashed, encoded and written,
        in the background; ``wait()`` (or the returned info's ``result()``) blocks until the
        snapshot is durable. `state` is a small JSON-serialisable dict; `rng` a
        ``numpy.random.Generator`` or a dict of them. `dims` names the dimensions of arrays
        (``{"u": ("y", "x")}``) for xarray; they are remembered for later captures until the
        array's number of dimensions changes. The caller's arrays are never modified.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     info = snap.capture({"u": np.zeros(10)}, step=0, state={"t": 0.0},
        ...                         rng=np.random.default_rng(0))
        >>> info.chunks_changed
        1
        """
        self._check_writable("capture")
        prepared = _prepare_arrays(arrays, self.chunk_bytes, self._baselines)
        names = self._check_dims(prepared, dims)
        step = _check_step(step)
        state_json = _check_state(state)
        check_rng(rng)
        rng_json = rng_to_json(rng)
        if not self._capture_lock.acquire(blocking=False):
            raise ArraysnapError("capture() is already running in another thread of this "
                                 "process; call it from one thread at a time")
        try:
            self._dims = names
            return self._capture(prepared, step, state_json, rng_json)
        finally:
            self._capture_lock.release()

    def _baseline_file(self, name: str) -> Path | None:
        entry = self._baselines.entries.get(name)
        return None if entry is None else entry.path

    def _check_dims(self, prepared: Prepared, dims: object) -> dict[str, tuple[str, ...]]:
        """The dimension names of each captured array: given now, or remembered."""
        if dims is not None and not isinstance(dims, Mapping):
            raise TypeError(f"dims must be a dict of array name -> dimension names, got "
                            f"{type(dims).__name__}")
        given = dict(dims or {})
        shapes = {name: array.shape for name, array, _ in prepared}
        unknown = sorted(set(given) - set(shapes), key=str)
        if unknown:
            raise ValueError(f"dims names arrays that are not captured: {unknown}; the "
                             f"arrays are {sorted(shapes)}")
        names: dict[str, tuple[str, ...]] = {}
        for name, shape in shapes.items():
            if name in given:
                names[name] = check_dims(name, len(shape), given[name])
            elif name in self._dims and len(self._dims[name]) == len(shape):
                names[name] = self._dims[name]
        return names

    def _capture(self, prepared: Prepared, step: int | None,
                 state: dict[str, Any] | None, rng: Any) -> CaptureInfo:
        persister = self._persister
        assert persister is not None
        self._raise_background_error("an earlier capture failed to persist; its changes are "
                                     "kept and go into the next capture")
        started = time.perf_counter()
        persister.wait_chunks_read()
        pause_start = time.perf_counter()
        deltas = []
        seq = self._next_seq
        journal_position = self._replay_log.position if self._replay_log is not None else 0
        try:
            with self._state_lock:
                # From here the baselines are ahead of every committed snapshot.
                self._baseline_seq = None
                self._last_captured = seq
                persister.retrying(self._baselines.mark_dirty, free_space=False)
        except OSError as err:
            return self._capture_failed(seq, step, started, err)
        self._next_seq += 1
        tracking = self._tracking
        assert tracking is not None
        compared = 0
        try:
            tracking.retain_only({name for name, _, _ in prepared})
            for name, live, layout in prepared:
                baseline, fresh = self._baselines.baseline(name, layout, live)
                flags = np.full(layout.n_chunks, 1 if fresh else 0, dtype=np.uint8)
                # Before the comparison: from here on, writes count for the next capture.
                candidates, audit = tracking.candidates(name, live, layout, fresh)
                changed = scan_and_copy(live, baseline, layout, flags, self._pool,
                                        candidates)
                if audit is not None:
                    tracking.audit(name, audit, changed)
                if not fresh:
                    tracking.unprotect_changed(name, changed)
                compared += (layout.n_chunks if candidates is None
                             else int(np.count_nonzero(candidates)))
                deltas.append(ArrayDelta(name, layout, baseline, changed, fresh,
                                         self._dims.get(name)))
            self._baselines.retain_only({name for name, _, _ in prepared})
        except BaseException as err:
            # Baselines already updated hold changes no snapshot has; forget them so the next
            # capture writes those arrays whole (dedup keeps unchanged chunks free).
            tracking.forget_all()
            for name, _, _ in prepared:
                try:
                    self._baselines.forget(name)
                except OSError as forget_error:
                    log.error("arraysnap: could not drop the %r baseline: %r", name,
                              forget_error)
            if isinstance(err, OSError):
                return self._capture_failed(seq, step, started, err)
            raise
        now = time.perf_counter()
        pause = now - pause_start
        info = CaptureInfo(seq, step, pause, sum(d.layout.n_chunks for d in deltas),
                           sum(len(d.changed) for d in deltas), chunks_compared=compared)
        wall = time.time()
        job = PersistJob(seq, step, wall, deltas, state, rng, _provenance(), pause,
                         pause_start - started, started, journal_position, info)
        persister.submit(job)
        self._captured(step, wall, now - started)
        return info

    def _captured(self, step: int | None, wall: float, blocking: float) -> None:
        if self.policy is not None:
            self.policy.captured(step, wall, blocking)
        if self._preempt_pending:
            # A capture followed the signal (even one due for another reason, with the
            # signal landing during it): the loop may stop now.
            self._preempt_seen = True
        self._preempt_pending = False

    def _capture_failed(self, seq: int, step: int | None, started: float,
                        err: OSError) -> CaptureInfo:
        """A capture that failed in its pause (the disk, writing the baselines' marker)."""
        wrapped = _wrap(err, "capture failed before anything was committed")
        log.error("arraysnap: capture at step %s failed in its pause: %r", step, err)
        self._history.append(CaptureStat(seq, step, time.time(), "failed", error=repr(err)))
        if self.on_error != "warn":
            raise wrapped
        self._warn_once(err)
        info = CaptureInfo(seq, step, time.perf_counter() - started, 0, 0)
        info._finish(None, wrapped)
        return info

    def _warn_once(self, err: BaseException) -> None:
        cause = err
        while not isinstance(cause, OSError) and cause.__cause__ is not None:
            cause = cause.__cause__
        kind = (f"{type(cause).__name__}:{errno.errorcode.get(cause.errno, cause.errno)}"
                if isinstance(cause, OSError) else type(cause).__name__)
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"arraysnap: {self.path} cannot be written ({cause}); the run goes on and the "
            "changes stay pending for the next capture (on_error='warn'). Further failures "
            "of this kind are logged, not warned", ArraysnapWarning, stacklevel=4)

    def _raise_background_error(self, message: str) -> None:
        persister = self._persister
        error = persister.take_error() if persister is not None else None
        if error is None:
            return
        if self.on_error == "warn":
            self._warn_once(error)
            return
        raise _wrap(error, message)

    def _on_failure(self, job: PersistJob, err: BaseException, stat: CaptureStat) -> None:
        self._history.append(stat)
        job.capture._finish(None, _wrap(err, f"snapshot {job.seq} failed to persist"))

    def _on_commit(self, job: PersistJob, manifest: Manifest, manifest_bytes: int,
                   stat: CaptureStat) -> None:
        self._cache[manifest.seq] = (manifest, manifest_bytes)
        try:
            self._history.append(stat)
        except Exception as err:  # noqa: BLE001 - informational; the commit stands
            log.warning("arraysnap: capture history: %r", err)
        with self._state_lock:
            if self._last_captured == job.seq:  # no later capture has touched the baselines
                self._baseline_seq = job.seq
                try:
                    self._baselines.mark_committed(job.seq)
                except OSError as err:  # the snapshot is committed; the marker only helps
                    log.warning("arraysnap: could not mark the baselines clean: %r", err)
        job.capture._finish(SnapshotInfo.from_manifest(manifest, manifest_bytes), None)
        if self.retention.active:
            try:
                self._apply_retention(self.retention)
            except (OSError, ArraysnapError) as err:  # retention only frees space
                log.error("arraysnap: retention after snapshot %d failed: %r", job.seq, err)

    def wait(self) -> None:
        """Block until every capture so far is durable; raise the first background error.

        >>> import arraysnap, numpy as np, tempfile
        >>> snap = arraysnap.open(tempfile.mkdtemp() + "/s.snap")
        >>> _ = snap.capture({"u": np.zeros(3)}); snap.wait(); len(snap.list())
        1
        >>> snap.close()
        """
        self._check_open()
        if self._persister is None:
            return
        self._persister.drain()
        try:
            self._sync_replay_log()
        except OSError as err:
            if self.on_error != "warn":
                raise ArraysnapError(f"the replay log cannot be synced: {err}") from err
            self._warn_once(err)
        self._raise_background_error("a capture failed to persist; its changes are kept and "
                                     "go into the next capture")

    # -- restore -------------------------------------------------------------------------
    def restore(self, step: int | None = None, *, seq: int | None = None,
                verify: bool = True, fallback: bool = False) -> Restored:
        """Restore the latest snapshot (or the newest one of `step`, or the one with `seq`).

        Arrays come back as copy-on-write memory maps with their dtype, shape and memory
        order. The latest snapshot maps the baseline files directly; older ones are
        assembled from chunk objects into a temporary file first. With ``verify=True`` (the
        default) every chunk is checked against its blake3 digest. With ``fallback=True`` a
        snapshot that cannot be restored (damaged manifest or chunk) is skipped for the next
        older one, and ``Restored.skipped`` says which were skipped and why.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(4)}, step=1)
        ...     _ = snap.capture({"u": np.arange(4) * 2}, step=2)
        ...     snap.restore(step=1).arrays["u"].tolist()
        [0, 1, 2, 3]
        """
        self._check_open()
        if self._persister is not None:
            self._persister.drain()
        if not fallback:
            return self._restore(self._select(step, seq), verify)
        skipped: list[Problem] = []
        for candidate in self._fallback_candidates(step, seq):
            try:
                restored = self._restore(self._load(candidate)[0], verify)
            except (CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError) as err:
                log.warning("arraysnap: restore skipped snapshot %d: %s", candidate, err)
                skipped.append(Problem(candidate, getattr(err, "array", None),
                                       getattr(err, "chunk", None),
                                       getattr(err, "reason", str(err))))
                continue
            return dataclasses.replace(restored, skipped=tuple(skipped))
        raise SnapshotNotFoundError(
            f"no snapshot of {self.path} could be restored: "
            + "; ".join(str(problem) for problem in skipped)
        )

    def _fallback_candidates(self, step: int | None, seq: int | None) -> list[int]:
        """Seqs to try, newest first, from the selected snapshot down to the oldest."""
        seqs = self._seqs()
        if not seqs:
            raise SnapshotNotFoundError(f"{self.path} holds no snapshot yet; capture one first")
        if seq is not None:
            return [self._select(None, seq).seq, *reversed([s for s in seqs if s < seq])]
        if step is None:
            return seqs[::-1]
        for candidate in reversed(seqs):
            try:
                if self._load(candidate)[0].step == step:
                    return [s for s in reversed(seqs) if s <= candidate]
            except ArraysnapError:
                continue
        return [self._select(step, None).seq]  # raises SnapshotNotFoundError, naming steps

    def _restore(self, manifest: Manifest, verify: bool) -> Restored:
        arrays: dict[str, np.ndarray] = {}
        for name, record in manifest.arrays.items():
            array = self._map_baseline(manifest, name, verify)
            if array is None:
                array = self._materialize(record, verify=verify, seq=manifest.seq)
            arrays[name] = array
        try:
            rng = rng_from_json(manifest.rng)
        except (ValueError, TypeError) as err:
            raise CorruptSnapshotError(str(err), seq=manifest.seq) from None
        info = SnapshotInfo.from_manifest(*self._load(manifest.seq))
        events: tuple[Any, ...] = ()
        if manifest.journal is not None:
            journal = self._replay_log or ReplayLog(self._storage, writable=False)
            try:
                events = tuple(journal.read_from(manifest.journal))
            except CorruptSnapshotError as err:
                raise CorruptSnapshotError(f"replay log: {err}", seq=manifest.seq) from None
        return Restored(arrays, manifest.step, manifest.seq, manifest.time,
                        None if manifest.state is None else dict(manifest.state), rng, info,
                        events=events)

    def _map_baseline(self, manifest: Manifest, name: str, verify: bool) -> np.ndarray | None:
        """Map the baseline of `name` if it holds exactly this snapshot; None otherwise."""
        record = manifest.arrays[name]
        if self.mode == "a":
            entry = self._baselines.entries.get(name)
            with self._state_lock:
                current = self._baseline_seq == manifest.seq
            if not current or entry is None or entry.layout != record.layout:
                return None
            if verify:
                bad = find_bad_chunks(entry.buffer, record, self._pool)
                if bad:
                    log.warning("arraysnap: baseline of %r had %d damaged chunks; repairing",
                                name, len(bad))
                    buffer, _ = self._baselines.baseline(name, record.layout)
                    assemble(buffer, self._objects, self.codec, record, self._pool,
                             verify=True, seq=manifest.seq, indices=bad)
                    if self._tracking is not None:  # the baseline changed under its watch
                        self._tracking.forget(name)
                    with self._state_lock:
                        self._baselines.mark_committed(manifest.seq)
            return self._baselines.hand_out(name)
        return self._map_baseline_shared(manifest, name, verify)

    def _map_baseline_shared(self, manifest: Manifest, name: str,
                             verify: bool) -> np.ndarray | None:
        record = manifest.arrays[name]
        if record.layout.nbytes == 0:
            return None
        marker = self._baselines.read_marker()
        filename = (marker or {}).get("files", {}).get(name)
        if not isinstance(filename, str) or "/" in filename or not filename.endswith(".bin"):
            return None
        lease = ReaderLease.acquire(self._baselines.dir / filename)
        if lease is None:
            return None
        # Under the lease no writer changes the file; only now is the marker to be trusted.
        marker = self._baselines.read_marker()
        if (marker is None or self._baselines.trusted_seq(marker) != manifest.seq
                or marker["files"].get(name) != filename
                or os.fstat(lease.fd).st_size != record.layout.nbytes):
            lease.release()
            return None
        array = map_private(self._baselines.dir / filename, record.layout, lease.fd)
        if verify:
            flat = as_bytes(array)
            if find_bad_chunks(flat, record, self._pool):
                lease.release()
                return None
        lease.track(array)
        return array

    def _materialize(self, record: Any, *, verify: bool, seq: int) -> np.ndarray:
        layout = record.layout
        if layout.nbytes == 0:
            return np.empty(layout.shape, dtype=layout.dtype, order=layout.order)
        # A manifest may claim any size: one real chunk (decoded to the full chunk size)
        # vouches for it before anything of that size is allocated.
        load_chunk(self._objects, self.codec, record, 0, verify=verify, seq=seq)
        directory = self.path / "tmp" if self.mode == "a" else None
        if directory is not None:
            directory.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix="restore-") as handle:
            # Allocated, not sparse: a full disk fails here, not as SIGBUS in a mapped write.
            os.posix_fallocate(handle.fileno(), 0, layout.nbytes)
            shared = mmap.mmap(handle.fileno(), layout.nbytes, mmap.MAP_SHARED)
            # No `with`: on failure the traceback still refers to views of the map, and
            # closing it then would raise BufferError over the CorruptSnapshotError.
            assemble(np.frombuffer(shared, dtype=np.uint8), self._objects, self.codec, record,
                     self._pool, verify=verify, seq=seq)
            shared.close()
            return map_private(Path(), layout, handle.fileno())

    def restore_into(self, arrays: Mapping[str, np.ndarray], step: int | None = None, *,
                     seq: int | None = None, verify: bool = True) -> Restored:
        """Restore into buffers the caller owns (same shapes and dtypes); return the rest.

        Every array of the snapshot named in `arrays` is copied into it; the returned
        ``Restored`` holds the caller's arrays in ``.arrays``.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(3.0)}, step=3)
        ...     out = np.empty(3)
        ...     _ = snap.restore_into({"u": out})
        >>> out.tolist()
        [0.0, 1.0, 2.0]
        """
        self._check_open()
        manifest = self._select(step, seq) if self._persister is None else None
        if manifest is None:
            self._persister.drain()  # type: ignore[union-attr]
            manifest = self._select(step, seq)
        for name, target in arrays.items():
            if name not in manifest.arrays:
                raise KeyError(f"snapshot {manifest.seq} has no array {name!r}; it has "
                               f"{sorted(manifest.arrays)}")
            record = manifest.arrays[name]
            if not isinstance(target, np.ndarray):
                raise TypeError(f"restore_into needs numpy arrays, got {type(target).__name__}")
            if target.shape != record.shape or target.dtype != record.dtype:
                raise ValueError(
                    f"array {name!r}: snapshot holds {record.shape} {record.dtype}, the target "
                    f"is {target.shape} {target.dtype}; allocate a matching array"
                )
            if not target.flags.writeable:
                raise ValueError(f"array {name!r}: the target is read-only")
        restored = self.restore(seq=manifest.seq, verify=verify)
        for name, target in arrays.items():
            np.copyto(target, restored.arrays[name])
        return Restored(dict(arrays), restored.step, restored.seq, restored.time,
                        restored.state, restored.rng, restored.info, events=restored.events)

    # -- verify, prune, gc ---------------------------------------------------------------
    def verify(self, seq: int | None = None) -> VerifyReport:
        """Check snapshots (all, or the one with `seq`): manifests, and every chunk's digest.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.zeros(3)})
        ...     snap.wait()
        ...     snap.verify().ok
        True
        """
        self._check_open()
        if self._persister is not None:
            self._persister.drain()
        seqs = self._seqs() if seq is None else [seq]
        problems: list[Problem] = []
        checked: dict[bytes, str | None] = {}
        chunks = 0
        for current in seqs:
            try:
                # From disk, not the cache: verify checks what a restarted job would read.
                manifest = self._load(current, from_disk=True)[0]
            except ArraysnapError as err:
                problems.append(Problem(current, None, None, getattr(err, "reason", str(err))))
                continue
            for name, record in manifest.arrays.items():
                for index in range(record.n_chunks):
                    digest = record.digest(index)
                    chunks += 1
                    if digest not in checked:
                        try:
                            load_chunk(self._objects, self.codec, record, index, verify=True,
                                       seq=current)
                            checked[digest] = None
                        except CorruptSnapshotError as err:
                            checked[digest] = err.reason
                    reason = checked[digest]
                    if reason is not None:
                        problems.append(Problem(current, name, index, reason))
        return VerifyReport(len(seqs), chunks, tuple(problems))

    def prune(self, keep_last: int | None = None, *, keep_every: int | None = None,
              keep_within: float | str | None = None,
              max_bytes: int | None = None) -> PruneReport:
        """Apply a retention policy now: the one given, or else the store's own.

        A snapshot is kept if any rule keeps it (see :func:`arraysnap.open`); the newest is
        never removed. Chunk objects no kept snapshot uses are deleted, and replay-log
        records older than every kept snapshot.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     for i in range(4):
        ...         _ = snap.capture({"u": np.full(4, i)}, step=i * 10)
        ...     snap.prune(keep_last=1, keep_every=20).snapshots_removed  # steps 0, 20 stay
        (2,)
        """
        self._check_writable("prune")
        given = (keep_last, keep_every, keep_within, max_bytes)
        retention = (Retention(*given) if any(v is not None for v in given)  # type: ignore[arg-type]
                     else self.retention)
        if not retention.active:
            raise ValueError("prune() needs a rule: keep_last=, keep_every=, keep_within= or "
                             "max_bytes= (or open the store with one)")
        with self._capture_lock:
            self.wait()
            return self._apply_retention(retention)

    def _apply_retention(self, retention: Retention) -> PruneReport:
        """Remove what `retention` does not keep; runs on the writer thread or after wait()."""
        seqs = self._seqs()
        manifests: dict[int, Manifest] = {}
        for seq in seqs:
            try:
                manifests[seq] = self._load(seq)[0]
            except ArraysnapError as err:
                # What a damaged manifest uses is unknown: keep everything it might use.
                raise CorruptSnapshotError(
                    f"retention stopped: snapshot {seq} cannot be read ({err}); remove or "
                    "repair that manifest first") from None
        candidates = [Candidate(seq, m.step, m.time) for seq, m in manifests.items()]
        usage = _Usage(self, manifests) if retention.max_bytes is not None else None
        doomed = retention.doomed(candidates, time.time(),
                                  usage.size_without if usage is not None else None)
        if not doomed:
            return PruneReport((), 0, 0)
        gone = {c.seq for c in doomed}
        used: set[bytes] = set()
        for seq, manifest in manifests.items():
            if seq not in gone:
                used.update(manifest.chunk_digests())
        candidates_digests: set[bytes] = set()
        for seq in gone:
            candidates_digests.update(manifests[seq].chunk_digests())
        for seq in sorted(gone):
            self._storage.delete(manifest_key(seq))
            self._cache.pop(seq, None)
        # The manifests are gone for good before any object they used goes.
        self._storage.barrier()
        removed, freed = self._delete_objects(candidates_digests - used)
        positions = [m.journal for seq, m in manifests.items() if seq not in gone]
        if self._replay_log is not None and positions and None not in positions:
            self._replay_log.trim(min(p for p in positions if p is not None))
        log.info("arraysnap: retention removed snapshots %s (%d chunks, %d bytes)",
                 sorted(gone), removed, freed)
        return PruneReport(tuple(sorted(gone)), removed, freed)

    def _delete_objects(self, digests: Iterable[bytes]) -> tuple[int, int]:
        removed = freed = 0
        persister = self._persister
        for digest in digests:
            try:
                size = self._objects.size(digest)
            except FileNotFoundError:
                continue
            if persister is not None:
                # Under the pin lock: a capture pins before it checks that an object exists.
                if not persister.delete_unless_pinned(digest, self._objects.delete):
                    continue
            else:
                self._objects.delete(digest)
            removed += 1
            freed += size
        return removed, freed

    def _free_space(self) -> int:
        """The ENOSPC hook (a writer thread, under the commit lock): apply the retention
        policy, then delete chunk objects no snapshot uses (a killed writer's leftovers);
        return the bytes freed."""
        freed = 0
        try:
            if self.retention.active:
                freed += self._apply_retention(self.retention).bytes_freed
            freed += self._gc().bytes_freed
        except (OSError, ArraysnapError) as err:
            log.error("arraysnap: pruning to free space failed: %r", err)
        return freed

    def _sync_replay_log(self) -> None:
        if self._replay_log is not None:
            self._replay_log.flush(durable=True)

    def gc(self) -> PruneReport:
        """Delete chunk objects that no snapshot uses (left by prune or a killed writer).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").gc().chunks_removed
        0
        """
        self._check_writable("collect garbage")
        with self._capture_lock:
            self.wait()
            return self._gc()

    def _gc(self) -> PruneReport:
        used: set[bytes] = set()
        for seq in self._seqs():
            try:
                manifest = self._load(seq)[0]
            except ArraysnapError as err:
                raise CorruptSnapshotError(
                    f"gc stopped: snapshot {seq} cannot be read ({err}); without it the chunks "
                    "it uses are unknown. Remove or repair that manifest first"
                ) from None
            used.update(manifest.chunk_digests())
        unused = [d for d in self._objects.digests() if d not in used]
        removed, freed = self._delete_objects(unused)
        return PruneReport((), removed, freed)

    # -- zarr ----------------------------------------------------------------------------
    def export(self, out_path: str | os.PathLike[str], step: int | None = None, *,
               seq: int | None = None) -> Path:
        """Write one snapshot as a plain zarr v3 store at `out_path` (which must not exist).

        >>> import arraysnap, numpy as np, tempfile, zarr
        >>> tmp = tempfile.mkdtemp()
        >>> with arraysnap.open(tmp + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(5.0)}, step=1)
        ...     _ = snap.export(tmp + "/out.zarr")
        >>> zarr.open_group(tmp + "/out.zarr", mode="r")["u"][:].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0]
        """
        from .zarr_view import export_snapshot

        self._check_open()
        if self._persister is not None:
            self._persister.drain()
        manifest = self._select(step, seq)
        return export_snapshot(manifest, self._objects, self.codec, Path(out_path))

    def zarr_store(self, step: int | None = None, *, seq: int | None = None) -> Any:
        """A read-only zarr Store presenting one snapshot (see :func:`arraysnap.open_zarr`).

        >>> import arraysnap, numpy as np, tempfile, zarr
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(3)})
        ...     zarr.open_group(snap.zarr_store(), mode="r")["u"][:].tolist()
        [0, 1, 2]
        """
        from .zarr_view import SnapshotZarrStore

        self._check_open()
        if self._persister is not None:
            self._persister.drain()
        return SnapshotZarrStore(self._select(step, seq), self._objects, self.codec)

    # -- cadence, preemption, replay log, stats --------------------------------------------
    def due(self, step: int | None = None) -> bool:
        """True when a capture at `step` is due: by the ``every=`` policy, or a preemption.

        A watched signal (``signals=``) makes the next ``due()`` true, whatever the policy,
        until the next capture. Without a policy only preemption makes it true.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap", every=10) as snap:
        ...     u = np.zeros(4)
        ...     for step in range(25):
        ...         u += 1
        ...         if snap.due(step):
        ...             _ = snap.capture({"u": u}, step=step)
        ...     snap.wait()
        ...     [info.step for info in snap.list()]
        [10, 20]
        """
        self._check_open()
        self._due_asked = True
        if self._preempt_pending:
            self._preempt_seen = True
            return True
        return self.policy is not None and self.policy.due(step)

    @property
    def preempted(self) -> bool:
        """True once a watched signal arrived: capture at the next safe point and exit.

        In a loop that asks ``due()``, it turns true only once ``due()`` has answered True
        for the signal, so ``if snap.due(step): snap.capture(...)`` followed by ``if
        snap.preempted: break`` never exits without that last capture, wherever the signal
        lands.

        >>> import arraysnap, os, signal, tempfile
        >>> snap = arraysnap.open(tempfile.mkdtemp() + "/s.snap", signals=[signal.SIGUSR2])
        >>> snap.preempted
        False
        >>> os.kill(os.getpid(), signal.SIGUSR2)
        >>> snap.preempted, snap.due(0)
        (True, True)
        >>> snap.close()
        """
        return self._preempted and (self._preempt_seen or not self._due_asked)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags: the loop captures at its next safe point, never from in here.
        previous = self._old_handlers.get(signum, self._closed_handlers.get(signum))
        if self._closed:
            # Closed, but another store installed its handler over ours and kept ours as its
            # "previous": act as if ours had been removed.
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self._preempted = True
        self._preempt_pending = True
        if callable(previous):
            previous(signum, frame)

    def _watch_signals(self, signums: tuple[int, ...]) -> None:
        if not signums:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("signals= must be set by a store opened in the main thread "
                             "(Python delivers signals there)")
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _unwatch_signals(self) -> None:
        while self._old_handlers:
            signum, previous = self._old_handlers.popitem()
            # Kept for the case where another store chained to our handler (see _on_signal).
            self._closed_handlers[signum] = previous
            try:
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)
            except ValueError:  # not the main thread (close at exit from another thread)
                log.warning("arraysnap: could not restore the handler of signal %d", signum)

    def log(self, record: Any) -> int:
        """Append a JSON record to the replay log; return its number.

        ``restore()`` returns, as ``Restored.events``, the records logged after the restored
        snapshot's capture, in order: replay them to redo external effects (the last message
        sent, a queue offset). Records are written in batches and made durable at each
        commit and by ``wait()``.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.zeros(2)}, step=1)
        ...     _ = snap.log({"sent": "mail 1"}); _ = snap.log({"offset": 42})
        ...     snap.wait()
        ...     snap.restore().events
        ({'sent': 'mail 1'}, {'offset': 42})
        """
        self._check_writable("log")
        assert self._replay_log is not None
        return self._replay_log.log(record)

    def stats(self) -> CaptureStats:
        """The history of this store's captures (committed and failed), oldest first.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.zeros(4)}, step=0)
        ...     snap.wait()
        ...     stats = snap.stats()
        >>> len(stats), stats[0].status, stats.column("chunks_changed").tolist()
        (1, 'committed', [1])
        """
        self._check_open()
        return self._history.read()

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Finish pending captures, mark the baselines clean and release the lock.

        Raises the first background error, after releasing everything. Stores still open
        at interpreter exit are closed then.

        >>> import arraysnap, numpy as np, tempfile
        >>> snap = arraysnap.open(tempfile.mkdtemp() + "/s.snap")
        >>> _ = snap.capture({"u": np.zeros(2)})
        >>> snap.close(); snap
        <arraysnap.Store '...' (closed)>
        """
        if self._closed:
            return
        error = None
        try:
            if self._persister is not None:
                self._persister.drain()
                error = self._persister.take_error()
                try:
                    self._sync_replay_log()
                except OSError as err:
                    error = error or err
                self._history.sync()
                with self._state_lock:
                    baseline_seq = self._baseline_seq
                if error is None and baseline_seq is not None:
                    self._baselines.mark_clean(baseline_seq)
        finally:
            self._release()
        if error is not None and self.on_error == "warn":
            self._warn_once(error)
            return
        if error is not None:
            raise _wrap(error, "a capture failed to persist before close(); the store holds "
                               "every snapshot committed before it")

    def _release(self) -> None:
        self._closed = True
        self._unwatch_signals()
        if self._persister is not None:
            self._persister.stop()
            self._persister = None
        if self._replay_log is not None:
            self._replay_log.close()
        if self._tracking is not None:
            self._tracking.close()
        self._baselines.close()
        self._pool.shutdown(wait=True)
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None
        _open_stores.discard(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<arraysnap.Store {str(self.path)!r} ({state})>"


def _wrap(error: BaseException, message: str) -> ArraysnapError:
    """`error` chained under an ArraysnapError (a StoreWriteError for an OSError)."""
    if isinstance(error, OSError):
        wrapped: ArraysnapError = StoreWriteError(error.errno, f"{message}: {error}")
    else:
        wrapped = ArraysnapError(f"{message}: {error!r}")
    wrapped.__cause__ = error
    return wrapped


# -- retention helpers ---------------------------------------------------------------------
class _Usage:
    """The store's size (chunk objects and manifests) as snapshots are taken away."""

    def __init__(self, store: Store, manifests: Mapping[int, Manifest]) -> None:
        self._sets = {seq: m.chunk_digests() for seq, m in manifests.items()}
        self._manifest_bytes = {seq: store._load(seq)[1] for seq in manifests}
        self._refs: dict[bytes, int] = {}
        for digests in self._sets.values():
            for digest in digests:
                self._refs[digest] = self._refs.get(digest, 0) + 1
        sizes = store._object_sizes
        for digest in self._refs:
            if digest not in sizes:
                try:
                    sizes[digest] = store._objects.size(digest)
                except OSError:
                    sizes[digest] = 0
        self._sizes = sizes
        self.total = sum(sizes[d] for d in self._refs) + sum(self._manifest_bytes.values())
        self._removed: set[int] = set()

    def size_without(self, doomed: Iterable[Candidate]) -> int:
        for candidate in doomed:
            if candidate.seq in self._removed:
                continue
            self._removed.add(candidate.seq)
            self.total -= self._manifest_bytes[candidate.seq]
            for digest in self._sets[candidate.seq]:
                self._refs[digest] -= 1
                if self._refs[digest] == 0:
                    self.total -= self._sizes[digest]
        return self.total


def _parse_signals(signals: object) -> tuple[int, ...]:
    if signals is True:
        return DEFAULT_SIGNALS
    if signals is False or signals is None:
        return ()
    if isinstance(signals, int):
        signals = (signals,)
    if not isinstance(signals, Iterable):
        raise TypeError(f"signals= takes True (SIGTERM and SIGUSR1) or a list of signals, got "
                        f"{signals!r}")
    parsed = []
    for item in signals:
        try:
            parsed.append(signal.Signals(item))
        except (ValueError, TypeError):
            raise ValueError(f"signals=: {item!r} is not a signal number; use e.g. "
                             "signal.SIGTERM") from None
    return tuple(parsed)


# -- input checking ------------------------------------------------------------------------
def _prepare_arrays(arrays: object, chunk_bytes: int,
                    mirror: Baselines) -> Prepared:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"capture() takes a dict of name -> numpy array, got "
                        f"{type(arrays).__name__}")
    prepared = []
    for name, array in arrays.items():
        check_array_name(name)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array {name!r} is a {type(array).__name__}, not a numpy array; "
                            "pass np.asarray(value)")
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {array.dtype}, which holds Python "
                            "objects; arraysnap stores raw bytes only (use a fixed-size dtype)")
        order = memory_order(array)
        entry = mirror.entries.get(name)
        # Keep the array's existing chunking when it is unchanged, so that a new chunk_bytes
        # does not force a whole re-capture.
        if (entry is not None and entry.layout.shape == array.shape
                and entry.layout.dtype == array.dtype and entry.layout.order == order):
            layout = entry.layout
        else:
            layout = plan_layout(array.shape, array.dtype, order, chunk_bytes)
        prepared.append((name, array, layout))
    return prepared


def _check_step(step: object) -> int | None:
    if step is None:
        return None
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an integer or None, got {type(step).__name__} {step!r}")
    return int(step)


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r:.60} is not JSON-serialisable")


def _check_state(state: object) -> dict[str, Any] | None:
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of JSON values, got {type(state).__name__}")
    if any(not isinstance(key, str) for key in state):
        raise TypeError("state keys must be strings")
    try:
        text = json.dumps(dict(state), default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"state must be JSON-serialisable (dicts with str keys, lists, str, int, finite "
            f"float, bool, None): {err}; store arrays in `arrays`, not in `state`"
        ) from None
    except RecursionError:
        raise ValueError("state is nested too deeply (or refers to itself)") from None
    if len(text) > 16 << 20:
        raise ValueError(f"state is {len(text)} bytes of JSON; keep it small (< 16 MiB) and "
                         "put bulk data in `arrays`")
    value = json.loads(text)
    return value  # type: ignore[no-any-return]


def _provenance() -> dict[str, Any]:
    return {"arraysnap": __version__, "numpy": np.__version__,
            "python": platform.python_version(), "host": socket.gethostname(),
            "pid": os.getpid(), "argv0": os.path.basename(sys.argv[0]) if sys.argv else ""}


def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except Exception as err:  # noqa: BLE001 - exit must go on; the error is logged
            log.error("arraysnap: closing %s at exit failed: %r", store.path, err)


# Before concurrent.futures refuses new work at exit (its hook runs after ours, as threading
# calls these hooks last-registered first), so pending captures can still finish.
_register_thread_exit = getattr(threading, "_register_atexit", None)
if _register_thread_exit is not None:
    _register_thread_exit(_close_open_stores)
atexit.register(_close_open_stores)
