"""Torture arraysnap: kill writers, fail their storage, corrupt their stores, cut their power.

Usage::

    python -m arraysnap.torture [--minutes M] [--seconds S] [--dir DIR] [--seed N] [--json FILE]

Runs four families of events in rotation until the time is up (default 10 minutes):

kills
    A child process captures a deterministic workload in a loop (with prune and gc now and
    then) and is SIGKILLed at a random moment, or kills itself just before or just after its
    n-th durable file operation (counted by an :class:`arraysnap.testing.FaultPlan`),
    sometimes twice in a row so that the second death lands in the first one's recovery.
    Then: the store opens, every listed snapshot verifies and restores to exactly the arrays
    of its step, no committed snapshot is missing (beyond what ``prune`` removed), the latest
    is at least the last one the child reported durable, and a further capture works.
faults
    Captures (or a prune) in this process with an :class:`arraysnap.testing.FaultPlan` that
    raises ``OSError`` EIO or ENOSPC at a random storage or file operation. Then: the failure
    was reported, committed snapshots are unchanged, and once the fault is gone the next
    capture stores every change since the last commit.
corruptions
    On a copy of the store: bit flips, truncation, deletion or swapping of chunk objects, bit
    flips in or truncation of a manifest or ``arraysnap.json``, damage to the mirror (the
    baseline files and their marker). Damage must be detected (``verify()`` names snapshot,
    array and chunk; ``restore()`` raises :class:`~arraysnap.CorruptSnapshotError`) or, for
    the mirror, repaired. Wrong data must never be returned.
power cuts
    A writer on a forgetting FUSE file system (:mod:`arraysnap.testing.powerloss`) frozen
    at a random file operation and killed; every change no fsync made durable is dropped and
    the store opened as after a reboot (with a new boot id), now and then cut again during
    that recovery, or on a full disk; and crash states of recorded runs, random mixtures of
    the changes since each file's and folder's last fsync kept and lost. Then: every
    snapshot whose ``wait()`` returned before the cut is listed and restores bit-exactly
    (the latest also with ``verify=False``), everything listed verifies, a further capture
    works. Without FUSE these events are counted as skipped.

Each store is small (a few MiB, 64 KiB chunks) and replaced by a fresh one every
``EVENTS_PER_STORE`` events. The stores live in ``--dir`` or in a new temporary folder under
the current directory (not under /tmp, which may be a tmpfs where fsync proves nothing);
they are deleted at the end unless something failed. A progress line is printed about every
30 seconds; at the end one line per count, the elapsed time, and ``N passed, M failed``
(checks). The exit code is 0 if and only if no snapshot was lost, no wrong data was
returned and no unexpected error happened.

The torture itself lives in :mod:`arraysnap.testing.torture`; this module only runs it.

>>> import arraysnap.testing.torture
>>> main is arraysnap.testing.torture.main
True
"""

import sys

from arraysnap.testing.torture import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
