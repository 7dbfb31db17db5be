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
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..baselines import Baselines
from ..bulk import paused_collector
from ..chunks import assemble, find_bad_chunks, load_chunk
from ..codecs import CodecSpec
from ..delta import as_bytes
from ..errors import (
    CorruptSnapshotError,
    FormatVersionError,
    SnapshotNotFoundError,
    space_error,
)
from ..extents import Views, align_of, read_extents, read_mirror
from ..layout import ChunkLayout
from ..leases import LEASES, LockFile, ReaderLeases
from ..manifest import ArrayEntry, DeferredArrays, Manifest
from ..mapping import FileMap, map_fd, map_file
from ..objects import ChunkObjects
from ..replaylog import ReplayLog
from ..restored import RestoredArrays
from ..results import Problem, Restored, SnapshotInfo
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
        self._reader_leases: ReaderLeases | None = None

    def restore(self, step: int | None, seq: int | None, *, verify: bool,
                fallback: bool) -> Restored:
        if self.capturer is None and not verify:
            mirrored = self._restore_mirrored(step, seq)
            if mirrored is not None:
                return mirrored
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

    def restore_manifest(self, manifest: Manifest, verify: bool,
                         into: Mapping[str, np.ndarray] | None = None) -> Restored:
        """The snapshot of `manifest`; with `into`, only those arrays, copied into them
        (chunk objects decoded straight into the caller's buffers: no scratch file)."""
        with paused_collector():  # thousands of maps' views, none in a cycle
            views = self._map_baselines(manifest, verify)
        if into is not None:
            for name, target in into.items():
                if name in views:
                    np.copyto(target, views.array(name))
                else:
                    self._assemble_into(target, manifest.arrays[name], verify, manifest.seq)
            arrays = RestoredArrays(into)
        else:
            missing = [manifest.arrays[name] for name in views.lacking(manifest.arrays)]
            if missing:
                views.update(self._materialize(missing, verify=verify, seq=manifest.seq))
            arrays = RestoredArrays.of(manifest.arrays, views)
        return self._restored(manifest, arrays, self.catalog.info(manifest.seq))

    def _restored(self, manifest: Manifest, arrays: RestoredArrays,
                  info: SnapshotInfo) -> Restored:
        try:
            rng = rng_from_json(manifest.rng)
        except (ValueError, TypeError) as err:
            raise CorruptSnapshotError(str(err), seq=manifest.seq) from None
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
        return self.restore_manifest(manifest, verify, into=arrays)

    def _assemble_into(self, target: np.ndarray, entry: ArrayEntry, verify: bool,
                       seq: int) -> None:
        layout = entry.layout
        if not layout.nbytes:
            return
        order = layout.order
        if target.flags.c_contiguous if order == "C" else target.flags.f_contiguous:
            flat = target.reshape(-1, order=order).view(np.uint8)  # the caller's bytes
            assemble(flat, self.objects, self.codec, entry, self.pool, verify=verify, seq=seq)
            return
        flat = np.empty(layout.nbytes, dtype=np.uint8)  # a strided target: via memory
        assemble(flat, self.objects, self.codec, entry, self.pool, verify=verify, seq=seq)
        np.copyto(target, np.ndarray(layout.shape, dtype=layout.dtype, buffer=flat,
                                     order=order))

    # -- mapping the baselines -------------------------------------------------------------
    def _map_baselines(self, manifest: Manifest, verify: bool) -> Views:
        """Maps of the baselines that hold exactly this snapshot's arrays (maybe none)."""
        capturer = self.capturer
        if capturer is None:
            return self._map_committed(manifest, verify)
        if capturer.baseline_seq != manifest.seq:
            return Views()
        names = [name for name, entry in manifest.arrays.items()
                 if self.baselines.layout_of(name) == entry.layout]
        if verify:
            for name in names:
                entry = manifest.arrays[name]
                bad = find_bad_chunks(self.baselines.flat(name), entry, self.pool)
                if bad:
                    log.warning("arraysnap: baseline of %r had %d damaged chunks; repairing",
                                name, len(bad))
                    target = self.baselines.baseline(name, entry.layout)
                    if target.held:
                        self.baselines.preserve(name, np.array(bad))
                    assemble(target.buffer, self.objects, self.codec, entry, self.pool,
                             verify=True, seq=manifest.seq, indices=bad)
                    capturer.repaired(name, manifest.seq)
        return self.baselines.hand_out(names)

    def _restore_mirrored(self, step: int | None, seq: int | None) -> Restored | None:
        """In a reader, without verifying: the latest snapshot from the writer's baselines
        alone, when a clean marker says they hold it and its extent table gives every
        array's layout (``extents.read_mirror``), without reading the snapshot's chunk
        tables (two thirds of a reader's restore of 10,000 arrays). None when that cannot
        be: the restore then goes the usual way."""
        baselines = self.baselines
        marker = baselines.read_marker()
        target = None if marker is None else baselines.trusted_seq(marker)
        if target is None or seq not in (None, target):
            return None
        seqs = self.catalog.seqs()
        mirror = read_mirror(baselines.dir, marker) if seqs and seqs[-1] == target else None
        if mirror is None:
            return None
        try:
            manifest, manifest_bytes = self.catalog.head(target)
        except (CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError):
            return None  # the usual way reports it, or falls back
        if step is not None and manifest.step != step:
            return None
        names, layouts = mirror.names, mirror.layouts
        arrays = manifest.arrays
        if isinstance(arrays, DeferredArrays):
            # The manifest's own word on its arrays: how many, and the first of each subtree
            # (in name order, as its tables list them and as the mirror does).
            listed = set(names)
            if names != sorted(names) or arrays.count != len(names) or not all(
                    isinstance(first, str) and first in listed for first in arrays.first_names):
                return None
        else:
            # A manifest that lists its arrays (a small store): compared whole; its order is
            # the one a restore gives.
            by_name = dict(zip(names, layouts, strict=True))
            if len(arrays) != len(by_name) or any(by_name.get(name) != entry.layout
                                                  for name, entry in arrays.items()):
                return None
            names = list(arrays)
            layouts = [by_name[name] for name in names]
        with paused_collector():
            views = self._map_extents(marker, zip(names, layouts, strict=True),
                                      mirror.extents)
        empty = {name: np.empty(layout.shape, dtype=layout.dtype, order=layout.order)
                 for name, layout in zip(names, layouts, strict=True) if not layout.nbytes}
        views.made.update(empty)
        if views.lacking(names):
            return None  # a file the writer holds, or gone: the usual way assembles those
        info = SnapshotInfo.from_manifest(manifest, manifest_bytes)
        try:
            return self._restored(manifest, RestoredArrays.of(names, views), info)
        except CorruptSnapshotError:
            return None  # its rng or replay log: the usual way reports it, or falls back

    def _map_committed(self, manifest: Manifest, verify: bool) -> Views:
        """In a reader: the writer's baselines, if they hold this snapshot, each file under
        a lease for as long as its map lives."""
        baselines = self.baselines
        marker = baselines.read_marker()
        if marker is None or baselines.trusted_seq(marker) != manifest.seq:
            return Views()
        extents = read_extents(baselines.dir, marker, current_only=True)
        if not extents:
            return Views()
        views = self._map_extents(marker, ((name, entry.layout)
                                           for name, entry in manifest.arrays.items()),
                                  extents)
        if verify:
            bad = [name for name in views.names() if find_bad_chunks(
                as_bytes(views.array(name)), manifest.arrays[name], self.pool)]
            for name in bad:
                views.drop(name)  # assembled from its chunk objects instead
        return views

    def _map_extents(self, marker: dict[str, Any],
                     arrays: Iterable[tuple[str, ChunkLayout]],
                     extents: Mapping[str, tuple[str | None, int]]) -> Views:
        """The views of `arrays` (name, layout) at their `extents` in the baselines, each
        file under a lease for as long as its map lives, if `marker` is still the one on
        disk once the leases are held."""
        baselines = self.baselines
        # Each file's arrays (name, offset, layout), and where its last array ends.
        by_file: dict[str, list[tuple[str, int, ChunkLayout]]] = {}
        stops: dict[str, int] = {}
        for name, layout in arrays:  # (a loop run for every array)
            found = extents.get(name)
            if found is None or found[0] is None or not layout.nbytes:
                continue
            filename, offset = found
            placed = by_file.get(filename)
            if placed is None:
                placed = by_file[filename] = []
            placed.append((name, offset, layout))
            stops[filename] = max(stops.get(filename, 0), offset + layout.nbytes)
        leases = self._leases()
        if leases is None:
            return Views()
        leased = [filename for filename in by_file if leases.acquire(filename)]
        views = Views()
        # Under the leases no writer changes these files; only now is the marker to be
        # trusted (the writer may have moved on between the first read and the leases).
        unchanged = baselines.read_marker() == marker
        for filename in leased:
            file_map = (self._map_file(baselines.dir / filename, stops[filename])
                        if unchanged else None)
            if file_map is None:
                leases.release(filename)
                continue
            leases.keep(filename, file_map)  # the lease now lasts as long as the map
            views.add_all(file_map, by_file[filename])
        return views

    @staticmethod
    def _map_file(path: Path, stop: int) -> FileMap | None:
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size < stop:
                return None
            return map_file(path, stop, shared=False, writable_file=False)
        except OSError:
            return None

    def _leases(self) -> ReaderLeases | None:
        if self._reader_leases is None:
            try:
                self._reader_leases = ReaderLeases(
                    LockFile(self.baselines.dir / LEASES, writable=False))
            except OSError:  # no lease file: no writer has made baselines here
                return None
        return self._reader_leases

    def close(self) -> None:
        """The store closes: the lease descriptor closes once no map of it is left."""
        if self._reader_leases is not None:
            self._reader_leases.close()
            self._reader_leases = None

    def _materialize(self, entries: list[ArrayEntry], *, verify: bool, seq: int) -> Views:
        """Assemble arrays from their chunk objects into one allocated temporary file,
        mapped once: each array a view of it."""
        offsets, total = [], 0
        for entry in entries:
            if entry.layout.nbytes:
                # A manifest may claim any size: one real chunk (decoded to the full chunk
                # size) vouches for it before anything of that size is allocated.
                load_chunk(self.objects, self.codec, entry, 0, verify=verify, seq=seq)
            align = align_of(entry.layout.nbytes)
            total = -(-total // align) * align
            offsets.append(total)
            total += entry.layout.nbytes
        views = Views()
        if total == 0:
            views.made.update((entry.name, np.empty(entry.layout.shape, dtype=entry.layout.dtype,
                                                    order=entry.layout.order))
                              for entry in entries)
            return views
        directory = self._scratch_dir
        handle = None
        try:
            if directory is not None:
                directory.mkdir(exist_ok=True)
            handle = tempfile.TemporaryFile(dir=directory, prefix="restore-")
            # Allocated, not sparse: a full disk fails here, not as SIGBUS in a mapped write.
            os.posix_fallocate(handle.fileno(), 0, total)
        except OSError as err:
            if handle is not None:
                handle.close()
            where = directory if directory is not None else tempfile.gettempdir()
            raise space_error(err, f"restoring snapshot {seq} needs {total} bytes in {where} "
                              "to assemble its arrays",
                              "restore_into() arrays of your own (which needs no space)"
                              ) from err
        with handle:
            shared = np.frombuffer(map_fd(handle.fileno(), total, shared=True), dtype=np.uint8)
            for entry, offset in zip(entries, offsets, strict=True):
                assemble(shared[offset : offset + entry.layout.nbytes], self.objects,
                         self.codec, entry, self.pool, verify=verify, seq=seq)
            del shared  # unmapped with its last view (a pool task may still hold one)
            private = map_fd(handle.fileno(), total, shared=False)
        for entry, offset in zip(entries, offsets, strict=True):
            views.add(entry.name, private, offset, entry.layout)
        return views
