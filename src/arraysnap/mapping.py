"""Memory maps of files that hold no file descriptor, and copy-on-write preservation.

The thin, validating wrapper around the private Cython module ``arraysnap._mapping``:
descriptors are opened, used and closed here, so a store keeps a bounded number of them
open however many arrays it maps (Python's ``mmap`` keeps one per map). `preserve` makes
a private map keep its current bytes in a range whatever later happens to the file.

>>> import os, tempfile
>>> fd, name = tempfile.mkstemp()
>>> os.write(fd, b"abcd" * 1024); os.close(fd)
4096
>>> private = map_file(name, 4096, shared=False)
>>> preserve(private, 0, 4096)       # from now on a copy of its own
True
>>> with open(name, "r+b") as handle:
...     _ = handle.write(b"XXXX")
>>> bytes(memoryview(private)[:4]), open(name, "rb").read(4)
(b'abcd', b'XXXX')
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from ._mapping import FileMap

__all__ = ["PAGE", "FileMap", "map_file", "preserve", "preserving_supported", "sync"]

PAGE = mmap.PAGESIZE


def map_file(path: Path | str, length: int, *, offset: int = 0, shared: bool,
             writable_file: bool | None = None) -> FileMap:
    """Map `length` bytes of the file at `path` from `offset` (a multiple of the page size),
    shared (writes go to the file) or private (copy-on-write); no descriptor stays open.

    A link in place of the file is refused (``O_NOFOLLOW``): a store maps its own files only.
    """
    if length <= 0:
        raise ValueError(f"cannot map {length} bytes; give a positive length")
    if offset < 0 or offset % PAGE:
        raise ValueError(f"offset {offset} is not a non-negative multiple of {PAGE}")
    writable = shared if writable_file is None else writable_file
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        return map_fd(fd, length, offset=offset, shared=shared)
    finally:
        os.close(fd)


def map_fd(fd: int, length: int, *, offset: int = 0, shared: bool) -> FileMap:
    """Map `length` bytes of open file `fd`; the map does not keep `fd` (close it when done).

    >>> import tempfile
    >>> with tempfile.TemporaryFile() as handle:
    ...     os.posix_fallocate(handle.fileno(), 0, 8192)
    ...     shared = map_fd(handle.fileno(), 8192, shared=True)
    >>> np.frombuffer(shared, dtype=np.uint8).sum()     # the file lives while mapped
    np.uint64(0)
    """
    if length <= 0:
        raise ValueError(f"cannot map {length} bytes; give a positive length")
    if offset < 0 or offset % PAGE:
        raise ValueError(f"offset {offset} is not a non-negative multiple of {PAGE}")
    return FileMap(fd, length, offset, shared)


def _page_range(file_map: FileMap, start: int, stop: int) -> tuple[int, int]:
    low = max(0, start // PAGE * PAGE)
    high = min(len(file_map), -(-stop // PAGE) * PAGE)
    return low, high


def preserve(file_map: FileMap, start: int, stop: int) -> bool:
    """Give private map `file_map` its own copy of the pages holding bytes ``[start, stop)``,
    so that later writes to the file no longer show there; False if this kernel cannot
    (MADV_POPULATE_WRITE is Linux 5.14+) and nothing was done.

    Unlike writing the bytes back, it cannot lose a write another thread makes meanwhile.
    """
    if file_map.shared:
        raise ValueError("preserve() is for private maps; a shared map is the file")
    low, high = _page_range(file_map, start, stop)
    if high <= low:
        return True
    result = file_map.populate_write(low, high - low)
    if result in (errno.EINVAL, errno.ENOSYS):
        return False
    if result:
        raise OSError(result, os.strerror(result))
    return True


def sync(file_map: FileMap, start: int, stop: int) -> None:
    """Write the pages of shared map `file_map` holding ``[start, stop)`` to disk (msync).

    >>> import tempfile
    >>> with tempfile.TemporaryFile() as handle:
    ...     os.posix_fallocate(handle.fileno(), 0, PAGE)
    ...     shared = map_fd(handle.fileno(), PAGE, shared=True)
    >>> memoryview(shared)[:2] = b"ok"; sync(shared, 0, 2)
    """
    low, high = _page_range(file_map, start, stop)
    if high > low:
        file_map.flush(low, high - low)


def _probe() -> bool:
    """Whether this kernel supports `preserve` (probed once, on an anonymous page)."""
    anonymous = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE)
    try:
        view = np.frombuffer(anonymous, dtype=np.uint8)
        address = view.ctypes.data
        del view
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.madvise(ctypes.c_void_p(address), PAGE, 23) == 0
    except (OSError, AttributeError):
        return False
    finally:
        anonymous.close()


_SUPPORTED: bool | None = None


def preserving_supported() -> bool:
    """Whether `preserve` works on this kernel.

    >>> preserving_supported() in (True, False)
    True
    """
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = _probe()
    return _SUPPORTED
