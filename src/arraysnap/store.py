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
import fcntl
import json
import logging
import mmap
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import __version__
from .chunks import assemble, find_bad_chunks, load_chunk
from .codecs import CodecSpec, parse_codec
from .delta import as_bytes, scan_and_copy
from .errors import (
    ArraysnapError,
    CorruptSnapshotError,
    FormatVersionError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreLockedError,
)
from .fsio import TMP_PREFIX, FileIO, read_regular_file
from .layout import ChunkLayout, memory_order, plan_layout
from .manifest import Manifest, check_array_name, parse_manifest
from .mirror import Mirror, ReaderLease, map_private
from .objects import ChunkObjects
from .pipeline import ArrayDelta, Persister, PersistJob, manifest_path
from .records import (
    CaptureInfo,
    Problem,
    PruneReport,
    Restored,
    SnapshotInfo,
    VerifyReport,
)
from .rngstate import check_rng, rng_from_json, rng_to_json

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Store", "open"]

log = logging.getLogger("arraysnap")

FORMAT_NAME = "arraysnap"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20
_MANIFEST_NAME = re.compile(r"^(\d{12})\.json$")
_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()
# Store.list shadows the builtin inside the class body; annotations there use this alias.
Prepared = list[tuple[str, np.ndarray, ChunkLayout]]


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str],
    mode: Literal["a", "r"] = "a",
    *,
    chunk_bytes: int | None = None,
    codec: str | None = None,
    _io: FileIO | None = None,
) -> Store:
    """Open (or, with ``mode="a"``, create) the store at `path`.

    ``mode="a"`` takes the store's writer lock (:class:`StoreLockedError` if another writer
    has it); ``mode="r"`` never writes. `chunk_bytes` (default 1 MiB) is the target chunk
    size for arrays captured from now on; `codec` is ``"zstd"`` (default, level 1),
    ``"zstd:<level>"``, ``"blosc"`` or ``"none"`` and is fixed when the store is created.

    >>> import arraysnap, tempfile
    >>> snap = arraysnap.open(tempfile.mkdtemp() + "/run.snap", chunk_bytes=1 << 16)
    >>> snap.latest() is None
    True
    >>> snap.close()
    """
    return Store(Path(path), mode, chunk_bytes=chunk_bytes, codec=codec, io=_io)


class Store:
    """A snapshot store; see :func:`arraysnap.open`.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"x": np.ones(3)}, step=5)
    ...     snap.wait()  # list() shows committed snapshots only
    ...     [info.step for info in snap.list()]
    [5]
    """

    def __init__(self, path: Path, mode: str = "a", *, chunk_bytes: int | None = None,
                 codec: str | None = None, io: FileIO | None = None) -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' (read and write) or 'r' (read only), got {mode!r}")
        if chunk_bytes is not None and (type(chunk_bytes) is not int
                                        or not 1 <= chunk_bytes <= 1 << 31):
            raise ValueError(f"chunk_bytes must be an integer from 1 to 2**31, got {chunk_bytes!r}")
        self.path = path
        self.mode = mode
        self._io = io or FileIO()
        self._closed = True
        self._lock_fd = -1
        self._cache: dict[int, tuple[Manifest, int]] = {}
        self._capture_lock = threading.Lock()
        self._state_lock = threading.Lock()
        settings = self._open_settings(codec)
        self.codec: CodecSpec = parse_codec(settings["codec"])
        self.chunk_bytes: int = chunk_bytes or settings["chunk_bytes"]
        self._objects = ChunkObjects(path, self._io)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="arraysnap")
        self._mirror = Mirror(path, self._io)
        self._closed = False
        self._persister: Persister | None = None
        self._mirror_seq: int | None = None
        self._last_captured: int | None = None
        if mode == "a":
            try:
                self._take_lock()
                self._recover()
            except BaseException:
                self._release()
                raise
        _open_stores.add(self)

    # -- opening -------------------------------------------------------------------------
    def _open_settings(self, codec: str | None) -> dict[str, Any]:
        config = self.path / "arraysnap.json"
        if not config.exists():
            if self.mode == "r":
                raise FileNotFoundError(
                    f"{self.path} is not an arraysnap store (no arraysnap.json)")
            return self._create(parse_codec(codec or "zstd"))
        try:
            settings = json.loads(read_regular_file(config, 1 << 20))
        except (OSError, ValueError, RecursionError) as err:
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
        if self.path.exists():
            if not self.path.is_dir():
                raise FileExistsError(f"{self.path} exists and is not a directory")
            # A creation that died leaves `lock`, temporaries and empty store folders.
            leftovers = [p.name for p in self.path.iterdir()
                         if p.name != "lock" and not p.name.startswith(TMP_PREFIX)
                         and not (p.name in ("chunks", "snapshots", "mirror")
                                  and p.is_dir() and not p.is_symlink()
                                  and not any(p.iterdir()))]
            if leftovers:
                raise FileExistsError(
                    f"{self.path} is not empty and not an arraysnap store (no arraysnap.json); "
                    "choose a new path"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        settings = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "chunk_bytes": DEFAULT_CHUNK_BYTES, "codec": codec.to_json(),
                    "created": time.time(), "created_by": f"arraysnap {__version__}"}
        for sub in ("chunks", "snapshots", "mirror"):
            (self.path / sub).mkdir(exist_ok=True)
        self._io.write_atomic(self.path / "arraysnap.json", json.dumps(settings).encode())
        self._io.fsync_dir(self.path.parent)
        return {"codec": codec, "chunk_bytes": DEFAULT_CHUNK_BYTES}

    def _take_lock(self) -> None:
        lock_path = self.path / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.path} is being written by another process ({holder}); only one writer "
                "at a time: stop it, or open this store with mode='r' to read"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def _recover(self) -> None:
        """Clean up after a killed writer and make the mirror equal the latest snapshot."""
        if self._mirror.dir.is_symlink():
            # Baselines are created, and stray ones deleted, in there: never somewhere else.
            self._mirror.dir.unlink()
        self._objects.remove_temporaries()
        for directory in (self.path / "snapshots", self.path):
            for leftover in directory.glob(f"{TMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)
        head = self._newest_valid()
        seqs = self._seqs()
        self._next_seq = (seqs[-1] + 1) if seqs else 1
        self._persister = Persister(self.path, self._objects, self.codec, self._io, self._pool,
                                    head, self._on_commit)
        if head is None:
            self._mirror.clear_directory()
            return
        trusted = self._mirror.trusted_seq() == head.seq
        files = (self._mirror.read_marker() or {"files": {}})["files"]
        repaired = False
        for name, record in head.arrays.items():
            filename = files.get(name)
            adopted = isinstance(filename, str) and self._mirror.adopt(name, filename,
                                                                       record.layout)
            try:
                if not adopted:
                    if record.n_chunks:  # one real chunk vouches for the size before allocating
                        load_chunk(self._objects, self.codec, record, 0, verify=True,
                                   seq=head.seq)
                    buffer, _ = self._mirror.baseline(name, record.layout)
                    assemble(buffer, self._objects, self.codec, record, self._pool,
                             verify=True, seq=head.seq)
                    repaired = True
                elif not trusted:
                    bad = find_bad_chunks(self._mirror.entries[name].buffer, record, self._pool)
                    if bad:
                        buffer, _ = self._mirror.baseline(name, record.layout)
                        assemble(buffer, self._objects, self.codec, record, self._pool,
                                 verify=True, seq=head.seq, indices=bad)
                        log.warning("arraysnap: repaired %d chunks of the %r baseline",
                                    len(bad), name)
                    repaired = True
            except CorruptSnapshotError as err:
                # The newest snapshot itself is damaged: the next capture of this array
                # is written whole, and verify() reports the damage.
                log.error("arraysnap: cannot rebuild the baseline of %r: %s", name, err)
                self._mirror.retain_only(set(self._mirror.entries) - {name})
                self._persister.tables.pop(name, None)
        self._mirror.remove_strays()
        if repaired or not trusted:
            self._mirror.mark_clean(head.seq)
        self._mirror_seq = head.seq

    # -- snapshots on disk ---------------------------------------------------------------
    def _seqs(self) -> list[int]:
        try:
            names = os.listdir(self.path / "snapshots")
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for name in names if (m := _MANIFEST_NAME.match(name)))

    def _load(self, seq: int, *, from_disk: bool = False) -> tuple[Manifest, int]:
        cached = None if from_disk else self._cache.get(seq)
        if cached is not None:
            return cached
        path = manifest_path(self.path, seq)
        try:
            data = read_regular_file(path, 1 << 28)
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
            except (CorruptSnapshotError, SnapshotNotFoundError, FormatVersionError) as err:
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
                state: Mapping[str, Any] | None = None, rng: Any = None) -> CaptureInfo:
        """Snapshot `arrays`; return as soon as the changed chunks are set aside.

        Only chunks that differ from the previous capture are hashed, encoded and written,
        in the background; ``wait()`` (or the returned info's ``result()``) blocks until the
        snapshot is durable. `state` is a small JSON-serialisable dict; `rng` a
        ``numpy.random.Generator`` or a dict of them. The caller's arrays are never modified.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     info = snap.capture({"u": np.zeros(10)}, step=0, state={"t": 0.0},
        ...                         rng=np.random.default_rng(0))
        >>> info.chunks_changed
        1
        """
        self._check_writable("capture")
        prepared = _prepare_arrays(arrays, self.chunk_bytes, self._mirror)
        step = _check_step(step)
        state_json = _check_state(state)
        check_rng(rng)
        rng_json = rng_to_json(rng)
        if not self._capture_lock.acquire(blocking=False):
            raise ArraysnapError("capture() is already running in another thread of this "
                                 "process; call it from one thread at a time")
        try:
            return self._capture(prepared, step, state_json, rng_json)
        finally:
            self._capture_lock.release()

    def _capture(self, prepared: Prepared, step: int | None,
                 state: dict[str, Any] | None, rng: Any) -> CaptureInfo:
        persister = self._persister
        assert persister is not None
        error = persister.take_error()
        if error is not None:
            raise ArraysnapError(
                "an earlier capture failed to persist; its changes are kept and go into the "
                "next capture"
            ) from error
        started = time.perf_counter()
        persister.wait_chunks_read()
        pause_start = time.perf_counter()
        deltas = []
        seq = self._next_seq
        self._next_seq += 1
        with self._state_lock:
            # From here the baselines are ahead of every committed snapshot.
            self._mirror_seq = None
            self._last_captured = seq
            self._mirror.mark_dirty()
        try:
            for name, live, layout in prepared:
                baseline, fresh = self._mirror.baseline(name, layout, live)
                flags = np.full(layout.n_chunks, 1 if fresh else 0, dtype=np.uint8)
                changed = scan_and_copy(live, baseline, layout, flags)
                deltas.append(ArrayDelta(name, layout, baseline, changed, fresh))
            self._mirror.retain_only({name for name, _, _ in prepared})
        except BaseException:
            # Baselines already updated hold changes no snapshot has; forget them so the next
            # capture writes those arrays whole (dedup keeps unchanged chunks free).
            for name, _, _ in prepared:
                self._mirror.forget(name)
            raise
        pause = time.perf_counter() - pause_start
        info = CaptureInfo(seq, step, pause, sum(d.layout.n_chunks for d in deltas),
                           sum(len(d.changed) for d in deltas))
        job = PersistJob(seq, step, time.time(), deltas, state, rng, _provenance(), pause,
                         started, info)
        persister.submit(job)
        return info

    def _on_commit(self, job: PersistJob, manifest: Manifest, manifest_bytes: int) -> None:
        self._cache[manifest.seq] = (manifest, manifest_bytes)
        with self._state_lock:
            if self._last_captured == job.seq:  # no later capture has touched the baselines
                self._mirror_seq = job.seq
                try:
                    self._mirror.mark_committed(job.seq)
                except OSError as err:  # the snapshot is committed; the marker only helps
                    log.warning("arraysnap: could not mark the baselines clean: %r", err)
        job.capture._finish(SnapshotInfo.from_manifest(manifest, manifest_bytes), None)

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
        error = self._persister.take_error()
        if error is not None:
            raise ArraysnapError("a capture failed to persist; its changes are kept and go "
                                 "into the next capture") from error

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
        return Restored(arrays, manifest.step, manifest.seq, manifest.time,
                        None if manifest.state is None else dict(manifest.state), rng, info)

    def _map_baseline(self, manifest: Manifest, name: str, verify: bool) -> np.ndarray | None:
        """Map the baseline of `name` if it holds exactly this snapshot; None otherwise."""
        record = manifest.arrays[name]
        if self.mode == "a":
            entry = self._mirror.entries.get(name)
            with self._state_lock:
                current = self._mirror_seq == manifest.seq
            if not current or entry is None or entry.layout != record.layout:
                return None
            if verify:
                bad = find_bad_chunks(entry.buffer, record, self._pool)
                if bad:
                    log.warning("arraysnap: baseline of %r had %d damaged chunks; repairing",
                                name, len(bad))
                    buffer, _ = self._mirror.baseline(name, record.layout)
                    assemble(buffer, self._objects, self.codec, record, self._pool,
                             verify=True, seq=manifest.seq, indices=bad)
                    with self._state_lock:
                        self._mirror.mark_committed(manifest.seq)
            return self._mirror.hand_out(name)
        return self._map_baseline_shared(manifest, name, verify)

    def _map_baseline_shared(self, manifest: Manifest, name: str,
                             verify: bool) -> np.ndarray | None:
        record = manifest.arrays[name]
        if record.layout.nbytes == 0:
            return None
        marker = self._mirror.read_marker()
        filename = (marker or {}).get("files", {}).get(name)
        if not isinstance(filename, str) or "/" in filename or not filename.endswith(".bin"):
            return None
        lease = ReaderLease.acquire(self._mirror.dir / filename)
        if lease is None:
            return None
        # Under the lease no writer changes the file; only now is the marker to be trusted.
        marker = self._mirror.read_marker()
        if (marker is None or self._mirror.trusted_seq(marker) != manifest.seq
                or marker["files"].get(name) != filename
                or os.fstat(lease.fd).st_size != record.layout.nbytes):
            lease.release()
            return None
        array = map_private(self._mirror.dir / filename, record.layout, lease.fd)
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
                        restored.state, restored.rng, restored.info)

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

    def prune(self, keep_last: int) -> PruneReport:
        """Remove all but the newest `keep_last` snapshots, then unused chunk objects.

        >>> import arraysnap, numpy as np, tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
        ...     for i in range(3):
        ...         _ = snap.capture({"u": np.full(4, i)}, step=i)
        ...     snap.prune(keep_last=1).snapshots_removed
        (1, 2)
        """
        self._check_writable("prune")
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"keep_last must be an integer of at least 1 (the newest snapshot "
                             f"is always kept), got {keep_last!r}")
        self.wait()
        seqs = self._seqs()
        doomed = tuple(seqs[:-keep_last])
        for seq in doomed:
            self._io.unlink(manifest_path(self.path, seq))
            self._cache.pop(seq, None)
        if doomed:
            self._io.fsync_dir(self.path / "snapshots")
        report = self.gc()
        return PruneReport(doomed, report.chunks_removed, report.bytes_freed)

    def gc(self) -> PruneReport:
        """Delete chunk objects that no snapshot uses (left by prune or a killed writer).

        >>> import arraysnap, tempfile
        >>> arraysnap.open(tempfile.mkdtemp() + "/s.snap").gc().chunks_removed
        0
        """
        self._check_writable("collect garbage")
        self.wait()
        used: set[bytes] = set()
        for seq in self._seqs():
            try:
                manifest = self._load(seq)[0]
            except ArraysnapError as err:
                raise CorruptSnapshotError(
                    f"gc stopped: snapshot {seq} cannot be read ({err}); without it the chunks "
                    "it uses are unknown. Remove or repair that manifest first"
                ) from None
            for record in manifest.arrays.values():
                digests = record.digests
                used.update(digests[i : i + 32] for i in range(0, len(digests), 32))
        removed = freed = 0
        for digest in list(self._objects.digests()):
            if digest not in used:
                path = self._objects.path(digest)
                try:
                    freed += path.stat().st_size
                except FileNotFoundError:
                    continue
                self._objects.delete(digest)
                removed += 1
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
                with self._state_lock:
                    mirror_seq = self._mirror_seq
                if error is None and mirror_seq is not None:
                    self._mirror.mark_clean(mirror_seq)
        finally:
            self._release()
        if error is not None:
            raise ArraysnapError("a capture failed to persist before close(); the store holds "
                                 "every snapshot committed before it") from error

    def _release(self) -> None:
        self._closed = True
        if self._persister is not None:
            self._persister.stop()
            self._persister = None
        self._mirror.close()
        self._pool.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        _open_stores.discard(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<arraysnap.Store {str(self.path)!r} ({state})>"


# -- input checking ------------------------------------------------------------------------
def _prepare_arrays(arrays: object, chunk_bytes: int,
                    mirror: Mirror) -> Prepared:
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


@atexit.register
def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except Exception as err:  # noqa: BLE001 - exit must go on; the error is logged
            log.error("arraysnap: closing %s at exit failed: %r", store.path, err)

