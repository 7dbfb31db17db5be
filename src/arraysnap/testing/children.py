"""Child processes for tests that kill, hold or watch a writer from outside.

Run as ``python -m arraysnap.testing.children KIND STORE [options]``; each prints what the
parent checks, one line at a time (a line torn by a kill does not count, see
:func:`committed_reports`). Kinds:

loop
    Capture a workload for ever (two captures in flight now and then, prune and gc every few
    steps); print ``committed STEP SEQ`` after each wait.
tiered-loop
    Like ``loop`` on a store in object storage (STORE is its URL, with ``--options`` JSON
    as its storage options) with the local tier ``--local`` (or none, and the baseline
    folder ``--baseline-dir``) and ``keep_last=3``; print ``committed STEP SEQ`` after
    each wait.
kill
    Open, capture, restore, prune, gc and close with a :class:`~arraysnap.testing.FaultPlan`
    that SIGKILLs the process just before (``--at N``) or just after (``--after``) its N-th
    file operation; ``ops JSON`` at the end lists every file operation if it lived.
die-at
    Open (creating) the store and capture once, SIGKILLed at the first call of OP in AREA
    whose key or path contains MATCH.
hold-lock
    Capture once, print ``holding`` and sleep, keeping the writer lock.
reader-holds
    Restore the latest snapshot, print what it got, wait for a line on stdin, then print
    whether the arrays it still holds changed.
reader-during-writes
    Open, list and restore every snapshot in rounds while a writer works; print how many
    snapshots it saw.
reader-check
    Print the latest step, the listed steps, whether verify() passed and whether the arrays
    are the workload's.
second-writer
    Print ``locked`` if a writer's open() is refused, then the latest step from a reader.
refuse-or-restore, special-files, audit
    A restore of a hostile store (``refused: ...``); every operation on a store with special
    files in it (``NAME ok|ArraysnapError|FOREIGN ...``); the audit events of the given
    prefixes that reading a hostile store raises.
power
    Capture, restore, prune, gc and close on a forgetting file system
    (:mod:`arraysnap.testing.powerloss`), marking each instant a ``wait()`` returned
    (``committed-SEQ-STEP``), a prune began and ended, or a capture failed (a full disk).
full-disk
    Capture into ``STORE/run.snap`` until the disk (a small file system holding a file
    ``STORE/filler``) is full; then free it and capture again; print a JSON summary.

>>> from arraysnap.testing import child_command
>>> child_command("loop", "/s")[2:]
['arraysnap.testing.children', 'loop', '/s']
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import arraysnap
from arraysnap.testing._faults import Call, FaultPlan
from arraysnap.testing._workload import (
    MANY_WORKLOAD,
    SMALL_WORKLOAD,
    TORTURE_WORKLOAD,
    Workload,
)

__all__ = ["WORKLOADS", "main"]

WORKLOADS = {"small": SMALL_WORKLOAD, "torture": TORTURE_WORKLOAD, "many": MANY_WORKLOAD}


def _say(*words: object) -> None:
    print(*words, flush=True)


def _next_step(snap: arraysnap.Store) -> int:
    latest = snap.latest()
    return 0 if latest is None or latest.step is None else latest.step + 1


def capture_loop(path: str, workload: Workload, chunk_bytes: int, log: bool) -> None:
    """Capture `workload` for ever (see the module doc); with `log`, log a replay record
    ``{"after": step, "i": 0}`` after each capture."""
    snap = arraysnap.open(path, chunk_bytes=chunk_bytes)
    step = _next_step(snap)
    _say("ready", step)
    while True:
        info = workload.capture(snap, step)
        if log:
            snap.log({"after": step, "i": 0})
        if step % 3 == 1:
            # Two captures in flight: the second pause overlaps the first commit.
            step += 1
            info = workload.capture(snap, step)
            if log:
                snap.log({"after": step, "i": 0})
        snap.wait()
        _say("committed", step, info.seq)
        if step % 6 == 5:
            snap.prune(keep_last=3)
        elif step % 4 == 3:
            snap.gc()
        step += 1


def tiered_loop(url: str, local: str, baseline_dir: str, options: dict[str, Any],
                workload: Workload, chunk_bytes: int) -> None:
    """Capture `workload` for ever into the store at `url` through the local tier `local`
    (or straight into it, with its baselines in `baseline_dir`)."""
    where: dict[str, Any] = ({"local": local, "_upload_delays": (0.01, 0.05)} if local
                             else {"baseline_dir": baseline_dir or None})
    snap = arraysnap.open(url, storage_options=options, chunk_bytes=chunk_bytes, keep_last=3,
                          **where)
    step = _next_step(snap)
    _say("ready", step)
    while True:
        info = workload.capture(snap, step)
        snap.wait()
        _say("committed", step, info.seq)
        step += 1


def kill_at_operation(path: str, workload: Workload, chunk_bytes: int, target: int,
                      after: bool, routine: str) -> None:
    """Run `routine` ("torture" or "logged") on the store at `path`, killed at file
    operation `target` (0: never); print ``ops JSON`` if it got to the end alive."""
    plan = FaultPlan(path)
    if target:
        plan.kill_at(target, after=after)
    snap = arraysnap.open(plan.storage, chunk_bytes=chunk_bytes,
                          _baseline_ops=plan.baseline_ops, _retry_delays=())
    step = _next_step(snap)

    def commit(count: int, logs: int) -> None:
        nonlocal step
        info = None
        for _ in range(count):
            info = workload.capture(snap, step)
            for i in range(logs):
                snap.log({"after": step, "i": i})
            step += 1
        snap.wait()
        assert info is not None
        _say("committed", step - 1, info.seq)

    if routine == "torture":
        commit(1, 0)
        commit(1, 0)
        commit(2, 0)
        restored = snap.restore()
        del restored
        snap.prune(keep_last=3)
        commit(1, 0)
    else:
        for _ in range(3):
            commit(1, 2)
        commit(2, 2)
        snap.prune(keep_last=2)
    snap.gc()
    snap.close()
    _say("ops", json.dumps([[call.op, call.where] for call in plan.log]))


def die_at(path: str, op: str, area: str, match: str) -> None:
    """Open the store at `path` (creating it) and capture once, SIGKILLed at the first call
    of `op` in `area` whose key or path holds `match`."""
    plan = FaultPlan(path)

    def die(call: Call) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    plan.before(op, area, die, match=match)
    with arraysnap.open(plan.storage, chunk_bytes=4096, _baseline_ops=plan.baseline_ops,
                        _retry_delays=()) as snap:
        SMALL_WORKLOAD.capture(snap, 0)


def hold_lock(path: str) -> None:
    """Capture step 0 of the small workload, say ``holding`` and keep the lock a while."""
    snap = arraysnap.open(path, chunk_bytes=4096)
    SMALL_WORKLOAD.capture(snap, 0)
    snap.wait()
    _say("holding")
    time.sleep(600)


def reader_holds(path: str) -> None:
    """Hold the latest snapshot's arrays while the parent writes (see the module doc)."""
    snap = arraysnap.open(path, mode="r")
    restored = snap.restore()
    held = restored.arrays
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    copies = {name: np.array(array) for name, array in held.items()}
    expected = SMALL_WORKLOAD.arrays(restored.step)
    _say(json.dumps({"step": restored.step, "maps_baseline": "/mirror/" in mapped,
                     "right": all(copies[n].tobytes() == expected[n].tobytes()
                                  for n in expected)}))
    sys.stdin.readline()
    _say(json.dumps({"unchanged": all(held[n].tobytes() == copies[n].tobytes()
                                      for n in held)}))


def reader_during_writes(path: str, rounds: int) -> None:
    """Restore every listed snapshot `rounds` times; each must be whole: "u" is `step`
    with its first `step` values -1, the state ``{"step": step}``."""
    seen = set()
    for _ in range(rounds):
        try:
            reader = arraysnap.open(path, mode="r")
        except FileNotFoundError:
            continue
        with reader:
            for info in reader.list():
                try:
                    restored = reader.restore(seq=info.seq)
                except arraysnap.ArraysnapError:
                    # Pruned since list(): a clear error is allowed, never wrong data.
                    if os.path.exists(f"{path}/snapshots/{info.seq:012d}.json"):
                        raise
                    continue
                expected = np.full(20_000, restored.step, dtype="<i8")
                expected[: restored.step] = -1
                assert np.array_equal(restored.arrays["u"], expected), restored.step
                assert restored.state == {"step": restored.step}
                seen.add(info.seq)
    _say(len(seen))


def reader_check(path: str, mode: str) -> None:
    """Print the latest step, the listed steps, verify()'s verdict and whether the arrays
    are the small workload's of their step."""
    with arraysnap.open(path, mode=mode) as snap:  # type: ignore[arg-type]
        restored = snap.restore()
        same = all(restored.arrays[k].tobytes() == v.tobytes()
                   for k, v in SMALL_WORKLOAD.arrays(restored.step).items())
        _say(restored.step, [i.step for i in snap.list()], snap.verify().ok, same)


def second_writer(path: str) -> None:
    """Try to open a second writer, then read the latest step."""
    try:
        arraysnap.open(path)
    except arraysnap.StoreLockedError:
        _say("locked")
    with arraysnap.open(path, mode="r") as reader:
        latest = reader.latest()
        _say(None if latest is None else latest.step)


def refuse_or_restore(path: str) -> None:
    """Restore the latest snapshot; print ``refused: ...`` on an ArraysnapError."""
    try:
        arraysnap.open(path, mode="r").restore()
        _say("restored")
    except arraysnap.ArraysnapError as err:
        _say("refused:", err)


def special_files(path: str) -> None:
    """Run every kind of operation, as reader and as writer; print how each ended."""
    actions: list[tuple[str, Callable[[arraysnap.Store], Any]]] = [
        ("list", lambda s: s.list()), ("verify", lambda s: s.verify()),
        ("restore", lambda s: s.restore(seq=1, verify=True)), ("stats", lambda s: s.stats()),
        ("capture", lambda s: s.mode == "a" and s.capture({"u": np.zeros(3)}).result())]
    for name, action in actions:
        try:
            with arraysnap.open(path, mode="r") as snap:
                action(snap)
            with arraysnap.open(path) as snap:
                action(snap)
            _say(name, "ok")
        except arraysnap.ArraysnapError:
            _say(name, "ArraysnapError")
        except BaseException as err:  # noqa: BLE001 - exactly what the parent looks for
            _say(name, "FOREIGN", type(err).__name__, err)


def audit(path: str, prefixes: list[str]) -> None:
    """Read (and open for writing) a hostile store with an audit hook; print the sorted
    events that start with one of `prefixes`."""

    def exercise() -> None:
        for mode in ("r", "a"):
            try:
                with arraysnap.open(path, mode=mode) as snap:  # type: ignore[arg-type]
                    snap.list()
                    snap.verify()
                    snap.restore()
            except arraysnap.ArraysnapError:
                pass

    exercise()  # imports everything imported lazily first
    seen: list[str] = []

    def hook(event: str, args: object) -> None:
        if event.startswith(tuple(prefixes)):
            seen.append(event)

    sys.addaudithook(hook)
    exercise()
    _say(sorted(set(seen)))


def full_disk(root: str) -> None:
    """Fill the disk with captures, fail cleanly, free it, go on (see the module doc)."""
    snap = arraysnap.open(os.path.join(root, "run.snap"), chunk_bytes=65536)
    committed: list[int] = []
    failure: dict[str, Any] | None = None

    def data(step: int) -> dict[str, np.ndarray]:
        return {"u": np.random.default_rng(step).random(65536), "t": np.arange(100) + step,
                "k": np.zeros(5000)}

    for step in range(60):
        live = data(step)
        try:
            snap.capture(live, step=step)
            snap.wait()
        except (OSError, arraysnap.ArraysnapError) as err:
            cause = err if isinstance(err, OSError) else err.__cause__
            failure = {"step": step, "errno": getattr(cause, "errno", None)}
            break
        committed.append(step)
    # Still full: a new array (a new baseline file) must fail cleanly too, not kill the
    # process; and the changes this capture copied aside before failing must not be lost
    # either ("k" has not changed since the last commit, so only this capture knows of it).
    live["u"][:100] += 1.0
    live["k"][:10] = 7.0
    try:
        snap.capture({**live, "extra": np.ones(200000)}, step=1000)
        snap.wait()
        extra = "ok"
    except (OSError, arraysnap.ArraysnapError) as err:
        extra = type(err).__name__
    os.unlink(os.path.join(root, "filler"))  # the space is freed; the arrays are unchanged
    snap.capture(live, step=failure["step"] if failure else 999)
    snap.wait()
    restored = snap.restore()
    same = all(restored.arrays[k].tobytes() == v.tobytes() for k, v in live.items())
    snap.close()
    _say(json.dumps({"committed": committed, "failure": failure, "extra": extra,
                     "same": same}))


def power_routine(path: str, workload: Workload, chunk_bytes: int, marks: str,
                  rounds: int) -> None:
    """The power-loss tests' routine on the store at `path`: `rounds` rounds of one capture,
    two in flight, a held restore, a prune or a gc; a capture left pending at close. Each
    instant a snapshot is known durable is marked by looking up ``marks/committed-SEQ-STEP``
    (the forgetting file system journals the lookup); a failed capture (a full disk) is
    marked ``failed-STEP`` and answered with a prune and a gc."""
    def mark(label: str) -> None:
        os.path.exists(os.path.join(marks, label))

    try:
        snap = arraysnap.open(path, chunk_bytes=chunk_bytes)
    except arraysnap.StoreWriteError:  # a disk too full to rebuild the baselines
        mark("open-failed")
        return
    mark("opened")
    step = _next_step(snap)

    def commit(count: int) -> None:
        nonlocal step
        infos = []
        try:
            for _ in range(count):
                trying = step
                infos.append(workload.capture(snap, step))
                step += 1
            snap.wait()
        except (OSError, arraysnap.ArraysnapError):
            mark(f"failed-{trying}")
            tidy(keep=1)
            return
        for info in infos:
            mark(f"committed-{info.seq}-{info.step}")

    def tidy(keep: int) -> None:
        mark("pruning")
        try:
            report = snap.prune(keep_last=keep)
        except (OSError, arraysnap.ArraysnapError):
            mark("prune-failed")
            return
        mark("pruned-" + "-".join(map(str, report.snapshots_removed)))
        collect()

    def collect() -> None:
        try:
            snap.gc()
        except (OSError, arraysnap.ArraysnapError):
            mark("gc-failed")
            return
        mark("collected")

    for round_ in range(rounds):
        commit(1)
        commit(2)
        try:
            restored = snap.restore()  # held while the next capture runs
        except arraysnap.StoreWriteError:  # too full to assemble it (a full disk)
            mark("restore-failed")
            restored = None
        commit(1)
        del restored
        if round_ % 2:
            tidy(keep=2)
        else:
            collect()
    try:
        info = workload.capture(snap, step)
        snap.close()  # commits the pending capture
    except (OSError, arraysnap.ArraysnapError):
        mark(f"failed-{step}")
        try:
            snap.close()  # closed already, or raising what the pending capture met
        except (OSError, arraysnap.ArraysnapError):
            pass
    else:
        mark(f"committed-{info.seq}-{info.step}")
    mark("closed")


# The children that need nothing but the store.
_ON_STORE: dict[str, Callable[[str], None]] = {
    "hold-lock": hold_lock, "reader-holds": reader_holds, "second-writer": second_writer,
    "refuse-or-restore": refuse_or_restore, "special-files": special_files,
    "full-disk": full_disk}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arraysnap.testing.children",
                                     description="Child processes of arraysnap's tests.")
    parser.add_argument("kind", choices=["loop", "tiered-loop", "kill", "die-at", "hold-lock",
                                         "reader-holds", "reader-during-writes", "reader-check",
                                         "second-writer", "refuse-or-restore",
                                         "special-files", "audit", "full-disk", "power"])
    parser.add_argument("store")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--chunk-bytes", type=int, default=4096)
    parser.add_argument("--log", action="store_true", help="loop: log replay records")
    parser.add_argument("--at", type=int, default=0, help="kill: the file operation")
    parser.add_argument("--after", action="store_true", help="kill: just after it")
    parser.add_argument("--routine", choices=["torture", "logged"], default="logged")
    parser.add_argument("--op", default="", help="die-at: the operation")
    parser.add_argument("--area", default="", help="die-at: its area")
    parser.add_argument("--match", default="", help="die-at: part of its key or path")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--marks", default="", help="power: the folder marks are looked up in")
    parser.add_argument("--mode", choices=["r", "a"], default="r")
    parser.add_argument("--local", default="", help="tiered-loop: the local tier")
    parser.add_argument("--baseline-dir", default="", help="tiered-loop: without --local")
    parser.add_argument("--options", default="{}", help="tiered-loop: storage options, JSON")
    parser.add_argument("prefixes", nargs="*", help="audit: the event prefixes to report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one child (see the module doc); return its exit code.

    >>> import tempfile, contextlib, io
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     code = main(["reader-during-writes", tempfile.mkdtemp() + "/none", "--rounds", "1"])
    >>> code, out.getvalue()
    (0, '0\\n')
    """
    args = _parser().parse_args(argv)
    workload = WORKLOADS[args.workload]
    if args.kind == "loop":
        capture_loop(args.store, workload, args.chunk_bytes, args.log)
    elif args.kind == "tiered-loop":
        tiered_loop(args.store, args.local, args.baseline_dir, json.loads(args.options),
                    workload, args.chunk_bytes)
    elif args.kind == "kill":
        kill_at_operation(args.store, workload, args.chunk_bytes, args.at, args.after,
                          args.routine)
    elif args.kind == "die-at":
        die_at(args.store, args.op, args.area, args.match)
    elif args.kind == "reader-during-writes":
        reader_during_writes(args.store, args.rounds)
    elif args.kind == "reader-check":
        reader_check(args.store, args.mode)
    elif args.kind == "power":
        power_routine(args.store, workload, args.chunk_bytes, args.marks, args.rounds)
    elif args.kind == "audit":
        audit(args.store, args.prefixes)
    else:
        _ON_STORE[args.kind](args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
