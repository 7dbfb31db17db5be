"""Restore: a committed snapshot back as arrays, mapped or assembled, with its state.

The latest snapshot maps the baseline files (copy-on-write): in the writer when the
baselines equal it, in a reader under a shared lease on the file. Any other snapshot is
assembled from its chunk objects into an allocated temporary file that is then mapped.

>>> import arraysnap, numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/s.snap"
>>> with arraysnap.open(path) as snap:
...     _ = snap.capture({"u": np.arange(4.0)}, step=1)
>>> with arraysnap.open(path, mode="r") as reader:      # maps the baseline under a lease
...     reader.restore().arrays["u"].flags.writeable
True
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..baselines import Baselines, ReaderLease, map_private
from ..chunks import assemble, find_bad_chunks, load_chunk
from ..codecs import CodecSpec
from ..delta import as_bytes
from ..errors import CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError
from ..manifest import ArrayEntry, Manifest
from ..objects import ChunkObjects
from ..replaylog import ReplayLog
from ..results import Problem, Restored
from ..rngstate import rng_from_json
from .capture import Capturer
from .catalog import Catalog

__all__ = ["Restorer"]

log = logging.getLogger("arraysnap")


class Restorer:
    """Restores snapshots of one store. `capturer` is the writer's (None in a reader)."""

    def __init__(self, catalog: Catalog, objects: ChunkObjects, codec: CodecSpec,
                 baselines: Baselines, pool: ThreadPoolExecutor, capturer: Capturer | None,
                 replay_log: Callable[[], ReplayLog], scratch_dir: Path | None) -> None:
        self.catalog = catalog
        self.objects = objects
        self.codec = codec
        self.baselines = baselines
        self.pool = pool
        self.capturer = capturer
        self._replay_log = replay_log
        self._scratch_dir = scratch_dir  # where assembled snapshots are written (None: /tmp)

    def restore(self, step: int | None, seq: int | None, *, verify: bool,
                fallback: bool) -> Restored:
        if not fallback:
            return self.restore_manifest(self.catalog.select(step, seq), verify)
        skipped: list[Problem] = []
        for candidate in self.catalog.fallback_candidates(step, seq):
            try:
                restored = self.restore_manifest(self.catalog.load(candidate)[0], verify)
            except (CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError) as err:
                log.warning("arraysnap: restore skipped snapshot %d: %s", candidate, err)
                skipped.append(Problem(candidate, getattr(err, "array", None),
                                       getattr(err, "chunk", None),
                                       getattr(err, "reason", str(err))))
                continue
            return dataclasses.replace(restored, skipped=tuple(skipped))
        raise SnapshotNotFoundError(
            f"no snapshot of {self.catalog.where} could be restored: "
            + "; ".join(str(problem) for problem in skipped)
        )

    def restore_manifest(self, manifest: Manifest, verify: bool) -> Restored:
        arrays: dict[str, np.ndarray] = {}
        for name, entry in manifest.arrays.items():
            array = self._map_baseline(manifest, name, verify)
            if array is None:
                array = self._materialize(entry, verify=verify, seq=manifest.seq)
            arrays[name] = array
        try:
            rng = rng_from_json(manifest.rng)
        except (ValueError, TypeError) as err:
            raise CorruptSnapshotError(str(err), seq=manifest.seq) from None
        info = self.catalog.info(manifest.seq)
        events: tuple[Any, ...] = ()
        if manifest.replay_position is not None:
            try:
                events = tuple(self._replay_log().read_from(manifest.replay_position))
            except CorruptSnapshotError as err:
                raise CorruptSnapshotError(f"replay log: {err}", seq=manifest.seq) from None
        return Restored(arrays, manifest.step, manifest.seq, manifest.time,
                        None if manifest.state is None else dict(manifest.state), rng, info,
                        events=events)

    def restore_into(self, arrays: Mapping[str, np.ndarray], manifest: Manifest,
                     verify: bool) -> Restored:
        for name, target in arrays.items():
            if name not in manifest.arrays:
                raise KeyError(f"snapshot {manifest.seq} has no array {name!r}; it has "
                               f"{sorted(manifest.arrays)}")
            entry = manifest.arrays[name]
            if not isinstance(target, np.ndarray):
                raise TypeError(f"restore_into needs numpy arrays, got {type(target).__name__}")
            if target.shape != entry.shape or target.dtype != entry.dtype:
                raise ValueError(
                    f"array {name!r}: snapshot holds {entry.shape} {entry.dtype}, the target "
                    f"is {target.shape} {target.dtype}; allocate a matching array"
                )
            if not target.flags.writeable:
                raise ValueError(f"array {name!r}: the target is read-only")
        restored = self.restore_manifest(manifest, verify)
        for name, target in arrays.items():
            np.copyto(target, restored.arrays[name])
        return Restored(dict(arrays), restored.step, restored.seq, restored.time,
                        restored.state, restored.rng, restored.info, events=restored.events)

    # -- mapping the baselines -------------------------------------------------------------
    def _map_baseline(self, manifest: Manifest, name: str, verify: bool) -> np.ndarray | None:
        """Map the baseline of `name` if it holds exactly this snapshot; None otherwise."""
        entry = manifest.arrays[name]
        capturer = self.capturer
        if capturer is None:
            return self._map_baseline_shared(manifest, name, verify)
        if (capturer.baseline_seq != manifest.seq
                or self.baselines.layout_of(name) != entry.layout):
            return None
        if verify:
            bad = find_bad_chunks(self.baselines.flat(name), entry, self.pool)
            if bad:
                log.warning("arraysnap: baseline of %r had %d damaged chunks; repairing",
                            name, len(bad))
                buffer, _ = self.baselines.baseline(name, entry.layout)
                assemble(buffer, self.objects, self.codec, entry, self.pool, verify=True,
                         seq=manifest.seq, indices=bad)
                capturer.repaired(name, manifest.seq)
        return self.baselines.hand_out(name)

    def _map_baseline_shared(self, manifest: Manifest, name: str,
                             verify: bool) -> np.ndarray | None:
        entry = manifest.arrays[name]
        if entry.layout.nbytes == 0:
            return None
        marker = self.baselines.read_marker()
        filename = (marker or {}).get("files", {}).get(name)
        if not isinstance(filename, str) or "/" in filename or not filename.endswith(".bin"):
            return None
        lease = ReaderLease.acquire(self.baselines.dir / filename)
        if lease is None:
            return None
        # Under the lease no writer changes the file; only now is the marker to be trusted.
        marker = self.baselines.read_marker()
        if (marker is None or self.baselines.trusted_seq(marker) != manifest.seq
                or marker["files"].get(name) != filename
                or os.fstat(lease.fd).st_size != entry.layout.nbytes):
            lease.release()
            return None
        array = map_private(self.baselines.dir / filename, entry.layout, lease.fd)
        if verify:
            flat = as_bytes(array)
            if find_bad_chunks(flat, entry, self.pool):
                lease.release()
                return None
        lease.track(array)
        return array

    def _materialize(self, entry: ArrayEntry, *, verify: bool, seq: int) -> np.ndarray:
        layout = entry.layout
        if layout.nbytes == 0:
            return np.empty(layout.shape, dtype=layout.dtype, order=layout.order)
        # A manifest may claim any size: one real chunk (decoded to the full chunk size)
        # vouches for it before anything of that size is allocated.
        load_chunk(self.objects, self.codec, entry, 0, verify=verify, seq=seq)
        directory = self._scratch_dir
        if directory is not None:
            directory.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix="restore-") as handle:
            # Allocated, not sparse: a full disk fails here, not as SIGBUS in a mapped write.
            os.posix_fallocate(handle.fileno(), 0, layout.nbytes)
            shared = mmap.mmap(handle.fileno(), layout.nbytes, mmap.MAP_SHARED)
            # No `with`: on failure the traceback still refers to views of the map, and
            # closing it then would raise BufferError over the CorruptSnapshotError.
            assemble(np.frombuffer(shared, dtype=np.uint8), self.objects, self.codec, entry,
                     self.pool, verify=verify, seq=seq)
            try:
                shared.close()
            except BufferError:
                # A pool thread has returned its chunk but not yet dropped the task that
                # refers to the view: the map is unmapped with that last reference.
                pass
            return map_private(Path(), layout, handle.fileno())
