"""The kernel side of write tracking: one userfaultfd and ``PAGEMAP_SCAN`` (Linux 6.7+).

:class:`WriteTracker` write-protects ranges of this process's memory (asynchronous mode:
the kernel resolves each first write itself, no handler thread) and lists, and protects
again, the pages written since. ``tracking.py`` decides what to track and when to trust it;
this module only speaks to the kernel, through ``ctypes`` (no compiled part, no privileges).

>>> reason = tracking_unavailable_reason()
>>> reason is None or "tracking" in reason or isinstance(reason, str)
True
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import threading
import weakref

import numpy as np

__all__ = ["PAGE", "WriteTracker", "tracking_unavailable_reason"]

log = logging.getLogger("arraysnap")

PAGE = mmap.PAGESIZE
_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "loongarch64": 282,
                        "s390x": 355, "ppc64le": 364, "ppc64": 364}


def _ioc(direction: str, kind: int, number: int, size: int) -> int:
    if platform.machine().startswith("ppc"):
        bits = {"r": 2, "w": 4, "rw": 6}[direction]
        return bits << 29 | size << 16 | kind << 8 | number
    bits = {"r": 2, "w": 1, "rw": 3}[direction]
    return bits << 30 | size << 16 | kind << 8 | number


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_UFFDIO_API = _ioc("rw", 0xAA, 0x3F, ctypes.sizeof(_Api))
_UFFDIO_REGISTER = _ioc("rw", 0xAA, 0x00, ctypes.sizeof(_Register))
_UFFDIO_UNREGISTER = _ioc("r", 0xAA, 0x01, ctypes.sizeof(_Range))
_UFFDIO_WRITEPROTECT = _ioc("rw", 0xAA, 0x06, ctypes.sizeof(_WriteProtect))
_PAGEMAP_SCAN = _ioc("rw", ord("f"), 16, ctypes.sizeof(_ScanArg))
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
_VEC_LEN = 1024


class WriteTracker:
    """One userfaultfd and the pagemap of this process: protect ranges, list written pages.

    Raises OSError when the kernel does not offer what it needs; see
    ``tracking_unavailable_reason()``.

    >>> try:
    ...     tracker = WriteTracker()
    ... except OSError:
    ...     tracker = None  # an older kernel, or not Linux
    >>> tracker is None or tracker.close() is None
    True
    """

    def __init__(self) -> None:
        number = _SYSCALL_USERFAULTFD.get(platform.machine())
        if number is None or not hasattr(os, "O_CLOEXEC"):
            raise OSError(errno.ENOSYS, f"no userfaultfd on {platform.system()} "
                                        f"{platform.machine()}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        self.pid = os.getpid()
        # User-mode-only faults are what vm.unprivileged_userfaultfd=0 still allows anyone.
        fd = self._libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"userfaultfd: {os.strerror(code)}")
        self._fd = int(fd)
        self._pagemap = -1
        # Closed with the tracker even if nobody calls close() (a store never closed).
        self._descriptors = [self._fd]
        self._finalizer = weakref.finalize(self, _close_all, self._descriptors)
        try:
            wanted = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
            api = _Api(_UFFD_API, wanted, 0)
            self._ioctl(self._fd, _UFFDIO_API, api, "UFFDIO_API (WP_ASYNC needs Linux 6.7)")
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._descriptors.append(self._pagemap)
            self._vec = (_Region * _VEC_LEN)()
            self._self_test()
        except BaseException:
            self.close()
            raise

    def _ioctl(self, fd: int, request: int, argument: ctypes.Structure, what: str) -> int:
        result = self._libc.ioctl(fd, request, ctypes.byref(argument))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")
        return int(result)

    def _self_test(self) -> None:
        """Track a scratch map and check that exactly the written page is reported."""
        scratch = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            view = np.frombuffer(scratch, dtype=np.uint8)
            start = view.ctypes.data
            self.register(start, 4 * PAGE)
            self.protect(start, 4 * PAGE)
            view[2 * PAGE + 5] = 1
            first = self.written(start, 4 * PAGE)
            second = self.written(start, 4 * PAGE)
            self.unregister(start, 4 * PAGE)
            del view
        finally:
            scratch.close()
        if first != [(2 * PAGE, 3 * PAGE)] or second != []:
            raise OSError(errno.ENOTSUP, f"PAGEMAP_SCAN self-test failed: {first}, {second}")

    def register(self, start: int, length: int) -> None:
        """Register a page-aligned range for asynchronous write protection."""
        self._ioctl(self._fd, _UFFDIO_REGISTER,
                    _Register(_Range(start, length), _UFFDIO_REGISTER_MODE_WP, 0),
                    "UFFDIO_REGISTER")

    def protect(self, start: int, length: int) -> None:
        """Write-protect a registered range: its pages count as unwritten from now on."""
        self._ioctl(self._fd, _UFFDIO_WRITEPROTECT,
                    _WriteProtect(_Range(start, length), _UFFDIO_WRITEPROTECT_MODE_WP),
                    "UFFDIO_WRITEPROTECT")

    def unprotect(self, start: int, length: int) -> None:
        """Lift write protection from a registered range: its pages count as written (every
        scan reports them, and protects them again) and writes to them no longer fault."""
        self._ioctl(self._fd, _UFFDIO_WRITEPROTECT,
                    _WriteProtect(_Range(start, length), 0), "UFFDIO_WRITEPROTECT")

    def unregister(self, start: int, length: int) -> None:
        """Stop tracking a range; quietly nothing if it is no longer mapped."""
        result = self._libc.ioctl(self._fd, _UFFDIO_UNREGISTER,
                                  ctypes.byref(_Range(start, length)))
        if result < 0:
            log.debug("arraysnap: UFFDIO_UNREGISTER: %s", os.strerror(ctypes.get_errno()))

    def written(self, start: int, length: int) -> list[tuple[int, int]]:
        """Offsets ``(first, end)`` from `start` of the runs of pages written since they were
        last protected; protects them again. Raises OSError if any page of the range is not
        under asynchronous write protection (then nothing can be trusted)."""
        runs: list[tuple[int, int]] = []
        end = start + length
        position = start
        while position < end:
            argument = _ScanArg(ctypes.sizeof(_ScanArg),
                                _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, position, end,
                                0, ctypes.addressof(self._vec), _VEC_LEN, 0, 0,
                                _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
            count = self._ioctl(self._pagemap, _PAGEMAP_SCAN, argument, "PAGEMAP_SCAN")
            for index in range(count):
                region = self._vec[index]
                runs.append((region.start - start, region.end - start))
            if argument.walk_end <= position:  # no progress: never loop for ever
                raise OSError(errno.EIO, "PAGEMAP_SCAN made no progress")
            position = argument.walk_end
        return runs

    def close(self) -> None:
        """Close the descriptors; the kernel drops every registration with the last one."""
        self._finalizer()
        self._fd = self._pagemap = -1


def _close_all(descriptors: list[int]) -> None:
    while descriptors:
        os.close(descriptors.pop())


_probe_lock = threading.Lock()
_probe_result: dict[int, str | None] = {}


def tracking_unavailable_reason() -> str | None:
    """Why write tracking cannot work in this process, or None if it can.

    >>> reason = tracking_unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    with _probe_lock:
        pid = os.getpid()
        if pid not in _probe_result:
            try:
                WriteTracker().close()
                _probe_result[pid] = None
            except (OSError, AttributeError, ValueError) as err:
                _probe_result[pid] = str(err)
        return _probe_result[pid]
