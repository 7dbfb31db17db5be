"""Torture arraysnap: kill writers, fail their file operations and corrupt their stores.

Usage::

    python -m arraysnap.torture [--minutes M] [--seconds S] [--dir DIR] [--seed N] [--json FILE]

Runs three families of events in rotation until the time is up (default 10 minutes):

kills
    A child process captures a deterministic workload in a loop (with prune and gc now and
    then) and is SIGKILLed at a random moment, or kills itself just before or just after its
    n-th durable file operation (a :class:`~arraysnap.fsio.FileOps` installed with ``_io=``),
    sometimes twice in a row so that the second death lands in the first one's recovery.
    Then: the store opens, every listed snapshot verifies and restores to exactly the arrays
    of its step, no committed snapshot is missing (beyond what ``prune`` removed), the latest
    is at least the last one the child reported durable, and a further capture works.
faults
    Captures (or a prune) in this process with a FileOps that raises ``OSError`` EIO or ENOSPC
    at a random call. Then: the failure was reported, committed snapshots are unchanged,
    and once the fault is gone the next capture stores every change since the last commit.
corruptions
    On a copy of the store: bit flips, truncation, deletion or swapping of chunk objects, bit
    flips in or truncation of a manifest or ``arraysnap.json``, damage to the mirror (the
    baseline files and their marker). Damage must be detected (``verify()`` names snapshot,
    array and chunk; ``restore()`` raises :class:`~arraysnap.CorruptSnapshotError`) or, for
    the mirror, repaired. Wrong data must never be returned.

Each store is small (a few MiB, 64 KiB chunks) and replaced by a fresh one every
``EVENTS_PER_STORE`` events. The stores live in ``--dir`` or in a new temporary folder under
the current directory (not under /tmp, which may be a tmpfs where fsync proves nothing);
they are deleted at the end unless something failed. A progress line is printed about every
30 seconds; at the end one line per count, the elapsed time, and ``N passed, M failed``
(checks). The exit code is 0 if and only if no snapshot was lost, no wrong data was
returned and no unexpected error happened.

>>> sorted(workload_arrays(1))
['f', 'rec', 's', 'table', 'u', 'v', 'w']
"""

from __future__ import annotations

import argparse
import base64
import collections
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import blake3
import numpy as np

import arraysnap
from arraysnap.codecs import CodecSpec, parse_codec
from arraysnap.errors import (
    ArraysnapError,
    CorruptSnapshotError,
    FormatVersionError,
    SnapshotNotFoundError,
)
from arraysnap.fsio import FileOps

__all__ = [
    "FaultIO",
    "KillIO",
    "Torture",
    "capture_step",
    "committed_reports",
    "main",
    "restored_difference",
    "workload_arrays",
    "workload_rng",
    "workload_state",
]

CHUNK_BYTES = 64 << 10
KEEP_LAST = 3  # every prune keeps this many snapshots
EVENTS_PER_STORE = 12
PROGRESS_EVERY = 30.0
CHILD_TIMEOUT = 120.0
MAX_KEPT = 10  # failing stores and copies kept for a post-mortem

STORE_FOLDERS = ("chunks", "snapshots", "mirror", "tmp")
LOST, WRONG, UNEXPECTED = "lost", "wrong", "unexpected"
CATEGORY_LINES = {LOST: "snapshots lost", WRONG: "wrong data returned",
                  UNEXPECTED: "unexpected errors"}


# --------------------------------------------------------------------------------------------
# The workload: the arrays of step n are a pure function of n, so any snapshot of any crashed
# run can be checked by recomputing what was captured.
# --------------------------------------------------------------------------------------------
U_ROWS, U_COLS, U_PERIOD = 32, CHUNK_BYTES // 8, 12


def workload_arrays(step: int) -> dict[str, np.ndarray]:
    """The arrays captured at `step` (about 4 MiB).

    "u" (2 MiB, one chunk per row) changes two or three rows a step, "v" changes shape every
    5 steps, "f" (Fortran order, big-endian) every 3, "table" never, "w" comes and goes.

    >>> a, b = workload_arrays(7), workload_arrays(8)
    >>> int(sum(not np.array_equal(x, y) for x, y in zip(a["u"], b["u"])))
    3
    """
    u = np.empty((U_ROWS, U_COLS))
    for row in range(U_ROWS):
        version = max(step - (step + 7 * row) % U_PERIOD, -1)
        u[row] = np.random.default_rng([row, version + 1]).standard_normal(U_COLS)
    rows = 40 + 24 * ((step // 5) % 3)
    v = np.random.default_rng([1000, step // 5]).random((rows, 4096), dtype=np.float32)
    f = np.asfortranarray(
        np.random.default_rng([2000, step // 3]).integers(-9, 9, (300, 256)).astype(">i4"))
    rec = np.zeros(500, dtype=[("a", "<i4"), ("b", "<f8")])
    rec["a"] = np.arange(500)
    rec["b"] = np.sqrt(np.arange(500))
    arrays = {"u": u, "v": v, "f": f, "rec": rec, "s": np.array(step, dtype=np.int64),
              "table": np.linspace(0.0, 1.0, 1 << 17)}
    if step % 4 in (1, 2):
        arrays["w"] = np.random.default_rng([3000, step]).random(9000)
    return arrays


def workload_state(step: int) -> dict[str, Any]:
    """The JSON state captured at `step`.

    >>> workload_state(2)
    {'step': 2, 'tag': 'xx'}
    """
    return {"step": step, "tag": "x" * (step % 5)}


def workload_rng(step: int) -> dict[str, np.random.Generator]:
    """The random generators captured at `step`.

    >>> sorted(workload_rng(3))
    ['aux', 'main']
    """
    rngs = {"main": np.random.default_rng(step), "aux": np.random.default_rng([step, 99])}
    rngs["main"].random(step % 3)
    return rngs


def capture_step(snap: arraysnap.Store, step: int) -> arraysnap.CaptureInfo:
    """Capture the workload of `step` (arrays, state and rng) into `snap`."""
    return snap.capture(workload_arrays(step), step=step, state=workload_state(step),
                        rng=workload_rng(step))


def array_difference(actual: np.ndarray, expected: np.ndarray) -> str | None:
    """How `actual` differs from `expected` (dtype with byte order, shape, order, bytes)."""
    if actual.dtype.str != expected.dtype.str or actual.dtype != expected.dtype:
        return f"dtype {actual.dtype.str}, expected {expected.dtype.str}"
    if actual.shape != expected.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    fortran = expected.flags.f_contiguous and not expected.flags.c_contiguous
    if not (actual.flags.f_contiguous if fortran else actual.flags.c_contiguous):
        return f"memory order is not {'F' if fortran else 'C'}"
    if np.ascontiguousarray(actual).tobytes() != np.ascontiguousarray(expected).tobytes():
        return "content differs"
    return None


def restored_difference(restored: arraysnap.Restored, step: int | None) -> str | None:
    """How a restored snapshot differs from the workload of `step` (None if it does not)."""
    if step is None or restored.step != step:
        return f"step {restored.step}, expected {step}"
    expected = workload_arrays(step)
    if sorted(restored.arrays) != sorted(expected):
        return f"arrays {sorted(restored.arrays)}, expected {sorted(expected)}"
    for name, array in expected.items():
        problem = array_difference(restored.arrays[name], array)
        if problem is not None:
            return f"array {name!r} of step {step}: {problem}"
    if restored.state != workload_state(step):
        return f"state {restored.state!r}, expected {workload_state(step)!r}"
    rngs = workload_rng(step)
    if not isinstance(restored.rng, dict) or sorted(restored.rng) != sorted(rngs):
        return f"rng {restored.rng!r}, expected generators {sorted(rngs)}"
    for key, generator in rngs.items():
        if restored.rng[key].bit_generator.state != generator.bit_generator.state:
            return f"rng {key!r} differs"
    return None


def committed_reports(output: str) -> list[tuple[int, int]]:
    """(step, seq) pairs a child reported durable; a line torn by the kill does not count.

    >>> committed_reports("ready 0\\ncommitted 3 4\\ncommitted 5 6\\ncommitted 7")
    [(3, 4), (5, 6)]
    """
    reports = []
    for line in output.split("\n")[:-1]:
        parts = line.split()
        if (len(parts) == 3 and parts[0] == "committed" and parts[1].isdigit()
                and parts[2].isdigit()):
            reports.append((int(parts[1]), int(parts[2])))
    return reports


# --------------------------------------------------------------------------------------------
# Looking at a store from outside
# --------------------------------------------------------------------------------------------
def store_files(path: Path) -> dict[str, bytes]:
    """Every committed file of a store (not the mirror, tmp or lock), by relative path."""
    files = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).as_posix()
        if (file.is_file() and not file.is_symlink()
                and not relative.startswith(("mirror/", "tmp/"))
                and relative not in ("lock", "history.jsonl")):  # history only informs
            files[relative] = file.read_bytes()
    return files


def manifest_files(path: Path) -> dict[int, bytes]:
    """The manifests of a store by seq (only well-named ones)."""
    manifests = {}
    for file in (path / "snapshots").glob("*.json"):
        if len(file.stem) == 12 and file.stem.isdigit():
            manifests[int(file.stem)] = file.read_bytes()
    return manifests


def leftover_temporaries(path: Path, *, mirror: bool = True) -> list[str]:
    """Temporary files under `path` (optionally not counting those in mirror/)."""
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob(".tmp-*"))
    return found if mirror else [p for p in found if not p.startswith("mirror/")]


def chunk_references(path: Path) -> dict[str, list[tuple[int, str, int]]]:
    """Object path (relative to the store) -> every (seq, array, chunk) whose manifest uses it."""
    refs: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for seq, data in sorted(manifest_files(path).items()):
        body = json.loads(data)
        for name, record in body["arrays"].items():
            digests = base64.b64decode(record["chunks"])
            for index in range(len(digests) // 32):
                hexdigest = digests[index * 32 : (index + 1) * 32].hex()
                refs[f"chunks/{hexdigest[:2]}/{hexdigest[2:]}"].append((seq, name, index))
    return refs


def store_codec(path: Path) -> CodecSpec:
    """The codec recorded in a store's arraysnap.json."""
    return parse_codec(json.loads((path / "arraysnap.json").read_bytes())["codec"])


def object_intact(path: Path, relative: str, codec: CodecSpec) -> bool:
    """Whether a chunk object still decodes to the bytes its name (a blake3 digest) promises."""
    try:
        raw = codec.decode((path / relative).read_bytes())
    except Exception:  # noqa: BLE001 - any failure to read or decode means damaged
        return False
    return blake3.blake3(raw).hexdigest() == relative.replace("chunks/", "").replace("/", "")


def flip_bits(file: Path, chooser: random.Random, count: int) -> list[int]:
    """Flip `count` random bits of `file`; return the byte offsets touched."""
    data = bytearray(file.read_bytes())
    offsets = []
    for _ in range(count):
        if not data:
            break
        offset = chooser.randrange(len(data))
        data[offset] ^= 1 << chooser.randrange(8)
        offsets.append(offset)
    file.write_bytes(bytes(data))
    return offsets


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/self/mounts), or "unknown"."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _cause_chain(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


# --------------------------------------------------------------------------------------------
# File-operation seams
# --------------------------------------------------------------------------------------------
class KillIO(FileOps):
    """SIGKILLs this process just before (or just after) its `target`-th file operation."""

    def __init__(self, target: int, after: bool) -> None:
        self.target, self.after = target, after
        self.count = 0
        self._lock = threading.Lock()

    def _do(self, operation: Callable[[], Any]) -> Any:
        with self._lock:
            self.count += 1
            hit = self.count == self.target
        if hit and not self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = operation()
        if hit and self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def write(self, fd: int, data: memoryview | bytes) -> None:
        """Write, counted."""
        self._do(lambda: FileOps.write(self, fd, data))

    def fsync(self, fd: int) -> None:
        """Fsync, counted."""
        self._do(lambda: FileOps.fsync(self, fd))

    def replace(self, source: Path, target: Path) -> None:
        """Rename, counted."""
        self._do(lambda: FileOps.replace(self, source, target))

    def unlink(self, path: Path) -> None:
        """Unlink, counted."""
        self._do(lambda: FileOps.unlink(self, path))

    def fsync_dir(self, path: Path) -> None:
        """Fsync of a directory, counted (its inner fsync counts too)."""
        self._do(lambda: FileOps.fsync_dir(self, path))


class FaultIO(FileOps):
    """Counts calls per (operation, store area) and, when armed, raises ``OSError(err)`` at the
    `index`-th call (from 0) of one (operation, area) after arming, once.

    The area is the first path component inside the store: "chunks", "snapshots", "mirror",
    or "root" for files at the top.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.target: tuple[str, str] | None = None
        self.index = -1
        self.err = errno.EIO
        self.injected: OSError | None = None
        self.injected_at = ""

    def area(self, where: str) -> str:
        """The store area of a path."""
        where = os.path.realpath(where) if where.startswith("/") else where
        if where == self.root:
            return "root"
        if not where.startswith(self.root + "/"):
            return "other"
        inside = where[len(self.root) + 1 :].split("/")
        return inside[0] if len(inside) > 1 or inside[0] in STORE_FOLDERS else "root"

    def reset(self) -> None:
        """Forget the counts."""
        with self._lock:
            self.counts.clear()

    def arm(self, op: str, area: str, index: int, err: int) -> None:
        """Raise at the `index`-th call of `op` in `area` from now on."""
        with self._lock:
            self.counts.clear()
            self.target, self.index, self.err = (op, area), index, err
            self.injected, self.injected_at = None, ""

    def disarm(self) -> None:
        """Stop injecting (the counts are kept)."""
        with self._lock:
            self.target = None

    def _check(self, op: str, where: str) -> None:
        area = self.area(where)
        with self._lock:
            number = self.counts[(op, area)]
            self.counts[(op, area)] += 1
            if self.target != (op, area) or number != self.index:
                return
            self.target = None
            self.injected_at = where
            self.injected = OSError(self.err, f"injected {errno.errorcode[self.err]} at {op} "
                                              f"#{number} in {area} ({where})")
            raise self.injected

    def write(self, fd: int, data: memoryview | bytes) -> None:
        """Write, or fail."""
        self._check("write", _fd_path(fd))
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        """Fsync, or fail."""
        self._check("fsync", _fd_path(fd))
        super().fsync(fd)

    def replace(self, source: Path, target: Path) -> None:
        """Rename, or fail."""
        self._check("replace", str(target))
        super().replace(source, target)

    def unlink(self, path: Path) -> None:
        """Unlink, or fail."""
        self._check("unlink", str(path))
        super().unlink(path)

    def fsync_dir(self, path: Path) -> None:
        """Fsync a directory, or fail."""
        self._check("fsync_dir", str(path))
        super().fsync_dir(path)


# --------------------------------------------------------------------------------------------
# Children (run as ``python -m arraysnap.torture --child ...``)
# --------------------------------------------------------------------------------------------
def child_capture_loop(path: str, chunk_bytes: int) -> None:
    """Capture the workload forever, two captures in flight now and then, pruning and
    collecting garbage every few steps; print ``committed STEP SEQ`` after each wait."""
    snap = arraysnap.open(path, chunk_bytes=chunk_bytes)
    latest = snap.latest()
    step = 0 if latest is None or latest.step is None else latest.step + 1
    print("ready", step, flush=True)
    while True:
        info = capture_step(snap, step)
        if step % 3 == 1:
            # Two captures in flight: the second pause overlaps the first commit.
            step += 1
            info = capture_step(snap, step)
        snap.wait()
        print("committed", step, info.seq, flush=True)
        if step % 6 == 5:
            snap.prune(keep_last=KEEP_LAST)
        elif step % 4 == 3:
            snap.gc()
        step += 1


def child_kill_at_operation(path: str, chunk_bytes: int, target: int, after: bool) -> None:
    """Open, capture, restore, prune, gc and close with a :class:`KillIO`; print
    ``committed STEP SEQ`` after each wait and ``ops N`` if it got to the end alive."""
    io = KillIO(target, after)
    snap = arraysnap.open(path, chunk_bytes=chunk_bytes, _io=io, _retry_delays=())
    latest = snap.latest()
    step = 0 if latest is None or latest.step is None else latest.step + 1

    def commit(count: int) -> None:
        nonlocal step
        info = None
        for _ in range(count):
            info = capture_step(snap, step)
            step += 1
        snap.wait()
        assert info is not None
        print("committed", step - 1, info.seq, flush=True)

    commit(1)
    commit(1)
    commit(2)
    restored = snap.restore()
    del restored
    snap.prune(keep_last=KEEP_LAST)
    commit(1)
    snap.gc()
    snap.close()
    print("ops", io.count, flush=True)


def _child_main(args: list[str]) -> int:
    kind, path, chunk_bytes = args[0], args[1], int(args[2])
    if kind == "loop":
        child_capture_loop(path, chunk_bytes)
    elif kind == "ops":
        child_kill_at_operation(path, chunk_bytes, int(args[3]), args[4] == "after")
    else:
        print(f"unknown child {kind!r}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class Failure:
    """One failed check: its categories (lost, wrong, unexpected), event and explanation."""

    categories: tuple[str, ...]
    event: str
    message: str
    trace: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kinds = "+".join(self.categories)
        return f"FAIL [{kinds}] {self.event}: {self.message}"


class Tally:
    """Counts of events, passed checks and failures."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.passed = 0
        self.failures: list[Failure] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.event = ""

    def check(self, ok: bool, categories: tuple[str, ...], message: str) -> bool:
        """Record a check; a failed one is printed at once."""
        if ok:
            self.passed += 1
            return True
        self.fail(categories, message)
        return False

    def fail(self, categories: tuple[str, ...], message: str,
             trace: list[str] | None = None) -> None:
        """Record and print a failure."""
        failure = Failure(categories, self.event, message, trace or [])
        self.failures.append(failure)
        self.say(str(failure))
        for line in failure.trace:
            self.say(f"    {line}")

    def category(self, name: str) -> int:
        """How many failures carry category `name`."""
        return sum(name in failure.categories for failure in self.failures)


def trace_summary(error: BaseException, frames: int = 4) -> list[str]:
    """A few lines: the innermost frames of `error` and the exceptions it was caused by."""
    lines = []
    for entry in traceback.extract_tb(error.__traceback__)[-frames:]:
        lines.append(f"{Path(entry.filename).name}:{entry.lineno} in {entry.name}: "
                     f"{(entry.line or '').strip()[:90]}")
    for cause in _cause_chain(error)[1:]:
        lines.append(f"caused by {type(cause).__name__}: {str(cause)[:200]}")
    return lines


# --------------------------------------------------------------------------------------------
# The torture
# --------------------------------------------------------------------------------------------
class Torture:
    """Runs kill, fault and corruption events in rotation on small stores under `workdir`."""

    def __init__(self, workdir: Path, seed: int, out: TextIO = sys.stdout) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = out
        self.tally = Tally(self.say)
        self.store = workdir / "store-0000"
        self.stores = 0
        self.events_on_store = 0
        self.events = 0
        self.op_estimate = 300
        self.prune_estimates: dict[tuple[str, str], int] = {}
        self.kept: list[Path] = []
        self.needs_fresh_store = True

    # -- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Print a line at once."""
        print(text, file=self.out, flush=True)

    @property
    def counts(self) -> collections.Counter[str]:
        """Event counters."""
        return self.tally.counts

    # -- stores ----------------------------------------------------------------------------
    def new_store(self) -> None:
        """Replace the current store by a fresh one holding steps 0, 1, 2."""
        previous = self.store
        self.stores += 1
        self.store = self.workdir / f"store-{self.stores:04d}"
        if previous.exists() and previous not in self.kept:
            shutil.rmtree(previous, ignore_errors=True)
        codec = self.rng.choice(["zstd", "zstd", "zstd:3", "none"])
        with arraysnap.open(self.store, chunk_bytes=CHUNK_BYTES, codec=codec) as snap:
            for step in range(3):
                capture_step(snap, step)
            snap.wait()
        self.events_on_store = 0
        self.needs_fresh_store = False

    def keep(self, path: Path) -> bool:
        """Keep `path` (a store or a scratch copy) for a post-mortem, up to MAX_KEPT of them."""
        if path not in self.kept:
            if len(self.kept) >= MAX_KEPT:
                return False
            self.kept.append(path)
            self.say(f"    kept for inspection: {path}")
        return True

    def scratch_copy(self) -> Path:
        """A copy of the current store to damage."""
        scratch = self.workdir / f"scratch-{self.events:05d}"
        shutil.copytree(self.store, scratch, symlinks=True)
        return scratch

    # -- shared checks ---------------------------------------------------------------------
    def expect_restore(self, snap: arraysnap.Store, seq: int | None, step: int | None,
                       what: str, *, expected_seq: int | None = None,
                       fallback: bool = False) -> bool:
        """Restore snapshot `seq` (None: the latest) of `snap`; it must hold exactly the
        workload of `step` (and be snapshot `expected_seq`, if given)."""
        try:
            if seq is None:
                restored = snap.restore(fallback=fallback) if fallback else snap.restore()
            else:
                restored = snap.restore(seq=seq)
        except (CorruptSnapshotError, SnapshotNotFoundError, FormatVersionError) as err:
            self.tally.fail((LOST,), f"{what}: snapshot {'latest' if seq is None else seq} (step "
                                     f"{step}) does not restore: {type(err).__name__}: {err}")
            return False
        got_seq = restored.seq
        problem = restored_difference(restored, step)
        del restored
        if expected_seq is not None and problem is None and got_seq != expected_seq:
            problem = f"restored snapshot {got_seq}, expected {expected_seq}"
        return self.tally.check(problem is None, (LOST, WRONG),
                                f"{what}: snapshot {got_seq} restored wrong data: {problem}")

    def check_all_restore(self, snap: arraysnap.Store, what: str) -> None:
        """Every listed snapshot restores to exactly the workload of its step."""
        for info in snap.list():
            self.expect_restore(snap, info.seq, info.step, what)

    def check_prune_explains(self, expected: Iterable[int], listed: Iterable[int],
                             what: str) -> None:
        """Snapshots known committed that are gone must have been pruned: a prune keeps
        the newest KEEP_LAST, so at least that many newer snapshots must be listed."""
        listed = set(listed)
        for seq in sorted(set(expected) - listed):
            newer = sum(1 for other in listed if other > seq)
            self.tally.check(newer >= KEEP_LAST, (LOST,),
                             f"{what}: committed snapshot {seq} disappeared (only {newer} newer "
                             f"snapshots listed; prune keeps {KEEP_LAST})")

    # -- kills -----------------------------------------------------------------------------
    def _child_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "arraysnap.torture", "--child", *args]

    def _child_chunk_bytes(self) -> str:
        return str(self.rng.choice([CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES // 2]))

    def kill_at_random_moment(self) -> None:
        """SIGKILL a capture loop at a random moment, then check the store."""
        before = manifest_files(self.store)
        early = self.rng.random() < 0.2
        delay = self.rng.uniform(0.05, 0.9) if early else self.rng.uniform(0.0, 0.4)
        errors = self.workdir / "child-stderr.txt"
        lines: list[str] = []
        committed = threading.Event()
        with errors.open("w") as stderr:
            proc = subprocess.Popen(
                self._child_command("loop", str(self.store), self._child_chunk_bytes()),
                stdout=subprocess.PIPE, stderr=stderr, text=True)

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    if line.startswith("committed"):
                        committed.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                if early:
                    # Lands in start-up, open() and the recovery of the previous death.
                    time.sleep(delay)
                elif not committed.wait(60):
                    self.tally.fail((UNEXPECTED,), "the capture loop made no commit in 60 s")
                else:
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            reader.join(timeout=10)
        stderr_text = errors.read_text(errors="replace")
        if proc.returncode != -signal.SIGKILL:
            self.tally.fail((UNEXPECTED,), f"the capture loop exited with {proc.returncode} "
                                           f"before it was killed: {stderr_text[-1500:]}")
        else:
            self.tally.passed += 1
        reported = committed_reports("".join(lines))
        kind = "early" if early else "after a commit"
        ok = self.check_after_crash(before, reported, f"SIGKILL {kind} (+{delay:.2f} s)")
        if proc.returncode == -signal.SIGKILL and ok:
            self.counts["kills"] += 1
            self.counts["kills at random moments"] += 1

    def _run_ops_child(self, target: int, after: bool) -> tuple[int, str, str]:
        proc = subprocess.run(
            self._child_command("ops", str(self.store), self._child_chunk_bytes(), str(target),
                                "after" if after else "before"),
            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        return proc.returncode, proc.stdout, proc.stderr

    def kill_at_operation(self) -> None:
        """A child kills itself at its n-th file operation (sometimes again in recovery)."""
        before = manifest_files(self.store)
        # A little past the estimate, so that it grows with the stores' workloads.
        target = self.rng.randint(1, self.op_estimate * 5 // 4)
        after = self.rng.random() < 0.5
        code, out, err = self._run_ops_child(target, after)
        what = f"SIGKILL {'after' if after else 'before'} file operation {target}"
        killed = code == -signal.SIGKILL
        reported = committed_reports(out)
        if code == 0:
            total = int(out.rsplit("ops ", 1)[1].split()[0]) if "ops " in out else 0
            self.op_estimate = max(30, total)
            self.counts["kill points past the end"] += 1
        elif killed:
            self.op_estimate = max(self.op_estimate, target)
        if not self.tally.check(code in (0, -signal.SIGKILL), (UNEXPECTED,),
                                f"{what}: the child failed with exit code {code}: "
                                f"{err[-1500:]}"):
            killed = False
        again = killed and self.rng.random() < 0.3
        if again:
            # Die again early in the next run: during open()'s recovery of the first death.
            second = self.rng.randint(1, 12)
            code, out, err = self._run_ops_child(second, False)
            what += f", then before operation {second}"
            reported += committed_reports(out)
            self.tally.check(code in (0, -signal.SIGKILL), (UNEXPECTED,),
                             f"{what}: the second child failed with exit code {code}: "
                             f"{err[-1500:]}")
        ok = self.check_after_crash(before, reported, what)
        if killed and ok:
            self.counts["kills"] += 1
            self.counts["kills at file operations"] += 1
            if again and code == -signal.SIGKILL:
                self.counts["kills"] += 1
                self.counts["kills during recovery"] += 1

    def check_after_crash(self, before: dict[int, bytes], reported: list[tuple[int, int]],
                          what: str) -> bool:
        """Everything a killed writer must leave behind; True if all checks passed."""
        path = self.store
        failures = len(self.tally.failures)
        with arraysnap.open(path, mode="r") as reader:  # before a writer's recovery touches it
            latest = reader.latest()
            if self.tally.check(latest is not None, (LOST,), f"{what}: no snapshot is listed"):
                assert latest is not None
                self.expect_restore(reader, None, latest.step, f"{what}: reader, latest",
                                    expected_seq=latest.seq)
        with arraysnap.open(path, chunk_bytes=CHUNK_BYTES) as snap:
            infos = snap.list()
            listed = {info.seq: info.step for info in infos}
            on_disk = sorted(manifest_files(path))
            self.tally.check(sorted(listed) == on_disk, (LOST,),
                             f"{what}: manifests on disk {on_disk}, listed {sorted(listed)}")
            leftovers = leftover_temporaries(path)
            self.tally.check(not leftovers, (UNEXPECTED,),
                             f"{what}: temporaries left after recovery: {leftovers[:5]}")
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after the kill: {report}")
            for seq, data in before.items():
                now = path / "snapshots" / f"{seq:012d}.json"
                if now.exists():
                    self.tally.check(now.read_bytes() == data, (LOST,),
                                     f"{what}: committed manifest {seq} was rewritten")
            for step, seq in reported:
                if seq in listed:
                    self.tally.check(listed[seq] == step, (WRONG,),
                                     f"{what}: snapshot {seq} holds step {listed[seq]}, the "
                                     f"child committed step {step} as it")
            expected = set(before) | {seq for _, seq in reported}
            newest = max(listed, default=0)
            self.tally.check(newest >= max(expected, default=0), (LOST,),
                             f"{what}: the latest snapshot is {newest}, but "
                             f"{max(expected, default=0)} was committed")
            if reported:
                self.tally.check(
                    max(listed.values(), default=-1) >= max(step for step, _ in reported),
                    (LOST,), f"{what}: latest step {max(listed.values(), default=None)} < "
                             f"reported {max(step for step, _ in reported)}")
            self.check_prune_explains(expected, listed, what)
            # Older snapshots first: a restore of the latest repairs the baseline by itself,
            # and the capture below must find it right after open()'s recovery alone.
            for info in infos[:-1]:
                self.expect_restore(snap, info.seq, info.step, what)
            step = (infos[-1].step or 0) + 1 if infos else 0
            info = capture_step(snap, step)
            snap.wait()
            self.expect_restore(snap, None, step, f"{what}: the capture after recovery",
                                expected_seq=info.seq)
            for old in infos[-2:]:
                self.expect_restore(snap, old.seq, old.step, f"{what}: after a new capture")
        return len(self.tally.failures) == failures

    # -- faults ----------------------------------------------------------------------------
    def _check_raised(self, io: FaultIO, raised: list[BaseException], what: str,
                      may_swallow: bool) -> bool:
        """The injected fault was reported (or, where allowed, swallowed); True if injected."""
        if io.injected is None:
            self.tally.check(not raised, (UNEXPECTED,), f"{what}: no fault was injected")
            for error in raised:
                self.tally.fail((UNEXPECTED,), f"{what}: {type(error).__name__}: {error}",
                                trace_summary(error))
            return False
        for error in raised:
            if not self.tally.check(io.injected in _cause_chain(error), (UNEXPECTED,),
                                    f"{what}: raised {type(error).__name__}: {error}, which "
                                    f"is not the injected {io.injected}"):
                self.tally.fail((UNEXPECTED,), f"{what}: traceback of the above",
                                trace_summary(error))
        if not raised:
            self.tally.check(may_swallow, (UNEXPECTED,),
                             f"{what}: {io.injected} was swallowed: nothing was raised")
        return True

    def fault_in_capture(self) -> None:
        """Fail a capture (sometimes with another one queued behind it) at a random call;
        check committed snapshots, then that the next capture stores every change."""
        path = self.store
        io = FaultIO(path)
        snap = arraysnap.open(path, chunk_bytes=CHUNK_BYTES, _io=io, _retry_delays=())
        try:
            latest = snap.latest()
            assert latest is not None and latest.step is not None
            step = latest.step + 1
            # A capture without fault shows which calls one capture makes, and how many.
            io.reset()
            capture_step(snap, step)
            snap.wait()
            calls = dict(io.counts)
            before = store_files(path)
            before_seqs = set(manifest_files(path))
            op, area = self.rng.choice(sorted(calls))
            index = self.rng.randrange(calls[(op, area)])
            err = self.rng.choice([errno.EIO, errno.ENOSPC])
            queued = self.rng.random() < 0.3
            what = (f"{errno.errorcode[err]} at {op} #{index} in {area}"
                    f"{' with a capture queued' if queued else ''}")
            live_steps = [step + 1, step + 2] if queued else [step + 1]
            raised: list[BaseException] = []
            io.arm(op, area, index, err)
            for live in live_steps:
                try:
                    capture_step(snap, live)
                except (OSError, ArraysnapError) as error:
                    raised.append(error)
            try:
                snap.wait()
            except (OSError, ArraysnapError) as error:
                raised.append(error)
            io.disarm()
            injected = self._check_raised(io, raised, what,
                                          may_swallow=io.area(io.injected_at) == "mirror"
                                          or io.injected_at.endswith("/history.jsonl"))
            if injected:
                self.counts["faults"] += 1
                self.counts[f"faults {errno.errorcode[err]}"] += 1
            else:
                self.counts["faults not reached"] += 1
            last = live_steps[-1]
            after = store_files(path)
            for name, data in before.items():
                self.tally.check(after.get(name) == data, (LOST,),
                                 f"{what}: committed file {name} changed or vanished")
            codec = store_codec(path)
            for name in sorted(set(after) - set(before)):
                if name.startswith("chunks/"):
                    self.tally.check(object_intact(path, name, codec), (UNEXPECTED,),
                                     f"{what}: a torn chunk object {name} was left in place")
            leftovers = leftover_temporaries(path, mirror=False)
            self.tally.check(not leftovers, (UNEXPECTED,),
                             f"{what}: temporaries left by the failed capture: {leftovers[:5]}")
            if injected and not raised:
                # A swallowed fault (the marker after a commit) must follow a whole commit.
                steps = [info.step for info in snap.list()]
                self.tally.check(last in steps, (LOST,),
                                 f"{what}: nothing raised, but step {last} was not committed")
            with arraysnap.open(path, mode="r") as reader:  # another Store sees commits only
                report = reader.verify()
                self.tally.check(report.ok, (LOST,), f"{what}: verify after the fault: {report}")
                self.check_all_restore(reader, f"{what}: reader after the fault")
                self.check_prune_explains(before_seqs, [i.seq for i in reader.list()], what)
            if self.rng.random() < 0.5:
                what += ", reopened"
                try:
                    snap.close()
                except ArraysnapError as error:
                    self.tally.check(io.injected in _cause_chain(error), (UNEXPECTED,),
                                     f"{what}: close() raised {error!r}")
                snap = arraysnap.open(path, chunk_bytes=CHUNK_BYTES, _io=io, _retry_delays=())
            # The baselines already hold the live arrays: the next capture must store them.
            info = capture_step(snap, last)
            snap.wait()
            self.expect_restore(snap, None, last, f"{what}: the capture after the fault "
                                                  "(invariant 3)", expected_seq=info.seq)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after recovery: {report}")
            self.check_all_restore(snap, f"{what}: after recovery")
        finally:
            io.disarm()
            try:
                snap.close()
            except ArraysnapError:
                pass
        with arraysnap.open(path, mode="r") as reader:
            self.expect_restore(reader, None, last, f"{what}: reader after recovery")

    def fault_in_prune(self) -> None:
        """Fail a prune (or the gc inside it) at a random call; check what remains."""
        path = self.store
        io = FaultIO(path)
        with arraysnap.open(path, chunk_bytes=CHUNK_BYTES, _io=io, _retry_delays=()) as snap:
            latest = snap.latest()
            assert latest is not None and latest.step is not None
            for step in range(latest.step + 1, latest.step + 3):
                capture_step(snap, step)
            snap.wait()
            seqs = [info.seq for info in snap.list()]
            keys = [("unlink", "snapshots"), ("unlink", "chunks"), ("fsync_dir", "snapshots"),
                    ("fsync", "snapshots")]
            op, area = self.rng.choice(keys)
            index = self.rng.randrange(self.prune_estimates.get((op, area), 4))
            err = self.rng.choice([errno.EIO, errno.ENOSPC])
            what = f"{errno.errorcode[err]} at {op} #{index} in {area} during prune"
            raised: list[BaseException] = []
            io.arm(op, area, index, err)
            try:
                snap.prune(keep_last=KEEP_LAST)
            except (OSError, ArraysnapError) as error:
                raised.append(error)
            io.disarm()
            seen = io.counts.get((op, area), 0)
            if io.injected is None:
                self.prune_estimates[(op, area)] = max(1, seen)
            injected = self._check_raised(io, raised, what, may_swallow=False)
            if injected:
                self.counts["faults"] += 1
                self.counts["faults in prune"] += 1
                self.counts[f"faults {errno.errorcode[err]}"] += 1
            else:
                self.counts["faults not reached"] += 1
            listed = [info.seq for info in snap.list()]
            kept = seqs[-KEEP_LAST:]
            self.tally.check(set(kept) <= set(listed), (LOST,),
                             f"{what}: the newest {kept} must stay, listed {listed}")
            self.check_prune_explains(seqs, listed, what)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after the fault: {report}")
            self.check_all_restore(snap, what)
            snap.prune(keep_last=KEEP_LAST)
            listed = [info.seq for info in snap.list()]
            self.tally.check(listed == kept, (UNEXPECTED,),
                             f"{what}: the next prune left {listed}, expected {kept}")
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after a prune: {report}")
            step = (snap.latest().step or 0) + 1  # type: ignore[union-attr]
            info = capture_step(snap, step)
            snap.wait()
            self.expect_restore(snap, None, step, f"{what}: a capture after it",
                                expected_seq=info.seq)

    # -- corruptions -----------------------------------------------------------------------
    def _restore_outcome(self, snap: arraysnap.Store, seq: int
                         ) -> tuple[BaseException | None, str | None, int | None]:
        """(error, difference from the workload of its recorded step, step) of a restore."""
        try:
            restored = snap.restore(seq=seq)
        except (CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError) as err:
            return err, None, None
        step = restored.step
        problem = restored_difference(restored, step)
        del restored
        return None, problem, step

    def corrupt_chunks(self) -> None:
        """Flip bits in, truncate, empty, delete, overwrite or swap chunk objects; the damage
        must be named by verify() and make restore() of older snapshots raise."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        refs = chunk_references(scratch)
        codec = store_codec(scratch)
        objects = sorted(refs)
        how = self.rng.choice(["flip", "flip", "flip-many", "truncate", "empty", "delete",
                               "garbage", "swap"])
        victim = self.rng.choice(objects)
        touched = [victim]
        file = scratch / victim
        if how == "flip":
            flip_bits(file, self.rng, 1)
        elif how == "flip-many":
            flip_bits(file, self.rng, self.rng.randint(2, 40))
        elif how == "truncate":
            size = file.stat().st_size
            file.write_bytes(file.read_bytes()[: self.rng.randrange(max(1, size))])
        elif how == "empty":
            file.write_bytes(b"")
        elif how == "delete":
            file.unlink()
        elif how == "garbage":
            file.write_bytes(self.rng.randbytes(file.stat().st_size))
        else:
            other = self.rng.choice([obj for obj in objects if obj != victim])
            touched.append(other)
            first, second = file.read_bytes(), (scratch / other).read_bytes()
            file.write_bytes(second)
            (scratch / other).write_bytes(first)
        damaged = [obj for obj in touched if not object_intact(scratch, obj, codec)]
        expected = {use for obj in damaged for use in refs[obj]}
        what = f"chunk object {how} ({len(damaged)} damaged, used {len(expected)} times)"
        for mode in ("r", "a"):
            with arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES) as snap:
                here = f"{what}, mode {mode!r}"
                problems = {(p.seq, p.array, p.chunk) for p in snap.verify().problems}
                self.tally.check(problems == expected, (UNEXPECTED,),
                                 f"{here}: verify() reported {sorted(problems)[:6]}, expected "
                                 f"{sorted(expected)[:6]}")
                infos = snap.list()
                newest = infos[-1].seq
                for info in infos:
                    hits = {(name, index) for seq, name, index in expected if seq == info.seq}
                    error, problem, step = self._restore_outcome(snap, info.seq)
                    if error is not None:
                        if not hits:
                            self.tally.fail((LOST,), f"{here}: undamaged snapshot {info.seq} "
                                                     f"does not restore: {error}")
                            continue
                        names = getattr(error, "array", None), getattr(error, "chunk", None)
                        self.tally.check(
                            isinstance(error, CorruptSnapshotError) and names in hits
                            and f"array {names[0]!r}, chunk {names[1]}" in str(error),
                            (UNEXPECTED,),
                            f"{here}: restore(seq={info.seq}) raised {error!r}, which does "
                            f"not name one of the damaged chunks {sorted(hits)[:4]}")
                        continue
                    self.tally.check(problem is None and step == info.step,
                                     (WRONG,) if hits else (LOST, WRONG),
                                     f"{here}: snapshot {info.seq} restored wrong data: "
                                     f"{problem}")
                    # The latest may come from its (verified) baseline; older ones may not.
                    self.tally.check(not hits or info.seq == newest, (UNEXPECTED,),
                                     f"{here}: snapshot {info.seq} restored although its "
                                     f"chunks {sorted(hits)[:4]} are damaged")
        if not damaged:
            self.counts["corruptions harmless"] += 1
        elif len(self.tally.failures) == failures:
            self.counts["corruptions detected"] += 1
            self.counts["chunk objects damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_manifest(self) -> None:
        """Flip bits in or truncate a manifest: detected, left out, never misread."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        manifests = manifest_files(scratch)
        seq = self.rng.choice(sorted(manifests))
        pristine = manifests[seq]
        original = json.loads(pristine)
        file = scratch / "snapshots" / f"{seq:012d}.json"
        if self.rng.random() < 0.3:
            cut = self.rng.randrange(len(pristine))
            file.write_bytes(pristine[:cut])
            how = f"truncated to {cut} of {len(pristine)} bytes"
        else:
            offsets = flip_bits(file, self.rng, self.rng.randint(1, 3))
            how = f"bits flipped at {offsets}"
        data = file.read_bytes()
        try:
            same = json.loads(data) == original
        except ValueError:
            same = False
        others = sorted(s for s in manifests if s != seq)
        what = f"manifest {seq} {how}"
        if same:  # e.g. the case of a hex digit in a \\u escape: the same manifest
            with arraysnap.open(scratch, mode="r") as reader:
                self.check_all_restore(reader, f"{what} (harmless)")
            self.counts["corruptions harmless"] += 1
            self._done_with(scratch, failures)
            return
        for mode in ("r", "a"):
            here = f"{what}, mode {mode!r}"
            try:
                snap = arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES)
            except FormatVersionError as err:
                # The writer refuses a store holding a manifest from the future.
                self.tally.check(mode == "a" and seq == max(manifests), (UNEXPECTED,),
                                 f"{here}: open() raised {err!r}")
                continue
            with snap:
                error, problem, _ = self._restore_outcome(snap, seq)
                if error is None:
                    outcome = problem or "the right data, yet the manifest differs"
                    self.tally.fail((WRONG,) if problem else (UNEXPECTED,),
                                    f"{here}: the damaged snapshot restored ({outcome})")
                else:
                    self.tally.check(
                        isinstance(error, (CorruptSnapshotError, FormatVersionError))
                        and f"snapshot {seq}" in str(error), (UNEXPECTED,),
                        f"{here}: restore(seq={seq}) raised {error!r}")
                listed = [info.seq for info in snap.list()]
                self.tally.check(listed == others, (UNEXPECTED,),
                                 f"{here}: list() gives {listed}, expected {others}")
                latest = snap.latest()
                self.tally.check((latest.seq if latest else None) == (others or [None])[-1],
                                 (UNEXPECTED,), f"{here}: latest() gives {latest}")
                problems = [(p.seq, p.array) for p in snap.verify().problems]
                self.tally.check(problems == [(seq, None)], (UNEXPECTED,),
                                 f"{here}: verify() reported {problems[:6]}")
                self.check_all_restore(snap, here)
                if others:
                    newest = others[-1]
                    newest_step = json.loads(manifests[newest])["step"]
                    self.expect_restore(snap, None, newest_step, f"{here}: fallback",
                                        expected_seq=newest, fallback=True)
                    if seq < newest:
                        self.expect_restore(snap, None, newest_step, f"{here}: latest",
                                            expected_seq=newest)
                if mode == "a":
                    step = max(info.step or 0 for info in snap.list()) + 1
                    info = capture_step(snap, step)
                    snap.wait()
                    self.expect_restore(snap, None, step, f"{here}: a capture after it",
                                        expected_seq=info.seq)
        if len(self.tally.failures) == failures:
            self.counts["corruptions detected"] += 1
            self.counts["manifests damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_settings(self) -> None:
        """Damage arraysnap.json: open() refuses it, or it still means the same store."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        file = scratch / "arraysnap.json"
        pristine = file.read_bytes()
        how = self.rng.choice(["flip", "flip", "truncate", "garbage", "empty"])
        if how == "flip":
            flip_bits(file, self.rng, self.rng.randint(1, 2))
        elif how == "truncate":
            file.write_bytes(pristine[: self.rng.randrange(len(pristine))])
        elif how == "garbage":
            file.write_bytes(self.rng.randbytes(len(pristine)))
        else:
            file.write_bytes(b"")
        what = f"arraysnap.json {how}"
        refused = 0
        for mode in ("r", "a"):
            here = f"{what}, mode {mode!r}"
            try:
                snap = arraysnap.open(scratch, mode=mode, chunk_bytes=CHUNK_BYTES)
            except ArraysnapError:
                refused += 1
                self.tally.passed += 1
                continue
            with snap:
                # Still readable: it must still mean the same store.
                report = snap.verify()
                self.tally.check(report.ok, (LOST,), f"{here}: opened, then {report}")
                self.check_all_restore(snap, f"{here} (opened)")
                if mode == "a":
                    step = max(info.step or 0 for info in snap.list()) + 1
                    info = capture_step(snap, step)
                    snap.wait()
                    self.expect_restore(snap, None, step, f"{here}: a capture after it",
                                        expected_seq=info.seq)
        self.tally.check(refused in (0, 2), (UNEXPECTED,),
                         f"{what}: refused in one mode only")
        if len(self.tally.failures) == failures:
            key = "corruptions detected" if refused else "corruptions harmless"
            self.counts[key] += 1
            if refused:
                self.counts["settings damaged"] += 1
        self._done_with(scratch, failures)

    def corrupt_mirror(self) -> None:
        """Damage the baseline files or their marker; restore and capture must repair it."""
        scratch = self.scratch_copy()
        failures = len(self.tally.failures)
        mirror = scratch / "mirror"
        files = sorted(mirror.glob("*.bin"))
        how = self.rng.choice(["flip", "flip", "flip-many", "truncate", "extend", "delete",
                               "marker-flip", "marker-garbage", "marker-delete", "stale"])
        victim = self.rng.choice(files) if files else None
        if victim is None and how in ("flip", "flip-many", "truncate", "extend", "delete"):
            how = "marker-flip"
        marker = mirror / "state.json"
        if how == "stale":
            # The mirror of the snapshot before the latest comes back (an older copy).
            saved = self.workdir / f"saved-mirror-{self.events:05d}"
            shutil.copytree(mirror, saved)
            with arraysnap.open(scratch, chunk_bytes=CHUNK_BYTES) as snap:
                capture_step(snap, (snap.latest().step or 0) + 1)  # type: ignore[union-attr]
            shutil.rmtree(mirror)
            shutil.move(saved, mirror)
        elif how in ("flip", "flip-many") and victim is not None:
            flip_bits(victim, self.rng, 1 if how == "flip" else self.rng.randint(2, 30))
        elif how == "truncate" and victim is not None:
            os.truncate(victim, self.rng.randrange(max(1, victim.stat().st_size)))
        elif how == "extend" and victim is not None:
            with victim.open("ab") as handle:
                handle.write(b"\0" * self.rng.randint(1, 4096))
        elif how == "delete" and victim is not None:
            victim.unlink()
        elif how == "marker-flip" and marker.exists():
            flip_bits(marker, self.rng, self.rng.randint(1, 3))
        elif how == "marker-garbage":
            marker.write_bytes(self.rng.randbytes(self.rng.randint(0, 200)))
        else:
            marker.unlink(missing_ok=True)
        what = f"mirror {how}"
        with arraysnap.open(scratch, mode="r") as reader:
            latest = reader.latest()
            assert latest is not None
            self.expect_restore(reader, None, latest.step, f"{what}: reader",
                                expected_seq=latest.seq)
            report = reader.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify: {report}")
        with arraysnap.open(scratch, chunk_bytes=CHUNK_BYTES) as snap:
            step = (latest.step or 0) + 1
            if self.rng.random() < 0.5:
                # Capture first: only open()'s recovery can have made the baseline right.
                info = capture_step(snap, step)
                snap.wait()
                self.expect_restore(snap, latest.seq, latest.step, f"{what}: previous")
            else:
                self.expect_restore(snap, None, latest.step, f"{what}: writer",
                                    expected_seq=latest.seq)
                info = capture_step(snap, step)
                snap.wait()
            self.expect_restore(snap, None, step, f"{what}: capture after the damage",
                                expected_seq=info.seq)
            report = snap.verify()
            self.tally.check(report.ok, (LOST,), f"{what}: verify after a capture: {report}")
        with arraysnap.open(scratch, mode="r") as reader:
            self.expect_restore(reader, None, step, f"{what}: reader after a capture",
                                expected_seq=info.seq)
        if len(self.tally.failures) == failures:
            self.counts["mirror damage repaired"] += 1
        self._done_with(scratch, failures)

    def _done_with(self, scratch: Path, failures: int) -> None:
        if len(self.tally.failures) == failures or not self.keep(scratch):
            shutil.rmtree(scratch, ignore_errors=True)

    # -- the rotation ----------------------------------------------------------------------
    def run_event(self, family: str, kind: str, action: Callable[[], None]) -> None:
        """Run one event; any exception escaping it is an unexpected error."""
        self.events += 1
        self.events_on_store += 1
        self.tally.event = f"event {self.events} ({family}: {kind}, {self.store.name})"
        failures = len(self.tally.failures)
        try:
            action()
        except Exception as error:  # noqa: BLE001 - exactly what the torture looks for
            self.tally.fail((UNEXPECTED,), f"{type(error).__name__}: {error}",
                            trace_summary(error))
        if len(self.tally.failures) > failures:
            # Go on with a clean slate; keep this store for a post-mortem.
            self.keep(self.store)
            self.needs_fresh_store = True

    def run(self, seconds: float) -> float:
        """Rotate events for `seconds`; return the time taken."""
        started = time.monotonic()
        deadline = started + seconds
        next_progress = started + PROGRESS_EVERY
        kills = [("random moment", self.kill_at_random_moment),
                 ("file operation", self.kill_at_operation)]
        faults = [("capture", self.fault_in_capture), ("capture", self.fault_in_capture),
                  ("prune", self.fault_in_prune)]
        corruptions = [("chunk objects", self.corrupt_chunks), ("mirror", self.corrupt_mirror),
                       ("manifest", self.corrupt_manifest), ("settings", self.corrupt_settings)]
        rounds = 0
        while time.monotonic() < deadline:
            for family, choices in (("kill", kills), ("fault", faults),
                                    ("corruption", corruptions)):
                if time.monotonic() >= deadline:
                    break
                if self.needs_fresh_store or self.events_on_store >= EVENTS_PER_STORE:
                    self.new_store()
                kind, action = choices[rounds % len(choices)]
                self.run_event(family, kind, action)
                now = time.monotonic()
                if now >= next_progress:
                    self.say(self.progress_line(now - started))
                    next_progress = now + PROGRESS_EVERY
            rounds += 1
        return time.monotonic() - started

    def progress_line(self, elapsed: float) -> str:
        """A one-line summary so far."""
        c = self.counts
        return (f"[{elapsed:5.0f} s] {self.events} events on {self.stores} stores: "
                f"{c['kills']} kills survived, {c['faults']} faults, "
                f"{c['corruptions detected']} corruptions detected, "
                f"{c['mirror damage repaired']} mirror repairs; "
                f"{self.tally.passed} checks passed, {len(self.tally.failures)} failed")

    def summary(self, elapsed: float) -> list[str]:
        """The final report, one line per count; the last line is ``N passed, M failed``."""
        c = self.counts
        lines = [
            f"arraysnap torture: seed {self.seed}, {self.events} events on {self.stores} "
            f"stores in {self.workdir}",
            f"  kills: {c['kills at random moments']} at random moments, "
            f"{c['kills at file operations']} at file operation n, "
            f"{c['kills during recovery']} more during the recovery of one "
            f"({c['kill points past the end']} children finished before their kill point)",
            f"  faults: {c['faults EIO']} EIO, {c['faults ENOSPC']} ENOSPC; "
            f"{c['faults in prune']} in prune/gc; {c['faults not reached']} armed past the "
            "last call",
            f"  corruptions: {c['chunk objects damaged']} chunk objects, "
            f"{c['manifests damaged']} manifests, {c['settings damaged']} arraysnap.json; "
            f"{c['corruptions harmless']} changed nothing that matters (checked)",
        ]
        for failure in self.tally.failures[:40]:
            lines.append(f"  {failure}")
        if len(self.tally.failures) > 40:
            lines.append(f"  ... and {len(self.tally.failures) - 40} more failures")
        lines += [
            f"kills survived: {c['kills']}",
            f"faults injected: {c['faults']}",
            f"corruptions detected: {c['corruptions detected']}",
            f"mirror damage repaired: {c['mirror damage repaired']}",
            *(f"{line}: {self.tally.category(key)}" for key, line in CATEGORY_LINES.items()),
            f"elapsed: {elapsed:.1f} s",
            f"{self.tally.passed} passed, {len(self.tally.failures)} failed",
        ]
        return lines

    def report(self, elapsed: float) -> dict[str, Any]:
        """The outcome as a JSON-ready dict."""
        c = self.counts
        return {
            "seed": self.seed,
            "elapsed_seconds": round(elapsed, 3),
            "events": self.events,
            "stores": self.stores,
            "kills_survived": c["kills"],
            "faults_injected": c["faults"],
            "corruptions_detected": c["corruptions detected"],
            "mirror_damage_repaired": c["mirror damage repaired"],
            "snapshots_lost": self.tally.category(LOST),
            "wrong_data_returned": self.tally.category(WRONG),
            "unexpected_errors": self.tally.category(UNEXPECTED),
            "passed": self.tally.passed,
            "failed": len(self.tally.failures),
            "counts": dict(sorted(c.items())),
            "failures": [{"categories": list(f.categories), "event": f.event,
                          "message": f.message, "trace": f.trace}
                         for f in self.tally.failures],
            "kept": [str(path) for path in self.kept],
        }

    @property
    def ok(self) -> bool:
        """No snapshot lost, no wrong data, no unexpected error."""
        return all(self.tally.category(key) == 0 for key in CATEGORY_LINES)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arraysnap.torture",
        description="Kill, fail and corrupt arraysnap stores in rotation and check that no "
                    "committed snapshot is lost and no wrong data is returned.",
        epilog="Exit code 0 if and only if no snapshot was lost, no wrong data was returned "
               "and no unexpected error happened.")
    parser.add_argument("--minutes", type=float, default=None,
                        help="how long to run (default 10)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="how long to run, in seconds (overrides --minutes)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to put the stores (default: a new temporary folder under "
                             "the current directory, removed at the end unless something "
                             "failed)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random choices (default: from the clock)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the counts and failures to FILE as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the torture from the command line; return the exit code."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--child"]:
        return _child_main(args_list[1:])
    args = _parser().parse_args(args_list)
    seconds = (args.seconds if args.seconds is not None
               else 60.0 * (args.minutes if args.minutes is not None else 10.0))
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    # Damaged stores make arraysnap log warnings by design: counted here, not printed.
    logger = logging.getLogger("arraysnap")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    if args.dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="arraysnap-torture-", dir=Path.cwd()))
        owned = True
    else:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        owned = False
    torture = Torture(workdir, seed)
    kind = filesystem_type(workdir)
    torture.say(f"arraysnap torture: {seconds:.0f} s, seed {seed}, stores in {workdir} ({kind})")
    if kind in ("tmpfs", "ramfs"):
        torture.say("  note: that is a RAM file system, where fsync does nothing; "
                    "use --dir on a real disk to torture durability too")
    elapsed = 0.0
    interrupted = False
    began = time.monotonic()
    try:
        torture.run(seconds)
    except KeyboardInterrupt:
        interrupted = True
        torture.say("interrupted")
    elapsed = time.monotonic() - began
    for line in torture.summary(elapsed):
        torture.say(line)
    if args.json is not None:
        args.json.write_text(json.dumps(torture.report(elapsed), indent=2) + "\n")
    if torture.ok and not interrupted:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for child in workdir.iterdir():
                if child.name.startswith(("store-", "scratch-", "saved-mirror-",
                                          "child-stderr")):
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
    if interrupted:
        return 130
    return 0 if torture.ok else 1


if __name__ == "__main__":
    sys.exit(main())
