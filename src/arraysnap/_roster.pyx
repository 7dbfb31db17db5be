# cython: language_level=3, boundscheck=False, wraparound=False
"""Roster kernel: which arrays of a capture lie in memory exactly as the last capture saw them.

Private; `arraysnap._store.roster` validates arguments and is the only caller. A pause over
thousands of arrays cannot afford a Python check per array; this one reads the few fields
of each ndarray it needs (data pointer, dimensions, strides, dtype) in C.
"""

cimport numpy as cnp
from cpython.dict cimport PyDict_Next
from cpython.object cimport PyObject

cnp.import_array()

# Arrays of more dimensions are never vouched for (the pause checks them one by one).
cdef enum:
    _MAX_DIMS = 8
MAX_DIMS = _MAX_DIMS


def describe(list values, long long[::1] addresses, long long[:, ::1] dims,
             long long[:, ::1] strides, signed char[::1] ndims, list descrs):
    """Record each of `values`: exact ndarrays of at most MAX_DIMS dimensions get their data
    address, dimensions, strides and dtype; anything else gets ``ndims = -1`` (never
    matched). `descrs` is appended to, one entry per value."""
    cdef Py_ssize_t i, d, nd
    cdef cnp.ndarray array
    for i in range(len(values)):
        value = values[i]
        if not cnp.PyArray_CheckExact(value) or cnp.PyArray_NDIM(<cnp.ndarray>value) > _MAX_DIMS:
            ndims[i] = -1
            descrs.append(None)
            continue
        array = <cnp.ndarray>value
        nd = cnp.PyArray_NDIM(array)
        ndims[i] = <signed char>nd
        addresses[i] = <long long>cnp.PyArray_DATA(array)
        for d in range(nd):
            dims[i, d] = cnp.PyArray_DIMS(array)[d]
            strides[i, d] = cnp.PyArray_STRIDES(array)[d]
        descrs.append(<object>cnp.PyArray_DESCR(array))


def match(dict arrays, list names, list descrs, const long long[::1] addresses,
          const long long[:, ::1] dims, const long long[:, ::1] strides,
          const signed char[::1] ndims, unsigned char[::1] matched, list values):
    """Compare the items of `arrays`, in order, with the recorded ones: ``matched[i]`` is 2
    where item ``i`` has the recorded name and is an exact ndarray at the recorded address
    with the recorded dimensions, strides and dtype; 1 where only the name is the recorded
    one; 0 where the name differs. Appends each value to `values`; returns the count of 2s.
    The caller checks that `arrays` has as many items as were recorded."""
    cdef Py_ssize_t position = 0
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t d, nd
    cdef Py_ssize_t count = 0
    cdef PyObject *key
    cdef PyObject *value
    cdef cnp.ndarray array
    cdef bint same
    cdef Py_ssize_t n = len(names)
    while PyDict_Next(arrays, &position, &key, &value) and i < n:
        item = <object>value
        values.append(item)
        name = <object>key
        recorded = names[i]
        if not (name is recorded or (type(name) is str and name == recorded)):
            matched[i] = 0
            i += 1
            continue
        same = False
        nd = ndims[i]
        if nd >= 0 and cnp.PyArray_CheckExact(item):
            array = <cnp.ndarray>item
            same = (cnp.PyArray_NDIM(array) == nd
                    and <long long>cnp.PyArray_DATA(array) == addresses[i])
            d = 0
            while same and d < nd:
                same = (cnp.PyArray_DIMS(array)[d] == dims[i, d]
                        and cnp.PyArray_STRIDES(array)[d] == strides[i, d])
                d += 1
            if same:
                descr = <object>cnp.PyArray_DESCR(array)
                same = descr is descrs[i] or descr == descrs[i]
        matched[i] = 2 if same else 1
        count += same
        i += 1
    return count
