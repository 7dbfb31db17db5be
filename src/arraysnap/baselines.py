"""The baselines: one memory-mapped file per array, holding the last captured bytes.

The delta kernel compares live arrays against their baselines and copies changed chunks into
them. The baselines are a cache of the latest snapshot, never the only copy: a marker file
records which committed snapshot they equal and whether they are clean, and baselines that
are dirty or unsure are checked against the manifest's digests and repaired from chunk
objects. They live in the store's folder ``mirror/`` (its name in the on-disk format).

Ownership. ``restore()`` hands out copy-on-write maps of baseline files. On Linux such a
private map still shows later writes to pages it has not copied, so the writer never
updates a file in place while someone may hold a map of it:

- readers take a shared ``flock`` on the file for as long as their maps live;
- the writer takes an exclusive ``flock`` before its first update, and its own process's
  maps are tracked with weak references;
- when either says a map may exist, the writer first *detaches*: it copies the file to a
  new one, switches to that, and unlinks the old one, which lives on for its holders.

>>> import tempfile, pathlib
>>> baselines = Baselines(pathlib.Path(tempfile.mkdtemp()))
>>> from arraysnap.layout import plan_layout
>>> baseline, fresh = baselines.baseline("u", plan_layout((4,), np.dtype("u1"), "C", 2))
>>> baseline.size, fresh
(4, True)
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fsio import TMP_PREFIX, FileOps, read_regular_file
from .layout import ChunkLayout

__all__ = ["Baselines", "ReaderLease", "map_private"]

MARKER = "state.json"


def _read_boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()


@dataclass(slots=True)
class _Entry:
    layout: ChunkLayout
    path: Path
    fd: int
    buffer: np.ndarray
    exclusive: bool = False
    handed_out: list[weakref.ref[Any]] = field(default_factory=list)

    def has_live_maps(self, except_for: object = None) -> bool:
        self.handed_out = [ref for ref in self.handed_out if ref() is not None]
        return any(ref() is not except_for for ref in self.handed_out)


def _mapping_of(array: np.ndarray | None) -> object:
    """The mmap object at the root of `array`'s base chain, if any."""
    while isinstance(array, np.ndarray):
        array = array.base  # type: ignore[assignment]
    return array if isinstance(array, mmap.mmap) else None


def _map_shared(fd: int, size: int) -> np.ndarray:
    if size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(fd, size, mmap.MAP_SHARED), dtype=np.uint8)


def map_private(path: Path, layout: ChunkLayout, fd: int | None = None) -> np.ndarray:
    """A copy-on-write map of a baseline file, shaped as the array it holds."""
    if layout.nbytes == 0:
        return np.empty(layout.shape, dtype=layout.dtype, order=layout.order)
    owned = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, layout.nbytes, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        if owned:
            os.close(fd)
    return np.ndarray(layout.shape, dtype=layout.dtype, buffer=mm, order=layout.order)


class Baselines:
    """The baseline files under ``<store>/mirror`` and the marker that says what they hold."""

    def __init__(self, root: Path, ops: FileOps | None = None) -> None:
        self.dir = root / "mirror"
        self.ops = ops or FileOps()
        self.entries: dict[str, _Entry] = {}
        self._marked_dirty = False
        # Whether the marker on disk is a fsynced "clean", trusted even after a reboot.
        self._durably_clean = False

    # -- marker ---------------------------------------------------------------------------
    def read_marker(self) -> dict[str, Any] | None:
        try:
            marker = json.loads(read_regular_file(self.dir / MARKER, 1 << 24))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            return None
        return marker

    def trusted_seq(self, marker: dict[str, Any] | None = None) -> int | None:
        """The snapshot the files equal according to the marker, if the marker can be trusted.

        A clean marker written without fsync is trusted only within the boot that wrote it:
        a killed process loses no page-cache writes, a power loss may.
        """
        marker = marker if marker is not None else self.read_marker()
        if marker is None or marker.get("clean") is not True or type(marker.get("seq")) is not int:
            return None
        if marker.get("synced") is True or (_BOOT_ID and marker.get("boot_id") == _BOOT_ID):
            return marker["seq"]  # type: ignore[no-any-return]
        return None

    def _write_marker(self, seq: int | None, *, clean: bool, durable: bool) -> None:
        files = {name: entry.path.name for name, entry in self.entries.items()}
        marker = {"seq": seq, "clean": clean, "synced": clean and durable, "boot_id": _BOOT_ID,
                  "files": files}
        self.dir.mkdir(parents=True, exist_ok=True)
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
        capture, which then copies any file a reader holds instead of updating it.
        """
        self._write_marker(seq, clean=True, durable=False)
        self._marked_dirty = False
        for entry in self.entries.values():
            if entry.exclusive:
                fcntl.flock(entry.fd, fcntl.LOCK_UN)
                entry.exclusive = False

    def mark_clean(self, seq: int | None) -> None:
        """Flush the files and record durably that they equal snapshot `seq`."""
        for entry in self.entries.values():
            if entry.buffer.size:
                base = entry.buffer.base
                if isinstance(base, mmap.mmap):
                    base.flush()
            self.ops.fsync(entry.fd)
        self._write_marker(seq, clean=True, durable=True)
        self._marked_dirty = False

    # -- files ----------------------------------------------------------------------------
    def _new_file(self, name: str, layout: ChunkLayout) -> _Entry:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{uuid.uuid4().hex}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            # Allocated, not sparse: a full disk fails here, not as SIGBUS in a mapped write.
            if layout.nbytes:
                os.posix_fallocate(fd, 0, layout.nbytes)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _Entry(layout, path, fd, _map_shared(fd, layout.nbytes), exclusive=True)

    def adopt(self, name: str, filename: str, layout: ChunkLayout) -> bool:
        """Take over an existing baseline file of the right size; False if it is unusable."""
        path = self.dir / filename
        if not _safe_filename(filename):
            return False
        try:
            # O_NOFOLLOW: a planted link must not make the writer write outside the store.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != layout.nbytes:
            os.close(fd)
            return False
        self.entries[name] = _Entry(layout, path, fd, _map_shared(fd, layout.nbytes))
        return True

    def layout_of(self, name: str) -> ChunkLayout | None:
        """The layout of `name`'s baseline, if it has one."""
        entry = self.entries.get(name)
        return None if entry is None else entry.layout

    def flat(self, name: str) -> np.ndarray:
        """The flat bytes of `name`'s baseline (to check them, not to write)."""
        return self.entries[name].buffer

    def file_of(self, name: str) -> Path | None:
        """The file of `name`'s baseline, if it has one."""
        entry = self.entries.get(name)
        return None if entry is None else entry.path

    def baseline(self, name: str, layout: ChunkLayout,
                 live: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """The writable flat baseline of array `name` for `layout`, safe to update in place.

        Returns ``(buffer, fresh)``; `fresh` means a new zero-filled file (every chunk counts
        as changed). `live`, the array about to be compared, may itself be a map handed out
        of this baseline: updating in place is then safe for it (the kernel only copies its
        own bytes into the file), so it does not force a detach.
        """
        entry = self.entries.get(name)
        if entry is None or entry.layout != layout:
            if entry is not None:
                self._drop(name)
            self.mark_dirty()
            self.entries[name] = self._new_file(name, layout)
            return self.entries[name].buffer, True
        if not entry.exclusive or entry.has_live_maps(except_for=_mapping_of(live)):
            self._make_exclusive(name, entry, live)
        self.mark_dirty()
        return self.entries[name].buffer, False

    def _make_exclusive(self, name: str, entry: _Entry, live: np.ndarray | None) -> None:
        if not entry.has_live_maps(except_for=_mapping_of(live)):
            try:
                fcntl.flock(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                entry.exclusive = True
                return
            except BlockingIOError:
                pass
        # Someone may hold a map of this file: continue in a copy, leave the old one to them.
        self._marked_dirty = False
        fresh = self._new_file(name, entry.layout)
        if entry.layout.nbytes:
            np.copyto(fresh.buffer, entry.buffer)
        self._drop(name)
        self.entries[name] = fresh
        self.mark_dirty()

    def _drop(self, name: str) -> None:
        entry = self.entries.pop(name)
        os.close(entry.fd)
        try:
            self.ops.unlink(entry.path)
        except FileNotFoundError:
            pass

    def forget(self, name: str) -> None:
        """Drop `name`'s baseline: its content is no longer known to match any snapshot."""
        if name in self.entries:
            self.mark_dirty()
            self._drop(name)

    def retain_only(self, names: set[str]) -> None:
        """Forget baselines of arrays no longer captured."""
        for name in list(self.entries):
            if name not in names:
                self.mark_dirty()
                self._drop(name)

    def hand_out(self, name: str) -> np.ndarray:
        """A copy-on-write map of `name`'s baseline for a caller in this process."""
        entry = self.entries[name]
        array = map_private(entry.path, entry.layout, entry.fd)
        if isinstance(array.base, mmap.mmap):
            entry.handed_out.append(weakref.ref(array.base))
        return array

    def remove_strays(self) -> None:
        """Delete baseline files no entry uses (left by a killed writer)."""
        if not self.dir.is_dir():
            return
        used = {entry.path.name for entry in self.entries.values()} | {MARKER}
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
        files stay under a shared lock until the last map is gone, so that the next writer
        (another store, in this process or another) detaches instead of writing in place."""
        for name in list(self.entries):
            entry = self.entries.pop(name)
            maps = [ref() for ref in entry.handed_out]
            live = [mapping for mapping in maps if mapping is not None]
            if live:
                try:
                    fcntl.flock(entry.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # from exclusive
                except OSError:
                    pass  # another holder's shared lock already guards it
                ReaderLease(entry.fd).keep(live)
                continue
            os.close(entry.fd)

    def clear_directory(self) -> None:
        """Remove every baseline (used when the store holds no snapshot they could equal)."""
        self.close()
        self.ops.remove_tree(self.dir)


def _safe_filename(name: object) -> bool:
    return (isinstance(name, str) and name.endswith(".bin") and "/" not in name
            and "\\" not in name and not name.startswith(".") and len(name) < 100)


# Leases whose only other referent is a weak reference: kept alive here until released.
_held_leases: set[ReaderLease] = set()


class ReaderLease:
    """A shared lock on a baseline file, held while this process has maps of it.

    Released when the last map handed out under it is garbage collected.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs: list[weakref.ref[Any]] = []

    @classmethod
    def acquire(cls, path: Path) -> ReaderLease | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd)

    def track(self, array: np.ndarray) -> None:
        if isinstance(array.base, mmap.mmap):
            self.refs.append(weakref.ref(array.base, self._released))
        else:
            self.release()

    def keep(self, mappings: list[Any]) -> None:
        """Hold the lock until every one of `mappings` (mmap objects) is gone."""
        self.refs.extend(weakref.ref(mapping, self._released) for mapping in mappings)
        _held_leases.add(self)

    def _released(self, _ref: object) -> None:
        if all(ref() is None for ref in self.refs):
            self.release()

    def release(self) -> None:
        _held_leases.discard(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
