"""The failure policy: what a store does when it cannot be written (``on_error=``).

``"raise"`` raises the failure from the next call that can (``capture``, ``wait``,
``close``); ``"warn"`` lets the run go on (the changes stay pending for the next capture)
and warns once per kind of failure, logging the rest.

>>> import warnings
>>> policy = FailurePolicy("warn", "run.snap")
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     policy.handle(OSError(5, "Input/output error"), "a capture failed")
...     policy.handle(OSError(5, "Input/output error"), "a capture failed")
>>> len(caught)
1
>>> FailurePolicy("raise", "run.snap").handle(OSError(28, "No space left"), "capture failed")
Traceback (most recent call last):
...
arraysnap.errors.StoreWriteError: [Errno 28] capture failed: No space left
"""

from __future__ import annotations

import errno
import threading
import warnings

from ..errors import ArraysnapError, ArraysnapWarning, StoreWriteError

__all__ = ["FailurePolicy", "failure_kind", "parse_on_error", "wrap"]


def parse_on_error(on_error: object) -> str:
    """`on_error` if it is one of the policies, else ValueError.

    >>> parse_on_error("warn")
    'warn'
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def failure_kind(error: BaseException) -> tuple[str, BaseException]:
    """What kind of failure `error` is, for warning once per kind, and its cause: the
    OSError it was raised from, if any (its type and errno), else its own type.

    >>> failure_kind(ValueError("x"))[0], failure_kind(OSError(28, "full"))[0]
    ('ValueError', 'OSError:ENOSPC')
    """
    cause = error
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    kind = (f"{type(cause).__name__}:{errno.errorcode.get(cause.errno, cause.errno)}"
            if isinstance(cause, OSError) else type(cause).__name__)
    return kind, cause


def wrap(error: BaseException, message: str) -> ArraysnapError:
    """`error` chained under an ArraysnapError (a StoreWriteError for an OSError).

    The errno is said once, by the StoreWriteError itself:

    >>> str(wrap(OSError(28, "No space left on device", "run.snap/chunks"), "capture failed"))
    "[Errno 28] capture failed: No space left on device: 'run.snap/chunks'"
    >>> wrap(ValueError("x"), "it failed")
    ArraysnapError("it failed: ValueError('x')")
    """
    if isinstance(error, OSError):
        detail = error.strerror or str(error)
        if error.filename is not None:
            detail += f": {str(error.filename)!r}"
        wrapped: ArraysnapError = StoreWriteError(error.errno, f"{message}: {detail}")
    else:
        wrapped = ArraysnapError(f"{message}: {error!r}")
    wrapped.__cause__ = error
    return wrapped


class FailurePolicy:
    """Raise or warn about failures to write the store `where`; see the module doc."""

    def __init__(self, on_error: str, where: str) -> None:
        self.on_error = parse_on_error(on_error)
        self.where = where
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def warns(self) -> bool:
        return self.on_error == "warn"

    def handle(self, error: BaseException, message: str) -> None:
        """Raise `error` (wrapped under `message`), or warn about it once per kind."""
        if not self.warns:
            raise wrap(error, message)
        self.warn_once(error)

    def warn_once(self, error: BaseException) -> None:
        kind, cause = failure_kind(error)
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        warnings.warn(
            f"arraysnap: {self.where} cannot be written ({cause}); the run goes on and the "
            "changes stay pending for the next capture (on_error='warn'). Further failures "
            "of this kind are logged, not warned", ArraysnapWarning, stacklevel=5)
