# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Delta kernel: find the chunks of a live buffer that differ from its baseline.

Private; `arraysnap.delta` validates arguments and is the only caller. The kernel trusts
its inputs completely and never raises.
"""

from libc.string cimport memcmp, memcpy


cdef Py_ssize_t _scan_and_copy(
    const unsigned char[::1] live,
    unsigned char[::1] baseline,
    Py_ssize_t segment_bytes,
    Py_ssize_t chunk_bytes,
    const unsigned char[::1] candidates,
    unsigned char[::1] changed,
    bint copy,
) noexcept nogil:
    # The buffer is a run of equal segments; each segment is cut into chunks of
    # chunk_bytes, the last one of each segment possibly shorter (a ragged edge). Chunks
    # whose candidate flag is 0 are known unwritten (write tracking) and not compared.
    cdef Py_ssize_t total = live.shape[0]
    cdef Py_ssize_t segment_start = 0
    cdef Py_ssize_t segment_end, start, length
    cdef Py_ssize_t index = 0
    cdef Py_ssize_t count = 0
    while segment_start < total:
        segment_end = segment_start + segment_bytes
        start = segment_start
        while start < segment_end:
            length = segment_end - start
            if length > chunk_bytes:
                length = chunk_bytes
            if candidates[index] and memcmp(&live[start], &baseline[start], length) != 0:
                if copy:
                    memcpy(&baseline[start], &live[start], length)
                changed[index] = 1
            if changed[index]:
                count += 1
            index += 1
            start += length
        segment_start = segment_end
    return count


def scan_and_copy(
    const unsigned char[::1] live,
    unsigned char[::1] baseline,
    Py_ssize_t segment_bytes,
    Py_ssize_t chunk_bytes,
    const unsigned char[::1] candidates,
    unsigned char[::1] changed,
    bint copy=True,
):
    """Copy every candidate chunk of `live` that differs from `baseline` into `baseline`.

    Compares chunk ``i`` only where ``candidates[i]`` is set; sets ``changed[i] = 1`` for
    each chunk that differs (flags already set stay set) and returns the number of set
    flags. With ``copy=False`` it only compares. Runs without the GIL.
    """
    cdef Py_ssize_t count
    with nogil:
        count = _scan_and_copy(live, baseline, segment_bytes, chunk_bytes, candidates,
                               changed, copy)
    return count


def compare_many(
    const long long[::1] live,
    const long long[::1] baseline,
    const long long[::1] nbytes,
    const Py_ssize_t[::1] which,
    unsigned char[::1] changed,
    bint copy=True,
):
    """For each index ``i`` in `which`: if the ``nbytes[i]`` bytes at address ``live[i]``
    differ from those at ``baseline[i]``, copy them there (unless not `copy`) and set
    ``changed[i] = 1``.

    Returns the number of arrays found changed. The addresses are raw pointers: the caller
    keeps every buffer alive and of that size. Runs without the GIL.
    """
    cdef Py_ssize_t k, i
    cdef Py_ssize_t count = 0
    with nogil:
        for k in range(which.shape[0]):
            i = which[k]
            if memcmp(<const void *>live[i], <const void *>baseline[i], nbytes[i]) != 0:
                if copy:
                    memcpy(<void *>baseline[i], <const void *>live[i], nbytes[i])
                changed[i] = 1
                count += 1
    return count
