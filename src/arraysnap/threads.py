"""The threads arraysnap runs beside the program: how nice they are, and when they start.

Every background thread (a store's pool, the engine's reader, object writers and committer)
runs at a lower priority than the program's own, and is started when its store opens,
not lazily at its first busy moment.

>>> lower_thread_priority()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["BACKGROUND_NICENESS", "lower_thread_priority", "start_workers"]

log = logging.getLogger("arraysnap")

# How much nicer than the program's own threads arraysnap's threads run (Linux).
BACKGROUND_NICENESS = 10


def start_workers(executor: ThreadPoolExecutor, count: int, timeout: float = 10.0) -> None:
    """Make `executor` start `count` worker threads now, not at its first busy moment.

    Each of `count` tasks waits until all have started, so they run on `count` threads; an
    executor never starts more than its ``max_workers``, so later work needs no new thread.

    >>> pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="doctest-pool")
    >>> start_workers(pool, 3)
    >>> sum(t.name.startswith("doctest-pool") for t in threading.enumerate())
    3
    >>> pool.shutdown()
    """
    barrier = threading.Barrier(count + 1, timeout=timeout)

    def arrive() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # a thread that could not start: that executor starts it when it can

    for _ in range(count):
        executor.submit(arrive)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        log.warning("arraysnap: not every background thread started within %.0f s", timeout)


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the program's own threads.

    Hashing, encoding and writing run while the program computes; on a machine whose cores
    the program keeps busy they would otherwise take their share of its time. At niceness
    +10 they get about a tenth of a contended core and all of an idle one. Linux sets
    niceness per thread; elsewhere this does nothing. Never raises: a priority is a wish.

    >>> lower_thread_priority()
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        thread = threading.get_native_id()
        # Relative to the main thread's (its id is the process id), not to whichever of our
        # threads started this one: threads inherit their creator's niceness.
        wanted = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICENESS)
        if os.getpriority(os.PRIO_PROCESS, thread) < wanted:
            os.setpriority(os.PRIO_PROCESS, thread, wanted)
    except OSError:
        pass
