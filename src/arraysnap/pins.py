"""The pins: digests that in-flight jobs rely on, shared by the engine and retention.

>>> pins = Pins(); pins.claim(b"d"), pins.claim(b"d")
(False, True)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable

__all__ = ["Pins"]


class Pins:
    """Digests that in-flight jobs rely on; deleting an object goes through here.

    A job pins a digest before it checks that the object exists, and a deletion checks the
    pin under the same lock, so either the job sees the object gone (and writes it) or the
    deletion sees the pin (and keeps it).

    >>> pins = Pins(); pins.pin([b"a"])
    >>> pins.delete_unless_pinned(b"a", print), pins.unpin([b"a"])
    (False, None)
    >>> pins.delete_unless_pinned(b"a", lambda digest: None)
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[bytes] = Counter()

    def pin(self, digests: Iterable[bytes]) -> None:
        with self._lock:
            for digest in digests:
                self._counts[digest] += 1

    def claim(self, digest: bytes) -> bool:
        """Pin `digest`; True if another in-flight chunk had pinned it already."""
        with self._lock:
            claimed = self._counts[digest] > 0
            self._counts[digest] += 1
            return claimed

    def unpin(self, digests: Iterable[bytes]) -> None:
        with self._lock:
            for digest in digests:
                self._counts[digest] -= 1
                if self._counts[digest] <= 0:
                    del self._counts[digest]

    def delete_unless_pinned(self, digest: bytes, delete: Callable[[bytes], None]) -> bool:
        """Delete `digest` unless an in-flight job relies on it; True if deleted."""
        with self._lock:
            if self._counts[digest] > 0:
                return False
            delete(digest)
            return True
