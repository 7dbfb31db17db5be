# cython: language_level=3, boundscheck=False, wraparound=False
"""Memory maps of files that keep no file descriptor open.

Private; `arraysnap.mapping` validates arguments and is the only caller. Python's
``mmap.mmap`` keeps a duplicate of the file's descriptor for as long as the map lives (3.13
can opt out, 3.11 and 3.12 cannot), so a store handing out thousands of maps would hold
thousands of descriptors. A `FileMap` is unmapped when its last reference goes: arrays
made with ``np.frombuffer(file_map)`` keep it alive.
"""

from cpython.buffer cimport PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from posix.mman cimport (MAP_FAILED, MAP_PRIVATE, MAP_SHARED, MS_SYNC, PROT_READ, PROT_WRITE,
                         madvise, mmap, msync, munmap)
from posix.types cimport off_t

# Linux 5.14: fault pages in writable, as if each were written, without changing them. On a
# private map of a file that is the copy-on-write copy of every page in the range.
cdef int MADV_POPULATE_WRITE = 23


cdef class FileMap:
    """A readable and writable map of ``length`` bytes of a file from ``offset``."""

    cdef char *_address
    cdef Py_ssize_t _length
    cdef readonly bint shared
    cdef object __weakref__

    def __cinit__(self, int fd, Py_ssize_t length, off_t offset, bint shared):
        self._address = NULL
        self._length = length
        self.shared = shared
        cdef void *address = mmap(NULL, length, PROT_READ | PROT_WRITE,
                                  MAP_SHARED if shared else MAP_PRIVATE, fd, offset)
        if address == MAP_FAILED:
            raise OSError(errno, "mmap failed")
        self._address = <char *>address

    def __dealloc__(self):
        if self._address != NULL:
            munmap(self._address, self._length)
            self._address = NULL

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._address, self._length, 0, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __len__(self):
        return self._length

    @property
    def address(self):
        """The address of the first mapped byte."""
        return <uintptr_t>self._address

    def flush(self, Py_ssize_t start, Py_ssize_t length):
        """Write the pages of ``[start, start + length)`` to the file and wait (msync)."""
        cdef int result
        with nogil:
            result = msync(self._address + start, length, MS_SYNC)
        if result != 0:
            raise OSError(errno, "msync failed")

    def populate_write(self, Py_ssize_t start, Py_ssize_t length):
        """Fault ``[start, start + length)`` in as written, without changing a byte; returns
        0, or the errno (EINVAL: the kernel has no MADV_POPULATE_WRITE)."""
        cdef int result
        with nogil:
            result = madvise(self._address + start, length, MADV_POPULATE_WRITE)
        return 0 if result == 0 else errno
