"""Background persistence: hash, deduplicate, encode and write changed chunks, then commit.

One worker thread takes capture jobs in order; chunk work runs on a small thread pool (blake3
and the codecs release the GIL). A job signals ``chunks_read`` once it no longer needs the
mirror, which is all the next capture waits for. A failed job's chunks stay *uncommitted* and
are added to the next job, so no change is lost (invariant 3).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .chunks import padded_chunk
from .codecs import CodecSpec
from .fsio import FileIO
from .layout import ChunkLayout
from .manifest import ArrayRecord, Manifest
from .objects import DIGEST_BYTES, ChunkObjects
from .records import CaptureInfo

__all__ = ["ArrayDelta", "PersistJob", "Persister", "manifest_path"]

log = logging.getLogger("arraysnap")


def manifest_path(root: Path, seq: int) -> Path:
    return root / "snapshots" / f"{seq:012d}.json"


@dataclass(slots=True)
class ArrayDelta:
    """One array of a capture: its layout, its baseline buffer and the chunks that changed."""

    name: str
    layout: ChunkLayout
    baseline: np.ndarray
    changed: np.ndarray
    fresh: bool


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
    started: float
    capture: CaptureInfo
    chunks_read: threading.Event = field(default_factory=threading.Event)


class Persister:
    """Runs capture jobs in the background, in order, and commits their manifests."""

    def __init__(self, root: Path, objects: ChunkObjects, codec: CodecSpec, io: FileIO,
                 pool: ThreadPoolExecutor, head: Manifest | None,
                 on_commit: Callable[[PersistJob, Manifest, int], None]) -> None:
        self.root = root
        self.objects = objects
        self.codec = codec
        self.io = io
        self.pool = pool
        self.on_commit = on_commit
        self.tables: dict[str, ArrayRecord] = dict(head.arrays) if head else {}
        self.parent = head.seq if head else None
        self.uncommitted: dict[str, set[int]] = {}
        self._queue: queue.Queue[PersistJob | None] = queue.Queue()
        self._last: PersistJob | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._claimed: set[bytes] = set()
        self._thread = threading.Thread(target=self._run, name="arraysnap-persist", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------
    def submit(self, job: PersistJob) -> None:
        with self._lock:
            self._pending += 1
            self._last = job
        self._queue.put(job)

    def wait_chunks_read(self) -> None:
        """Block until the newest job no longer reads the mirror."""
        last = self._last
        if last is not None:
            last.chunks_read.wait()

    def drain(self) -> None:
        """Block until every submitted job has committed or failed."""
        with self._idle:
            while self._pending:
                self._idle.wait()

    def take_error(self) -> BaseException | None:
        with self._lock:
            error, self._error = self._error, None
            return error

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    # -- worker side ---------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                manifest, manifest_bytes = self._persist(job)
            except BaseException as err:  # noqa: BLE001 - handed to the caller, never lost
                self._claimed.clear()
                log.error("arraysnap: snapshot %d failed to persist: %r", job.seq, err)
                self._remember_uncommitted(job)
                job.chunks_read.set()
                job.capture._finish(None, err)
                with self._lock:
                    self._error = self._error or err
            else:
                self.on_commit(job, manifest, manifest_bytes)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _indices(self, delta: ArrayDelta) -> tuple[np.ndarray, bytearray]:
        previous = self.tables.get(delta.name)
        if delta.fresh or previous is None or previous.layout != delta.layout:
            return np.arange(delta.layout.n_chunks), bytearray(delta.layout.n_chunks * DIGEST_BYTES)
        extra = self.uncommitted.get(delta.name)
        indices = delta.changed
        if extra:
            indices = np.union1d(indices, np.fromiter(extra, dtype=np.intp))
        return indices, bytearray(previous.digests)

    def _persist(self, job: PersistJob) -> tuple[Manifest, int]:
        encode_start = time.perf_counter()
        records: dict[str, ArrayRecord] = {}
        written = deduplicated = changed = 0
        work: list[tuple[ArrayDelta, np.ndarray, bytearray]] = []
        for delta in job.arrays:
            indices, digests = self._indices(delta)
            work.append((delta, indices, digests))
            changed += len(indices)
        futures = [[self.pool.submit(self._store_chunk, delta, int(i)) for i in indices]
                   for delta, indices, _ in work]
        # Every chunk task must be finished, failed or not, before the baseline is released:
        # a task still reading it while the next capture writes would name an object by the
        # digest of other bytes.
        wait_for(f for group in futures for f in group)
        for (delta, indices, digests), group in zip(work, futures, strict=True):
            for index, future in zip(indices, group, strict=True):
                digest, size = future.result()
                digests[int(index) * DIGEST_BYTES : (int(index) + 1) * DIGEST_BYTES] = digest
                written += size
                deduplicated += size == 0
            layout = delta.layout
            records[delta.name] = ArrayRecord(delta.name, layout.shape, layout.dtype, layout.order,
                                              layout.split_axis, layout.rows_per_chunk,
                                              bytes(digests))
        self._claimed.clear()
        job.chunks_read.set()
        sync_start = time.perf_counter()
        self.objects.sync()
        stats = {
            "pause_seconds": job.pause_seconds,
            "chunks_scanned": sum(d.layout.n_chunks for d in job.arrays),
            "chunks_changed": changed,
            "chunks_deduplicated": deduplicated,
            "bytes_written": written,
            "encode_seconds": sync_start - encode_start,
            "sync_seconds": time.perf_counter() - sync_start,
            "queue_seconds": encode_start - job.started - job.pause_seconds,
            # From the start of capture() to the manifest write, which cannot time itself.
            "durable_seconds": time.perf_counter() - job.started,
        }
        manifest = Manifest(job.seq, job.step, job.wall_time, self.parent, self.codec.to_json(),
                            records, job.state, job.rng, stats, job.provenance)
        data = manifest.to_json()
        self.io.write_atomic(manifest_path(self.root, job.seq), data)
        self.tables = records
        self.parent = job.seq
        self.uncommitted.clear()
        return manifest, len(data)

    def _store_chunk(self, delta: ArrayDelta, index: int) -> tuple[bytes, int]:
        raw = padded_chunk(delta.baseline, delta.layout, index)
        digest = blake3.blake3(raw).digest()
        with self._lock:
            # Two equal chunks of one job: the first writes, the other counts as a duplicate.
            duplicate = digest in self._claimed
            self._claimed.add(digest)
        if duplicate or self.objects.has(digest):
            return digest, 0
        encoded = self.codec.encode(raw, delta.layout.dtype.itemsize)
        return digest, self.objects.put(digest, encoded)

    def _remember_uncommitted(self, job: PersistJob) -> None:
        for delta in job.arrays:
            self.uncommitted.setdefault(delta.name, set()).update(int(i) for i in delta.changed)
