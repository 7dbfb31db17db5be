"""Power cuts, simulated: a file system that forgets, the crash states it may leave, and the
check that every snapshot ``wait()`` returned for survived.

Two levels, both fed by one recorder, the journaling FUSE file system of
:mod:`arraysnap.testing._forgetting` (a pass-through of a backing folder that journals
every write, create, rename, unlink, truncation, fallocate and barrier as the kernel sends
them, shared-map writes included):

1. :class:`ForgettingMount` mounts it, runs a real writer process on it, freezes the file
   system at a chosen operation (or lets the process finish), kills the process, drops
   every change that was not made durable (:meth:`FileSystemModel.crash_state` with no
   generator), and mounts what is left, as a machine that lost its power and booted again
   (the writer runs with a boot id of its own, so the next boot's is different).
2. :func:`crash_states` replays one recorded journal and gives, for every instant worth a
   cut, what a power cut then may leave: every change since the last barrier lost, and
   random mixtures of the changes kept and lost that the rules of
   :mod:`arraysnap.testing._crashstates` allow. Checking them needs no FUSE and no process.

:func:`check_after_cut` is the one check both use: the store opens (writer and reader) to a
committed snapshot, every snapshot the writer knew durable before the cut is listed and
restores bit-exactly, everything listed verifies, and a further capture works.

FUSE needs ``/dev/fuse``, Debian's ``fuse3`` (``fusermount3`` and libfuse3) and the
``mfusepy`` package; :func:`fuse_unavailable` says what is missing.

>>> from arraysnap.testing.powerloss import expected_snapshots
>>> expected_snapshots(["opened", "committed-1-0", "committed-2-1", "pruning",
...                     "pruned-1", "committed-3-2"])
({2: 1, 3: 2}, {1: 0})
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arraysnap
from arraysnap.testing._crashstates import MARKS, CrashState, FileSystemModel, Journal
from arraysnap.testing._workload import SMALL_WORKLOAD, Workload

__all__ = ["MARKS", "CrashState", "Cut", "FileSystemModel", "ForgettingMount", "Journal",
           "check_after_cut", "crash_states", "expected_snapshots", "fuse_unavailable"]



def fuse_unavailable() -> str | None:
    """Why a forgetting file system cannot be mounted here, or None if it can.

    >>> fuse_unavailable() is None or isinstance(fuse_unavailable(), str)
    True
    """
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE is not available)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian's fuse3 package: apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:
        return f"mfusepy cannot load libfuse3 ({err}); install Debian's fuse3 and the test extra"
    if os.geteuid() != 0:
        # The writer gets a boot id of its own from a bind mount in a mount namespace.
        return "the power-loss simulation needs root (a private mount namespace per writer)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def expected_snapshots(labels: list[str]) -> tuple[dict[int, int], dict[int, int]]:
    """From the marks made before a cut (of one boot or several in a row): the snapshots
    that must survive it (seq: step) and those that may be gone, removed by a prune.

    A prune may remove any snapshot durable when it began but the newest then; what it
    did remove is marked when it returns. One that failed, or was cut, may have removed
    any of them.
    """
    acked: dict[int, int] = {}
    maybe: set[int] = set()
    exposed: set[int] = set()  # what the prune under way may remove
    for label in labels:
        parts = label.split("-")
        if parts[0] == "committed":
            acked[int(parts[1])] = int(parts[2])
        elif parts[0] == "pruning":
            newest = max(acked, default=None)
            exposed = {seq for seq in acked if seq != newest}
        elif parts[0] == "pruned":
            maybe.update(int(p) for p in parts[1:] if p)
            exposed = set()
        elif label in ("prune-failed", "opened"):  # failed, or cut by a power loss
            maybe |= exposed
            exposed = set()
    maybe |= exposed
    return ({s: acked[s] for s in sorted(acked) if s not in maybe},
            {s: acked[s] for s in sorted(maybe) if s in acked})


def check_after_cut(path: Path, labels: list[str], workload: Workload = SMALL_WORKLOAD,
                    *, capture: bool = True) -> list[str]:
    """What is wrong with the store at `path` after a cut, given the marks made before it;
    an empty list if nothing is. With `capture`, a further capture is made and checked."""
    problems: list[str] = []
    must, maybe = expected_snapshots(labels)
    if not (path / "arraysnap.json").exists():
        # The store's creation itself may be lost, until its first snapshot is durable.
        return [f"the store is gone, but snapshot {sorted(must)} was durable"] if must else []
    try:
        with arraysnap.open(path, mode="r") as reader:
            read = {info.seq: info.step for info in reader.list()}
            # A reader maps the baselines when their marker vouches for them: it must not
            # vouch across a reboot unless it was made durable.
            problems += _latest_unverified(reader, read, workload, "a reader's")
        snap = arraysnap.open(path, chunk_bytes=4096)
    except arraysnap.ArraysnapError as err:
        return [f"open failed: {type(err).__name__}: {err}"]
    try:
        listed = {info.seq: info.step for info in snap.list()}
        if sorted(listed) != sorted(read):
            problems.append(f"the writer lists {sorted(listed)}, a reader {sorted(read)}")
        for seq, step in must.items():
            if listed.get(seq) != step:
                problems.append(f"snapshot {seq} (step {step}) was durable before the cut and "
                                f"is {'missing' if seq not in listed else 'changed'}")
        # First, and without verifying: the writer's recovery must not have trusted the
        # baselines on a marker no fsync made durable either.
        problems += _latest_unverified(snap, listed, workload, "the writer's")
        for seq, step in listed.items():
            if seq in maybe and maybe[seq] != step:
                problems.append(f"snapshot {seq} is listed with step {step}, not {maybe[seq]}")
            difference = workload.difference(_restore(snap, seq, step, workload), step)
            if difference is not None:
                problems.append(f"snapshot {seq} restores wrong: {difference}")
        report = snap.verify()
        if not report.ok:
            problems.append(f"verify: {report}")
        if capture:
            step = max(listed.values(), default=-1) + 1
            info = workload.capture(snap, step).result()
            difference = workload.difference(snap.restore(seq=info.seq), step)
            if difference is not None:
                problems.append(f"the capture after the cut restores wrong: {difference}")
    except (arraysnap.ArraysnapError, OSError) as err:
        problems.append(f"{type(err).__name__}: {err}")
    finally:
        snap.close()
    return problems


def _latest_unverified(snap: arraysnap.Store, listed: dict[int, int], workload: Workload,
                       who: str) -> list[str]:
    if not listed:
        return []
    latest = max(listed)
    difference = workload.difference(snap.restore(verify=False), listed[latest])
    return [] if difference is None else [
        f"{who} restore(verify=False) of snapshot {latest} is wrong: {difference}"]


def _restore(snap: arraysnap.Store, seq: int, step: int,
             workload: Workload) -> arraysnap.Restored:
    """Snapshot `seq`; on a disk too full to assemble it, restored into arrays of the
    workload's shapes instead (which needs no space)."""
    try:
        return snap.restore(seq=seq)
    except arraysnap.StoreWriteError as err:
        if err.errno != errno.ENOSPC:
            raise
    buffers = {name: np.zeros_like(array) for name, array in workload.arrays(step).items()}
    listed = snap.snapshot(seq).arrays
    return snap.restore_into({n: b for n, b in buffers.items() if n in listed}, seq=seq)


@dataclass(frozen=True, slots=True)
class Cut:
    """One crash state of a recorded run: before operation `index`, the marks made until
    then, and the state (`variant` 0: every change not yet durable lost)."""

    index: int
    variant: int
    labels: tuple[str, ...]
    state: CrashState


def crash_states(base: Path, journal: Journal, *, cuts: int, variants: int,
                 seed: int = 0) -> Iterator[Cut]:
    """The crash states of the run `journal` recorded over the folder `base`.

    At every barrier (just before the next one, the instant with the most marks and the
    same durable state) the state with everything not yet durable lost; at `cuts` further
    instants drawn at random among all operations, `variants` random mixtures each. States
    already given with the same marks are not given again.
    """
    rng = random.Random(seed)
    barriers = journal.barriers()
    at_barrier = set(barriers[1:]) | {len(journal.ops)}
    drawn = set(rng.sample(range(1, len(journal.ops) + 1), min(cuts, len(journal.ops))))
    model = FileSystemModel.of_folder(base)
    seen: set[bytes] = set()
    for index in journal.replay(model, at_barrier | drawn):
        labels = tuple(journal.labels(index))
        states = [(0, model.crash_state())] if index in at_barrier else []
        if index in drawn:
            states += [(v, model.crash_state(rng)) for v in range(1, variants + 1)]
        for variant, state in states:
            key = _digest(state, labels)
            if key not in seen:
                seen.add(key)
                yield Cut(index, variant, labels, state)


def _digest(state: CrashState, labels: tuple[str, ...]) -> bytes:
    digest = hashlib.blake2b(repr(labels).encode())
    for name in sorted(state.files):
        digest.update(name.encode() + b"\0" + hashlib.blake2b(state.files[name]).digest())
    digest.update(repr(sorted(state.folders)).encode())
    return digest.digest()


class ForgettingMount:
    """A forgetting file system under `workdir`, mounted at ``workdir/mnt`` (see module),
    empty or holding `initial`.

    :meth:`run` runs a writer process on it; the file system freezes at its operation
    `hold_at` (0: never); :meth:`cut` then drops what was not durable and mounts the rest,
    as after a reboot.

    >>> reason = fuse_unavailable()
    >>> if reason is None:
    ...     import tempfile, pathlib
    ...     with ForgettingMount(pathlib.Path(tempfile.mkdtemp())) as mount:
    ...         _ = (mount.mount / "a").write_bytes(b"lost")
    ...         labels = mount.cut()
    ...         print((mount.mount / "a").exists())
    ... else:
    ...     print(False)
    False
    """

    def __init__(self, workdir: Path, *, capacity: int = 0, hold_at: int = 0,
                 initial: CrashState | None = None) -> None:
        self.workdir = workdir
        self.mount = workdir / "mnt"
        self.capacity = capacity
        self.boots = 0
        self._daemon: subprocess.Popen[bytes] | None = None
        self._writer: subprocess.Popen[bytes] | None = None
        self._base = workdir / "boot-0"
        if initial is None:
            self._base.mkdir(parents=True)
        else:  # the state a cut left, to run its recovery on
            initial.write(self._base)
        self.mount.mkdir()
        self._start(hold_at)

    # -- mounting -------------------------------------------------------------------------
    @property
    def journal_dir(self) -> Path:
        return self.workdir / f"journal-{self.boots}"

    def _start(self, hold_at: int) -> None:
        backing = self.workdir / f"live-{self.boots}"
        shutil.copytree(self._base, backing)
        command = [sys.executable, "-m", "arraysnap.testing._forgetting", str(backing),
                   str(self.mount), str(self.journal_dir), "--hold-at", str(hold_at),
                   "--capacity", str(self.capacity)]
        log = open(self.workdir / f"fuse-{self.boots}.log", "wb")  # noqa: SIM115
        self._daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mount):
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError("the forgetting file system did not mount: " + (
                    self.workdir / f"fuse-{self.boots}.log").read_text()[-2000:])
            time.sleep(0.02)

    def _stop(self) -> None:
        if self._daemon is not None:
            self._daemon.kill()
            self._daemon.wait()
            self._daemon = None
        # A mount whose process died answers "not connected": ismount() says False then,
        # the kernel's table still lists it.
        if self._mounted():
            done = subprocess.run(["fusermount3", "-u", "-z", str(self.mount)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0 or self._mounted():
                raise RuntimeError(f"cannot unmount {self.mount}: {done.stderr.strip()}")

    def _mounted(self) -> bool:
        with open("/proc/self/mounts") as table:
            return any(line.split()[1].replace("\\040", " ") == str(self.mount)
                       for line in table)

    # -- a writer and a cut ---------------------------------------------------------------
    def run(self, command: list[str], *, timeout: float = 120) -> bool:
        """Run `command` on the mount with a boot id of its own; return True if the file
        system froze at its hold point (the process is then killed), False if it ended
        (RuntimeError if it failed: a crashed writer is not a finished run)."""
        boot = self.workdir / f"boot-id-{self.boots}"
        boot.write_text(str(uuid.uuid4()) + "\n")
        wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"',
                   str(boot), *command]
        out = open(self.workdir / f"writer-{self.boots}.log", "wb")  # noqa: SIM115
        self._writer = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        out.close()
        held = self.journal_dir / "held"
        deadline = time.monotonic() + timeout
        try:
            while self._writer.poll() is None:
                if held.exists():
                    return True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command} ran longer than {timeout} s")
                time.sleep(0.005)
            if held.exists():
                return True
            if self._writer.returncode != 0:
                raise RuntimeError(f"the writer failed (exit code {self._writer.returncode}) "
                                   f"before any cut: {self.writer_output()[-3000:]}")
            return False
        finally:
            if self._writer.poll() is None:
                os.killpg(self._writer.pid, signal.SIGKILL)
                # A process waiting for a frozen file system's answer cannot die until the
                # file system does (the kernel waits for the reply uninterruptibly).
                self._stop()
            self._writer.wait()

    def writer_output(self) -> str:
        return (self.workdir / f"writer-{self.boots}.log").read_text(errors="replace")

    def cut(self, *, hold_at: int = 0) -> list[str]:
        """Cut the power: every change not made durable is lost; boot again and mount what
        is left, to freeze at its operation `hold_at` (0: never; a cut during what runs
        next, the recovery for instance). Returns the labels marked before the cut."""
        self._stop()
        journal = Journal.read(self.journal_dir)
        model = FileSystemModel.of_folder(self._base)
        journal.apply(model)
        self.boots += 1
        self._base = self.workdir / f"boot-{self.boots}"
        model.crash_state().write(self._base)
        self._start(hold_at)
        return journal.labels()

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> ForgettingMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
