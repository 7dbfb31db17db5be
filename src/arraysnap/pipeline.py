"""Background persistence: read, hash and encode changed chunks, write them, then commit.

Capture jobs go, in order, through:

* the **reader** hashes each changed chunk of the baseline (blake3) and encodes it on a
  small pool (both release the GIL), then sets the job's ``chunks_read``, which is all the
  next capture waits for. Encoded chunks wait in memory for the writers, at most
  ``buffer_bytes`` of them: past that the reader, and so the next capture, waits
  (backpressure) rather than memory growing.
* the **object writers** (a few threads, so that one object's fsync overlaps the next
  one's write) write each chunk object (temporary file, fsync, rename) as it comes;
* the **committer** commits each job in order once its objects are written: the replay
  log's records and the objects made durable (one storage barrier), then the manifest,
  written create-only. Then it tells the listener, which applies retention.

Memory: encoded chunks wait in the buffer budget (``budget.py``); the codec's temporary
output is freed at once by the thread that made it, so each pool thread reuses the same block.

The engine tells the store what happened through one :class:`Listener` (committed, failed,
and the two questions it asks before a commit and on a full disk); which chunk objects an
in-flight job relies on is kept in :class:`Pins`, shared with retention and gc.

Transient write errors (EINTR, EAGAIN, EIO, EBUSY, ETIMEDOUT) are retried with backoff;
ENOSPC first asks the listener to free space (the retention policy's pruning) and retries once.
A job that still fails fails every job read after it (they may share its chunk objects);
their chunks are remembered as *uncommitted* and go into the next job, so no change is
lost (invariant 3), and the reader starts again from the last committed tables.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, TypeVar

import blake3
import numpy as np

from .budget import Budget, Held
from .chunks import padded_chunk
from .codecs import CodecSpec
from .layout import ChunkLayout
from .manifest import ArrayEntry, Manifest
from .objects import DIGEST_BYTES, ChunkObjects
from .pins import Pins
from .results import CaptureInfo, CaptureStat
from .storage import Storage
from .tables import Built, TableWriter
from .threads import lower_thread_priority, start_workers

__all__ = ["DEFAULT_BUFFER_BYTES", "DEFAULT_RETRY_DELAYS", "POOL_WORKERS", "ArrayDelta",
           "Listener", "PersistJob", "Persister", "Pins", "manifest_key", "put_manifest"]

log = logging.getLogger("arraysnap")
T = TypeVar("T")

# 16 MiB: 16 chunks of 1 MiB queued for the disk is plenty to overlap writes with the next
# captures, and keeps anonymous memory within the core target (64 MiB) even at 100 % change.
DEFAULT_BUFFER_BYTES = 16 << 20
# A pipeline idle this long unmaps the mappings it kept for reuse.
IDLE_TRIM_SECONDS = 5.0
# Threads writing chunk objects: each write ends in an fsync that mostly waits for the disk,
# so a few of them keep the disk busy (the file system commits their fsyncs together).
OBJECT_WRITERS = 4
TABLE_WRITERS = 8  # a commit's table objects (format 2), written at once
# Threads of a store's pool, which hashes, encodes and assembles chunks (both release the GIL).
POOL_WORKERS = 2
DEFAULT_RETRY_DELAYS = (0.05, 0.2, 1.0, 3.0)
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EIO, errno.EBUSY,
                              errno.ETIMEDOUT})


def manifest_key(seq: int) -> str:
    """The storage key of snapshot `seq`'s manifest.

    >>> manifest_key(7)
    'snapshots/000000000007.json'
    """
    return f"snapshots/{seq:012d}.json"


def put_manifest(storage: Storage, seq: int, data: bytes) -> None:
    """Write snapshot `seq`'s manifest create-only (the commit point) and make it durable.

    A key that exists already is fine only if it holds these very bytes: an earlier attempt
    of this commit that landed although its reply was lost.
    """
    key = manifest_key(seq)
    if not storage.put_if_absent(key, data) and storage.get(key) != data:
        raise FileExistsError(errno.EEXIST, f"snapshot {seq} exists already in "
                              f"{storage.describe()}: is another writer at work?", key)
    storage.barrier()


@dataclass(slots=True)
class ArrayDelta:
    """One array of a capture: its layout, its baseline buffer and the chunks that changed."""

    name: str
    layout: ChunkLayout
    baseline: np.ndarray
    changed: np.ndarray
    fresh: bool
    dims: tuple[str, ...] | None = None


@dataclass(slots=True)
class PersistJob:
    seq: int
    step: int | None
    wall_time: float
    arrays: list[ArrayDelta]
    state: dict[str, Any] | None
    rng: Any
    provenance: dict[str, Any]
    pause_seconds: float
    queue_seconds: float
    started: float
    replay_position: int
    capture: CaptureInfo
    chunks_read: threading.Event = field(default_factory=threading.Event)
    # Filled in by the reader for the writer.
    entries: dict[str, ArrayEntry] = field(default_factory=dict)
    changed: dict[str, np.ndarray] = field(default_factory=dict)
    writes: list[Future[int]] = field(default_factory=list)
    pinned: list[bytes] = field(default_factory=list)
    error: BaseException | None = None
    chunks_changed: int = 0
    chunks_deduplicated: int = 0
    encode_seconds: float = 0.0
    read_done: float = 0.0
    retries: int = 0


_scratch = threading.local()


def _chunk_of(delta: ArrayDelta, index: int) -> np.ndarray:
    """Chunk `index` of the baseline at full chunk size: a view, or for a ragged chunk a
    zero-padded copy in this thread's scratch buffer (reused, never freed per chunk)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < delta.layout.chunk_bytes:
        buffer = _scratch.buffer = np.empty(delta.layout.chunk_bytes, dtype=np.uint8)
    return padded_chunk(delta.baseline, delta.layout, index, buffer)


class Listener(ABC):
    """What the engine tells its store, and asks it; called on the committer's thread.

    >>> class Quiet(Listener):
    ...     def committed(self, job, manifest, manifest_bytes, stat): pass
    ...     def failed(self, job, error, stat): pass
    >>> Quiet().free_space(), Quiet().before_commit()
    (0, None)
    """

    @abstractmethod
    def committed(self, job: PersistJob, manifest: Manifest, manifest_bytes: int,
                  stat: CaptureStat) -> None:
        """Snapshot `job.seq` is durable: its manifest is written and synced."""

    @abstractmethod
    def failed(self, job: PersistJob, error: BaseException, stat: CaptureStat) -> None:
        """Snapshot `job.seq` will never commit; its changes go into the next job."""

    def before_commit(self) -> None:  # noqa: B027 - most stores have nothing to add
        """Write what the manifest will point to (the replay log's records); the barrier
        that follows makes it durable with the chunk objects."""

    def free_space(self) -> int:
        """The disk is full: free what the store's policy allows; return the bytes freed."""
        return 0


class Persister:
    """Runs capture jobs in the background, in order, and commits their manifests."""

    def __init__(self, objects: ChunkObjects, codec: CodecSpec, pool: ThreadPoolExecutor,
                 listener: Listener, pins: Pins, committed: Mapping[str, ArrayEntry],
                 parent: int | None, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
                 tables: ChunkObjects | None = None) -> None:
        self.objects = objects
        # Format 2: the manifests' tables go to table objects (None: format 1, whole tables).
        self.tables = tables
        self._table_writer = None if tables is None else TableWriter()
        self.codec = codec
        self.pool = pool
        self.listener = listener
        self.pins = pins
        self.retry_delays = tuple(retry_delays)
        self.budget = Budget(buffer_bytes)
        # Held by a commit (after its objects are written) and by pruning on ENOSPC in an
        # object writer: freeing space never races a commit.
        self._commit_lock = threading.RLock()
        # Tables of the last committed snapshot, and of the last job read (ahead of it).
        self._committed: dict[str, ArrayEntry] = dict(committed)
        self._tables: dict[str, ArrayEntry] = dict(self._committed)
        self._parent = parent
        self._uncommitted: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._last: PersistJob | None = None
        self._error: BaseException | None = None
        self._broken = False  # a job failed: jobs read after it fail too
        self._read_queue: queue.Queue[PersistJob | None] = queue.Queue()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arraysnap-commit",
                                          initializer=lower_thread_priority)
        self._object_writers = ThreadPoolExecutor(max_workers=OBJECT_WRITERS,
                                                  thread_name_prefix="arraysnap-write",
                                                  initializer=lower_thread_priority)
        self._reader = threading.Thread(target=self._read_loop, name="arraysnap-read",
                                        daemon=True)
        self._reader.start()
        # Every thread the engine may need, started now: a capture still pending at
        # interpreter exit is finished from an exit hook, where Python 3.12.0-3.12.2 can no
        # longer start threads (CPython gh-113964); and an executor starts its threads lazily.
        start_workers(self.pool, POOL_WORKERS)
        start_workers(self._writer, 1)
        start_workers(self._object_writers, OBJECT_WRITERS)
        # The table objects of a commit, on threads of their own: behind the next capture's
        # chunk writes they would wait for those.
        self._table_writers = None if tables is None else ThreadPoolExecutor(
            max_workers=TABLE_WRITERS, thread_name_prefix="arraysnap-tables",
            initializer=lower_thread_priority)
        if self._table_writers is not None:
            start_workers(self._table_writers, TABLE_WRITERS)

    # -- caller side ---------------------------------------------------------------------
    def submit(self, job: PersistJob) -> None:
        with self._lock:
            self._pending += 1
            self._last = job
        self._read_queue.put(job)

    def wait_chunks_read(self) -> None:
        """Block until the newest job no longer reads the baselines."""
        last = self._last
        if last is not None:
            last.chunks_read.wait()

    def drain(self) -> None:
        """Block until every submitted job has committed or failed; then unmap the mappings
        kept for reuse."""
        with self._idle:
            while self._pending:
                self._idle.wait()
            self.budget.trim()

    def take_error(self) -> BaseException | None:
        with self._lock:
            error, self._error = self._error, None
            return error

    def stop(self) -> None:
        self._read_queue.put(None)
        self._reader.join()
        self._writer.shutdown(wait=True)  # commits wait for their objects: writers still run
        self._object_writers.shutdown(wait=True)
        if self._table_writers is not None:
            self._table_writers.shutdown(wait=True)

    # -- retrying ------------------------------------------------------------------------
    def retrying(self, action: Callable[[], T], job: PersistJob | None = None, *,
                 free_space: bool = True) -> T:
        """Run `action`, retrying transient errors with backoff and ENOSPC after pruning.

        Freeing space holds the commit lock: pruning must never race a commit.
        """
        delays = iter(self.retry_delays)
        pruned = not free_space
        while True:
            try:
                return action()
            except OSError as err:
                if err.errno == errno.ENOSPC and not pruned and self.retry_delays:
                    pruned = True
                    with self._commit_lock:
                        freed = self.listener.free_space()
                    log.warning("arraysnap: disk full; retention freed %d bytes, retrying",
                                freed)
                    if freed:
                        continue
                    raise
                delay = next(delays, None) if err.errno in TRANSIENT_ERRNOS else None
                if delay is None:
                    raise
                if job is not None:
                    job.retries += 1
                log.warning("arraysnap: %r; retrying in %.2f s", err, delay)
                time.sleep(delay)

    # -- reader stage --------------------------------------------------------------------
    def _read_loop(self) -> None:
        lower_thread_priority()
        while True:
            try:
                job = self._read_queue.get(timeout=IDLE_TRIM_SECONDS)
            except queue.Empty:
                with self._idle:
                    if not self._pending:  # idle a while: the mappings kept for reuse go
                        self.budget.trim()
                continue
            if job is None:
                break
            try:
                if self._broken:
                    # Jobs read after a failed one are failing on the writer: once they
                    # have, start again from the committed tables, with their changes
                    # uncommitted.
                    self._writer.submit(lambda: None).result()
                    with self._lock:
                        self._broken = False
                        self._tables = dict(self._committed)
                self._read(job)
            except BaseException as err:  # noqa: BLE001 - handed to the writer, never lost
                job.error = err
                with self._lock:
                    # The tables did not take this job's changes: the next job must start
                    # again from the committed ones, with these changes uncommitted.
                    self._broken = True
            job.read_done = time.perf_counter()
            job.chunks_read.set()
            try:
                self._writer.submit(self._commit, job)
            except RuntimeError:  # the writer was shut down (interpreter exit): never hang
                self._commit(job)

    def _indices(self, delta: ArrayDelta) -> tuple[np.ndarray, bytearray]:
        previous = self._tables.get(delta.name)
        if delta.fresh or previous is None or previous.layout != delta.layout:
            return np.arange(delta.layout.n_chunks), bytearray(delta.layout.n_chunks * DIGEST_BYTES)
        with self._lock:
            extra = self._uncommitted.get(delta.name)
            extra = set(extra) if extra else None
        indices = delta.changed
        if extra:
            indices = np.union1d(indices, np.fromiter(extra, dtype=np.intp))
        return indices, bytearray(previous.digests)

    def _read(self, job: PersistJob) -> None:
        start = time.perf_counter()
        work = []
        for delta in job.arrays:
            indices, digests = self._indices(delta)
            job.changed[delta.name] = indices
            job.chunks_changed += len(indices)
            work.append((delta, indices, digests))
        futures = [[self.pool.submit(self._read_chunk, job, delta, int(i)) for i in indices]
                   for delta, indices, _ in work]
        # Every chunk task must be finished, failed or not, before the baseline is released:
        # a task still reading it while the next capture writes would name an object by the
        # digest of other bytes.
        wait_for(f for group in futures for f in group)
        for (delta, indices, digests), group in zip(work, futures, strict=True):
            previous = self._tables.get(delta.name)
            if (not len(indices) and previous is not None and previous.dims == delta.dims
                    and previous.layout == delta.layout):
                # Unchanged: the same entry, so that what was built of it is reused.
                job.entries[delta.name] = previous
                continue
            for index, future in zip(indices, group, strict=True):
                digest = future.result()
                digests[int(index) * DIGEST_BYTES : (int(index) + 1) * DIGEST_BYTES] = digest
            layout = delta.layout
            job.entries[delta.name] = ArrayEntry(delta.name, layout.shape, layout.dtype,
                                                  layout.order, layout.split_axis,
                                                  layout.rows_per_chunk, bytes(digests),
                                                  delta.dims)
        self._tables = dict(job.entries)
        job.encode_seconds = time.perf_counter() - start

    def _read_chunk(self, job: PersistJob, delta: ArrayDelta, index: int) -> bytes:
        # At most one chunk in flight per pool thread (a view of the baseline, or a padded
        # copy in the thread's scratch buffer) plus the codec's output, freed right here.
        raw = _chunk_of(delta, index)
        digest = blake3.blake3(raw).digest()
        # Pinned before the existence check, so retention cannot delete it between the
        # two. A digest another in-flight chunk pinned is written by that one.
        claimed = self.pins.claim(digest)
        with self._lock:
            job.pinned.append(digest)
        if claimed or self.objects.has(digest):
            if not claimed:
                self.objects.reuse(digest)
            with self._lock:  # pool threads count concurrently
                job.chunks_deduplicated += 1
            return digest
        encoded = self.codec.encode_lazily(raw, delta.layout.dtype.itemsize)
        buffer, held = self.budget.hold(encoded)
        del encoded, raw  # freed by the thread that allocated it, before anything else
        try:
            write = self._object_writers.submit(self._write_object, job, digest, buffer, held)
        except RuntimeError:  # the writers were shut down (interpreter exit): never hang
            write = Future()
            write.set_result(self._write_object(job, digest, buffer, held))
        job.writes.append(write)
        return digest

    def _write_object(self, job: PersistJob, digest: bytes, buffer: Held, held: int) -> int:
        try:
            if job.error is not None:
                return 0
            return self.retrying(
                lambda: buffer.write_with(lambda data: self.objects.put(digest, data)), job)
        except BaseException as err:  # noqa: BLE001 - the commit of this job reports it
            job.error = job.error or err
            return 0
        finally:
            self.budget.give(buffer, held)

    # -- writer stage --------------------------------------------------------------------
    def _commit(self, job: PersistJob) -> None:
        try:
            # Every write was submitted before the reader handed the job over.
            wait_for(job.writes)
            with self._commit_lock:
                self._commit_written(job)
        finally:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _commit_written(self, job: PersistJob) -> None:
        try:
            if job.error is None and self._broken:
                # An earlier job failed after this one was read from its tables: this one
                # holds that job's changes too, and is whole if all its objects exist. Pinned
                # first, so that freeing space (ENOSPC) cannot delete them before the commit.
                digests = {entry.digest(i) for entry in job.entries.values()
                           for i in range(entry.n_chunks)}
                self.pins.pin(digests)
                with self._lock:
                    job.pinned.extend(digests)
                missing = sum(not self.objects.has(d) for d in digests)
                if missing:
                    job.error = RuntimeError(
                        f"an earlier capture failed to persist, and {missing} of the chunk "
                        "objects this one shares with it were never written")
            if job.error is not None:
                raise job.error
            manifest, size, stat = self._write_manifest(job)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, never lost
            self._fail(job, err)
        else:
            self._committed = dict(job.entries)
            self._parent = job.seq
            self._unpin(job)
            with self._lock:
                # Every failed job before this one is covered by it: either read from its
                # tables, or (after a restart of the reader) through `uncommitted`.
                self._uncommitted.clear()
            try:
                self.listener.committed(job, manifest, size, stat)
            except Exception as err:  # noqa: BLE001 - the snapshot is committed regardless
                log.error("arraysnap: after committing snapshot %d: %r", job.seq, err)

    def _write_manifest(self, job: PersistJob) -> tuple[Manifest, int, CaptureStat]:
        write_done = time.perf_counter()
        # What the manifest points to (the table objects, the replay log's records), then
        # one barrier for them and the chunk objects, before the manifest.
        built, table_bytes = None, 0
        if self._table_writer is not None and self.tables is not None:
            built, table_bytes = self.retrying(lambda: self._build_tables(job), job)
        self.retrying(self.listener.before_commit, job)
        self.retrying(self.objects.sync, job)
        if built is not None and self.tables is not None:
            self.retrying(self.tables.sync, job)  # present ones it reuses; written: synced
        written = sum(write.result() for write in job.writes) + table_bytes
        stats = {
            "pause_seconds": job.pause_seconds,
            "queue_seconds": job.queue_seconds,
            "chunks_scanned": sum(d.layout.n_chunks for d in job.arrays),
            "chunks_compared": job.capture.chunks_compared,
            "chunks_changed": job.chunks_changed,
            "chunks_deduplicated": job.chunks_deduplicated,
            "bytes_written": written,
            "encode_seconds": job.encode_seconds,
            "write_seconds": max(0.0, write_done - job.read_done),
            # From the start of capture() to the manifest write, which cannot time itself.
            "durable_seconds": time.perf_counter() - job.started,
        }
        manifest = Manifest(job.seq, job.step, job.wall_time, self._parent, self.codec.to_json(),
                            job.entries, job.state, job.rng, stats, job.provenance,
                            replay_position=job.replay_position,
                            table_digests=frozenset() if built is None else built.digests)
        data = manifest.to_json(built)
        self.retrying(lambda: put_manifest(self.objects.storage, job.seq, data), job)
        if built is not None:
            self._table_writer.committed(built)  # type: ignore[union-attr]
        now = time.perf_counter()
        stat = dataclasses.replace(self._stat(job, "committed", None),
                                   bytes_written=written + len(data),
                                   commit_seconds=now - write_done,
                                   durable_seconds=now - job.started)
        return manifest, len(data), stat

    def _build_tables(self, job: PersistJob) -> tuple[Built, int]:
        """The job's tables and the bytes of table objects written for them; the new
        objects are written on threads of their own at once (each write waits for its
        fsync: one after another they would add up in every commit), pinned until the job
        commits."""
        assert self._table_writer is not None and self._table_writers is not None
        writers = self._table_writers
        writes: list[Future[int]] = []

        def put(digest: bytes, data: bytes) -> None:
            self.pins.pin((digest,))
            with self._lock:
                job.pinned.append(digest)
            try:
                writes.append(writers.submit(self._write_table, digest, data))
            except RuntimeError:  # the writers were shut down (interpreter exit): write here
                done: Future[int] = Future()
                done.set_result(self._write_table(digest, data))
                writes.append(done)

        try:
            built = self._table_writer.build(job.entries, put)
        finally:
            wait_for(writes)
        return built, sum(write.result() for write in writes)  # or its error

    def _write_table(self, digest: bytes, data: bytes) -> int:
        assert self.tables is not None
        written = self.tables.put(digest, data)
        if not written:
            self.tables.reuse(digest)  # present: maybe from a capture that never committed
        return written

    def _stat(self, job: PersistJob, status: str, error: str | None) -> CaptureStat:
        return CaptureStat(
            seq=job.seq, step=job.step, time=job.wall_time, status=status,
            pause_seconds=job.pause_seconds, queue_seconds=job.queue_seconds,
            blocking_seconds=job.pause_seconds + job.queue_seconds,
            encode_seconds=job.encode_seconds,
            write_seconds=max(0.0, time.perf_counter() - job.read_done) if job.read_done else 0.0,
            chunks_scanned=sum(d.layout.n_chunks for d in job.arrays),
            chunks_compared=job.capture.chunks_compared,
            chunks_changed=job.chunks_changed, chunks_deduplicated=job.chunks_deduplicated,
            retries=job.retries, error=error)

    def _fail(self, job: PersistJob, err: BaseException) -> None:
        log.error("arraysnap: snapshot %d failed to persist: %r", job.seq, err)
        with self._lock:
            self._broken = True
            for delta in job.arrays:
                target = self._uncommitted.setdefault(delta.name, set())
                target.update(int(i) for i in delta.changed)
                target.update(int(i) for i in job.changed.get(delta.name, ()))
            self._error = self._error or err
        self._unpin(job)
        try:
            self.listener.failed(job, err, self._stat(job, "failed", repr(err)))
        except Exception as hook_error:  # noqa: BLE001 - the failure itself is what matters
            log.error("arraysnap: after failing snapshot %d: %r", job.seq, hook_error)

    def _unpin(self, job: PersistJob) -> None:
        with self._lock:
            pinned, job.pinned = job.pinned, []
        self.pins.unpin(pinned)
