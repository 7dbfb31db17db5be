"""The journaling FUSE file system under the power-loss tests (run as a process of its own).

``python -m arraysnap.testing._forgetting BACKING MOUNT JOURNAL [--hold-at N]
[--capacity BYTES]`` mounts MOUNT as a pass-through of the folder BACKING and journals, in
the order it performs them, every operation that changes what a power cut could keep:
creates, writes (data included), truncations, fallocate, renames, unlinks, folder creation
and removal, and the barriers (fsync and fdatasync of a file, fsync of a folder). It decides
nothing about durability itself: :mod:`arraysnap.testing._crashstates` replays the journal
and says what a cut after any operation may leave. Writes through shared memory maps arrive
here as the kernel writes the pages back (at msync, fsync or when it chooses), as on any
file system.

The journal (``JOURNAL`` a folder) is ``ops.jsonl``, one JSON object per operation, and
``data.bin``, the bytes of the writes (``"data": [offset, length]``). Each line is written
(unbuffered) before the operation returns to the kernel, so a journal read after the
process under test died holds every operation that process saw complete.

``--hold-at N`` freezes the file system when its N-th journaled operation (counting from 1)
arrives: that one is not performed and every later call that could change anything blocks
for ever, as on a machine whose power just went (reads still answer); the file
``JOURNAL/held`` then appears. Looking up a name under
``/.powercut/`` journals a ``mark`` (the name is its label) and answers "no such file": a
process under test marks the instant it saw something complete. ``--capacity`` makes the
file system full (ENOSPC) once the files in it would hold more than BYTES.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import mfusepy as fuse

from arraysnap.testing._crashstates import MARKS

__all__ = ["main"]


class Journaling(fuse.Operations):
    """Pass-through operations on `backing`, journaled into the folder `journal`."""

    use_ns = True

    def __init__(self, backing: str, journal: str, hold_at: int, capacity: int) -> None:
        self.root = os.path.realpath(backing)
        self.folder = Path(journal)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ops = os.open(self.folder / "ops.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._data = os.open(self.folder / "data.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._data_end = os.fstat(self._data).st_size
        self._lock = threading.Lock()
        self._count = 0
        self._hold_at = hold_at
        self._frozen = threading.Event()
        self._capacity = capacity
        self._used = sum(entry.stat().st_size for entry in _files(self.root))
        # Open handles: the file's inode, and whether its last name is gone (its bytes
        # count until the last handle is released, as on a disk).
        self._open: dict[int, tuple[int, bool]] = {}

    # -- journal --------------------------------------------------------------------------
    def _record(self, op: str, data: bytes | None = None, **fields: Any) -> None:
        """Journal one operation; called holding the lock, after the operation succeeded."""
        if data is not None:
            fields["data"] = [self._data_end, len(data)]
            os.write(self._data, data)
            self._data_end += len(data)
        os.write(self._ops, (json.dumps({"op": op, **fields}) + "\n").encode())

    def _enter(self, counted: bool = True) -> None:
        """Take the lock and count one journaled operation; freeze for ever at the one to
        hold at, and every call after it."""
        self._lock.acquire()
        if self._frozen.is_set():
            self._lock.release()
            threading.Event().wait()
        if not counted:
            return
        self._count += 1
        if self._count == self._hold_at:
            self._frozen.set()
            try:
                (self.folder / "held").write_text(str(self._count))
            finally:
                self._lock.release()
            threading.Event().wait()

    def _run(self, op: str, action: Any, data: bytes | None = None, *, counted: bool = True,
             handle: bool = False, journaled: bool = True, **fields: Any) -> Any:
        """Perform `action` and journal it; with `handle`, its result is the file handle."""
        self._enter(counted)
        try:
            result = action()
            if handle:
                fields["fh"] = result
            if journaled:
                self._record(op, data, **fields)
            return result
        except OSError as err:
            raise fuse.FuseOSError(err.errno or errno.EIO) from None
        finally:
            self._lock.release()

    def _sized(self, before: int, after: int, action: Any) -> Any:
        """Do `action`, which makes a file of `before` bytes `after` bytes long, if the
        disk has room for it (ENOSPC if not); count the difference."""
        growth = after - before
        if self._capacity and growth > 0 and self._used + growth > self._capacity:
            raise OSError(errno.ENOSPC, "full")
        result = action()
        self._used += growth
        return result

    def _drop_name(self, path: str) -> None:
        """A name of a file goes: its bytes stop counting once no handle holds it."""
        info = os.lstat(self._real(path))
        if info.st_nlink > 1 or stat.S_ISDIR(info.st_mode):
            return
        holders = [fh for fh, (ino, _) in self._open.items() if ino == info.st_ino]
        if holders:
            for fh in holders:
                self._open[fh] = (info.st_ino, True)
        else:
            self._used -= info.st_size

    def _real(self, path: str) -> str:
        return self.root + path

    # -- reading --------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path.startswith(f"/{MARKS}/"):
            self._run("mark", lambda: None, counted=False, label=path[len(MARKS) + 2:])
            raise fuse.FuseOSError(errno.ENOENT)
        if path == f"/{MARKS}":
            path = "/"  # a folder to look names up in, never listed
        try:
            info = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        except OSError as err:
            raise fuse.FuseOSError(err.errno or errno.EIO) from None
        return {key: getattr(info, key) for key in (
            "st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns",
            "st_mtime_ns", "st_ctime_ns", "st_blocks")} | {
            "st_atime": info.st_atime_ns, "st_mtime": info.st_mtime_ns,
            "st_ctime": info.st_ctime_ns}

    def readdir(self, path: str, fh: int) -> list[str]:
        try:
            return [".", "..", *os.listdir(self._real(path))]
        except OSError as err:
            raise fuse.FuseOSError(err.errno or errno.EIO) from None

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def statfs(self, path: str) -> dict[str, int]:
        info = os.statvfs(self.root)
        answer = {key: getattr(info, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}
        if self._capacity:  # a small disk says so, as a full one would
            with self._lock:
                free = max(0, self._capacity - self._used)
            answer["f_blocks"] = self._capacity // info.f_frsize
            answer["f_bfree"] = answer["f_bavail"] = free // info.f_frsize
        return answer

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    # -- files ----------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        # Opening changes nothing a power cut could keep (a truncation on open is journaled
        # on its own); the journal names the handle so that writes through it stay tied to
        # the file after a rename or an unlink of its name.
        fd = int(self._run("open", lambda: self._opened(os.open(
            self._real(path), flags & ~os.O_TRUNC)), counted=False, handle=True, path=path))
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fd)
        return fd

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return int(self._run("create", lambda: self._opened(os.open(
            self._real(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)), handle=True,
            path=path))

    def _opened(self, fd: int) -> int:
        self._open[fd] = (os.fstat(fd).st_ino, False)
        return fd

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        def action() -> int:
            size = os.fstat(fh).st_size
            return int(self._sized(size, max(size, offset + len(data)),
                                   lambda: os.pwrite(fh, data, offset)))
        return int(self._run("write", action, data, fh=fh, offset=offset))

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is None and path is None:
            raise fuse.FuseOSError(errno.EBADF)

        def action() -> None:
            size = os.fstat(fh).st_size if fh is not None else os.lstat(self._real(path)).st_size
            self._sized(size, length, lambda: os.ftruncate(fh, length) if fh is not None
                        else os.truncate(self._real(path), length))
        self._run("truncate", action, fh=fh, path=path if fh is None else None, size=length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        if mode:
            raise fuse.FuseOSError(errno.EOPNOTSUPP)  # only the plain kind is carried

        def action() -> None:
            before = os.fstat(fh).st_size
            self._sized(before, max(before, offset + size),
                        lambda: os.posix_fallocate(fh, offset, size))
        self._run("fallocate", action, fh=fh, offset=offset, length=size)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._run("fsync", lambda: os.fsync(fh), fh=fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        def action() -> None:
            inode, orphan = self._open.pop(fh, (0, False))
            if orphan and not any(other == inode for other, _ in self._open.values()):
                self._used -= os.fstat(fh).st_size
            os.close(fh)
        self._run("release", action, counted=False, fh=fh)
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        # Times and modes are not journaled (arraysnap relies on neither), but a frozen
        # file system changes nothing.
        self._run("utimens", lambda: os.utime(self._real(path), ns=times), counted=False,
                  journaled=False)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._run("chmod", lambda: os.chmod(self._real(path), mode), counted=False,
                  journaled=False)
        return 0

    # -- names ----------------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> int:
        self._run("mkdir", lambda: os.mkdir(self._real(path), mode), path=path)
        return 0

    def rmdir(self, path: str) -> int:
        self._run("rmdir", lambda: os.rmdir(self._real(path)), path=path)
        return 0

    def unlink(self, path: str) -> int:
        def action() -> None:
            self._drop_name(path)
            os.unlink(self._real(path))
        self._run("unlink", action, path=path)
        return 0

    def rename(self, old: str, new: str) -> int:
        def action() -> None:
            if os.path.lexists(self._real(new)):
                self._drop_name(new)
            os.rename(self._real(old), self._real(new))
        self._run("rename", action, old=old, new=new)
        return 0

    def symlink(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(errno.EPERM)  # arraysnap never makes one; nor does this

    def link(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(errno.EPERM)

    def opendir(self, path: str) -> int:
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        def action() -> None:
            fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._run("fsyncdir", action, path=path)
        return 0


class _Mount(fuse.FUSE):
    """mfusepy's FUSE, passing the handle of a truncation and refusing rename flags
    (libfuse 3 gives both; mfusepy 3.1 drops them)."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return int(self.operations.truncate(
            None if path is None else path.decode(self.encoding, self.errors), length, fh))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:  # RENAME_NOREPLACE, RENAME_EXCHANGE: not carried
            return -errno.EINVAL
        return int(self.rename_fuse_2(old, new))


def _files(root: str) -> list[os.DirEntry[str]]:
    found, pending = [], [root]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    found.append(entry)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arraysnap.testing._forgetting")
    parser.add_argument("backing")
    parser.add_argument("mount")
    parser.add_argument("journal")
    parser.add_argument("--hold-at", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=0)
    args = parser.parse_args(argv)
    operations = Journaling(args.backing, args.journal, args.hold_at, args.capacity)
    # hard_remove: an unlinked open file goes at once (no ".fuse_hidden" renames);
    # default_permissions: the kernel checks modes, as a local file system does.
    _Mount(operations, args.mount, foreground=True, hard_remove=True,
              default_permissions=True, fsname="arraysnap-forgetting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
