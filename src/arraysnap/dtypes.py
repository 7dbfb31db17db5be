"""Dtypes as a store records them: the JSON form of the ``.npy`` header's ``descr``.

Exact for byte order, padding and structured fields, and never an object dtype: a stored
dtype is data, read without executing anything.

>>> dtype_from_json(dtype_to_json(np.dtype([("x", "<f4"), ("n", ">i2")]))).names
('x', 'n')
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dtype_from_json", "dtype_to_json"]


def dtype_to_json(dtype: np.dtype) -> Any:
    """The JSON form of a dtype (the .npy ``descr``), exact for byte order and padding.

    >>> dtype_to_json(np.dtype(">i2")), dtype_to_json(np.dtype([("a", "u1")]))
    ('>i2', [['a', '|u1']])
    """
    descr = np.lib.format.dtype_to_descr(dtype)
    return descr if isinstance(descr, str) else _lists(descr)


def _lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _tuples(value: Any, depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("dtype description nested too deeply")
    if isinstance(value, list):
        return [tuple(_tuples(v, depth + 1) for v in field) if isinstance(field, list) else field
                for field in value]
    return value


def dtype_from_json(value: Any) -> np.dtype:
    """Parse a stored dtype, refusing object dtypes and anything malformed.

    >>> dtype_from_json("<f8")
    dtype('float64')
    """
    if not isinstance(value, (str, list)):
        raise ValueError(f"dtype must be a string or a list, got {type(value).__name__}")
    try:
        dtype = np.lib.format.descr_to_dtype(_tuples(value))
    except (TypeError, ValueError, KeyError, IndexError, SyntaxError, RecursionError) as err:
        raise ValueError(f"invalid dtype {str(value)[:80]!r}: {err}") from None
    if dtype.hasobject:
        raise ValueError("object dtypes cannot be stored")
    return dtype
