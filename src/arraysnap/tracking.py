"""Write tracking: which pages of a live array were written since the last capture.

Without it the pause compares every byte of every array with its baseline, which costs a
full pass over memory (about 80 ms a GiB here) however little changed. With it the pause
compares only the chunks on pages written since the last capture.

The mechanism is Linux's (6.7 and later, no privileges needed):

- a ``userfaultfd`` in asynchronous write-protect mode (``UFFD_FEATURE_WP_ASYNC``): the
  kernel write-protects the array's pages, and the first write to each afterwards is
  resolved by the kernel itself (no handler thread, no signal), clearing the page's
  write-protect bit;
- the ``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap`` lists the pages whose bit is clear
  (written) and protects them again, atomically, in one call.

An array of 1 MiB or more has a *watch* of its own, read chunk by chunk. Smaller arrays
(those the capture's roster compares in bulk) are tracked many at a time: ``watch_many``
registers a few *spans*, each over arrays that lie close together in memory, and
``candidates_many`` flags the arrays a written page overlaps.

A first write to a protected page costs a fault (about 2 µs here). Most programs write the
same memory again and again (a field updated every step), so the pages of the chunks a
capture found changed are *unprotected* after the comparison: the next scan reports them as
written (an unprotected page always counts as written, so nothing can be missed), protects
them, and the next comparison decides again. Memory written at every step then costs no
faults at all; memory that stops changing is protected again after one more comparison.

Writes by the kernel on the process's behalf (``read()`` into the array, ``readinto``) are
tracked as well: they fault like the process's own, and pages dropped with
``madvise(MADV_DONTNEED)`` are reported as written. What is *not* seen is memory changed
without a write through this process's page tables: a device writing into pinned pages
(RDMA, GPUDirect, io_uring registered buffers), or a shared mapping written by another
process or through ``write()``.
Shared mappings and files other than the store's own baselines are therefore never
tracked, and each capture also *audits* a slice of the chunks (a different 1/32 each time,
so all of them every 32 captures), comparing it whether written or not: if that finds a
change the tracker missed, tracking is switched off for the run and a warning says why
(that capture stores the change, so no snapshot after it misses anything). A rolling slice
costs what a full comparison every 32 captures would, without a long pause every 32nd.

Anything unexpected (an older kernel, a seccomp filter, a mapping of the wrong kind, an
overlap with another tracked array, a failed ioctl) falls back to the full comparison,
array by array; tracking only ever decides what need not be compared.

>>> tracking = Tracking("auto")
>>> tracking.active in (True, False)
True
>>> tracking.close()
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArraysnapWarning
from .layout import ChunkLayout
from .memmaps import mapping_kinds
from .writetracker import PAGE, WriteTracker, tracking_unavailable_reason

__all__ = ["AUDIT_EVERY", "MIN_TRACKED_BYTES", "Audit", "Tracking", "WriteTracker",
           "audit_slice", "check_track_writes", "tracking_unavailable_reason"]

log = logging.getLogger("arraysnap")

# Smaller arrays get no watch of their own (a watch costs an ioctl and a mapping split):
# spans (`watch_many`) track them many at a time.
MIN_TRACKED_BYTES = 1 << 20
MAX_WATCHES = 4096
# Small arrays closer than this in memory share a span: one registration and one scan.
SPAN_GAP = 64 << 10
MAX_SPANS = 1024
# Each tracked capture of an array audits a different 1/AUDIT_EVERY of its chunks.
AUDIT_EVERY = 32

@dataclass(slots=True, eq=False)
class _Watch:
    """One tracked array: the memory it occupies, how it is laid out, and its chunks.

    A watch follows memory, not an object: whatever array object lies over exactly this
    memory, laid out the same way, is fully described by the pages written in it. (No
    weak reference either: NumPy refuses to ``resize`` an array that has one.)
    """

    address: int
    nbytes: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    layout: ChunkLayout
    start: int  # first whole page inside the buffer
    end: int  # end of the last whole page inside the buffer
    chunk_starts: np.ndarray
    edge_chunks: np.ndarray  # flags of chunks on partial first/last pages: always compared
    previous: np.ndarray | None = None  # the last capture's written chunks
    captures: int = 0

    def matches(self, array: np.ndarray, layout: ChunkLayout) -> bool:
        return (array.ctypes.data == self.address and array.nbytes == self.nbytes
                and array.shape == self.shape and array.strides == self.strides
                and array.dtype == self.dtype and layout == self.layout)


# Every watched range in this process, whichever store watches it: PAGEMAP_SCAN is not tied
# to a userfaultfd, so one store scanning another's range would consume its written pages.
_ranges_lock = threading.Lock()
_watched_ranges: dict[int, tuple[int, int]] = {}


def _claim_range(owner: object, low: int, high: int) -> bool:
    with _ranges_lock:
        if any(low < end and start < high for start, end in _watched_ranges.values()):
            return False
        _watched_ranges[id(owner)] = (low, high)
        return True


def _release_range(owner: object) -> None:
    with _ranges_lock:
        _watched_ranges.pop(id(owner), None)


def _track_range(tracker: WriteTracker, owner: object, low: int, high: int,
                 what: str) -> bool:
    """Claim ``[low, high)`` for `owner` (a watch or a span), register it and protect it;
    False, with nothing left claimed or registered, where any step fails."""
    if not _claim_range(owner, low, high):
        return False  # views of one buffer: scanning one would re-protect the other's pages
    try:
        tracker.register(low, high - low)
    except OSError as err:  # EBUSY: registered by a userfaultfd outside this store
        log.debug("arraysnap: %s not tracked: %s", what, err)
        _release_range(owner)
        return False
    try:
        tracker.protect(low, high - low)
    except OSError as err:
        log.debug("arraysnap: %s not tracked: %s", what, err)
        tracker.unregister(low, high - low)
        _release_range(owner)
        return False
    return True


@dataclass(slots=True, eq=False)
class _Span:
    """One registered range of memory holding many small arrays (a roster's)."""

    start: int
    end: int


@dataclass(slots=True, eq=False)
class _Spans:
    """The spans over a roster's small arrays and what the last scan found written."""

    spans: list[_Span]
    lows: np.ndarray  # the spans' starts, sorted
    highs: np.ndarray
    previous: np.ndarray | None = None  # the last capture's written arrays
    captures: int = 0

    def inside(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """uint8 flags of the byte ranges that lie wholly inside one span."""
        index = np.searchsorted(self.lows, starts, side="right") - 1
        valid = index >= 0
        clipped = np.where(valid, index, 0)
        return (valid & (ends <= self.highs[clipped]) & (ends > starts)).astype(np.uint8)


def _ranges_hit(starts: np.ndarray, ends: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """uint8 flags of the byte ranges ``[starts[i], ends[i])`` that overlap any of `runs`
    (sorted, disjoint ``[first, end)`` rows): the last run that begins before a range ends
    is the one that reaches furthest."""
    if not len(runs):
        return np.zeros(len(starts), dtype=np.uint8)
    index = np.searchsorted(runs[:, 0], ends, side="left") - 1
    valid = index >= 0
    return (valid & (runs[np.where(valid, index, 0), 1] > starts)).astype(np.uint8)


def _clusters(starts: np.ndarray, ends: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Page-aligned ranges covering the byte ranges, one per group of ranges at most `gap`
    bytes apart."""
    order = np.argsort(starts, kind="stable")
    low, reach = starts[order], np.maximum.accumulate(ends[order])
    breaks = np.flatnonzero(low[1:] > reach[:-1] + gap) + 1
    firsts = low[np.concatenate(([0], breaks))] // PAGE * PAGE
    lasts = -(-reach[np.concatenate((breaks - 1, [len(low) - 1]))] // PAGE) * PAGE
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def _chunk_starts(layout: ChunkLayout) -> np.ndarray:
    index = np.arange(layout.n_chunks, dtype=np.int64)
    segment, within = np.divmod(index, layout.chunks_per_segment)
    return segment * layout.segment_bytes + within * layout.chunk_bytes


def _chunks_of(starts: np.ndarray, n_chunks: int, runs: np.ndarray) -> np.ndarray:
    """Flags of the chunks that overlap any byte run ``[first, end)`` (chunks tile the
    buffer in index order, so each run covers a contiguous band of chunk indices)."""
    flags = np.zeros(n_chunks + 1, dtype=np.int64)
    if len(runs):
        first = np.searchsorted(starts, runs[:, 0], side="right") - 1
        last = np.searchsorted(starts, runs[:, 1] - 1, side="right") - 1
        np.add.at(flags, first, 1)
        np.add.at(flags, last + 1, -1)
    return (np.cumsum(flags[:-1]) > 0).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class Audit:
    """The chunks ``[low, high)`` a capture compares whatever tracking says, and the flags
    tracking gave (`tracked`): a chunk in the slice that changed but was not flagged is a
    write tracking missed."""

    tracked: np.ndarray
    low: int
    high: int

    def missed(self, changed: np.ndarray) -> list[int]:
        """The chunk indices in `changed` that tracking should have flagged and did not."""
        indices = np.asarray(changed, dtype=np.int64)
        inside = indices[(indices >= self.low) & (indices < self.high)]
        return inside[self.tracked[inside] == 0].tolist()


def audit_slice(capture: int, n_chunks: int) -> tuple[int, int]:
    """The chunks ``[low, high)`` that tracked capture number `capture` audits: the slices of
    AUDIT_EVERY consecutive captures tile ``range(n_chunks)``.

    >>> [audit_slice(c, 64)[0] for c in range(3)], audit_slice(31, 64)
    ([0, 2, 4], (62, 64))
    """
    part = capture % AUDIT_EVERY
    return part * n_chunks // AUDIT_EVERY, (part + 1) * n_chunks // AUDIT_EVERY


def _audited(flags: np.ndarray, capture: int) -> tuple[np.ndarray, Audit]:
    """Tracking's `flags` with tracked capture number `capture`'s audit slice set too, and
    the audit that checks the comparison against them."""
    low, high = audit_slice(capture, len(flags))
    audit = Audit(flags, low, high)
    flags = flags.copy()
    flags[low:high] = 1
    return flags, audit


def _index_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted chunk indices as runs ``(first, last)`` of consecutive ones."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    firsts = np.concatenate(([indices[0]], indices[breaks + 1]))
    lasts = np.concatenate((indices[breaks], [indices[-1]]))
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def check_track_writes(mode: object) -> None:
    """Raise ValueError unless `mode` is a ``track_writes`` setting.

    >>> check_track_writes("auto")
    """
    if mode not in ("auto", True, False):
        raise ValueError(f"track_writes must be 'auto', True or False, got {mode!r}")


class Tracking:
    """A store's write tracking: a watch per captured array, audits, and the fallbacks.

    `mode` is ``"auto"`` (track where the kernel allows), ``True`` (the same, but say why
    when it cannot) or ``False`` (always compare everything). `baseline_dir` is the store's
    folder of baseline files: an array in a private map of one of them (one ``restore()``
    returned) may be tracked, no other file mapping.

    >>> import numpy as np
    >>> from arraysnap.layout import plan_layout
    >>> tracking = Tracking("auto")
    >>> u = np.zeros(1 << 18)
    >>> layout = plan_layout(u.shape, u.dtype, "C", 1 << 16)
    >>> tracking.candidates("u", u, layout, fresh=True)  # first sight: compare everything
    (None, None)
    >>> u[5] = 1.0
    >>> flags, audit = tracking.candidates("u", u, layout, fresh=False)
    >>> flags is None or flags.tolist()[:3] == [1, 0, 0]  # chunk 0 was written, 1 and 2 not
    True
    >>> tracking.close()
    """

    def __init__(self, mode: object = "auto",
                 baseline_dir: Path | None = None) -> None:
        check_track_writes(mode)
        self.mode = mode
        self._baseline_dir = None if baseline_dir is None else os.path.realpath(baseline_dir)
        self._tracker: WriteTracker | None = None
        self._watches: dict[str, _Watch] = {}
        self._spans: _Spans | None = None
        self.disabled_reason: str | None = None
        if mode is False:
            self.disabled_reason = "track_writes=False"
        else:
            self.disabled_reason = tracking_unavailable_reason()
            if self.disabled_reason is not None and mode is True:
                log.warning("arraysnap: write tracking unavailable (%s); every capture "
                            "compares all of its arrays", self.disabled_reason)

    @property
    def active(self) -> bool:
        """True while captures may compare only written chunks."""
        return self.disabled_reason is None

    def _usable_tracker(self) -> WriteTracker | None:
        """The tracker, unless this is a forked child: the kernel gave the child none of the
        parent's registrations, and an ioctl on the inherited descriptor would act on the
        *parent's* memory, so the child only closes its copies, and starts afresh."""
        tracker = self._tracker
        if tracker is not None and tracker.pid != os.getpid():
            tracker.close()
            self._tracker = None
            with _ranges_lock:  # the child's copy of the parent's registry
                _watched_ranges.clear()
            self._watches.clear()
            self._spans = None
            return None
        return tracker

    def _get_tracker(self) -> WriteTracker | None:
        if self._usable_tracker() is None and self.active:
            try:
                self._tracker = WriteTracker()
            except OSError as err:
                self.disable(str(err))
        return self._tracker

    def disable(self, reason: str) -> None:
        """Stop tracking for the rest of this store's life; compare everything from now."""
        if self.disabled_reason is None:
            self.disabled_reason = reason
        self.forget_all()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def candidates(self, name: str, live: np.ndarray, layout: ChunkLayout,
                   fresh: bool) -> tuple[np.ndarray | None, Audit | None]:
        """The chunks of `live` to compare, as uint8 flags (None: all of them), and the
        audit to check the comparison's result with (``audit()``), if any: the flags include
        the audit's slice of chunks, written or not.

        Must run before the comparison: it protects the pages again, so writes from here on
        count for the next capture.
        """
        if live.nbytes < MIN_TRACKED_BYTES and name not in self._watches:
            return None, None  # never watched (a pause over thousands of small arrays)
        tracker = self._get_tracker()
        if tracker is None:
            return None, None
        watch = self._watches.get(name)
        if watch is not None and not watch.matches(live, layout):
            self.forget(name)
            watch = None
        if watch is None:
            self._watch(tracker, name, live, layout)
            return None, None
        try:
            runs = tracker.written(watch.start, watch.end - watch.start)
        except OSError as err:
            log.info("arraysnap: write tracking of %r lost (%s); comparing it whole", name, err)
            self.forget(name)
            self._watch(tracker, name, live, layout)
            return None, None
        offset = watch.start - watch.address
        spans = np.array(runs, dtype=np.int64).reshape(-1, 2) + offset
        written = _chunks_of(watch.chunk_starts, layout.n_chunks, spans)
        # The last capture's written chunks are compared once more: a read by direct or
        # asynchronous I/O pins its pages (they count as written) when it starts, and the
        # device may fill them after that capture protected them again.
        flags = written | watch.edge_chunks
        if watch.previous is not None:
            flags |= watch.previous
        watch.previous = written
        watch.captures += 1
        if fresh:
            return None, None
        return _audited(flags, watch.captures - 1)

    # -- many small arrays: spans ----------------------------------------------------------
    def watch_many(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Track the byte ranges ``[starts[i], ends[i])`` of many small arrays (a roster's)
        with a few spans of memory, each over arrays less than SPAN_GAP apart; replaces the
        spans of an earlier call. Must run before those arrays are compared: writes from
        here on count for the next capture. Ranges in memory that may not be tracked (a
        shared or file mapping, another watch's range) stay outside every span, and
        ``candidates_many`` always flags them."""
        self.forget_many()
        if not len(starts):
            return
        tracker = self._get_tracker()
        if tracker is None:
            return
        clusters = _clusters(starts, ends, SPAN_GAP)[:MAX_SPANS]
        spans = []
        for (low, high), kind in zip(clusters, mapping_kinds(clusters, self._baseline_dir),
                                     strict=True):
            if isinstance(kind, str):
                log.debug("arraysnap: a span of small arrays not tracked: %s", kind)
                continue
            span = _Span(low, high)
            if _track_range(tracker, span, low, high, "a span of small arrays"):
                spans.append(span)
        if spans:
            self._spans = _Spans(spans, np.array([span.start for span in spans], np.int64),
                                 np.array([span.end for span in spans], np.int64))

    def candidates_many(self, starts: np.ndarray,
                        ends: np.ndarray) -> tuple[np.ndarray | None, Audit | None]:
        """The ranges of ``watch_many`` (the same arrays, in the same order; an array that
        moved has its new range) to compare, as uint8 flags (None: all of them), and the
        audit to check the comparison with (``audit_many``): written since the last call,
        written before it (compared once more, as in ``candidates``), outside every span, or
        in the audit's rolling slice of the arrays. Protects the written pages again."""
        spans = self._spans
        tracker = self._usable_tracker()
        if spans is None or tracker is None:
            return None, None
        try:
            runs = [(span.start + first, span.start + end) for span in spans.spans
                    for first, end in tracker.written(span.start, span.end - span.start)]
        except OSError as err:
            log.info("arraysnap: write tracking of small arrays lost (%s); comparing them "
                     "all", err)
            self.forget_many()
            return None, None
        written = _ranges_hit(starts, ends, np.array(runs, dtype=np.int64).reshape(-1, 2))
        flags = written | (1 - spans.inside(starts, ends))
        if spans.previous is not None and len(spans.previous) == len(flags):
            flags |= spans.previous
        spans.previous = written
        spans.captures += 1
        return _audited(flags, spans.captures - 1)

    def audit_many(self, names: list[str], audit: Audit, changed: np.ndarray) -> None:
        """``audit`` for the arrays of ``candidates_many``: `changed` holds the positions of
        the arrays found changed, `names` names every position."""
        missed = audit.missed(changed)
        if missed:
            self._missed(f"array {names[missed[0]]!r} changed (and {len(missed) - 1} more "
                         "small arrays) though write tracking did not see it written")

    def unprotect_many(self, starts: np.ndarray, ends: np.ndarray,
                       changed: np.ndarray) -> None:
        """``unprotect_changed`` for the arrays of ``candidates_many`` at positions
        `changed`: their pages stay writable until the next scan."""
        spans = self._spans
        tracker = self._usable_tracker()
        if spans is None or tracker is None or not len(changed):
            return
        low, high = starts[changed], ends[changed]
        inside = spans.inside(low, high).astype(bool)
        if not inside.any():
            return
        low = low[inside] // PAGE * PAGE
        high = -(-high[inside] // PAGE) * PAGE
        try:  # one call per run of adjacent pages
            for first, end in _clusters(low, high, 0):
                tracker.unprotect(first, end - first)
        except OSError as err:  # still correct: the pages stay protected, writes fault
            log.debug("arraysnap: could not unprotect small arrays: %s", err)

    def forget_many(self) -> None:
        """Drop the spans of ``watch_many``."""
        spans, self._spans = self._spans, None
        if spans is None:
            return
        tracker = self._usable_tracker()
        for span in spans.spans:
            if tracker is not None:
                tracker.unregister(span.start, span.end - span.start)
            _release_range(span)

    # -- audits ----------------------------------------------------------------------------
    def audit(self, name: str, audit: Audit, changed: np.ndarray) -> None:
        """Check a comparison's `changed` chunk indices against what tracking said in the
        audited slice; a change it missed switches tracking off (with a warning)."""
        missed = audit.missed(changed)
        if missed:
            self._missed(f"array {name!r} changed in {len(missed)} chunks (first: "
                         f"{missed[:5]}) that write tracking did not see written")

    def _missed(self, reason: str) -> None:
        self.disable(reason)  # first: the warning may be turned into an error
        warnings.warn(
            f"arraysnap: {reason}. Something fills it without writing through this "
            "process's page tables: a device writing into pinned memory (RDMA, "
            "GPUDirect), or direct or asynchronous I/O (O_DIRECT, AIO, io_uring) still "
            "in flight across two captures. Tracking is off for the rest of the run and "
            "every capture compares everything; this capture stored the change. Pass "
            "open(..., track_writes=False) to skip tracking for this program",
            ArraysnapWarning, stacklevel=5)

    def unprotect_changed(self, name: str, changed: np.ndarray) -> None:
        """After a comparison found `changed` (chunk indices) in `name`: leave those chunks'
        pages writable, so that writing them again before the next capture costs no faults.

        Safe whatever happens: an unprotected page is reported written by the next scan.
        """
        watch = self._watches.get(name)
        if watch is None or not len(changed):
            return
        tracker = self._usable_tracker()
        if tracker is None:
            return
        try:
            for first, last in _index_runs(np.asarray(changed, dtype=np.int64)):
                low = watch.address + watch.layout.chunk_range(first)[0]
                high = watch.address + watch.layout.chunk_range(last)[1]
                # Whole pages around the run, inside the watched range: a page shared with
                # an unchanged neighbour only makes that neighbour a candidate next time.
                low = max(watch.start, low // PAGE * PAGE)
                high = min(watch.end, -(-high // PAGE) * PAGE)
                if high > low:
                    tracker.unprotect(low, high - low)
        except OSError as err:  # still correct: the pages stay protected, writes fault
            log.debug("arraysnap: could not unprotect %r: %s", name, err)

    def _watch(self, tracker: WriteTracker, name: str, live: np.ndarray,
               layout: ChunkLayout) -> None:
        if live.nbytes < MIN_TRACKED_BYTES or len(self._watches) >= MAX_WATCHES:
            return
        contiguous = live.flags.c_contiguous if layout.order == "C" else live.flags.f_contiguous
        if not contiguous:
            return
        address = live.ctypes.data
        start = -(-address // PAGE) * PAGE
        end = (address + live.nbytes) // PAGE * PAGE
        if end - start < PAGE:
            return
        mapping = mapping_kinds([(start, end)], self._baseline_dir)[0]
        if isinstance(mapping, str):
            log.debug("arraysnap: %r not tracked: %s", name, mapping)
            return
        starts = _chunk_starts(layout)
        head, tail = start - address, end - address  # bytes on pages shared with others
        edges = np.array([(0, head), (tail, live.nbytes)], dtype=np.int64)
        edges = edges[edges[:, 1] > edges[:, 0]]
        watch = _Watch(address, live.nbytes, live.shape, live.strides, live.dtype, layout,
                       start, end, starts, _chunks_of(starts, layout.n_chunks, edges))
        if _track_range(tracker, watch, start, end, repr(name)):
            self._watches[name] = watch

    def forget(self, name: str) -> None:
        """Drop `name`'s watch (its next capture compares everything)."""
        watch = self._watches.pop(name, None)
        if watch is None:
            return
        tracker = self._usable_tracker()
        if tracker is not None:
            tracker.unregister(watch.start, watch.end - watch.start)
        _release_range(watch)

    def forget_all(self) -> None:
        """Drop every watch: the baselines changed other than by a capture's comparison."""
        for name in list(self._watches):
            self.forget(name)
        self.forget_many()

    def retain_only(self, names: set[str]) -> None:
        """Drop the watches of arrays no longer captured."""
        for name in list(self._watches):
            if name not in names:
                self.forget(name)

    def close(self) -> None:
        self.forget_all()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

