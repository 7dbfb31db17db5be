"""The arrays a ``restore()`` gives back: a mapping that makes each array's view when first
looked up (``Restored.arrays``).

>>> import arraysnap, numpy as np, tempfile
>>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
...     _ = snap.capture({"u": np.arange(3.0)}, step=1)
...     type(snap.restore().arrays).__name__
'RestoredArrays'
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

from .extents import Views

__all__ = ["RestoredArrays"]


_PENDING = object()  # in RestoredArrays._items: the view is not made yet


class RestoredArrays(MutableMapping[str, np.ndarray]):
    """The arrays of a restored snapshot by name, in the snapshot's order: a mapping that
    behaves as a dict of them, whose arrays are copy-on-write memory maps made when first
    looked up (a restore of 10,000 arrays need not make 10,000 views before it returns; a
    program may use a few). Each name gives the same array every time; its map holds the
    snapshot's bytes from the moment of the restore whenever it is first used. Setting or
    deleting names changes this mapping only, as it would a dict; ``|``, ``copy()`` and
    pickling give a dict of the arrays. ``capture()`` takes it as it takes a dict.

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.arange(3.0), "v": np.ones(2)}, step=1)
    ...     arrays = snap.restore().arrays
    >>> list(arrays), arrays["u"].tolist(), arrays["u"] is arrays["u"]
    (['u', 'v'], [0.0, 1.0, 2.0], True)
    >>> sorted(dict(arrays, w=np.zeros(1)))
    ['u', 'v', 'w']
    """

    __slots__ = ("_items", "_lock", "_views")

    def __init__(self, arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]
                 = (), /) -> None:
        # Every name, in order: its array, or _PENDING while `_views` holds its map.
        self._items: dict[str, Any] = {}
        self._views = Views()
        # Reentrant: dropping an array under it may run a finalizer that uses the mapping.
        self._lock = threading.RLock()
        self.update(arrays)

    @classmethod
    def of(cls, names: Iterable[str], views: Views) -> RestoredArrays:
        """The arrays `names` (in that order, each handed out by `views`) as a mapping that
        makes each view when first looked up; it takes `views` over."""
        arrays = cls()
        arrays._items = dict.fromkeys(names, _PENDING)
        arrays._items.update(views.made)
        views.made.clear()  # kept once, in _items; `views` holds what is pending only
        arrays._views = views
        return arrays

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._items[name]
        if value is _PENDING:
            with self._lock:  # two threads looking one name up get the same array
                value = self._items[name]
                if value is _PENDING:
                    value = self._items[name] = self._views.take(name)
        return value  # type: ignore[no-any-return]

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        with self._lock:
            self._views.drop(name)
            self._items[name] = array

    def __delitem__(self, name: str) -> None:
        with self._lock:
            del self._items[name]
            self._views.drop(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def popitem(self) -> tuple[str, np.ndarray]:
        """Remove and return the last (name, array), as a dict does."""
        with self._lock:
            if not self._items:
                raise KeyError("popitem(): the arrays are empty")
            name = next(reversed(self._items))
            array = self[name]
            del self[name]
        return name, array

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._views = Views()

    def copy(self) -> dict[str, np.ndarray]:
        """A dict of the same arrays, in order (each view made now)."""
        with self._lock:
            for name in list(self._views.pending):
                self._items[name] = self._views.take(name)
            return dict(self._items)

    # What a dict of the arrays offered besides the mapping methods: `|`, and copying or
    # pickling (to another process, say) as that dict.
    def __or__(self, other: object) -> dict[str, np.ndarray]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.copy(), **other}

    def __ror__(self, other: object) -> dict[str, np.ndarray]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.copy()}

    def __ior__(self, other: Mapping[str, np.ndarray]) -> RestoredArrays:
        self.update(other)
        return self

    def __reduce__(self) -> tuple[type, tuple[dict[str, np.ndarray]]]:
        return dict, (self.copy(),)

    def __repr__(self) -> str:
        return repr(self.copy())
