"""The content-addressed chunk object store: ``chunks/ab/cdef…``, named by blake3 of raw bytes.

An object is written to a temporary file, fsynced and renamed into place, so a name that
exists always holds a whole object. Directories touched are fsynced in one batch before a
manifest refers to them.

>>> import tempfile, pathlib
>>> objects = ChunkObjects(pathlib.Path(tempfile.mkdtemp()))
>>> digest = bytes(32)
>>> objects.put(digest, b"data"), objects.has(digest), objects.get(digest)
(4, True, b'data')
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .fsio import TMP_PREFIX, FileIO, read_regular_file

__all__ = ["DIGEST_BYTES", "ChunkObjects"]

DIGEST_BYTES = 32
_MAX_OBJECT_BYTES = 1 << 34


class ChunkObjects:
    """Put, get, test and delete encoded chunk objects under ``<root>/chunks``."""

    def __init__(self, root: Path, io: FileIO | None = None) -> None:
        self.root = root / "chunks"
        self.io = io or FileIO()
        self._unsynced_dirs: set[Path] = set()

    def path(self, digest: bytes) -> Path:
        hexdigest = digest.hex()
        return self.root / hexdigest[:2] / hexdigest[2:]

    def has(self, digest: bytes) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: bytes, data: bytes | memoryview) -> int:
        """Store `data` under `digest` unless present; return the bytes written."""
        path = self.path(digest)
        if path.is_file():
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.io.write_new(path, data)
        try:
            self.io.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._unsynced_dirs.add(path.parent)
        return len(memoryview(data).cast("B"))

    def reuse(self, digest: bytes) -> None:
        """Note that a new snapshot relies on an existing object: its name must be durable too.

        An object may have been renamed into place by a writer that was killed before it
        fsynced the folder; the next sync() makes that entry durable before a manifest names it.
        """
        self._unsynced_dirs.add(self.path(digest).parent)

    def sync(self) -> None:
        """Make every rename since the last sync durable."""
        while self._unsynced_dirs:
            directory = self._unsynced_dirs.pop()
            try:
                self.io.fsync_dir(directory)
            except BaseException:
                self._unsynced_dirs.add(directory)
                raise
        if self.root.is_dir():
            self.io.fsync_dir(self.root)

    def get(self, digest: bytes, limit: int = _MAX_OBJECT_BYTES) -> bytes:
        """The stored bytes; FileNotFoundError when absent, OSError when not a regular file
        or larger than `limit` (never blocks on a FIFO, never reads a device without end)."""
        return read_regular_file(self.path(digest), limit)

    def delete(self, digest: bytes) -> None:
        try:
            self.io.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[bytes]:
        """Every stored object's digest (files with malformed names are skipped)."""
        if not self.root.is_dir():
            return
        for prefix in os.scandir(self.root):
            if len(prefix.name) != 2 or not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                name = prefix.name + entry.name
                if len(name) == 2 * DIGEST_BYTES and _is_hex(name):
                    yield bytes.fromhex(name)

    def remove_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind; return how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for prefix in os.scandir(self.root):
            if prefix.is_dir(follow_symlinks=False):
                for entry in os.scandir(prefix.path):
                    if entry.name.startswith(TMP_PREFIX):
                        os.unlink(entry.path)
                        removed += 1
        return removed


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()
