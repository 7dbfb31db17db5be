"""Background persistence: read, hash and encode changed chunks, write them, then commit.

Capture jobs go, in order, through:

* the **reader** hashes each changed chunk of the baseline (blake3) and encodes it on a
  small pool (both release the GIL), then sets the job's ``chunks_read``, which is all the
  next capture waits for. Encoded chunks wait in memory for the writers, at most
  ``buffer_bytes`` of them: past that the reader, and so the next capture, waits
  (backpressure) rather than memory growing.
* the **object writers** (a few threads, so that one object's fsync overlaps the next
  one's write) write each chunk object (temporary file, fsync, rename) as it comes;
* the **committer** commits each job in order once its objects are written: journal fsync,
  directory fsyncs, manifest. After a commit it runs the retention hook.

Memory. An encoded chunk waiting for a writer is copied into a private anonymous mapping
(``mmap``) of its own, and the budget counts that mapping in whole pages: what is held is
what is counted. Once written, the mapping is kept for the next chunk (still counted), and
all are unmapped when the pipeline has been idle for a few seconds, or on ``wait()``.
Keeping them matters while captures come every second or so: unmapping a populated range
flushes the TLB of every core running the program (an interrupt, and then page walks, in
the middle of its loop), and a new mapping's pages must be zeroed again.

Holding the codec's output (a ~1 MiB ``bytes`` from ``malloc``) instead let glibc
keep a heap per thread (the pool threads allocate, the writer frees, out of order), each
grown to its own high-water mark and fragmented: at 100 % change that doubled or tripled the
resident memory the budget claims to bound. The codec's temporary output is now freed at
once by the thread that made it, so each pool thread reuses the same block.

Transient write errors (EINTR, EAGAIN, EIO, EBUSY, ETIMEDOUT) are retried with backoff;
ENOSPC first calls the ``on_full`` hook (the retention policy's pruning) and retries once.
A job that still fails fails every job read after it (they may share its chunk objects);
their chunks are remembered as *uncommitted* and go into the next job, so no change is
lost (invariant 3), and the reader starts again from the last committed tables.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, TypeVar

import blake3
import numpy as np

from .chunks import padded_chunk
from .codecs import CodecSpec, RawFrame
from .layout import ChunkLayout
from .manifest import ArrayEntry, Manifest
from .objects import DIGEST_BYTES, ChunkObjects
from .results import CaptureInfo, CaptureStat
from .storage import Storage

__all__ = ["DEFAULT_BUFFER_BYTES", "DEFAULT_RETRY_DELAYS", "ArrayDelta", "PersistJob",
           "Persister", "manifest_key", "put_manifest"]

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
PAGE_BYTES = mmap.PAGESIZE
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in with the mmap call
DEFAULT_RETRY_DELAYS = (0.05, 0.2, 1.0, 3.0)
# How much nicer than the program's own threads arraysnap's threads run (Linux).
BACKGROUND_NICENESS = 10
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


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the program's own threads.

    Hashing, encoding and writing run while the program computes; on a machine whose cores
    the program keeps busy they would otherwise take their share of its time. At niceness
    +10 they get about a tenth of a contended core and all of an idle one. Linux sets
    niceness per thread; elsewhere this does nothing. Never raises: a priority is a wish.

    >>> lower_thread_priority()
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        thread = threading.get_native_id()
        # Relative to the main thread's (its id is the process id), not to whichever of our
        # threads started this one: threads inherit their creator's niceness.
        wanted = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICENESS)
        if os.getpriority(os.PRIO_PROCESS, thread) < wanted:
            os.setpriority(os.PRIO_PROCESS, thread, wanted)
    except OSError:
        pass


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
    journal_position: int
    capture: CaptureInfo
    chunks_read: threading.Event = field(default_factory=threading.Event)
    # Filled in by the reader for the writer.
    records: dict[str, ArrayEntry] = field(default_factory=dict)
    changed: dict[str, np.ndarray] = field(default_factory=dict)
    writes: list[Future[int]] = field(default_factory=list)
    pinned: list[bytes] = field(default_factory=list)
    error: BaseException | None = None
    chunks_changed: int = 0
    chunks_deduplicated: int = 0
    encode_seconds: float = 0.0
    read_done: float = 0.0
    retries: int = 0


def held_bytes(size: int) -> int:
    """What a held buffer of `size` bytes takes in memory: whole pages (at least one),
    rounded up to a size class (1/32 of its power of two) so that mappings can be reused.

    >>> held_bytes(1), held_bytes((1 << 20) + 33) - (1 << 20)
    (4096, 65536)
    """
    pages = max(PAGE_BYTES, -(-size // PAGE_BYTES) * PAGE_BYTES)
    granule = max(PAGE_BYTES, 1 << max(0, pages.bit_length() - 5))
    return -(-pages // granule) * granule


class _Held:
    """An encoded chunk waiting for a writer, in a private anonymous mapping (see _Budget)."""

    __slots__ = ("map", "size")

    def __init__(self, mapping: mmap.mmap, data: memoryview | RawFrame) -> None:
        self.map: mmap.mmap | None = mapping
        if isinstance(data, RawFrame):  # framed as it is copied: one copy, not three
            with memoryview(mapping) as whole:
                self.size = data.write_into(whole)
        else:
            self.size = data.nbytes
            mapping[: self.size] = data

    def write_with(self, put: Callable[[memoryview], T]) -> T:
        assert self.map is not None, "written after release"
        with memoryview(self.map) as whole, whole[: self.size] as data:
            return put(data)


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view is still exported (a test's storage kept one): GC unmaps it
        pass


_scratch = threading.local()


def _chunk_of(delta: ArrayDelta, index: int) -> np.ndarray:
    """Chunk `index` of the baseline at full chunk size: a view, or for a ragged chunk a
    zero-padded copy in this thread's scratch buffer (reused, never freed per chunk)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < delta.layout.chunk_bytes:
        buffer = _scratch.buffer = np.empty(delta.layout.chunk_bytes, dtype=np.uint8)
    return padded_chunk(delta.baseline, delta.layout, index, buffer)


class _Budget:
    """Bytes of chunk data held in memory between the reader and the writers.

    The encoded chunks live in private anonymous mappings (``mmap``), not in ``malloc``
    memory: a buffer made on one thread and freed on another, out of order, leaves glibc's
    per-thread heaps grown and fragmented (freed memory stays resident). `used` counts every
    mapping, in use or kept for reuse, in whole pages: what is held is what is counted.
    Freed mappings are kept for the next chunks (no page faults, no syscalls, no TLB
    flushes); they are unmapped when the pipeline goes idle (`trim`) or when a chunk waits
    for room.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()
        self._waiting = 0
        self._free: list[mmap.mmap] = []

    def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)  # one chunk larger than the budget still passes
        with self._cond:
            self._waiting += 1
            try:
                while self.used + amount > self.limit:
                    if self._free:
                        # Kept for reuse: they make way first, before any wait (one given
                        # back after this chunk's _reuse() was kept, as nobody waited yet:
                        # waiting for it would be waiting for ever).
                        self._drop(self._free.pop())
                        continue
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self.used += amount
        return amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()

    def hold(self, data: Any) -> tuple[_Held, int]:
        """Copy `data` (bytes-like, or a `RawFrame`) into a mapping counted by the budget
        (waiting for room); return it and the bytes counted for it, which `give` hands back."""
        view = data if isinstance(data, RawFrame) else memoryview(data).cast("B")
        try:
            need = held_bytes(view.nbytes)
            mapping = self._reuse(need)
            if mapping is not None:
                return _Held(mapping, view), min(len(mapping), self.limit)
            counted = self.acquire(need)
            try:
                mapping = mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | _MAP_POPULATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                self.release(counted)
                raise
            return _Held(mapping, view), counted
        finally:
            if isinstance(view, memoryview):
                view.release()

    def _reuse(self, need: int) -> mmap.mmap | None:
        with self._cond:
            fits = [m for m in self._free if need <= len(m) <= need + need // 4]
            if fits:
                best = min(fits, key=len)
                self._free.remove(best)
                return best
            return None  # acquire() makes room for a new one: kept mappings go first

    def give(self, held: _Held, counted: int) -> None:
        """The writer is done with `held`: keep its mapping for reuse or unmap it."""
        mapping, held.map = held.map, None
        if mapping is None:
            return
        with self._cond:
            if self._waiting or counted != len(mapping):
                _unmap(mapping)
                self.used -= counted
            else:
                self._free.append(mapping)
            self._cond.notify_all()

    def trim(self) -> None:
        """Unmap the mappings kept for reuse (the pipeline is idle)."""
        with self._cond:
            while self._free:
                self._drop(self._free.pop())
            self._cond.notify_all()

    def _drop(self, mapping: mmap.mmap) -> None:
        self.used -= len(mapping)
        _unmap(mapping)


class Persister:
    """Runs capture jobs in the background, in order, and commits their manifests."""

    def __init__(self, objects: ChunkObjects, codec: CodecSpec,
                 pool: ThreadPoolExecutor, head: Manifest | None, *,
                 on_commit: Callable[[PersistJob, Manifest, int, CaptureStat], None],
                 on_failure: Callable[[PersistJob, BaseException, CaptureStat], None],
                 before_commit: Callable[[], None] = lambda: None,
                 on_full: Callable[[], int] = lambda: 0,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS) -> None:
        self.objects = objects
        self.codec = codec
        self.pool = pool
        self.on_commit = on_commit
        self.on_failure = on_failure
        self.before_commit = before_commit
        self.on_full = on_full
        self.retry_delays = tuple(retry_delays)
        self.budget = _Budget(buffer_bytes)
        # Held by a commit (after its objects are written) and by pruning on ENOSPC in an
        # object writer: freeing space never races a commit.
        self._commit_lock = threading.RLock()
        # Tables of the last committed snapshot, and of the last job read (ahead of it).
        self.committed: dict[str, ArrayEntry] = dict(head.arrays) if head else {}
        self.tables: dict[str, ArrayEntry] = dict(self.committed)
        self.parent = head.seq if head else None
        self.uncommitted: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._last: PersistJob | None = None
        self._error: BaseException | None = None
        self._broken = False  # a job failed: jobs read after it fail too
        self._pins: Counter[bytes] = Counter()  # digests in-flight jobs refer to
        self._read_queue: queue.Queue[PersistJob | None] = queue.Queue()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arraysnap-commit",
                                          initializer=lower_thread_priority)
        self._object_writers = ThreadPoolExecutor(max_workers=OBJECT_WRITERS,
                                                  thread_name_prefix="arraysnap-write",
                                                  initializer=lower_thread_priority)
        self._reader = threading.Thread(target=self._read_loop, name="arraysnap-read",
                                        daemon=True)
        self._reader.start()

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

    def delete_unless_pinned(self, digest: bytes, delete: Callable[[bytes], None]) -> bool:
        """Delete `digest` unless an in-flight job refers to it; True if deleted.

        Atomic with pinning: a job pins a digest before it checks that the object exists,
        so either it sees the pin here, or it finds the object gone and writes it.
        """
        with self._lock:
            if self._pins[digest] > 0:
                return False
            delete(digest)
            return True

    def stop(self) -> None:
        self._read_queue.put(None)
        self._reader.join()
        self._writer.shutdown(wait=True)  # commits wait for their objects: writers still run
        self._object_writers.shutdown(wait=True)

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
                        freed = self.on_full()
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
                        self.tables = dict(self.committed)
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
        previous = self.tables.get(delta.name)
        if delta.fresh or previous is None or previous.layout != delta.layout:
            return np.arange(delta.layout.n_chunks), bytearray(delta.layout.n_chunks * DIGEST_BYTES)
        with self._lock:
            extra = self.uncommitted.get(delta.name)
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
            for index, future in zip(indices, group, strict=True):
                digest = future.result()
                digests[int(index) * DIGEST_BYTES : (int(index) + 1) * DIGEST_BYTES] = digest
            layout = delta.layout
            job.records[delta.name] = ArrayEntry(delta.name, layout.shape, layout.dtype,
                                                  layout.order, layout.split_axis,
                                                  layout.rows_per_chunk, bytes(digests),
                                                  delta.dims)
        self.tables = dict(job.records)
        job.encode_seconds = time.perf_counter() - start

    def _read_chunk(self, job: PersistJob, delta: ArrayDelta, index: int) -> bytes:
        # At most one chunk in flight per pool thread (a view of the baseline, or a padded
        # copy in the thread's scratch buffer) plus the codec's output, freed right here.
        raw = _chunk_of(delta, index)
        digest = blake3.blake3(raw).digest()
        with self._lock:
            # Pinned before the existence check, so retention cannot delete it between
            # the two. A digest another in-flight chunk pinned is written by that one.
            claimed = self._pins[digest] > 0
            self._pins[digest] += 1
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

    def _write_object(self, job: PersistJob, digest: bytes, buffer: _Held, held: int) -> int:
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
                digests = {record.digest(i) for record in job.records.values()
                           for i in range(record.n_chunks)}
                with self._lock:
                    for digest in digests:
                        self._pins[digest] += 1
                        job.pinned.append(digest)
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
            self.committed = dict(job.records)
            self.parent = job.seq
            self._unpin(job)
            with self._lock:
                # Every failed job before this one is covered by it: either read from its
                # tables, or (after a restart of the reader) through `uncommitted`.
                self.uncommitted.clear()
            try:
                self.on_commit(job, manifest, size, stat)
            except Exception as err:  # noqa: BLE001 - the snapshot is committed regardless
                log.error("arraysnap: after committing snapshot %d: %r", job.seq, err)

    def _write_manifest(self, job: PersistJob) -> tuple[Manifest, int, CaptureStat]:
        write_done = time.perf_counter()
        self.retrying(self.before_commit, job)  # the journal, before the manifest points to it
        self.retrying(self.objects.sync, job)
        written = sum(write.result() for write in job.writes)
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
        manifest = Manifest(job.seq, job.step, job.wall_time, self.parent, self.codec.to_json(),
                            job.records, job.state, job.rng, stats, job.provenance,
                            journal=job.journal_position)
        data = manifest.to_json()
        self.retrying(lambda: put_manifest(self.objects.storage, job.seq, data), job)
        now = time.perf_counter()
        stat = dataclasses.replace(self._stat(job, "committed", None),
                                   bytes_written=written + len(data),
                                   commit_seconds=now - write_done,
                                   durable_seconds=now - job.started)
        return manifest, len(data), stat

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
                target = self.uncommitted.setdefault(delta.name, set())
                target.update(int(i) for i in delta.changed)
                target.update(int(i) for i in job.changed.get(delta.name, ()))
            self._error = self._error or err
        self._unpin(job)
        try:
            self.on_failure(job, err, self._stat(job, "failed", repr(err)))
        except Exception as hook_error:  # noqa: BLE001 - the failure itself is what matters
            log.error("arraysnap: after failing snapshot %d: %r", job.seq, hook_error)

    def _unpin(self, job: PersistJob) -> None:
        with self._lock:
            for digest in job.pinned:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]
            job.pinned.clear()

