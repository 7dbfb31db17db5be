"""Capture: the input checks, and the pause that finds and sets aside what changed.

The pause compares each live array with its baseline (only the chunks write tracking
flags, where it can), copies changed chunks into the baseline and hands a job to the
engine. It owns the answer to "which committed snapshot do the baselines equal?": none while
a capture is ahead of every commit, the job's seq once that job commits and no later capture
has touched them.

>>> import numpy as np
>>> check_step(np.int64(5)), check_state({"t": np.float64(0.5)})
(5, {'t': 0.5})
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._version import __version__
from ..baselines import Baselines
from ..delta import as_bytes, compare_many, scan_and_copy
from ..history import History
from ..layout import ChunkLayout, memory_order, plan_layout
from ..manifest import Manifest, check_array_name, check_dims
from ..pipeline import ArrayDelta, Persister, PersistJob
from ..replaylog import ReplayLog
from ..restored import RestoredArrays
from ..results import CaptureInfo, CaptureStat
from ..tracking import Tracking
from .failures import FailurePolicy, wrap
from .roster import HIT, Roster

__all__ = ["Capturer", "Prepared", "check_state", "check_step", "prepare_arrays", "provenance"]

log = logging.getLogger("arraysnap")

_ONE_CHUNK = np.zeros(1, dtype=np.intp)  # the chunk of an array the roster compares in bulk

@dataclass(frozen=True, slots=True)
class Prepared:
    """A capture's checked input: each array with the layout it is captured in, and the
    baseline bytes the capture will allocate (arrays new or of a new shape, less the bytes
    of the baselines they replace).

    With a `roster` (see ``roster.py``), `arrays` holds only the arrays it does not vouch
    for, at roster `positions`; `hits` flags (HIT) the positions it vouches for, whose
    arrays, names and layouts are the roster's, and `values` holds every array in order.
    """

    arrays: list[tuple[str, np.ndarray, ChunkLayout]]
    new_bytes: int
    roster: Roster | None = None
    hits: np.ndarray | None = None
    values: list[np.ndarray] | None = None
    positions: list[int] | None = None

    def everything(self) -> list[tuple[str, np.ndarray, ChunkLayout]]:
        """Every array with its layout, in the caller's order."""
        if self.roster is None or self.values is None or self.positions is None:
            return self.arrays
        items = [(name, value, layout) for name, value, layout
                 in zip(self.roster.names, self.values, self.roster.layouts, strict=True)]
        for position, item in zip(self.positions, self.arrays, strict=True):
            items[position] = item
        return items


# -- input checks --------------------------------------------------------------------------
def prepare_arrays(arrays: object, chunk_bytes: int, baselines: Baselines,
                   roster: Roster | None = None) -> Prepared:
    """Each array with the chunk layout it is captured in; TypeError/ValueError if unfit.

    With a `roster` and a dict of the same names in the same order, only the arrays the
    roster does not vouch for are checked (the rest are as they were when checked last).
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"capture() takes a dict of name -> numpy array, got "
                        f"{type(arrays).__name__}")
    if type(arrays) is not dict:  # the roster's match takes a dict: a dict of the same
        # (the resume's restored arrays through their C-level copy)
        arrays = arrays.copy() if type(arrays) is RestoredArrays else dict(arrays)
    if roster is not None and type(arrays) is dict and len(arrays) == len(roster):
        hits, values = roster.match(arrays)
        if hits.all():  # the same names: check the arrays that are not the same
            positions = np.flatnonzero(hits != HIT).tolist()
            prepared, new_bytes = [], 0
            for position in positions:
                name, array, layout, grown = _prepare_one(roster.names[position],
                                                          values[position], chunk_bytes,
                                                          baselines)
                prepared.append((name, array, layout))
                new_bytes += grown
            return Prepared(prepared, new_bytes, roster, hits == HIT, values, positions)
    prepared = []
    new_bytes = 0
    for name, array in arrays.items():
        name, array, layout, grown = _prepare_one(name, array, chunk_bytes, baselines)
        prepared.append((name, array, layout))
        new_bytes += grown
    return Prepared(prepared, new_bytes)


def _prepare_one(name: object, array: object, chunk_bytes: int,
                 baselines: Baselines) -> tuple[str, np.ndarray, ChunkLayout, int]:
    """One array checked: its name, plain array, layout and new baseline bytes."""
    layout = baselines.layout_of(name) if type(name) is str else None
    if layout is None:  # a name with a baseline was checked when it was first captured
        check_array_name(name)
    assert isinstance(name, str)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array {name!r} is a {type(array).__name__}, not a numpy array; "
                        "pass np.asarray(value)")
    array = _plain_array(name, array)
    if array.dtype.hasobject:
        raise TypeError(f"array {name!r} has dtype {array.dtype}, which holds Python "
                        "objects; arraysnap stores raw bytes only (use a fixed-size dtype)")
    order = memory_order(array)
    grown = 0
    # Keep the array's existing chunking when it is unchanged, so that a new chunk_bytes
    # does not force a whole re-capture.
    if (layout is None or layout.shape != array.shape or layout.dtype != array.dtype
            or layout.order != order):
        grown -= 0 if layout is None else layout.nbytes
        layout = plan_layout(array.shape, array.dtype, order, chunk_bytes)
        grown += layout.nbytes
    return name, array, layout, grown


# Subclasses whose data is plain ndarray data: captured as their base array, and restored
# as plain arrays (np.memmap: the file's bytes; np.recarray: its records).
_PLAIN_SUBCLASSES = (np.memmap, np.recarray)


def _plain_array(name: str, array: np.ndarray) -> np.ndarray:
    """`array` as a plain ndarray view, or TypeError for a subclass whose meaning is more
    than its data (a masked array's mask, a matrix's 2-d algebra)."""
    if type(array) is np.ndarray:
        return array
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(
            f"array {name!r} is a masked array: arraysnap stores plain arrays only. Capture "
            f"its data and mask as two arrays, e.g. {{{name!r}: a.data, "
            f"{name + '_mask'!r}: np.ma.getmaskarray(a)}}, and rebuild it with "
            "np.ma.masked_array(data, mask) after restore")
    if isinstance(array, _PLAIN_SUBCLASSES):
        return array.view(np.ndarray)
    raise TypeError(f"array {name!r} is a {type(array).__name__} (a numpy.ndarray subclass); "
                    f"arraysnap stores plain arrays only: pass np.asarray({name}) and rebuild "
                    f"the {type(array).__name__} after restore")


def check_step(step: object) -> int | None:
    if step is None:
        return None
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an integer or None, got {type(step).__name__} {step!r}")
    return int(step)


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r:.60} is not JSON-serialisable")


def check_state(state: object) -> dict[str, Any] | None:
    """`state` as the JSON it will be stored as; TypeError/ValueError naming the problem."""
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of JSON values, got {type(state).__name__}")
    if any(not isinstance(key, str) for key in state):
        raise TypeError("state keys must be strings")
    rule = ("state must be JSON-serialisable (dicts with str keys, lists, str, int, finite "
            "float, bool, None)")
    try:
        text = json.dumps(dict(state), default=_json_default, allow_nan=False)
    except TypeError as err:  # a value of a type JSON has not: as json.dumps says it
        raise TypeError(f"{rule}: {err}; store arrays in `arrays`, not in `state`") from None
    except ValueError as err:  # a value JSON cannot hold: NaN or infinity
        raise ValueError(f"{rule}: {err}; store arrays in `arrays`, not in `state`") from None
    except RecursionError:
        raise ValueError("state is nested too deeply (or refers to itself)") from None
    if len(text) > 16 << 20:
        raise ValueError(f"state is {len(text)} bytes of JSON; keep it small (< 16 MiB) and "
                         "put bulk data in `arrays`")
    value = json.loads(text)
    return value  # type: ignore[no-any-return]


def provenance() -> dict[str, Any]:
    """Where and by what a snapshot was made.

    >>> sorted(provenance())
    ['argv0', 'arraysnap', 'host', 'numpy', 'pid', 'python']
    """
    return {"arraysnap": __version__, "numpy": np.__version__,
            "python": platform.python_version(), "host": socket.gethostname(),
            "pid": os.getpid(), "argv0": os.path.basename(sys.argv[0]) if sys.argv else ""}


# -- the pause -----------------------------------------------------------------------------
class Capturer:
    """The pause of one writer, and what the baselines equal; see the module doc."""

    def __init__(self, baselines: Baselines, tracking: Tracking, pool: ThreadPoolExecutor,
                 history: History, policy: FailurePolicy, replay_log: ReplayLog | None,
                 head: Manifest | None, next_seq: int) -> None:
        self.baselines = baselines
        self.tracking = tracking
        self.pool = pool
        self.history = history
        self.policy = policy
        self.replay_log = replay_log
        self.next_seq = next_seq
        self._lock = threading.Lock()  # one capture at a time
        self._state_lock = threading.Lock()
        self._baseline_seq = head.seq if head is not None else None
        self._last_captured: int | None = None
        self._roster: Roster | None = None
        self._dims: dict[str, tuple[str, ...]] = {} if head is None else {
            name: entry.dims for name, entry in head.arrays.items() if entry.dims is not None}

    # -- what the baselines equal ----------------------------------------------------------
    @property
    def baseline_seq(self) -> int | None:
        """The committed snapshot the baselines equal, or None while a capture is ahead."""
        with self._state_lock:
            return self._baseline_seq

    def committed(self, seq: int) -> None:
        """Snapshot `seq` committed: the baselines equal it unless a later capture began."""
        with self._state_lock:
            if self._last_captured == seq:
                self._baseline_seq = seq
                try:
                    self.baselines.mark_committed(seq)
                except OSError as err:  # the snapshot is committed; the marker only helps
                    log.warning("arraysnap: could not mark the baselines clean: %r", err)

    def repaired(self, name: str, seq: int) -> None:
        """The baseline of `name` was repaired to equal snapshot `seq` (a restore found
        damage): tracking must look at it afresh."""
        self.tracking.forget(name)
        self.tracking.forget_many()
        self._roster = None
        with self._state_lock:
            self.baselines.mark_committed(seq)

    # -- capturing -------------------------------------------------------------------------
    def dims_for(self, prepared: Prepared, dims: object) -> dict[str, tuple[str, ...]]:
        """The dimension names of each captured array: given now, or remembered."""
        if dims is not None and not isinstance(dims, Mapping):
            raise TypeError(f"dims must be a dict of array name -> dimension names, got "
                            f"{type(dims).__name__}")
        if dims is None and prepared.roster is not None and not prepared.arrays:
            return self._dims  # the same arrays as last time: the same names
        given = dict(dims or {})
        shapes = {name: array.shape for name, array, _ in prepared.everything()}
        unknown = sorted(set(given) - set(shapes), key=str)
        if unknown:
            raise ValueError(f"dims names arrays that are not captured: {unknown}; the "
                             f"arrays are {sorted(shapes)}")
        names: dict[str, tuple[str, ...]] = {}
        for name, shape in shapes.items():
            if name in given:
                names[name] = check_dims(name, len(shape), given[name])
            elif name in self._dims and len(self._dims[name]) == len(shape):
                names[name] = self._dims[name]
        return names

    @property
    def lock(self) -> threading.Lock:
        """Held for a capture; prune and gc hold it too, so they never run during one."""
        return self._lock

    def capture(self, persister: Persister, prepared: Prepared,
                dims: dict[str, tuple[str, ...]], step: int | None,
                state: dict[str, Any] | None, rng: Any) -> tuple[CaptureInfo, float | None]:
        """Run the pause (the caller holds the lock); return the info and the seconds the
        caller was blocked in all (None if the pause failed and the policy only warns)."""
        self._dims = dims
        started = time.perf_counter()
        persister.wait_chunks_read()
        pause_start = time.perf_counter()
        seq = self.next_seq
        replay_position = self.replay_log.position if self.replay_log is not None else 0
        shortage = self._space_shortage(prepared)
        if shortage is not None:  # refused before anything is written
            return self._failed(seq, step, started, shortage), None
        try:
            with self._state_lock:
                # From here the baselines are ahead of every committed snapshot.
                self._baseline_seq = None
                self._last_captured = seq
                persister.retrying(self.baselines.mark_dirty, free_space=False)
        except OSError as err:
            return self._failed(seq, step, started, err), None
        try:
            deltas, compared, n_chunks, n_changed = self._compare(prepared)
        except OSError as err:
            self.next_seq += 1  # the history records this failed capture under its seq
            return self._failed(seq, step, started, err), None
        # (Any other error is a bug or bad input that slipped past the checks: it spends no
        # seq, and the baselines it touched were forgotten.)
        self.next_seq += 1
        now = time.perf_counter()
        pause = now - pause_start
        info = CaptureInfo(seq, step, pause, n_chunks, n_changed, chunks_compared=compared,
                           blocked_seconds=now - started)
        job = PersistJob(seq, step, time.time(), deltas, state, rng, provenance(), pause,
                         pause_start - started, started, replay_position, info)
        persister.submit(job)
        return info, now - started

    def _space_shortage(self, prepared: Prepared) -> OSError | None:
        """The error for a capture whose new baselines (arrays new, or of a new shape) would
        not fit on their file system, or None: a full disk is named before anything is
        written, not found half-way."""
        needed = prepared.new_bytes
        if needed <= 0:
            return None
        free = self.baselines.free_bytes()
        if needed <= free:
            return None
        return OSError(errno.ENOSPC, (
            f"this capture needs {needed / 2**30:.2f} GiB of new baseline space (arrays that "
            f"are new or changed shape) in {self.baselines.dir}, and that file system has "
            f"{free / 2**30:.2f} GiB free; free space there (the baselines are a cache of the "
            "latest snapshot, a file per GiB of small arrays and one per large array), or "
            "capture less"))

    @property
    def roster(self) -> Roster | None:
        """What the last pause saw of each array (None after a failure or a repair)."""
        return self._roster

    def _compare(self, prepared: Prepared) -> tuple[list[ArrayDelta], int, int, int]:
        """The pause's comparison: the engine's entries, the chunks compared, the chunks in
        all, the chunks changed."""
        roster = prepared.roster
        try:
            if (roster is not None and roster is self._roster
                    and self.baselines.steady(roster.epoch)):
                return self._compare_roster(prepared, roster)
            self._roster = None
            return self._compare_each(prepared.everything())
        except BaseException:
            # Baselines already updated hold changes no snapshot has; forget them so the next
            # capture writes those arrays whole (dedup keeps unchanged chunks free).
            self._roster = None
            self.tracking.forget_all()
            for name, _, _ in prepared.everything():
                try:
                    self.baselines.forget(name)
                except OSError as forget_error:
                    log.error("arraysnap: could not drop the %r baseline: %r", name,
                              forget_error)
            raise

    def _compare_each(self, items: list[tuple[str, np.ndarray, ChunkLayout]]
                      ) -> tuple[list[ArrayDelta], int, int, int]:
        """Compare array by array, and record the roster the next pause starts from."""
        tracking = self.tracking
        names = [name for name, _, _ in items]
        name_set = set(names)
        tracking.retain_only(name_set)
        roster = Roster(names, [live for _, live, _ in items],
                        [layout for _, _, layout in items])
        # Before the comparison: from here on, writes count for the next capture.
        tracking.watch_many(roster.starts, roster.ends)
        deltas = []
        compared = 0
        for name, live, layout in items:
            delta, count = self._compare_one(name, live, layout)
            deltas.append(delta)
            compared += count
        self.baselines.retain_only(name_set)
        roster.settle(deltas, self.baselines.epoch, self._dims)
        self._roster = roster
        return deltas, compared, roster.n_chunks, sum(len(delta.changed) for delta in deltas)

    def _compare_roster(self, prepared: Prepared,
                        roster: Roster) -> tuple[list[ArrayDelta], int, int, int]:
        """Compare the small arrays the roster vouches for in bulk, where tracking saw them
        written; the others one by one."""
        assert prepared.hits is not None and prepared.values is not None
        assert prepared.positions is not None
        tracking = self.tracking
        if roster.dims is not self._dims:
            if roster.dims != self._dims:
                roster.redim(self._dims)
            roster.dims = self._dims
        bulk = roster.bulk & prepared.hits
        candidates, audit = tracking.candidates_many(roster.starts, roster.ends)
        which = np.flatnonzero(bulk if candidates is None else bulk & candidates.astype(bool))
        # A hit is the recorded array at the recorded address: the roster's starts are the
        # live buffers.
        if self.baselines.held():
            # Maps a restore() handed out show these bytes: compare first, let them keep
            # their own copy of just the arrays that changed, then copy (as _compare_one).
            flags = compare_many(roster.starts, roster.baselines, roster.nbytes, which,
                                 self.pool, copy=False)
            changed = np.flatnonzero(flags)
            for position in changed.tolist():
                self.baselines.preserve(roster.names[position], _ONE_CHUNK)
            compare_many(roster.starts, roster.baselines, roster.nbytes, changed, self.pool)
        else:
            flags = compare_many(roster.starts, roster.baselines, roster.nbytes, which,
                                 self.pool)
            changed = np.flatnonzero(flags)
        if audit is not None:
            tracking.audit_many(roster.names, audit, changed)
        tracking.unprotect_many(roster.starts, roster.ends, changed)
        deltas = roster.deltas(changed)
        compared, n_changed = len(which), len(changed)
        one_by_one = dict(zip(prepared.positions, prepared.arrays, strict=True))
        for position in np.flatnonzero(~bulk).tolist():
            name, live, layout = one_by_one.get(position) or (
                roster.names[position], prepared.values[position], roster.layouts[position])
            delta, count = self._compare_one(name, live, layout)
            deltas[position] = delta
            compared += count
            n_changed += len(delta.changed)
            if position in one_by_one:
                roster.replace(position, prepared.values[position], delta)
        roster.epoch = self.baselines.epoch
        return deltas, compared, roster.n_chunks, n_changed

    def _compare_one(self, name: str, live: np.ndarray,
                     layout: ChunkLayout) -> tuple[ArrayDelta, int]:
        """Compare one array with its baseline (write tracking's candidates, if any)."""
        tracking = self.tracking
        target = self.baselines.baseline(name, layout, live)
        baseline, fresh = target.buffer, target.fresh
        # Before the comparison: from here on, writes count for the next capture.
        candidates, audit = tracking.candidates(name, live, layout, fresh)
        compared = (layout.n_chunks if candidates is None
                    else int(np.count_nonzero(candidates)))
        if fresh and not target.held and (live.flags.c_contiguous or live.flags.f_contiguous):
            # A new baseline: nothing to compare, every chunk changed. Copied at once (a first
            # capture of 10,000 arrays spent a third of its pause making flags to say so).
            np.copyto(baseline, as_bytes(live))
            changed = np.arange(layout.n_chunks)
            if audit is not None:
                tracking.audit(name, audit, changed)
            return ArrayDelta(name, layout, baseline, changed, fresh,
                              self._dims.get(name)), compared
        # A fresh baseline: every chunk counts as changed.
        flags = (np.full(layout.n_chunks, 1 if fresh else 0, dtype=np.uint8)
                 if fresh or target.held else None)
        if target.held:
            # Maps a restore() handed out show these bytes: compare first, let them
            # keep their own copy of just the chunks that changed, then copy.
            scan_and_copy(live, baseline, layout, flags, self.pool, candidates, copy=False)
            self.baselines.preserve(name, np.flatnonzero(flags))
            candidates = flags.copy()  # type: ignore[union-attr]
        changed = scan_and_copy(live, baseline, layout, flags, self.pool, candidates)
        if audit is not None:
            tracking.audit(name, audit, changed)
        if not fresh:
            tracking.unprotect_changed(name, changed)
        return ArrayDelta(name, layout, baseline, changed, fresh, self._dims.get(name)), compared

    def _failed(self, seq: int, step: int | None, started: float,
                err: OSError) -> CaptureInfo:
        """A capture that failed in its pause (the disk, writing the baselines' marker)."""
        message = "capture failed before anything was committed"
        log.error("arraysnap: capture at step %s failed in its pause: %r", step, err)
        self.history.append(CaptureStat(seq, step, time.time(), "failed", error=repr(err)))
        self.policy.handle(err, message)  # raises unless on_error="warn"
        info = CaptureInfo(seq, step, time.perf_counter() - started, 0, 0)
        info.finish(None, wrap(err, message))
        return info

    def mark_clean(self) -> None:
        """At close: record durably which snapshot the baselines equal, if they equal one."""
        with self._state_lock:
            seq = self._baseline_seq
        if seq is not None:
            try:
                self.baselines.mark_clean(seq)
            except OSError as err:
                # A full disk at close: the snapshots are committed; the marker stays as
                # the commit left it (trusted in this boot only, or dirty), so after a
                # reboot the next open checks the baselines.
                log.warning("arraysnap: could not mark the baselines clean at close: %r", err)
