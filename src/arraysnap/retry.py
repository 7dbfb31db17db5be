"""Retrying a storage action: transient errors with backoff, a full disk once after
freeing space.

>>> calls = []
>>> def flaky():
...     calls.append(1)
...     if len(calls) < 3:
...         raise OSError(errno.EAGAIN, "busy")
...     return "done"
>>> retry(flaky, (0.0, 0.0, 0.0), None), len(calls)
('done', 3)
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["DEFAULT_RETRY_DELAYS", "TRANSIENT_ERRNOS", "retry"]

log = logging.getLogger("arraysnap")
T = TypeVar("T")

DEFAULT_RETRY_DELAYS = (0.05, 0.2, 1.0, 3.0)
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EIO, errno.EBUSY,
                              errno.ETIMEDOUT})


def retry(action: Callable[[], T], delays: Sequence[float],
          free_space: Callable[[], int] | None, retried: Callable[[], None] | None = None) -> T:
    """Run `action`; retry it after each of `delays` (seconds) on a transient error, and once
    on ENOSPC if `free_space()` (pruning) freed any bytes (never without delays: a caller
    that wants no retries gets none). `retried()` is told of each retry."""
    remaining = iter(delays)
    pruned = free_space is None
    while True:
        try:
            return action()
        except OSError as err:
            if err.errno == errno.ENOSPC and not pruned and delays:
                pruned = True
                assert free_space is not None
                freed = free_space()
                log.warning("arraysnap: disk full; retention freed %d bytes, retrying", freed)
                if freed:
                    continue
                raise
            delay = next(remaining, None) if err.errno in TRANSIENT_ERRNOS else None
            if delay is None:
                raise
            if retried is not None:
                retried()
            log.warning("arraysnap: %r; retrying in %.2f s", err, delay)
            time.sleep(delay)
