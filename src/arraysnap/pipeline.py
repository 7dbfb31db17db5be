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
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, TypeVar

import blake3
import numpy as np

from .budget import Budget, Held
from .chunks import scratch_chunk
from .codecs import CodecSpec
from .commit import manifest_key, put_manifest
from .jobs import ArrayDelta, Listener, PersistJob
from .manifest import ArrayEntry, Manifest
from .objects import DIGEST_BYTES, ChunkObjects
from .packer import Packer, pack_capacity
from .packs import PACK_BYTES, PACKED_CHUNKS, Location
from .pins import Pins
from .repack import PackUsage
from .results import CaptureStat
from .retry import DEFAULT_RETRY_DELAYS, retry
from .tables import Built
from .tablewriter import TableWriter
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
# Chunks of at most BATCH_BYTES / BATCH_CHUNKS are read BATCH_CHUNKS to a pool task.
BATCH_CHUNKS = 64
BATCH_BYTES = 4 << 20


class Persister:
    """Runs capture jobs in the background, in order, and commits their manifests."""

    def __init__(self, objects: ChunkObjects, codec: CodecSpec, pool: ThreadPoolExecutor,
                 listener: Listener, pins: Pins, committed: Mapping[str, ArrayEntry],
                 parent: int | None, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
                 tables: ChunkObjects | None = None, version: int = 1,
                 head: Manifest | None = None) -> None:
        self.objects = objects
        # Format 2: the manifests' tables go to table objects (None: format 1, whole tables);
        # format 3 also packs small chunks, format 4 the table nodes.
        self.tables = tables
        self._table_writer = None if tables is None else TableWriter(version)
        if self._table_writer is not None and head is not None:  # the committed newest
            self._table_writer.resume(head.table_digests, head.table_nodes)
        packs = version >= 3
        self.codec = codec
        self.pool = pool
        self.listener = listener
        self.pins = pins
        self.retry_delays = tuple(retry_delays)
        self.budget = Budget(buffer_bytes)
        self._packer = None if not packs or tables is None else Packer(
            self.budget, pack_capacity(buffer_bytes, PACK_BYTES), self._submit_pack,
            self._pin_pack)
        if self._packer is not None:
            self.budget.before_wait = self._packer.flush
        self._pack_usage = PackUsage(objects.pack_size) if self._packer is not None else None
        self._usage_known = False  # built from the tables at the first job (reader thread)
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
        """Run `action`, retrying transient errors with backoff and ENOSPC after pruning
        (which holds the commit lock: pruning must never race a commit)."""
        def prune() -> int:
            with self._commit_lock:
                return self.listener.free_space()

        def count() -> None:
            if job is not None:
                job.retries += 1

        return retry(action, self.retry_delays, prune if free_space else None, count)

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
                    self._usage_known = False
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
        usage = self._pack_usage
        repack: dict[str, list[int]] = {}
        if usage is not None and self._packer is not None:
            if not self._usage_known:
                usage.reset(self._tables)
                self._usage_known = True
            repack = usage.to_repack(self._packer.capacity)
        work = []
        for delta in job.arrays:
            indices, digests = self._indices(delta)
            job.chunks_changed += len(indices)
            again = repack.get(delta.name)
            previous = self._tables.get(delta.name)
            if (again and not delta.fresh and previous is not None
                    and previous.layout == delta.layout):  # else all are read anyway
                indices = np.union1d(indices, np.asarray(again, dtype=np.intp))
            job.changed[delta.name] = indices
            work.append((delta, indices, digests))
        tasks, futures = self._submit_reads(job, work)
        # Every chunk task must be finished, failed or not, before the baseline is released:
        # a task still reading it while the next capture writes would name an object by the
        # digest of other bytes.
        wait_for(tasks)
        if self._packer is not None:
            self._packer.flush()  # the job's last pack: its chunks were all added
        # Each task's result once (it raises a task's error): this loop runs after every
        # chunk, for every array, on the job's critical path.
        results = {id(task): task.result() for task in tasks}
        located = job.located
        for (delta, indices, digests), group in zip(work, futures, strict=True):
            previous = self._tables.get(delta.name)
            if (not len(indices) and previous is not None and previous.dims == delta.dims
                    and previous.layout == delta.layout):
                # Unchanged: the same entry, so that what was built of it is reused.
                job.entries[delta.name] = previous
                continue
            where = self._where(delta, previous)
            layout = delta.layout
            if layout.n_chunks == 1 and len(group) == 1:  # most arrays of a many-array state
                future, within = group[0]
                table = results[id(future)] if within < 0 else results[id(future)][within]
                if where is not None:
                    where[0] = located.get(table)
            else:
                for index, (future, within) in zip(indices.tolist(), group, strict=True):
                    digest = (results[id(future)] if within < 0
                              else results[id(future)][within])
                    digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES] = digest
                    if where is not None:
                        where[index] = located.get(digest)
                table = bytes(digests)
            job.entries[delta.name] = ArrayEntry(
                delta.name, layout.shape, layout.dtype, layout.order, layout.split_axis,
                layout.rows_per_chunk, table, delta.dims, layout,
                None if where is None or not any(where) else tuple(where))
        if usage is not None:
            for name, entry in job.entries.items():
                previous = self._tables.get(name)
                if previous is not entry:
                    usage.update(previous, entry)
            for name in self._tables.keys() - job.entries.keys():
                usage.update(self._tables[name], None)
        self._tables = dict(job.entries)
        job.encode_seconds = time.perf_counter() - start

    def _submit_reads(self, job: PersistJob, work: list[tuple[ArrayDelta, np.ndarray, Any]]
                      ) -> tuple[list[Future[Any]], list[list[tuple[Future[Any], int]]]]:
        """Submit the job's chunk tasks: one a chunk, or one for a batch of the chunks of
        small arrays (a future of its own cost more than hashing and encoding an 8 KiB
        chunk). Returns the tasks and, for each chunk, its task and its place in the batch
        (-1: a task of its own)."""
        tasks: list[Future[Any]] = []
        refs: list[list[tuple[Future[Any], int]]] = []
        batch: list[tuple[ArrayDelta, int, list[tuple[Future[Any], int]]]] = []

        def submit_batch() -> None:
            items = [(delta, index) for delta, index, _ in batch]
            task = self.pool.submit(lambda: [self._read_chunk(job, d, i) for d, i in items])
            tasks.append(task)
            for within, (_, _, group) in enumerate(batch):
                group.append((task, within))
            batch.clear()

        for delta, indices, _ in work:
            group: list[tuple[Future[Any], int]] = []
            refs.append(group)
            small = delta.layout.chunk_bytes <= BATCH_BYTES // BATCH_CHUNKS
            for index in indices:
                if not small:
                    tasks.append(self.pool.submit(self._read_chunk, job, delta, int(index)))
                    group.append((tasks[-1], -1))
                    continue
                batch.append((delta, int(index), group))
                if len(batch) >= BATCH_CHUNKS:
                    submit_batch()
        if batch:
            submit_batch()
        return tasks, refs

    def _where(self, delta: ArrayDelta, previous: ArrayEntry | None
               ) -> list[Location | None] | None:
        """The locations to fill for `delta`'s entry (those of unchanged chunks as they
        were); None when its chunks are never packed."""
        if self._packer is None or delta.layout.n_chunks > PACKED_CHUNKS:
            return None
        if (delta.fresh or previous is None or previous.layout != delta.layout
                or previous.where is None):
            return [None] * delta.layout.n_chunks
        return list(previous.where)

    def _read_chunk(self, job: PersistJob, delta: ArrayDelta, index: int) -> bytes:
        # At most one chunk in flight per pool thread (a view of the baseline, or a padded
        # copy in the thread's scratch buffer) plus the codec's output, freed right here.
        raw = scratch_chunk(delta.baseline, delta.layout, index)
        digest = blake3.blake3(raw).digest()
        encoded = None
        if self._packer is not None and delta.layout.n_chunks <= PACKED_CHUNKS:
            encoded = self._pack_chunk(job, delta, raw, digest)
            if encoded is None:
                return digest
        # Pinned before the existence check, so retention cannot delete it between the
        # two. A digest another in-flight chunk pinned is written by that one.
        claimed = self.pins.claim(digest)
        with self._lock:
            job.pinned.append(digest)
        if claimed or self.objects.present(digest):
            if not claimed:
                self.objects.reuse(digest)
            with self._lock:  # pool threads count concurrently
                job.chunks_deduplicated += 1
            return digest
        if encoded is None:
            encoded = self.codec.encode_lazily(raw, delta.layout.dtype.itemsize)
        buffer, held = self.budget.hold(encoded)
        del encoded, raw  # freed by the thread that allocated it, before anything else
        self._submit(job, lambda data: self.objects.put(digest, data), buffer, held)
        return digest

    def _pack_chunk(self, job: PersistJob, delta: ArrayDelta, raw: np.ndarray,
                    digest: bytes) -> Any:
        """Pack the chunk with `digest` (once a job) and return None; or return it encoded
        when it is too large for a pack, for the caller to write as an object of its own.
        Packed chunks are deduplicated within a job only: a chunk that a capture found
        changed seldom equals one of an older snapshot's, and looking for that would cost
        a request a chunk."""
        assert self._packer is not None
        with self._lock:
            if digest in job.located:  # packed by another chunk (or being): this is it
                job.chunks_deduplicated += 1
                return None
            job.located[digest] = None
        encoded = self.codec.encode_lazily(raw, delta.layout.dtype.itemsize)
        location = self._packer.add(job, encoded)
        if location is None:  # an object of its own (located None): the caller writes it
            return encoded
        del encoded
        with self._lock:
            job.located[digest] = location
        return None

    def _pin_pack(self, job: PersistJob, pack: bytes) -> None:
        self.pins.pin((pack,))
        with self._lock:
            job.pinned.append(pack)

    def _submit_pack(self, job: PersistJob, pack: bytes, buffer: Held, held: int) -> None:
        if self._pack_usage is not None:
            self._pack_usage.written(pack, buffer.size)
        self._submit(job, lambda data: self.objects.put_pack(pack, data), buffer, held)

    def _submit(self, job: PersistJob, put: Callable[[memoryview], int], buffer: Held,
                held: int) -> None:
        try:
            write = self._object_writers.submit(self._write_object, job, put, buffer, held)
        except RuntimeError:  # the writers were shut down (interpreter exit): never hang
            write = Future()
            write.set_result(self._write_object(job, put, buffer, held))
        job.writes.append(write)

    def _write_object(self, job: PersistJob, put: Callable[[memoryview], int], buffer: Held,
                      held: int) -> int:
        """Write a chunk object or a pack with `put`, then give its buffer back."""
        try:
            if job.error is not None:
                return 0
            return self.retrying(lambda: buffer.write_with(put), job)
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
                           for i in range(entry.n_chunks) if entry.location(i) is None}
                packs = {location.pack for entry in job.entries.values()
                         for location in entry.where or () if location is not None}
                self.pins.pin(digests | packs)
                with self._lock:
                    job.pinned.extend(digests | packs)
                missing = (sum(not self.objects.has(d) for d in digests)
                           + sum(not self.objects.has_pack(p) for p in packs))
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
                            table_digests=frozenset() if built is None else built.objects,
                            table_nodes={} if built is None else built.nodes)
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
        objects (and the pack of new nodes, format 4) are written on threads of their own
        at once (each write waits for its fsync: one after another they would add up in
        every commit), pinned until the job commits."""
        assert self._table_writer is not None and self._table_writers is not None
        writers = self._table_writers
        writes: list[Future[int]] = []

        def put(write: Callable[[bytes, bytes], int], name: bytes, data: bytes) -> None:
            self.pins.pin((name,))
            with self._lock:
                job.pinned.append(name)
            try:
                writes.append(writers.submit(write, name, data))
            except RuntimeError:  # the writers were shut down (interpreter exit): write here
                done: Future[int] = Future()
                done.set_result(write(name, data))
                writes.append(done)

        try:
            built = self._table_writer.build(
                job.entries, functools.partial(put, self._write_table),
                functools.partial(put, self.objects.put_pack))
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
