"""The file-operation seam: every write, fsync, truncation, rename and delete of a local
store's files goes through a :class:`FileOps`.

``LocalStorage`` (everything behind the storage interface) and the baselines each take one;
tests inject faults (EIO, ENOSPC) there with :class:`arraysnap.testing.FaultPlan`, which
wraps it and the storage interface above it. What does not go through it: the cleanup of a
temporary file whose write already failed, and files the command line writes for the user
outside any store.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> FileOps().write_atomic(root / "a.json", b"{}")
>>> (root / "a.json").read_bytes()
b'{}'
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

__all__ = ["FileOps", "TMP_PREFIX", "read_regular_file"]

TMP_PREFIX = ".tmp-"


def read_regular_file(path: Path | str, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; OSError otherwise.

    Never blocks (a FIFO is refused, not opened for a writer that never comes) and never
    reads past `limit` (a device such as /dev/zero has no end).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, more than {limit}", str(path))
        parts: list[bytes] = []
        total = 0
        if info.st_size < 1 << 20:  # one read, asking for a byte more than there is
            first = os.read(fd, info.st_size + 1)
            if len(first) == info.st_size:  # all of it, and the end of the file
                return first
            parts, total = [first], len(first)  # short, or it grew: read on, to the limit
            if total > limit:
                raise OSError(errno.EFBIG, f"more than {limit} bytes", str(path))
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"more than {limit} bytes", str(path))
        return b"".join(parts)
    finally:
        os.close(fd)


class FileOps:
    """Durable file operations. Override single methods to inject faults."""

    def write(self, fd: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def drop_cached(self, fd: int) -> None:
        """Let the page cache drop the pages of `fd`'s file (clean ones go at once).

        A checkpoint's chunk objects are written once and seldom read back (a restore of
        the latest snapshot maps the baselines), so keeping them cached would only push the
        program's own data out: a full capture of 1 GiB would add 1 GiB of cache each time.
        Where fresh memory is lazily backed (a VM whose host takes back free pages), writing
        into pages the last objects freed is also several times faster than into new ones.
        A hint: where it does not exist or fails, nothing changes but the cache.

        >>> import tempfile
        >>> with tempfile.TemporaryFile() as f:
        ...     _ = f.write(b"x"); f.flush(); os.fsync(f.fileno())
        ...     FileOps().drop_cached(f.fileno())
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            try:
                advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def replace(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def remove_tree(self, path: Path) -> None:
        """Delete a folder and everything in it (an absent folder is no error)."""
        shutil.rmtree(path, ignore_errors=True)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def write_new(self, path: Path, data: memoryview | bytes, *, sync: bool = True,
                  cached: bool = True) -> Path:
        """Write `data` to a fresh temporary file beside `path`; return the temporary path.

        With ``cached=False`` (and `sync`) the file's pages leave the page cache once they
        are durable (see `drop_cached`).
        """
        temp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.write(fd, data)
            if sync:
                self.fsync(fd)
                if not cached:
                    self.drop_cached(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return temp

    def write_atomic(self, path: Path, data: memoryview | bytes, *, durable: bool = True) -> None:
        """Write `path` so that it is either absent, its old content, or all of `data`.

        With ``durable=False`` nothing is fsynced: the replacement is atomic for every reader
        and survives a killed process, but not necessarily a power loss.
        """
        temp = self.write_new(path, data, sync=durable)
        try:
            self.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if durable:
            self.fsync_dir(path.parent)
