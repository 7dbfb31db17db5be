"""The baselines: memory-mapped files holding the last captured bytes of every array.

The delta kernel compares live arrays against their baselines and copies changed chunks into
them. The baselines are a cache of the latest snapshot, never the only copy: a marker file
records which committed snapshot they equal and whether they are clean, and baselines that
are dirty or unsure are checked against the manifest's digests and repaired from chunk
objects. They live in ``mirror/`` of the store's folder (or of a local baseline folder,
whose marker names its store, ``owner``: another store's marker is never trusted).

Files. Arrays share files: each array has an *extent* (a file and an offset) in one of a
few large files (``s-*.bin``, mapped once each, 1 GiB of address space, allocated as they
fill); an array of 64 MiB or more has a file of its own (``a-*.bin``). Where each array
is, is the *extent table* ``extents.json``, written when it changes; the marker names the
table's generation. No descriptor stays open for a file (see ``arraysnap.mapping``), so a
store of 100,000 arrays holds a handful of maps and descriptors, not 100,000 of each.

Ownership. ``restore()`` hands out copy-on-write maps of baseline files (one map per file
and restore, each array a view of it). On Linux such a private map still shows later
writes to pages it has not copied, so before the writer updates bytes of a file:

- maps handed out in this process *preserve* those bytes first: the kernel gives them
  their own copy of just those pages (``MADV_POPULATE_WRITE``), so the cost follows what
  the capture changes, not what the restore returned;
- maps of other processes (or other stores) are announced by a lease (``arraysnap.leases``);
  while one is held, the writer does not update the file in place but *moves* each array
  it must change to a new extent elsewhere, leaving the old bytes to their holders. The
  same happens in this process on a kernel that cannot preserve.

>>> import tempfile, pathlib
>>> from arraysnap.layout import plan_layout
>>> baselines = Baselines(pathlib.Path(tempfile.mkdtemp()))
>>> target = baselines.baseline("u", plan_layout((4,), np.dtype("u1"), "C", 2))
>>> target.buffer.size, target.fresh, target.held
(4, True, False)
>>> baselines.close()
"""

from __future__ import annotations

import json
import os
import stat
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .extents import (
    MARKER,
    MARKER_VERSION,
    SMALL_ALIGN,
    TABLE,
    TABLE_DIGEST,
    BaselineFile,
    Extent,
    Target,
    Views,
    align_of,
    extent_table,
    read_extents,
    read_mirror,
    same_layouts,
    table_digest,
)
from .fsio import TMP_PREFIX, FileOps, read_regular_file
from .layout import ChunkLayout
from .leases import LEASES, LockFile, ReaderLeases, lock_byte
from .mapping import PAGE, FileMap, map_file, preserve, preserving_supported

__all__ = ["Baselines", "Target"]

SHARED_FILE_BYTES = 1 << 30  # address space of a shared file's map
OWN_FILE_BYTES = 64 << 20  # an array this large gets a file of its own
GROW_BYTES = 64 << 20  # a shared file grows by doubling, at most by this much at once


def _read_boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class Baselines:
    """The baseline files under ``<store>/mirror`` and the marker that says what they hold."""

    def __init__(self, root: Path, ops: FileOps | None = None, *,
                 owner: str | None = None) -> None:
        self.dir = root / "mirror"
        self.owner = owner  # the store's id, when `root` is not the store's own folder
        self.ops = ops or FileOps()
        self._extents: dict[str, Extent] = {}
        self._files: dict[str, BaselineFile] = {}
        self._open_file: BaselineFile | None = None  # the shared file new extents go to
        self._lock_file: LockFile | None = None
        self._generation = 0
        self._epoch = 0  # see `epoch`
        self._table_written = True  # the table on disk is the one in memory
        self._table_digest: str | None = None  # the digest of the table on disk
        self._table_durable = True
        self._marked_dirty = False
        # Whether the marker on disk is a fsynced "clean", trusted even after a reboot.
        self._durably_clean = False

    # -- marker ---------------------------------------------------------------------------
    def read_marker(self) -> dict[str, Any] | None:
        try:
            marker = json.loads(read_regular_file(self.dir / MARKER, 1 << 20))
        except (OSError, ValueError, RecursionError):
            return None
        return marker if isinstance(marker, dict) else None

    def trusted_seq(self, marker: dict[str, Any] | None = None) -> int | None:
        """The snapshot the files equal according to the marker, if the marker can be trusted.

        A clean marker written without fsync is trusted only within the boot that wrote it:
        a killed process loses no page-cache writes, a power loss may.
        """
        marker = marker if marker is not None else self.read_marker()
        if marker is None or marker.get("clean") is not True or type(marker.get("seq")) is not int:
            return None
        if not self.owns(marker):
            return None
        if marker.get("synced") is True or (_BOOT_ID and marker.get("boot_id") == _BOOT_ID):
            return marker["seq"]  # type: ignore[no-any-return]
        return None

    def owns(self, marker: dict[str, Any]) -> bool:
        """Whether `marker` is of this store (always, for baselines in the store's folder)."""
        return self.owner is None or marker.get("owner") == self.owner

    def _write_marker(self, seq: int | None, *, clean: bool, durable: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._table_written or (durable and not self._table_durable):
            if not self._table_written:
                self._generation += 1
            data = json.dumps(extent_table(self._generation, self._extents)).encode()
            self.ops.write_atomic(self.dir / TABLE, data, durable=durable)
            self._table_written, self._table_durable = True, durable
            self._table_digest = table_digest(data)
        marker = {"version": MARKER_VERSION, "seq": seq, "clean": clean,
                  "synced": clean and durable, "boot_id": _BOOT_ID, "table": self._generation,
                  TABLE_DIGEST: self._table_digest}
        if self.owner is not None:
            marker["owner"] = self.owner
        self.ops.write_atomic(self.dir / MARKER, json.dumps(marker).encode(), durable=durable)
        self._durably_clean = clean and durable

    def mark_dirty(self) -> None:
        """Record that the files may differ from any snapshot; call before updating them.

        Replacing a fsynced clean marker is fsynced too, or a power loss could bring back
        the clean marker over half-written files.
        """
        if not self._marked_dirty:
            self._write_marker(None, clean=False, durable=self._durably_clean)
            self._marked_dirty = True

    def mark_committed(self, seq: int) -> None:
        """Record (without fsync) that the files equal committed snapshot `seq`.

        Also lets go of the exclusive locks, so readers may map the files until the next
        capture, which then moves what it changes in a file a reader holds.
        """
        self._write_marker(seq, clean=True, durable=False)
        self._marked_dirty = False
        for file in self._files.values():
            if file.exclusive:
                self._locks().unlock(lock_byte(file.name))
                file.exclusive = False

    def mark_clean(self, seq: int | None) -> None:
        """Flush the files and record durably that they equal snapshot `seq`."""
        for file in self._files.values():
            fd = os.open(file.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self.ops.fsync(fd)  # every page written through any map of the file
            finally:
                os.close(fd)
        self._write_marker(seq, clean=True, durable=True)
        self._marked_dirty = False

    # -- files ----------------------------------------------------------------------------
    def _locks(self) -> LockFile:
        if self._lock_file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = LockFile(self.dir / LEASES, writable=True)
        return self._lock_file

    def _map(self, name: str, capacity: int, size: int, own: bool) -> BaselineFile:
        path = self.dir / name
        file_map = map_file(path, capacity, shared=True)
        file = BaselineFile(name, path, capacity, size, own, file_map,
                     np.frombuffer(file_map, dtype=np.uint8))
        self._files[name] = file
        return file

    def _new_file(self, own: bool, nbytes: int) -> BaselineFile:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{'a' if own else 's'}-{uuid.uuid4().hex}.bin"
        capacity = _round_up(nbytes, PAGE) if own else SHARED_FILE_BYTES
        size = _round_up(nbytes, PAGE)
        path = self.dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            # Allocated, not sparse: a full disk fails here, not as SIGBUS in a mapped write.
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        # New: nobody else can hold a map of it, and it is this writer's to update.
        file = self._map(name, capacity, size, own)
        file.exclusive = self._locks().try_lock(lock_byte(name), exclusive=True)
        return file

    def _grow(self, file: BaselineFile, end: int) -> None:
        # Doubling up to steps of GROW_BYTES: few calls for a first capture of many arrays,
        # little unused space for a small state.
        step = min(max(file.size, PAGE), GROW_BYTES)
        size = min(file.capacity, _round_up(max(end, file.size + step), PAGE))
        fd = os.open(file.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, file.size, size - file.size)
        finally:
            os.close(fd)
        file.size = size

    def _reusable(self, file: BaselineFile) -> bool:
        """Whether freed bytes of `file` may be written: no map of it is held anywhere."""
        if file.live_maps():
            return False
        if not file.exclusive:
            file.exclusive = self._locks().try_lock(lock_byte(file.name), exclusive=True)
        return file.exclusive

    def _place(self, layout: ChunkLayout, avoid: BaselineFile | None = None) -> Extent:
        """A new extent for `layout`, in bytes nobody holds a map of."""
        nbytes = layout.nbytes
        if nbytes == 0:
            return Extent(layout, None, 0)
        if nbytes >= OWN_FILE_BYTES:
            file = self._new_file(True, nbytes)
            file.end, file.users = file.capacity, 1
            return Extent(layout, file, 0)
        align, length = align_of(nbytes), _round_up(nbytes, SMALL_ALIGN)
        for file in self._files.values():
            if file.own or file is avoid or not file.holes or not self._reusable(file):
                continue
            for index, (start, stop) in enumerate(file.holes):
                offset = _round_up(start, align)
                if offset + length <= stop:
                    del file.holes[index]
                    file.holes[index:index] = [hole for hole in ((start, offset),
                                                                 (offset + length, stop))
                                               if hole[1] > hole[0]]
                    file.users += 1
                    return Extent(layout, file, offset)
        file = self._open_file
        if file is None or file is avoid or _round_up(file.end, align) + length > file.capacity:
            file = self._open_file = self._new_file(False, length)
        offset = _round_up(file.end, align)
        if offset + length > file.size:
            self._grow(file, offset + length)
        file.end = offset + length
        file.users += 1
        return Extent(layout, file, offset)

    def _free(self, extent: Extent) -> None:
        file = extent.file
        if file is None:
            return
        file.users -= 1
        if file.users == 0 and file is not self._open_file:
            self._files.pop(file.name, None)
            try:
                self.ops.unlink(file.path)  # holders of maps keep the inode
            except FileNotFoundError:
                pass
            return
        start = extent.offset
        stop = start + _round_up(extent.layout.nbytes, SMALL_ALIGN)
        file.holes.append((start, stop))
        file.holes.sort()

    def _set(self, name: str, extent: Extent | None) -> None:
        self._epoch += 1
        old = self._extents.pop(name, None)
        if extent is not None:
            self._extents[name] = extent
        if old is not None:
            self._free(old)
        self._table_written = False

    def adopt(self, layouts: dict[str, ChunkLayout], marker: dict[str, Any] | None) -> set[str]:
        """Take over the extents the marker's table gives the arrays of `layouts` (of the
        right size, in regular files of the store); returns the names adopted. A table from
        before shared files is migrated: each array's file is copied into a new extent."""
        self._epoch += 1
        legacy = marker is not None and marker.get("version") != MARKER_VERSION
        # A table with layouts (read_mirror) is what readers restore from alone; one
        # without (an earlier writer's) is written again in that form.
        mirror = None if marker is None or legacy else read_mirror(self.dir, marker)
        extents = (mirror.extents if mirror is not None
                   else None if marker is None else read_extents(self.dir, marker))
        if not extents:
            return set()
        adopted: set[str] = set()
        claimed: dict[str, list[tuple[int, int, str]]] = {}
        files = self._files
        for name, layout in layouts.items():  # (a loop run for every array of a store)
            found = extents.get(name)
            if found is None:
                continue
            filename, offset = found
            nbytes = layout.nbytes
            if nbytes == 0:
                if filename is None:
                    self._extents[name] = Extent(layout, None, 0)
                    adopted.add(name)
                continue
            file = files.get(filename) if filename else None
            if file is None and filename is not None:
                file = self._adopt_file(filename, legacy)
            if (file is None or offset % (PAGE if nbytes >= PAGE else SMALL_ALIGN)
                    or offset + nbytes > file.size):
                continue
            spans = claimed.get(file.name)
            if spans is None:
                spans = claimed[file.name] = []
            spans.append((offset, offset - (-nbytes // SMALL_ALIGN) * SMALL_ALIGN, name))
        for file in list(files.values()):
            # Bytes no adopted array uses may still be in maps an earlier store handed out:
            # holes, written only once no map of the file is held anywhere.
            holes: list[tuple[int, int]] = []
            names: list[str] = []
            end = 0
            for start, stop, name in sorted(claimed.get(file.name, [])):
                if start < end:
                    continue  # two arrays in the same bytes: a damaged table; rebuild it
                if start > end:
                    holes.append((end, start))
                end = stop
                self._extents[name] = Extent(layouts[name], file, start)
                names.append(name)
            adopted.update(names)
            file.users += len(names)
            file.end = file.size
            if file.end > end:
                holes.append((end, file.end))
            file.holes = holes
            if not file.own and file.end < file.capacity and self._open_file is None:
                self._open_file = file
        assert marker is not None
        generation = marker.get("table")
        self._generation = generation if type(generation) is int else 0
        if legacy:
            self._migrate(adopted)
            self._table_written = False
        else:
            # All of the table on disk adopted, each array with the layout it has now (a
            # table may be of a snapshot recovery went back from): no need to write it again.
            self._table_written = (mirror is not None and adopted == set(extents)
                                   and same_layouts(mirror, layouts))
            if self._table_written:
                self._table_digest = marker[TABLE_DIGEST]
            self._table_durable = marker.get("synced") is True
        # A fsynced clean marker stays until a durable one replaces it (see mark_dirty).
        self._durably_clean = self.trusted_seq(marker) is not None and (
            marker.get("synced") is True)
        return adopted

    def table_on_disk(self) -> bool:
        """Whether the extent table on disk is the one in memory."""
        return self._table_written

    def _adopt_file(self, filename: str, legacy: bool) -> BaselineFile | None:
        path = self.dir / filename
        try:
            # O_NOFOLLOW: a planted link must not make the writer write outside the store.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        own = legacy or filename.startswith("a-")
        capacity = info.st_size if own else max(SHARED_FILE_BYTES, info.st_size)
        try:
            file = self._map(filename, _round_up(capacity, PAGE), info.st_size, own)
        except OSError:
            return None
        return file

    def _migrate(self, names: set[str]) -> None:
        """Copy arrays out of the one-file-per-array files of an older arraysnap."""
        for name in names:
            old = self._extents[name]
            extent = self._place(old.layout, avoid=old.file)
            if old.layout.nbytes:
                np.copyto(extent.buffer, old.buffer)
            self._set(name, extent)

    def free_bytes(self) -> int:
        """Bytes free for an unprivileged writer on the baselines' file system."""
        folder = self.dir if self.dir.is_dir() else self.dir.parent
        info = os.statvfs(folder)
        return info.f_bavail * info.f_frsize

    def layout_of(self, name: str) -> ChunkLayout | None:
        """The layout of `name`'s baseline, if it has one."""
        extent = self._extents.get(name)
        return None if extent is None else extent.layout

    def names(self) -> set[str]:
        """The arrays that have a baseline."""
        return set(self._extents)

    def flat(self, name: str) -> np.ndarray:
        """The flat bytes of `name`'s baseline (to check them, not to write)."""
        return self._extents[name].buffer

    def location(self, name: str) -> tuple[Path, int] | None:
        """The file and offset of `name`'s baseline, if it has bytes."""
        extent = self._extents.get(name)
        if extent is None or extent.file is None:
            return None
        return extent.file.path, extent.offset

    def baseline(self, name: str, layout: ChunkLayout,
                 live: np.ndarray | None = None) -> Target:
        """Where to write array `name` for `layout`: its extent, made safe to update.

        A new layout gets a new extent (`fresh`). An extent whose file another process
        holds maps of is moved first. `live`, the array about to be compared, may be a
        view of a map this store handed out: the preservation this asks for keeps that
        map's other arrays intact too.
        """
        del live  # every handed-out map, the live one included, is preserved alike
        if not self._marked_dirty:
            self.mark_dirty()
        extent = self._extents.get(name)
        if extent is None or (extent.layout is not layout and extent.layout != layout):
            self._set(name, self._place(layout))
            return Target(self._extents[name].buffer, True, False)
        file = extent.file
        if file is None:
            return extent.in_place
        if not file.exclusive:
            file.exclusive = self._locks().try_lock(lock_byte(file.name), exclusive=True)
        held = bool(file.handed_out) and bool(file.live_maps())
        if not file.exclusive or (held and not preserving_supported()):
            # Someone may hold a map of this file: continue elsewhere, leave it to them.
            moved = self._place(layout, avoid=file)
            np.copyto(moved.buffer, extent.buffer)
            self._set(name, moved)
            return moved.in_place
        return Target(extent.buffer, False, True) if held else extent.in_place

    @property
    def epoch(self) -> int:
        """A count that changes whenever an extent is placed, moved or dropped: while it
        stays the same, every array's baseline buffer is where it was."""
        return self._epoch

    def steady(self, epoch: int) -> bool:
        """Whether every baseline may be updated in place where it was at `epoch`: no extent
        placed, moved or dropped since, and every file this writer's to update (its lock
        taken again after a commit let it go; maps this process handed out, if any, can be
        preserved). Then ``baseline()`` would return each array's buffer where it is, and a
        pause may compare and copy without asking array by array, calling ``preserve``
        first for what changes while ``held()``."""
        if epoch != self._epoch:
            return False
        for file in self._files.values():
            if not file.exclusive:
                file.exclusive = self._locks().try_lock(lock_byte(file.name), exclusive=True)
                if not file.exclusive:
                    return False
            if file.handed_out and file.live_maps() and not preserving_supported():
                return False
        return True

    def held(self) -> bool:
        """Whether maps this process handed out (``hand_out``) are still alive: bytes about
        to change must be preserved in them first."""
        return any(file.handed_out and file.live_maps() for file in self._files.values())

    def preserve(self, name: str, indices: np.ndarray) -> None:
        """Before chunks `indices` of `name` are updated in place: maps handed out in this
        process keep their current bytes there (their own copy of those pages)."""
        extent = self._extents[name]
        if extent.file is None or not len(indices):
            return
        layout = extent.layout
        for file_map in extent.file.live_maps():
            for index in np.asarray(indices).tolist():
                start, stop = layout.chunk_range(int(index))
                if not preserve(file_map, extent.offset + start, extent.offset + stop):
                    raise OSError("this kernel cannot preserve handed-out maps")

    def forget(self, name: str) -> None:
        """Drop `name`'s baseline: its content is no longer known to match any snapshot."""
        if name in self._extents:
            self.mark_dirty()
            self._set(name, None)

    def retain_only(self, names: set[str]) -> None:
        """Forget baselines of arrays no longer captured."""
        for name in list(self._extents):
            if name not in names:
                self.forget(name)

    def hand_out(self, names: list[str]) -> Views:
        """Copy-on-write maps of the baselines of `names` for a caller in this process: one
        map per file, each array a view of it (made when first used)."""
        maps: dict[str, FileMap] = {}
        views = Views()
        for name in names:
            extent = self._extents[name]
            layout = extent.layout
            if extent.file is None:
                views.made[name] = np.empty(layout.shape, dtype=layout.dtype,
                                            order=layout.order)
                continue
            file = extent.file
            file_map = maps.get(file.name)
            if file_map is None:
                file_map = maps[file.name] = map_file(file.path, file.end, shared=False,
                                                      writable_file=False)
                file.handed_out.append(weakref.ref(file_map))
            views.add(name, file_map, extent.offset, layout)
        return views

    def remove_strays(self) -> None:
        """Delete files no extent uses (left by a killed writer, or migrated)."""
        if not self.dir.is_dir():
            return
        used = set(self._files) | {MARKER, TABLE, LEASES}
        for child in self.dir.iterdir():
            if child.name not in used and (child.suffix == ".bin"
                                           or child.name.startswith(TMP_PREFIX)):
                try:
                    self.ops.unlink(child)
                except FileNotFoundError:
                    pass

    def refuse_link(self) -> None:
        """Remove a link planted in place of the baselines' folder: baselines are created,
        and stray ones deleted, in there, never somewhere else."""
        if self.dir.is_symlink():
            self.ops.unlink(self.dir)

    def stored_bytes(self) -> int:
        """Bytes of the baseline files on disk (for ``disk_usage``)."""
        if not self.dir.is_dir() or self.dir.is_symlink():
            return 0
        return sum(f.stat().st_size for f in self.dir.glob("*.bin") if f.is_file())

    def close(self) -> None:
        """Close the baselines. Maps handed out in this process may outlive the store: their
        files stay under a lease until the last map is gone, so that the next writer
        (another store, in this process or another) moves instead of writing in place."""
        self._epoch += 1
        lock_file, self._lock_file = self._lock_file, None
        leases = None if lock_file is None else ReaderLeases(lock_file)
        for file in self._files.values():
            held = file.live_maps()
            if leases is not None:
                if held:
                    for _ in held:  # the first converts exclusive to shared
                        leases.convert(file.name)
                    for file_map in held:
                        leases.keep(file.name, file_map)
                elif file.exclusive:
                    lock_file.unlock(lock_byte(file.name))  # type: ignore[union-attr]
        if leases is not None:
            leases.close()
        self._files.clear()
        self._extents.clear()
        self._open_file = None

    def clear_directory(self) -> None:
        """Remove every baseline (used when the store holds no snapshot they could equal)."""
        self.close()
        self.ops.remove_tree(self.dir)
