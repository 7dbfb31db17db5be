"""The store: open, capture, restore, list, verify, prune, export, close.

This module is the facade: :func:`open` and the :class:`Store` methods check their
arguments and wire the parts together. Each job lives in a part that owns its state
(``arraysnap._store``): the catalog of committed snapshots, opening and recovery, the
capture pause, restore, maintenance (verify, retention, gc, sizes), cadence and signals,
and the failure policy; the engine (``pipeline``) reports to the store through one
listener. Every persisted byte goes through the store's :class:`~arraysnap.storage.Storage`.

A store in a local folder::

    arraysnap.json          format name and version, creation settings
    lock                    flock-ed by the one writer
    chunks/ab/cdef...       content-addressed chunk objects (zarr v3 chunk encoding)
    snapshots/<seq>.json    one manifest per committed snapshot (the commit point)
    journal/<n>.jsonl       the replay log
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
import logging
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._store.capture import Capturer, check_state, check_step, prepare_arrays
from ._store.catalog import SNAPSHOT_SPEC_HELP, Catalog
from ._store.failures import FailurePolicy, parse_on_error, wrap
from ._store.locating import BaselineClaim, as_storage, default_baseline_dir
from ._store.maintenance import Maintenance, Progress, grace_of
from ._store.opening import (
    FORMAT_NAME,
    FORMAT_VERSION,
    create_store,
    not_a_store,
    read_settings,
    recover_baselines,
    upgrade_settings,
)
from ._store.restore import Restorer
from ._store.signals import Cadence, parse_signals
from ._store.tiers import (
    DEFAULT_UPLOAD_DELAYS,
    Reconciled,
    Uploader,
    check_tiers,
    reconcile,
    tier_settings,
)
from .baselines import Baselines
from .codecs import CodecSpec, parse_codec
from .diff import SnapshotDiff, diff_snapshots
from .errors import ArraysnapError, ArraysnapWarning, ReadOnlyStoreError, space_error
from .fsio import FileOps
from .history import History
from .manifest import Manifest
from .objects import ChunkObjects
from .pipeline import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_RETRY_DELAYS,
    POOL_WORKERS,
    Listener,
    Persister,
    PersistJob,
    Pins,
)
from .policies import parse_policy
from .replaylog import ReplayLog
from .results import (
    CaptureInfo,
    CaptureStat,
    CaptureStats,
    PruneReport,
    Restored,
    SnapshotInfo,
    StoreUsage,
    VerifyReport,
)
from .retention import Retention
from .rngstate import check_rng, rng_to_json
from .storage import LocalStorage, Storage, WriterLock
from .tables import PREFIX as TABLES_PREFIX
from .threads import lower_thread_priority
from .tracking import Tracking, check_track_writes
from .zarr_view import SnapshotZarrStore, export_snapshot

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SNAPSHOT_SPEC_HELP", "ArraysnapWarning", "Store",
           "open", "upgrade"]

log = logging.getLogger("arraysnap")

_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()
# A writer with no retention rule warns once when what it wrote passes this many times the
# state it captures (and GROWTH_FLOOR): every snapshot is kept, and a newcomer may not know.
GROWTH_FACTOR = 20
GROWTH_FLOOR = 1 << 30


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str] | Storage | Any,
    mode: Literal["a", "r"] = "a",
    *,
    storage_options: Mapping[str, Any] | None = None,
    baseline_dir: str | os.PathLike[str] | None = None,
    local: str | os.PathLike[str] | None = None,
    grace_seconds: float | None = None,
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
    _baseline_ops: FileOps | None = None,
    _retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS,
    _upload_delays: tuple[float, ...] = DEFAULT_UPLOAD_DELAYS,
) -> Store:
    """Open (or, with ``mode="a"``, create) the store at `path`: a folder, a URL in object
    storage (``s3://bucket/prefix/run.snap``, ``gs://``, ``az://``), an obstore store
    object, or a :class:`arraysnap.storage.Storage`.

    `storage_options` configure a URL's object store (obstore's settings: ``endpoint``,
    ``region``, credentials, ``allow_http``, ``timeout``, ``retry_config``); without them
    obstore reads the usual environment (``AWS_*`` and the like). A writer keeps its
    *baselines* (the local files a capture compares against) beside a local store, and for
    a store in object storage in `baseline_dir`, by default a folder of its own under
    ``$XDG_CACHE_HOME/arraysnap`` (``~/.cache/arraysnap``): a cache, which a fresh node
    rebuilds from the newest snapshot (see ``docs/object-storage.md``).

    `local` gives a store in object storage a *local tier* (a folder on a fast local disk):
    each capture commits there (durable in milliseconds; the baselines live there too)
    and is uploaded in the background, objects first and the manifest last;
    ``SnapshotInfo.remote`` says whether a snapshot is uploaded, ``wait(remote=True)``
    waits until all are. While the remote store fails, captures go on committing locally
    and uploads retry and catch up; retention never removes a snapshot not uploaded yet.
    The writer opens both tiers and goes on from the newest snapshot of either: a fresh
    node with an empty local tier restores from the remote store. `grace_seconds`
    (default 600 in object storage, 0 in a folder): how long retention and ``gc`` keep
    what a removed snapshot named, and objects no snapshot names, so that a reader
    elsewhere restoring it (or a writer's fresh upload) is not cut short.

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
    storage = as_storage(path, storage_options)
    remote = None
    if local is not None:
        folder = as_storage(local, None).local_path
        if folder is None:
            raise ValueError(f"local= must be a local folder, not {local!r}")
        storage, remote = LocalStorage(folder, keep_cached=True), storage
    return Store(storage, mode, chunk_bytes=chunk_bytes, codec=codec, every=every,
                 keep_last=keep_last, keep_every=keep_every, keep_within=keep_within,
                 max_bytes=max_bytes, on_error=on_error, signals=signals,
                 buffer_bytes=buffer_bytes, track_writes=track_writes,
                 baseline_ops=_baseline_ops, retry_delays=_retry_delays,
                 baseline_dir=baseline_dir, remote=remote, upload_delays=_upload_delays,
                 grace_seconds=grace_seconds)


def upgrade(path: str | os.PathLike[str] | Storage | Any, *,
            storage_options: Mapping[str, Any] | None = None) -> int:
    """Make the store at `path` a store of this arraysnap's format (``FORMAT_VERSION``);
    return the format version it had.

    A writer continues an older store in its own format, so that older releases of
    arraysnap can still read it; after ``upgrade`` writers write the current format (for
    format 2: table objects, whose costs follow what changed; for format 3: the chunks of
    small arrays packed, many to an object). Nothing already written
    changes, and releases that read only the older format refuse the store from then on
    (``FormatVersionError``). Takes the writer's lock: ``StoreLockedError`` while a job
    writes the store.

    >>> import arraysnap, tempfile
    >>> path = tempfile.mkdtemp() + "/run.snap"
    >>> arraysnap.open(path).close()
    >>> arraysnap.upgrade(path) == arraysnap.FORMAT_VERSION   # already current: unchanged
    True
    """
    storage = as_storage(path, storage_options)
    if read_settings(storage, codec=None) is None:
        raise not_a_store(storage)
    lock = storage.lock_writer(f"pid {os.getpid()} on {socket.gethostname()} (upgrade)")
    try:
        return upgrade_settings(storage)
    finally:
        lock.release()


class _Events(Listener):
    """The engine's listener: what a commit or a failure changes in the store's parts.

    It holds the store strongly: a store dropped without ``close()`` stays alive while its
    engine has captures in flight, so that their ``CaptureInfo.result()`` still returns.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def committed(self, job: PersistJob, manifest: Manifest, manifest_bytes: int,
                  stat: CaptureStat) -> None:
        self._store._committed(job, manifest, manifest_bytes, stat)

    def failed(self, job: PersistJob, error: BaseException, stat: CaptureStat) -> None:
        self._store._failed(job, error, stat)

    def before_commit(self) -> None:
        if self._store._replay_log is not None:
            self._store._replay_log.flush(durable=False)  # the commit's barrier makes it durable

    def free_space(self) -> int:
        return self._store._maintenance.free_space()


class Store:
    """A snapshot store; see :func:`arraysnap.open`.

    Attributes: ``path``, ``mode``, ``codec``, ``chunk_bytes``, and ``format_version``, the
    store's format (what its writers write; :func:`arraysnap.upgrade` raises it).

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"x": np.ones(3)}, step=5)
    ...     snap.wait()  # list() shows committed snapshots only
    ...     [info.step for info in snap.list()], snap.format_version == arraysnap.FORMAT_VERSION
    ([5], True)
    """

    def __init__(self, storage: Storage, mode: str = "a", *, chunk_bytes: int | None = None,
                 codec: str | None = None, every: object = None,
                 keep_last: int | None = None, keep_every: int | None = None,
                 keep_within: float | str | None = None, max_bytes: int | None = None,
                 on_error: str = "raise", signals: bool | Iterable[int] = (),
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 track_writes: bool | str = "auto", baseline_ops: FileOps | None = None,
                 retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS,
                 baseline_dir: str | os.PathLike[str] | None = None,
                 remote: Storage | None = None,
                 upload_delays: tuple[float, ...] = DEFAULT_UPLOAD_DELAYS,
                 grace_seconds: float | None = None) -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' (read and write) or 'r' (read only), got {mode!r}")
        parse_on_error(on_error)
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) \
                or buffer_bytes < 1 << 16:
            raise ValueError(f"buffer_bytes must be an integer of at least 65536, got "
                             f"{buffer_bytes!r}")
        check_track_writes(track_writes)
        if grace_seconds is not None and (isinstance(grace_seconds, bool) or not isinstance(
                grace_seconds, (int, float)) or not 0 <= grace_seconds < 1e9):
            raise ValueError(f"grace_seconds must be a number of seconds >= 0, got "
                             f"{grace_seconds!r}")
        policy = parse_policy(every)
        retention = Retention(keep_last, keep_every, keep_within, max_bytes)  # type: ignore[arg-type]
        watched = parse_signals(signals)
        if chunk_bytes is not None and (type(chunk_bytes) is not int
                                        or not 1 <= chunk_bytes <= 1 << 31):
            raise ValueError(f"chunk_bytes must be an integer from 1 to 2**31, got {chunk_bytes!r}")
        if mode == "r" and watched:
            raise ValueError("signals= is for a writer (mode='a'): a reader never captures")
        local = storage.local_path
        where = storage.describe()
        if remote is not None:
            check_tiers(storage, remote, mode, baseline_dir)
        self.path: Path | str = (remote.describe() if remote is not None
                                 else local if local is not None else where)
        # The local tier of a store in object storage (local=), or None.
        self.local: Path | None = local if remote is not None else None
        self._remote = remote
        self._uploader: Uploader | None = None
        self._remote_lock: WriterLock | None = None
        self.mode = mode
        self.on_error = on_error
        self._storage = storage
        self._closed = True
        self._failures = FailurePolicy(on_error, str(self.path))
        if local is not None and local.exists() and not local.is_dir():
            raise (NotADirectoryError if mode == "r" else FileExistsError)(
                f"{local} is a file, not an arraysnap store (a store is a folder)"
                + ("" if mode == "r" else "; choose a new path"))
        settings = (read_settings(storage, codec) if remote is None
                    else tier_settings(storage, remote, codec))
        if settings is None:
            if mode == "r":
                raise not_a_store(storage)
            settings = create_store(storage, parse_codec(codec or "zstd"))
        # Baselines beside a local store; for one in object storage, in a local folder
        # whose marker names the store (it is a cache: see docs/object-storage.md).
        if baseline_dir is None and local is not None:
            root, owner = local, None
        else:
            root = (Path(baseline_dir) if baseline_dir is not None
                    else default_baseline_dir(storage))
            owner = settings.store_id or where
        self.baseline_dir: Path = root
        self.codec: CodecSpec = settings.codec
        self.chunk_bytes: int = chunk_bytes or settings.chunk_bytes
        self.format_version: int = settings.version
        self._catalog = Catalog(storage)
        self._objects = ChunkObjects(storage)
        self._tables = ChunkObjects(storage, TABLES_PREFIX)
        self._history = History(storage)
        self._baselines = Baselines(root, baseline_ops, owner=owner)
        self._claim: BaselineClaim | None = None
        self._pool = ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="arraysnap",
                                        initializer=lower_thread_priority)
        self._writer_lock: WriterLock | None = None
        self._replay_log: ReplayLog | None = None
        self._tracking: Tracking | None = None
        self._persister: Persister | None = None
        self._capturer: Capturer | None = None
        self._restorer: Restorer | None = None
        self._cadence = Cadence(policy)
        pins = Pins()
        self._written = 0  # bytes this writer's commits wrote
        self._growth: str | None = None  # the growth warning, once due (then "")
        self._closed = False
        tiers: Reconciled | None = None
        try:
            if mode == "a":
                holder = f"pid {os.getpid()} on {socket.gethostname()}"
                if remote is not None:  # the authority first
                    self._remote_lock = remote.lock_writer(holder)
                self._writer_lock = storage.lock_writer(holder)
                if owner is not None:
                    self._claim = BaselineClaim(root, where)
                self._tracking = Tracking(track_writes, baseline_dir=self._baselines.dir)
                # Before the replay log is opened: reconciling may replace the local one.
                tiers = reconcile(storage, remote) if remote is not None else None
                self._replay_log = ReplayLog(storage)
                self._recover(pins, buffer_bytes, retry_delays,
                              distrust=tiers is not None and tiers.changed)
                self._cadence.watch(watched)
        except BaseException:
            self._release()
            raise
        self._maintenance = Maintenance(
            self._catalog, self._objects, self.codec, self._baselines, pins=pins,
            replay_log=self._replay_log, retention=retention, tables=self._tables,
            withheld=self._not_uploaded if remote is not None else None,
            # A local tier is a folder: its own grace is none, grace_seconds is the store's.
            grace=0.0 if remote is not None else grace_of(storage, grace_seconds))
        self._remote_maintenance = None if remote is None else Maintenance(
            Catalog(remote), ChunkObjects(remote), self.codec, self._baselines,
            retention=retention, tables=ChunkObjects(remote, TABLES_PREFIX),
            grace=grace_of(remote, grace_seconds))
        if tiers is not None:  # last: its thread uploads (and prunes) at once
            assert remote is not None
            self._uploader = Uploader(storage, self._catalog, remote, tiers.held,
                                      tiers.pending, upload_delays, self._prune_remote)
        self._restorer = Restorer(self._catalog, self._objects, self.codec, self._baselines,
                                  self._pool, self._capturer, self._reading_replay_log,
                                  root / "tmp" if mode == "a" else None)
        _open_stores.add(self)

    def _recover(self, pins: Pins, buffer_bytes: int, retry_delays: tuple[float, ...], *,
                 distrust: bool = False) -> None:
        """Clean up after a killed writer and make the baselines equal the latest snapshot."""
        self._baselines.refuse_link()
        self._storage.remove_temporaries()
        head = self._catalog.newest_valid()
        seqs = self._catalog.seqs()
        try:
            recovered = recover_baselines(head, self._baselines, self._objects, self.codec,
                                          self._pool, distrust=distrust)
        except OSError as err:
            if isinstance(err, ArraysnapError):
                raise
            raise space_error(err, f"{self._storage}: opening for writing rebuilds the "
                              f"baselines in {self._baselines.dir} and could not",
                              "open the store with mode='r' to read it") from err
        assert self._tracking is not None
        self._capturer = Capturer(self._baselines, self._tracking, self._pool, self._history,
                                  self._failures, self._replay_log, head,
                                  (seqs[-1] + 1) if seqs else 1)
        self._persister = Persister(self._objects, self.codec, self._pool, _Events(self), pins,
                                    recovered.tables, head.seq if head else None,
                                    buffer_bytes=buffer_bytes, retry_delays=retry_delays,
                                    tables=self._tables if self.format_version >= 2 else None,
                                    version=self.format_version, head=head)

    @property
    def retention(self) -> Retention:
        """What the store keeps (``keep_last=`` ... at open); settable.

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap", keep_last=3).retention.keep_last
        3
        """
        return self._maintenance.retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        self._maintenance.retention = retention

    def _reading_replay_log(self) -> ReplayLog:
        return self._replay_log or ReplayLog(self._storage, writable=False)

    # -- snapshots -------------------------------------------------------------------------
    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first (damaged manifests are left out; see verify()).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").list()
        []
        """
        return [self._tiered(info) for info in self._catalog.list()]

    def latest(self) -> SnapshotInfo | None:
        """The newest committed snapshot, or None if there is none.

        >>> import arraysnap, tempfile
        >>> print(arraysnap.open(tempfile.mkdtemp() + "/s.snap").latest())
        None
        """
        latest = self._catalog.latest()
        return None if latest is None else self._tiered(latest)

    def snapshot(self, spec: str | int | None = None) -> SnapshotInfo:
        """The committed snapshot that `spec` names: a seq (``12`` or ``"12"``),
        ``"step:N"`` (the newest of step N), ``"latest"`` (the default), ``"~K"`` (K before
        the latest) or ``"-K"`` (-1 is the latest), as the command line's SNAP.

        SnapshotNotFoundError if there is none such; ValueError if `spec` is no such form.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     for step in (10, 20, 30):
        ...         _ = snap.capture({"u": np.full(3, step)}, step=step)
        ...     snap.wait()
        ...     [snap.snapshot(s).seq for s in ("latest", "2", "step:10", "~1", "-3")]
        [3, 2, 1, 2, 1]
        """
        self._check_open()
        return self._tiered(self._catalog.info(self._catalog.resolve(spec)))

    def damaged(self) -> list[int]:
        """Seqs of the snapshots whose manifest is present but cannot be read (``list()``
        leaves them out; ``verify()`` says what is wrong).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").damaged()
        []
        """
        self._check_open()
        return self._catalog.damaged()

    # -- capture ---------------------------------------------------------------------------
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
        capturer, persister = self._capturer, self._persister
        assert capturer is not None and persister is not None
        prepared = prepare_arrays(arrays, self.chunk_bytes, self._baselines, capturer.roster)
        names = capturer.dims_for(prepared, dims)
        step = check_step(step)
        state_json = check_state(state)
        check_rng(rng)
        rng_json = rng_to_json(rng)
        if not capturer.lock.acquire(blocking=False):
            raise ArraysnapError("capture() is already running in another thread of this "
                                 "process; call it from one thread at a time")
        try:
            self._raise_background_error("an earlier capture failed to persist; its changes "
                                         "are kept and go into the next capture")
            if self._growth:
                warnings.warn(self._growth, ArraysnapWarning, stacklevel=2)
                self._growth = ""
            info, blocked = capturer.capture(persister, prepared, names, step, state_json,
                                             rng_json)
            if blocked is not None:  # None: it failed in its pause (and on_error="warn")
                self._cadence.captured(step, time.time(), blocked)
            return info
        finally:
            capturer.lock.release()

    def _raise_background_error(self, message: str) -> None:
        error = self._persister.take_error() if self._persister is not None else None
        if error is not None:
            self._failures.handle(error, message)

    def _committed(self, job: PersistJob, manifest: Manifest, manifest_bytes: int,
                   stat: CaptureStat) -> None:
        self._catalog.remember(manifest, manifest_bytes)
        try:
            self._history.append(stat)
        except Exception as err:  # noqa: BLE001 - informational; the commit stands
            log.warning("arraysnap: capture history: %r", err)
        if self._capturer is not None:
            self._capturer.committed(job.seq)
        if self._uploader is not None:
            self._uploader.enqueue(job.seq)
        self._note_growth(manifest, stat.bytes_written)
        job.capture.finish(self._tiered(SnapshotInfo.from_manifest(manifest, manifest_bytes)),
                           None)
        if self.retention.active:
            try:
                self._maintenance.prune(self.retention)
            except (OSError, ArraysnapError) as err:  # retention only frees space
                log.error("arraysnap: retention after snapshot %d failed: %r", job.seq, err)

    def _tiered(self, info: SnapshotInfo) -> SnapshotInfo:
        """`info` with ``remote`` set: uploaded (a local tier), always (a store in object
        storage), never (a local store)."""
        remote = (self._uploader.uploaded(info.seq) if self._uploader is not None
                  else self._storage.local_path is None)
        return info if info.remote == remote else dataclasses.replace(info, remote=remote)

    def _prune_remote(self, seq: int) -> tuple[int, ...]:
        """After an upload: the retention policy in the store in object storage too; the
        seqs it removed there."""
        if self.retention.active and self._remote_maintenance is not None:
            return self._remote_maintenance.prune(self.retention).snapshots_removed
        return ()

    def _not_uploaded(self) -> list[int]:
        return self._uploader.pending() if self._uploader is not None else []

    def _note_growth(self, manifest: Manifest, written: int) -> None:
        self._written += written
        state = sum(entry.layout.nbytes for entry in manifest.arrays.values())
        if (self._growth is None and not self.retention.active
                and self._written > max(GROWTH_FACTOR * state, GROWTH_FLOOR)):
            self._growth = (
                f"arraysnap: {self.path} keeps every snapshot (no keep_last=, keep_every=, "
                f"keep_within= or max_bytes=), and this run has written {self._written / 2**30:.1f}"
                f" GiB to it, {self._written / max(state, 1):.0f} times its state: open it with "
                "e.g. keep_last=3 to bound it (docs/checkpointing.md, 'What to keep'). Warned "
                "once")

    def _failed(self, job: PersistJob, error: BaseException, stat: CaptureStat) -> None:
        self._history.append(stat)
        job.capture.finish(None, wrap(error, f"snapshot {job.seq} failed to persist"))

    def _sync_replay_log(self) -> None:
        if self._replay_log is not None:
            self._replay_log.flush(durable=True)

    def wait(self, *, remote: bool = False, timeout: float | None = None) -> None:
        """Block until every capture so far is durable; raise the first background error.

        With ``remote=True``, also until every one is committed in the store in object
        storage behind the local tier (``local=``): uploaded. `timeout` (seconds) bounds
        that wait (``TimeoutError``, while the remote store fails); without a local tier
        ``remote=True`` changes nothing for a store in object storage and is a
        ``ValueError`` for a local store.

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
            if not self._failures.warns:
                raise ArraysnapError(f"the replay log cannot be synced: {err}") from err
            self._failures.warn_once(err)
        self._raise_background_error("a capture failed to persist; its changes are kept and "
                                     "go into the next capture")
        if remote:
            if self._uploader is not None:
                self._uploader.send_journal()  # records logged since the last capture too
                self._uploader.wait(timeout)
            elif self._storage.local_path is not None:
                raise ValueError(f"{self.path} is a local store with no remote tier: "
                                 "wait(remote=True) is for a store opened with local=")

    # -- restore ---------------------------------------------------------------------------
    def _settled(self) -> None:
        """Open, and every capture so far committed or failed: what readers of it see."""
        self._check_open()
        if self._persister is not None:
            self._persister.drain()

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
        self._settled()
        restored = self._restorer.restore(step, seq, verify=verify, fallback=fallback)
        info = self._tiered(restored.info)
        return restored if info is restored.info else dataclasses.replace(restored, info=info)

    def restore_into(self, arrays: Mapping[str, np.ndarray], step: int | None = None, *,
                     seq: int | None = None, verify: bool = True) -> Restored:
        """Restore into buffers the caller owns (same shapes and dtypes); return the rest.

        Every array of the snapshot named in `arrays` is decoded into it (no scratch file:
        this works on a full disk); the returned ``Restored`` holds the caller's arrays in
        ``.arrays``. If it raises (a damaged chunk), the buffers may hold part of the
        snapshot: restore again from another one.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(3.0)}, step=3)
        ...     out = np.empty(3)
        ...     _ = snap.restore_into({"u": out})
        >>> out.tolist()
        [0.0, 1.0, 2.0]
        """
        self._settled()
        return self._restorer.restore_into(arrays, self._catalog.select(step, seq), verify)

    # -- verify, prune, gc, sizes ----------------------------------------------------------
    def verify(self, seq: int | None = None, *,
               progress: Progress | None = None) -> VerifyReport:
        """Check snapshots (all, or the one with `seq`): manifests, and every chunk's digest.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.zeros(3)})
        ...     snap.wait()
        ...     snap.verify().ok
        True
        """
        self._settled()
        return self._maintenance.verify(None if seq is None else [seq], progress)

    def prune(self, keep_last: int | None = None, *, keep_every: int | None = None,
              keep_within: float | str | None = None, max_bytes: int | None = None,
              dry_run: bool = False) -> PruneReport:
        """Apply a retention policy now: the one given, or else the store's own.

        A snapshot is kept if any rule keeps it (see :func:`arraysnap.open`); the newest is
        never removed. Chunk objects no kept snapshot uses are deleted, and replay-log
        records older than every kept snapshot. With ``dry_run=True`` nothing is removed (a
        reader may ask too): the report says what would be.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     for i in range(4):
        ...         _ = snap.capture({"u": np.full(4, i)}, step=i * 10)
        ...     plan = snap.prune(keep_last=1, keep_every=20, dry_run=True)
        ...     done = snap.prune(keep_last=1, keep_every=20)  # steps 0, 20 stay
        >>> plan.snapshots_removed, done.snapshots_removed, plan == done
        ((2,), (2,), True)
        """
        if not dry_run:
            self._check_writable("prune")
        given = (keep_last, keep_every, keep_within, max_bytes)
        retention = (Retention(*given) if any(v is not None for v in given)  # type: ignore[arg-type]
                     else self.retention)
        if not retention.active:
            raise ValueError("prune() needs a rule: keep_last=, keep_every=, keep_within= or "
                             "max_bytes= (or open the store with one)")
        if dry_run:
            self._settled()
            return self._maintenance.prune(retention, dry_run=True)
        assert self._capturer is not None
        with self._capturer.lock:
            self.wait()
            return self._maintenance.prune(retention)

    def gc(self) -> PruneReport:
        """Delete chunk objects that no snapshot uses (left by prune or a killed writer).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").gc().chunks_removed
        0
        """
        self._check_writable("collect garbage")
        assert self._capturer is not None
        with self._capturer.lock:
            self.wait()
            return self._maintenance.gc()

    def disk_usage(self, *, progress: Progress | None = None) -> StoreUsage:
        """Bytes per snapshot (what it uses, alone and shared) and for the whole store.

        Chunk objects and packs count their stored (encoded) size, a pack whole for every
        snapshot that uses a chunk of it (it is kept, and freed, whole); a missing one counts
        0 bytes (``verify()`` reports it); damaged manifests are named in ``damaged``.
        `progress(done, total)` is called as manifests are read.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap", codec="none") as snap:
        ...     _ = snap.capture({"u": np.zeros(4), "v": np.ones(4)})    # one pack: u and v
        ...     _ = snap.capture({"u": np.zeros(4), "v": np.full(4, 2.0)})  # a pack: v
        ...     usage = snap.disk_usage()
        >>> [(s.unique_bytes, s.shared_bytes) for s in usage.snapshots], usage.object_bytes
        ([(0, 64), (32, 64)], 96)
        """
        self._settled()
        return self._maintenance.disk_usage(progress)

    def diff(self, a: str | int, b: str | int, *, values: bool = True,
             progress: Progress | None = None) -> SnapshotDiff:
        """Which chunks and rows of each array differ between snapshots `a` and `b` (any
        form ``snapshot()`` takes), and with `values` by how much (chunks are read and
        verified only where their digests differ).

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap", chunk_bytes=64) as snap:
        ...     u = np.zeros(32)                       # 8 float64 rows per chunk
        ...     _ = snap.capture({"u": u}, step=0)
        ...     u[20] = 3.0
        ...     _ = snap.capture({"u": u}, step=1)
        ...     d = snap.diff("step:0", "latest").arrays[0]
        >>> d.chunks_differing, d.row_ranges, d.max_abs_difference
        ([2], [(16, 24)], 3.0)
        """
        self._settled()
        first, second = self._catalog.resolve(a), self._catalog.resolve(b)
        return diff_snapshots(self._catalog, self._objects, self.codec, first, second,
                              values=values, progress=progress)

    # -- zarr ------------------------------------------------------------------------------
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
        self._settled()
        return export_snapshot(self._catalog.select(step, seq), self._objects, self.codec,
                               Path(out_path))

    def zarr_store(self, step: int | None = None, *, seq: int | None = None) -> Any:
        """A read-only zarr Store presenting one snapshot (see :func:`arraysnap.open_zarr`).

        >>> import arraysnap, numpy as np, tempfile, zarr
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     _ = snap.capture({"u": np.arange(3)})
        ...     zarr.open_group(snap.zarr_store(), mode="r")["u"][:].tolist()
        [0, 1, 2]
        """
        self._settled()
        return SnapshotZarrStore(self._catalog.select(step, seq), self._objects, self.codec)

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
        return self._cadence.due(step)

    @property
    def policy(self) -> Any:
        """The ``every=`` policy that ``due()`` asks, or None.

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap", every=10).policy is not None
        True
        """
        return self._cadence.policy

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
        return self._cadence.preempted

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

    # -- lifecycle -------------------------------------------------------------------------
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
                if error is None and self._capturer is not None:
                    self._capturer.mark_clean()
                if self._uploader is not None:
                    self._uploader.send_journal()
                    self._uploader.close()  # uploads what is pending, unless the store fails
        finally:
            self._release()
        if error is not None:
            self._failures.handle(error, "a capture failed to persist before close(); the "
                                         "store holds every snapshot committed before it")

    def _release(self) -> None:
        self._closed = True
        self._cadence.close()
        if self._persister is not None:
            self._persister.stop()
            self._persister = None
        if self._uploader is not None:
            self._uploader.close(upload=False)
            self._uploader = None
        if self._replay_log is not None:
            self._replay_log.close()
        if self._tracking is not None:
            self._tracking.close()
        self._baselines.close()
        if self._restorer is not None:
            self._restorer.close()
        self._pool.shutdown(wait=True)
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None
        if self._remote_lock is not None:
            self._remote_lock.release()
            self._remote_lock = None
        _open_stores.discard(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<arraysnap.Store {str(self.path)!r} ({state})>"


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
