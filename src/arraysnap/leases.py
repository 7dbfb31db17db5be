"""Leases on baseline files: who may update a file in place, and who holds maps of it.

A map handed out of a baseline file is copy-on-write, but on Linux a private map still
shows later writes to the pages it has not copied. So a writer updates a file in place
only while no other process (or other store) holds a map of it. Each file has a lock byte
in the one file ``<store>/mirror/leases``; the byte's offset is a hash of the file's name:

- a reader holds a shared (read) lock on the byte for as long as its maps of the file live;
- a writer takes an exclusive (write) lock on it before it updates the file in place, and
  keeps it until its capture commits; when it cannot, someone holds a map, and the writer
  moves what it must change elsewhere instead.

The locks are Linux open-file-description locks (``F_OFD_SETLK``): one descriptor holds
any number of them, so a process keeps one descriptor per store however many files it has
mapped, and they are released when that descriptor closes (a killed process holds none).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "leases"
>>> writer, reader = LockFile(path, writable=True), LockFile(path, writable=False)
>>> reader.try_lock(7, exclusive=False), writer.try_lock(7, exclusive=True)
(True, False)
>>> reader.unlock(7); writer.try_lock(7, exclusive=True)
True
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import weakref
from pathlib import Path

import blake3

__all__ = ["LEASES", "LockFile", "ReaderLeases", "lock_byte"]

LEASES = "leases"
# struct flock on Linux x86-64 and aarch64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hh4xqqi4x"


def lock_byte(filename: str) -> int:
    """The offset of `filename`'s lock byte in the lease file.

    >>> lock_byte("s-0.bin") == lock_byte("s-0.bin") != lock_byte("s-1.bin")
    True
    """
    # 48 bits: a collision costs at most one needless copy, never a wrong result.
    return int.from_bytes(blake3.blake3(filename.encode()).digest()[:6], "little")


class LockFile:
    """One open description of a lease file, holding byte locks on it."""

    def __init__(self, path: Path, *, writable: bool) -> None:
        flags = (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY
        self.fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)

    def _set(self, kind: int, byte: int) -> bool:
        request = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def try_lock(self, byte: int, *, exclusive: bool) -> bool:
        """Lock `byte` (a shared lock converts to exclusive and back); False if another
        description holds a conflicting lock."""
        return self._set(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, byte)

    def unlock(self, byte: int) -> None:
        self._set(fcntl.F_UNLCK, byte)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Lease holders whose maps outlive their store: kept here until the last map is gone.
_keepers: set[ReaderLeases] = set()


class ReaderLeases:
    """Shared locks on baseline files, each held while any map registered for it lives.

    Outlives the store that made it when maps do: the last map's end releases the lock,
    and the last lock's release closes the descriptor.

    >>> import gc, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "leases"
    >>> leases = ReaderLeases(LockFile(path, writable=True))
    >>> class Holder: pass
    >>> holder = Holder(); leases.acquire("s-1.bin")
    True
    >>> leases.keep("s-1.bin", holder); leases.close()   # the holder has the lease now
    >>> LockFile(path, writable=True).try_lock(lock_byte("s-1.bin"), exclusive=True)
    False
    >>> del holder; _ = gc.collect()
    >>> LockFile(path, writable=True).try_lock(lock_byte("s-1.bin"), exclusive=True)
    True
    """

    def __init__(self, lock_file: LockFile) -> None:
        self._file = lock_file
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}
        self._closing = False
        _keepers.add(self)

    def acquire(self, filename: str) -> bool:
        """Take (or share) the lease of `filename`; False while a writer updates it."""
        byte = lock_byte(filename)
        with self._lock:
            if self._counts.get(byte):
                self._counts[byte] += 1
                return True
            if not self._file.try_lock(byte, exclusive=False):
                return False
            self._counts[byte] = 1
            return True

    def convert(self, filename: str) -> None:
        """Hold `filename`'s byte shared (it may be held exclusive by this description)."""
        byte = lock_byte(filename)
        with self._lock:
            if not self._counts.get(byte):
                self._file.try_lock(byte, exclusive=False)
            self._counts[byte] = self._counts.get(byte, 0) + 1

    def release(self, filename: str) -> None:
        byte = lock_byte(filename)
        with self._lock:
            count = self._counts.get(byte, 0) - 1
            if count > 0:
                self._counts[byte] = count
                return
            self._counts.pop(byte, None)
            if self._file.fd >= 0:
                self._file.unlock(byte)
            self._maybe_close()

    def keep(self, filename: str, holder: object) -> None:
        """Hold `filename`'s lease (already acquired once for it) until `holder` is gone."""
        weakref.finalize(holder, self.release, filename)

    def close(self) -> None:
        """The store is closing: the descriptor closes once no lease is held."""
        with self._lock:
            self._closing = True
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self._closing and not self._counts:
            self._file.close()
            _keepers.discard(self)
