"""Invariants 2, 3, 4, 5 and 7 of the design, proven by doing to arraysnap what machines do.

- 2 Atomic: SIGKILL at random moments and at every durable file operation, failing writes,
  a real full disk: the store opens to the last commit and every listed snapshot verifies.
- 3 Nothing lost: after a failed capture the next one stores every change since the last commit.
- 4 Hands off: capture never writes the caller's arrays; a restored array never changes under
  its holder, in this process or another one.
- 5 Integrity: damaged objects, manifests and baselines are reported or repaired, never returned.
- 7 Safe to open: a hostile store gives an ArraysnapError, never another exception, a hang, a
  huge allocation or a write outside the store; no pickle anywhere.

``ARRAYSNAP_TORTURE=1`` runs ten times more kill points and generated examples.
"""

from __future__ import annotations

import base64
import collections
import errno
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from conftest import REPO, assert_bit_exact, run_python, store_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap.codecs import parse_codec
from arraysnap.fsio import FileOps

TORTURE = os.environ.get("ARRAYSNAP_TORTURE") == "1"
SCALE = 10 if TORTURE else 1
CHUNK = 4096

# --------------------------------------------------------------------------------------------
# A deterministic workload: the arrays of step n are a pure function of n, so a test can check
# any snapshot of any crashed run by recomputing what was captured. The source is shared with
# child processes verbatim.
# --------------------------------------------------------------------------------------------
WORKLOAD = '''
import numpy as np

U_CHUNKS, U_PERIOD = 48, 12


def workload_arrays(step):
    """A few chunks of "u" change every step; "v" changes shape; "w" comes and goes."""
    u = np.empty((U_CHUNKS, 512))
    for i in range(U_CHUNKS):
        version = max(step - (step + 7 * i) % U_PERIOD, -1)
        u[i] = np.random.default_rng([i, version + 1]).standard_normal(512)
    rows = 30 + 17 * ((step // 5) % 3)
    v = np.random.default_rng([1000, step // 5]).random((rows, 100), dtype=np.float32)
    f = np.asfortranarray(
        np.random.default_rng([2000, step // 3]).integers(-9, 9, (64, 40)).astype(">i4"))
    rec = np.zeros(50, dtype=[("a", "<i4"), ("b", "<f8")])
    rec["a"] = np.arange(50)
    arrays = {"u": u, "v": v, "f": f, "rec": rec, "s": np.array(step, dtype=np.int64)}
    if step % 4 in (1, 2):
        arrays["w"] = np.random.default_rng([3000, step]).random(700)
    return arrays


def workload_state(step):
    return {"step": step, "tag": "x" * (step % 5)}


def workload_rng(step):
    rngs = {"main": np.random.default_rng(step), "aux": np.random.default_rng([step, 99])}
    rngs["main"].random(step % 3)
    return rngs
'''

_namespace: dict[str, Any] = {}
exec(WORKLOAD, _namespace)  # noqa: S102 - our own constant source, shared with the children
workload_arrays: Callable[[int], dict[str, np.ndarray]] = _namespace["workload_arrays"]
workload_state: Callable[[int], dict[str, Any]] = _namespace["workload_state"]
workload_rng: Callable[[int], dict[str, np.random.Generator]] = _namespace["workload_rng"]


def capture_step(snap: arraysnap.Store, step: int) -> arraysnap.CaptureInfo:
    return snap.capture(workload_arrays(step), step=step, state=workload_state(step),
                        rng=workload_rng(step))


def assert_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert_bit_exact(actual[name], array)


def assert_workload_step(restored: arraysnap.Restored, step: int | None) -> None:
    """`restored` holds exactly what the workload captured at `step`, state and rng included."""
    assert step is not None
    assert restored.step == step
    assert_arrays(restored.arrays, workload_arrays(step))
    assert restored.state == workload_state(step)
    expected_rng = workload_rng(step)
    assert sorted(restored.rng) == sorted(expected_rng)
    for key, generator in expected_rng.items():
        assert restored.rng[key].bit_generator.state == generator.bit_generator.state


def leftover_temporaries(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob(".tmp-*"))


def check_store_after_crash(path: Path, last_committed: int | None) -> int:
    """Everything invariant 2 promises after a writer died; returns the step captured next."""
    with arraysnap.open(path, mode="r") as reader:  # before a writer's recovery touches it
        latest = reader.latest()
        if latest is not None:
            assert_workload_step(reader.restore(), latest.step)
    with arraysnap.open(path, chunk_bytes=CHUNK) as snap:
        infos = snap.list()
        on_disk = sorted(p.name for p in (path / "snapshots").glob("*.json"))
        # A manifest file that list() leaves out would be a half-written snapshot.
        assert [f"{info.seq:012d}.json" for info in infos] == on_disk
        assert leftover_temporaries(path) == []
        report = snap.verify()
        assert report.ok, str(report)
        if last_committed is not None:
            assert infos, f"step {last_committed} was committed but no snapshot is listed"
            assert infos[-1].step >= last_committed
        events = []
        for info in infos:
            restored = snap.restore(seq=info.seq)
            assert_workload_step(restored, info.step)
            events.append(list(restored.events))
            # The replay log: only records logged after the snapshot's capture...
            assert all(event["after"] >= info.step for event in restored.events), events[-1]
        for older, newer in zip(events, events[1:], strict=False):
            # ... and a newer snapshot's records are the tail of an older one's (no record
            # lost, reordered or trimmed away while a snapshot that needs it is kept).
            assert older[len(older) - len(newer):] == newer
        step = infos[-1].step + 1 if infos else 0
        # Capture before restoring the latest (a restore repairs the baseline by itself): the
        # recovery in open() alone must have made the baseline right.
        capture_step(snap, step)
        snap.wait()
        assert_workload_step(snap.restore(), step)
        for info in infos[-2:]:
            assert_workload_step(snap.restore(seq=info.seq), info.step)
    return step


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0"}


def committed_steps(output: str) -> list[int]:
    """Steps a child reported durable; a line torn by the kill does not count."""
    whole_lines = output.split("\n")[:-1]
    matches = (re.fullmatch(r"committed (\d+)", line) for line in whole_lines)
    return [int(match.group(1)) for match in matches if match]


# --------------------------------------------------------------------------------------------
# Invariant 2: SIGKILL
# --------------------------------------------------------------------------------------------
CAPTURE_LOOP = WORKLOAD + '''
import sys
import arraysnap

snap = arraysnap.open(sys.argv[1], chunk_bytes=4096)
latest = snap.latest()
step = 0 if latest is None else latest.step + 1
print("ready", step, flush=True)
while True:
    snap.capture(workload_arrays(step), step=step, state=workload_state(step),
                 rng=workload_rng(step))
    snap.log({"after": step, "i": 0})
    if step % 3 == 1:
        # Two captures in flight before waiting: the next pause overlaps the last commit.
        step += 1
        snap.capture(workload_arrays(step), step=step, state=workload_state(step),
                     rng=workload_rng(step))
        snap.log({"after": step, "i": 0})
    snap.wait()
    print("committed", step, flush=True)
    if step % 6 == 5:
        snap.prune(keep_last=3)
    elif step % 4 == 3:
        snap.gc()
    step += 1
'''


def test_sigkill_at_random_moments_leaves_a_store_that_opens_verifies_and_goes_on(
        store_path: Path):
    chooser = random.Random(20240611)
    kills = 30 * SCALE
    late_kills = 0
    for kill in range(kills):
        seen = ""
        proc = subprocess.Popen([sys.executable, "-c", CAPTURE_LOOP, str(store_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env())
        try:
            if kill % 5 == 4:
                # Early: lands in start-up, open() and the recovery of the previous kill.
                time.sleep(chooser.uniform(0.05, 0.9))
            else:
                # After the first commit of this run, so that every such kill finds a working
                # loop (capture, commit, prune, gc) whatever the machine's speed.
                for line in proc.stdout:  # type: ignore[union-attr]
                    seen += line
                    if line.startswith("committed"):
                        break
                else:
                    pytest.fail(f"the capture loop died: {proc.communicate()[1]}")
                late_kills += 1
                time.sleep(chooser.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # The loop never ends by itself: any other exit is an arraysnap error in the child.
        assert proc.returncode == -signal.SIGKILL, err
        steps = committed_steps(seen + out)
        check_store_after_crash(store_path, max(steps) if steps else None)
    # Guard against a vacuous run (the first commit of each late kill is read above).
    assert late_kills >= kills // 2


KILL_AT_OPERATION = WORKLOAD + '''
import json, os, signal, sys, threading
import arraysnap
from arraysnap.fsio import FileOps

root = os.path.abspath(sys.argv[1])


class KillIO(FileOps):
    """SIGKILLs this process just before (or just after) its n-th durable file operation."""

    def __init__(self, target, after):
        self.ops, self.target, self.after = [], target, after
        self.lock = threading.Lock()

    def _do(self, name, where, operation):
        where = str(where).replace(root, "").strip("/").split("/")[0] or "root"
        with self.lock:
            self.ops.append(name + ":" + where)
            hit = len(self.ops) == self.target
        if hit and not self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = operation()
        if hit and self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def write(self, fd, data):
        where = os.readlink(f"/proc/self/fd/{fd}")
        return self._do("write", where, lambda: FileOps.write(self, fd, data))

    def fsync(self, fd):
        where = os.readlink(f"/proc/self/fd/{fd}")
        return self._do("fsync", where, lambda: FileOps.fsync(self, fd))

    def replace(self, source, target):
        return self._do("replace", target, lambda: FileOps.replace(self, source, target))

    def unlink(self, path):
        return self._do("unlink", path, lambda: FileOps.unlink(self, path))

    def fsync_dir(self, path):
        return self._do("fsync_dir", path, lambda: FileOps.fsync_dir(self, path))


io = KillIO(int(sys.argv[2]), sys.argv[3] == "after")
snap = arraysnap.open(root, chunk_bytes=4096, _io=io, _retry_delays=())
latest = snap.latest()
step = 0 if latest is None else latest.step + 1


def capture():
    snap.capture(workload_arrays(step), step=step, state=workload_state(step),
                 rng=workload_rng(step))
    snap.log({"after": step, "i": 0})
    snap.log({"after": step, "i": 1})


for _ in range(3):
    capture()
    snap.wait()
    print("committed", step, flush=True)
    step += 1
capture()
step += 1
capture()
snap.wait()
print("committed", step, flush=True)
snap.prune(keep_last=2)
snap.gc()
snap.close()
print("ops", json.dumps(io.ops), flush=True)
'''


def run_kill_child(path: Path, target: int, after: bool) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_OPERATION, str(path), str(target),
         "after" if after else "before"],
        capture_output=True, text=True, timeout=120, env=child_env())
    return proc.returncode, proc.stdout, proc.stderr


def kill_points(ops: list[str]) -> list[tuple[int, bool]]:
    """(call number, after?) pairs: in the default run, the first of each kind of operation on
    each part of the store (before it) and the last one (after it); with torture, all."""
    if TORTURE:
        return [(n, after) for n in range(1, len(ops) + 1) for after in (False, True)]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for number, op in enumerate(ops, start=1):
        first.setdefault(op, number)
        last[op] = number
    return sorted({(n, False) for n in first.values()} | {(n, True) for n in last.values()})


def test_sigkill_at_every_kind_of_file_operation(tmp_path: Path):
    # Deterministic kill points: the child dies at its n-th write/fsync/replace/unlink/fsync_dir
    # (just before or just after it), so that capture, commit, prune and gc are all hit, on
    # chunk objects, manifests and the baseline marker alike.
    template = tmp_path / "template.snap"
    with arraysnap.open(template, chunk_bytes=CHUNK) as snap:
        for step in range(5):
            capture_step(snap, step)
    shutil.copytree(template, tmp_path / "dry")
    code, out, err = run_kill_child(tmp_path / "dry", 0, False)
    assert code == 0, err
    ops = json.loads(out.split("ops ", 1)[1])
    kinds = set(ops)
    # A sanity floor: else this test would test nothing.
    assert {"write:chunks", "replace:snapshots", "unlink:snapshots", "unlink:chunks",
            "write:mirror"} <= kinds, kinds
    for target, after in kill_points(ops):
        path = tmp_path / f"kill-{target}-{after}"
        shutil.copytree(template, path)
        code, out, err = run_kill_child(path, target, after)
        assert code in (0, -signal.SIGKILL), err
        steps = committed_steps(out)
        if target % 3 == 0:
            # Die again early in the next run: during open()'s recovery of the first death.
            code, out2, err = run_kill_child(path, 1 + target % 4, False)
            assert code in (0, -signal.SIGKILL), err
            steps += committed_steps(out2)
        check_store_after_crash(path, max(steps) if steps else 4)


def test_store_whose_creation_died_can_be_opened(store_path: Path):
    # A writer killed while creating the store (here: its arraysnap.json write fails) must not
    # leave a directory that no later open() accepts.
    class FailConfig(FileOps):
        def write(self, fd: int, data: memoryview | bytes) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".tmp-arraysnap"):
                raise OSError(errno.EIO, "injected: the machine died here")
            super().write(fd, data)

    with pytest.raises(OSError):
        arraysnap.open(store_path, _io=FailConfig())
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 0)
        snap.wait()
        assert_workload_step(snap.restore(), 0)


def test_store_whose_creation_was_sigkilled_can_be_opened(tmp_path: Path):
    code = """
        import os, signal, sys
        import arraysnap
        from arraysnap.fsio import FileOps

        class Die(FileOps):
            def replace(self, source, target):
                if target.name == "arraysnap.json":
                    os.kill(os.getpid(), signal.SIGKILL)
                super().replace(source, target)

        arraysnap.open(sys.argv[1], _io=Die())
    """
    path = tmp_path / "run.snap"
    assert run_python(code, str(path)).returncode == -signal.SIGKILL
    with arraysnap.open(path, chunk_bytes=CHUNK) as snap:
        assert snap.list() == []
        capture_step(snap, 0)
        snap.wait()
        assert_workload_step(snap.restore(), 0)


# -- the mirror after a death: a dirty or lying baseline is checked and repaired ---------------
def mirror_files(path: Path) -> list[Path]:
    return sorted((path / "mirror").glob("*.bin"))


def write_marker(path: Path, **changes: Any) -> None:
    marker_path = path / "mirror" / "state.json"
    marker = json.loads(marker_path.read_bytes())
    marker.update(changes)
    marker_path.write_text(json.dumps(marker))


def test_mirror_of_a_writer_killed_in_mid_copy_is_repaired_on_open(store_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        for step in range(3):
            capture_step(snap, step)
    # As if killed while copying step 3 into the baselines: the marker says dirty, half the
    # changed chunks of "u" already hold step 3, and the baseline of "v" is torn.
    marker = json.loads((store_path / "mirror" / "state.json").read_bytes())
    write_marker(store_path, clean=False, seq=None)
    before, after = workload_arrays(2)["u"], workload_arrays(3)["u"]
    changed = [row for row in range(len(after)) if not np.array_equal(before[row], after[row])]
    assert len(changed) >= 2
    with (store_path / "mirror" / marker["files"]["u"]).open("r+b") as handle:
        for row in changed[: len(changed) // 2]:
            handle.seek(row * CHUNK)
            handle.write(after[row].tobytes())
    with (store_path / "mirror" / marker["files"]["v"]).open("r+b") as handle:
        handle.write(np.random.default_rng(1).bytes(3 * CHUNK))
    with arraysnap.open(store_path, mode="r") as reader:
        assert_workload_step(reader.restore(), 2)
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        # Capture before any restore (which would repair the baseline on its own): chunks
        # already copied look unchanged unless open() put the baseline back to step 2.
        capture_step(snap, 3)
        snap.wait()
        assert_workload_step(snap.restore(), 3)
        assert_workload_step(snap.restore(seq=3), 2)
        assert snap.verify().ok


def test_unsynced_clean_marker_is_not_trusted_after_a_reboot(store_path: Path,
                                                            tmp_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 0)
        capture_step(snap, 1)
        snap.wait()
        # The store as a power cut would leave it, taken while the writer still runs.
        image = tmp_path / "after-a-power-cut.snap"
        shutil.copytree(store_path, image)
    marker = json.loads((image / "mirror" / "state.json").read_bytes())
    if marker.get("clean") is not True or marker.get("synced") is True:
        pytest.skip("no unsynced clean marker between captures: nothing to distrust")
    # Another boot, and a write to the baseline that the page cache never got to disk.
    write_marker(image, boot_id="the-boot-before-the-power-cut")
    before, after = workload_arrays(0)["u"], workload_arrays(1)["u"]
    row = next(r for r in range(len(after)) if not np.array_equal(before[r], after[r]))
    with (image / "mirror" / marker["files"]["u"]).open("r+b") as handle:
        handle.seek(row * CHUNK)
        handle.write(before[row].tobytes())
    with arraysnap.open(image, chunk_bytes=CHUNK) as snap:
        # Back to the step-0 arrays: the lost write makes that chunk look unchanged unless
        # open() distrusted the marker and rebuilt the baseline.
        capture_step(snap, 0)
        snap.wait()
        assert_workload_step(snap.restore(), 0)
        assert_workload_step(snap.restore(seq=2), 1)


# A marker saying "clean, latest seq" is trusted without hashing, by design; the one way arraysnap
# itself could write such a marker over other bytes is tested by
# test_commit_landing_during_the_next_pause_does_not_vouch_for_the_baseline.
@pytest.mark.parametrize("lie", ["clean-older-seq", "files-missing", "wrong-size",
                                 "marker-garbage", "marker-missing"])
def test_stale_or_lying_mirror_is_never_trusted_into_wrong_data(store_path: Path, lie: str):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 0)
    saved = store_path.parent / "mirror-at-step-0"
    shutil.copytree(store_path / "mirror", saved)
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 1)
    # Put the step-0 baselines back under the step-1 snapshot (a mirror from an older run).
    shutil.rmtree(store_path / "mirror")
    shutil.copytree(saved, store_path / "mirror")
    marker = store_path / "mirror" / "state.json"
    if lie == "files-missing":
        for file in mirror_files(store_path):
            file.unlink()
    elif lie == "wrong-size":
        for file in mirror_files(store_path):
            with file.open("ab") as handle:
                handle.write(b"\0" * 8)
    elif lie == "marker-garbage":
        marker.write_bytes(b"{\"seq\": 2, \"clean\": tru")
    elif lie == "marker-missing":
        marker.unlink()
    with arraysnap.open(store_path, mode="r") as reader:
        assert_workload_step(reader.restore(), 1)
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        # Capture the step-0 arrays again: a baseline still holding step 0 would make this look
        # like "nothing changed" and the snapshot would silently hold step 1.
        capture_step(snap, 0)
        snap.wait()
        assert_workload_step(snap.restore(), 0)
        assert_workload_step(snap.restore(seq=2), 1)
        assert snap.verify().ok
    with arraysnap.open(store_path, mode="r") as reader:
        assert_workload_step(reader.restore(), 0)


# --------------------------------------------------------------------------------------------
# Invariants 2 and 3: failing writes
# --------------------------------------------------------------------------------------------
def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class FaultIO(FileOps):
    """Raises OSError(err) at the index-th call (from 0) of one operation, once, when armed;
    with `where`, only calls on paths containing it count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.op: str | None = None
        self.index = -1
        self.err = errno.EIO
        self.injected: OSError | None = None
        self.injected_at = ""
        self.where = ""

    def arm(self, op: str, index: int, err: int, where: str = "") -> None:
        with self._lock:
            self.counts.clear()
            self.op, self.index, self.err, self.injected = op, index, err, None
            self.where = where

    def disarm(self) -> None:
        with self._lock:
            self.op = None

    def _check(self, op: str, where: object) -> None:
        with self._lock:
            if self.where not in str(where):
                return
            n = self.counts[op]
            self.counts[op] += 1
            if op != self.op or n != self.index:
                return
            self.op = None
            self.injected_at = str(where)
            self.injected = OSError(self.err, f"injected {errno.errorcode[self.err]} at "
                                              f"{op} #{n} ({where})")
            raise self.injected

    def write(self, fd: int, data: memoryview | bytes) -> None:
        self._check("write", fd_path(fd))
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("fsync", fd_path(fd))
        super().fsync(fd)

    def replace(self, source: Path, target: Path) -> None:
        self._check("replace", target)
        super().replace(source, target)

    def unlink(self, path: Path) -> None:
        self._check("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: Path) -> None:
        self._check("fsync_dir", path)
        super().fsync_dir(path)


def fault_arrays(step: int) -> dict[str, np.ndarray]:
    """Step 0, then step 1 with two chunks changed, a shape change, one array gone, one new."""
    u = np.random.default_rng(5).standard_normal((16, 512))
    arrays = {"u": u, "v": np.arange(3000, dtype=np.float32).reshape(30, 100),
              "w": np.full(600, 7.0)}
    if step >= 1:
        u[3] += 1.0
        u[11] -= 1.0
        arrays["v"] = np.arange(5000, dtype=np.float32).reshape(50, 100)
        del arrays["w"]
        arrays["x"] = np.random.default_rng(6).integers(-9, 9, 3000).astype(np.int16)
    return arrays


def assert_valid_object(path: Path, relative: str) -> None:
    """A chunk object that exists is whole: its content hashes to its name."""
    raw = parse_codec("zstd").decode((path / relative).read_bytes())
    assert blake3.blake3(raw).hexdigest() == relative.replace("chunks/", "").replace("/", "")


def failed_capture_round(path: Path, op: str, index: int, err: int, *, reopen: bool) -> bool:
    """Fail one capture at call `index` of `op`; check nothing committed changed and nothing is
    lost afterwards. Returns False once `index` is past the capture's last call of `op`."""
    io = FaultIO()
    snap = arraysnap.open(path, chunk_bytes=CHUNK, _io=io, _retry_delays=())
    snap.capture(fault_arrays(0), step=0, state={"n": 0})
    snap.close()
    # Reopened: the failing capture then also marks the baselines dirty, through the same seam.
    snap = arraysnap.open(path, _io=io, _retry_delays=())
    try:
        before = store_files(path)
        live = fault_arrays(1)
        io.arm(op, index, err)
        failure: BaseException | None = None
        try:
            snap.capture(live, step=1, state={"n": 1})
            snap.wait()
        except (OSError, arraysnap.ArraysnapError) as error:
            failure = error
        io.disarm()
        if io.injected is None:
            assert failure is None
            return False
        swallowed = failure is None
        if swallowed:
            # Only the marker written after the commit may fail unseen: it is a cache hint,
            # and the snapshot it follows must then be committed, whole (checked below).
            # So may the capture history, which is informational (a warning is logged).
            assert "/mirror/" in io.injected_at or io.injected_at.endswith("/history.jsonl"), \
                f"{io.injected} was swallowed"
        elif isinstance(failure, arraysnap.ArraysnapError):
            assert failure.__cause__ is io.injected
        else:
            raise AssertionError(f"a raw {failure!r} escaped; failures come wrapped")

        after = store_files(path)
        for name, data in before.items():
            assert after.get(name) == data, f"{name} changed by a failed capture"
        committed_late = False
        for name in sorted(set(after) - set(before)):
            if name.startswith("chunks/"):
                assert_valid_object(path, name)
            else:
                # fsync of the snapshots folder failed after the rename: the manifest is whole
                # and may stay; it must then hold exactly the captured arrays (checked below).
                assert name == "snapshots/000000000002.json", name
                committed_late = True
        assert [p for p in leftover_temporaries(path) if not p.startswith("mirror/")] == []
        assert committed_late or not swallowed

        # Another Store object sees the last committed snapshot.
        with arraysnap.open(path, mode="r") as reader:
            assert reader.verify().ok
            restored = reader.restore()
            assert_arrays(restored.arrays, fault_arrays(1 if committed_late else 0))
            assert restored.step == (1 if committed_late else 0)

        if reopen:
            snap.close()
            snap = arraysnap.open(path, _io=io, _retry_delays=())
            restored = snap.restore()
            assert_arrays(restored.arrays, fault_arrays(1 if committed_late else 0))
            del restored
        # The live arrays changed only in the failed capture: this capture must still store it.
        snap.capture(live, step=2, state={"n": 2})
        snap.wait()
        assert_arrays(snap.restore().arrays, live)
        assert_arrays(snap.restore(seq=1).arrays, fault_arrays(0))
        assert snap.verify().ok
    finally:
        io.disarm()
        try:
            snap.close()
        except arraysnap.ArraysnapError:
            pass
    with arraysnap.open(path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, fault_arrays(1))
    return True


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("op", ["write", "fsync", "replace", "fsync_dir"])
def test_failed_capture_at_every_call_commits_nothing_and_loses_nothing(
        tmp_path: Path, op: str, err: int):
    index = 0
    while failed_capture_round(tmp_path / f"{index}-same", op, index, err, reopen=False):
        failed_capture_round(tmp_path / f"{index}-reopen", op, index, err, reopen=True)
        index += 1
    # Every call point of one capture was enumerated; there are several of each kind.
    assert index >= 3


def test_two_failed_captures_in_a_row_then_one_without_changes(store_path: Path):
    io = FaultIO()
    with arraysnap.open(store_path, chunk_bytes=CHUNK, _io=io, _retry_delays=()) as snap:
        live = fault_arrays(0)
        snap.capture(live, step=0)
        snap.wait()
        live["u"][5] += 1
        io.arm("write", 0, errno.ENOSPC, where="/chunks/")
        snap.capture(live, step=1)
        with pytest.raises(arraysnap.ArraysnapError):
            snap.wait()
        live["u"][9] += 1
        live["v"][0, 0] = -1
        io.arm("replace", 0, errno.EIO, where="/snapshots/")  # the commit's rename
        snap.capture(live, step=2)
        with pytest.raises(arraysnap.ArraysnapError) as caught:
            snap.wait()
        assert caught.value.__cause__ is io.injected
        io.disarm()
        snap.capture(live, step=3)
        snap.wait()
        assert [info.step for info in snap.list()] == [0, 3]
        assert_arrays(snap.restore().arrays, live)
        assert_arrays(snap.restore(seq=1).arrays, fault_arrays(0))


def test_failure_of_a_capture_while_the_next_one_is_queued(store_path: Path):
    # The next capture was already handed to the background when the previous one failed:
    # it must carry the failed one's changes.
    queued = threading.Event()

    class FailFirstCommit(FileOps):
        failed: OSError | None = None

        def write(self, fd: int, data: memoryview | bytes) -> None:
            if self.failed is None and "/snapshots/.tmp-000000000002" in fd_path(fd):
                assert queued.wait(30)
                self.failed = OSError(errno.EIO, "injected at the commit of seq 2")
                raise self.failed
            super().write(fd, data)

    io = FailFirstCommit()
    with arraysnap.open(store_path, chunk_bytes=CHUNK, _io=io, _retry_delays=()) as snap:
        live = fault_arrays(0)
        snap.capture(live, step=0)
        snap.wait()
        live["u"][2] += 1  # only in the failing capture
        snap.capture(live, step=1)
        live["u"][7] += 1
        snap.capture(live, step=2)
        queued.set()
        with pytest.raises(arraysnap.ArraysnapError) as caught:
            snap.wait()
        assert caught.value.__cause__ is io.failed
        assert [info.step for info in snap.list()] == [0, 2]
        assert_arrays(snap.restore().arrays, live)
    with arraysnap.open(store_path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, live)
        assert reader.verify().ok


def test_commit_landing_during_the_next_pause_does_not_vouch_for_the_baseline(store_path: Path):
    # Snapshot N commits while capture N+1 is copying changed chunks into the baseline, and N+1
    # then fails. The baseline now holds N+1's bytes: nothing may record it as equal to N, or
    # the next run (after close and reopen) sees "no change" and silently loses N+1's change.
    class Interleave(FileOps):
        def __init__(self) -> None:
            self.in_pause = threading.Event()
            self.pending: arraysnap.CaptureInfo | None = None
            self.fail_seq: int | None = None
            self.failed: OSError | None = None
            self.stuck = False

        def write(self, fd: int, data: memoryview | bytes) -> None:
            where = fd_path(fd)
            pending = self.pending
            if pending is not None:
                if ("/mirror/.tmp-state.json" in where
                        and threading.current_thread() is threading.main_thread()):
                    # Inside capture N+1's pause: let snapshot N commit right now.
                    self.in_pause.set()
                    try:
                        pending.result(timeout=60)
                    except TimeoutError:
                        self.stuck = True  # this marker write holds a lock the commit needs
                elif f"/snapshots/.tmp-{pending.seq:012d}" in where:
                    assert self.in_pause.wait(30)
                elif f"/snapshots/.tmp-{self.fail_seq:012d}" in where:
                    self.failed = OSError(errno.EIO, "injected at the commit of N+1")
                    raise self.failed
            super().write(fd, data)

    io = Interleave()
    snap = arraysnap.open(store_path, chunk_bytes=CHUNK, _io=io, _retry_delays=())
    a, b = np.zeros(4096), np.ones(4096)
    snap.capture({"a": a, "b": b}, step=0)
    snap.wait()
    restored = snap.restore()
    held_b = restored.arrays["b"]  # a restored map, used as the live "b" once
    del restored
    a[0] = 1.0
    io.pending = snap.capture({"a": a, "b": held_b}, step=1)
    io.fail_seq = io.pending.seq + 1
    a[600] = 2.0  # the change only capture N+1 sees
    # "b" is now passed as a plain array while the map of its baseline is still held, so the
    # pause detaches it and rewrites the marker: the hook where snapshot N is let commit.
    snap.capture({"a": a, "b": np.array(held_b)}, step=2)
    with pytest.raises(arraysnap.ArraysnapError):
        snap.wait()
    assert not io.stuck, "snapshot N could not commit inside the pause: revisit this test"
    assert io.in_pause.is_set() and io.failed is not None  # the interleaving did happen
    snap.close()
    with arraysnap.open(store_path) as snap:
        snap.capture({"a": a, "b": b}, step=3)
        snap.wait()
        assert_arrays(snap.restore().arrays, {"a": a, "b": b})


def test_failed_chunk_task_never_names_an_object_by_other_bytes(store_path: Path, monkeypatch):
    # One chunk write of a capture fails while another chunk task of the same capture is still
    # encoding from the baseline. If the next capture could update the baseline before that task
    # finished, an object would be stored under the digest of bytes it does not hold; dedup
    # would later point a snapshot at it.
    from arraysnap.codecs import CodecSpec

    live = np.zeros((8, 512))
    live[5] = 5.0
    b_bytes = live[5].tobytes()
    b_encoding = threading.Event()
    gate = threading.Event()
    original = CodecSpec.encode_lazily

    def slow_encode(self: CodecSpec, raw: Any, itemsize: int) -> Any:
        if bytes(raw) == b_bytes and not gate.is_set():
            b_encoding.set()
            gate.wait(1.0)  # the next capture runs meanwhile, unless the pipeline waits for us
        return original(self, raw, itemsize)

    class FailOtherChunk(FileOps):
        armed = False
        failed: OSError | None = None

        def write(self, fd: int, data: memoryview | bytes) -> None:
            if self.armed and self.failed is None and "/chunks/" in fd_path(fd):
                assert b_encoding.wait(30)
                self.failed = OSError(errno.EIO, "injected at a chunk write")
                raise self.failed
            super().write(fd, data)

    monkeypatch.setattr(CodecSpec, "encode_lazily", slow_encode)
    io = FailOtherChunk()
    with arraysnap.open(store_path, chunk_bytes=CHUNK, _io=io, _retry_delays=()) as snap:
        snap.capture({"u": np.zeros((8, 512))}, step=0)
        snap.wait()
        io.armed = True
        live[2] = 2.0  # chunk 2's write fails; chunk 5 is being encoded then
        snap.capture({"u": live}, step=1)
        with pytest.raises(arraysnap.ArraysnapError):
            snap.wait()
        changed = live.copy()
        changed[5] = 6.0
        snap.capture({"u": changed}, step=2)
        gate.set()
        snap.wait()
        # Back to the bytes of the failed capture: dedup now reuses whatever object holds them.
        snap.capture({"u": live}, step=3)
        snap.capture({"u": np.zeros((8, 512))}, step=4)
        snap.wait()
        report = snap.verify()
        assert report.ok, str(report)
        assert_arrays(snap.restore(step=3).arrays, {"u": live})


def test_after_a_failed_capture_another_process_sees_the_last_commit(store_path: Path):
    io = FaultIO()
    snap = arraysnap.open(store_path, chunk_bytes=CHUNK, _io=io, _retry_delays=())
    capture_step(snap, 0)
    snap.wait()
    io.arm("fsync", 0, errno.EIO, where="/chunks/")
    capture_step(snap, 1)
    with pytest.raises(arraysnap.ArraysnapError):
        snap.wait()
    reader = WORKLOAD + """
import sys, arraysnap
with arraysnap.open(sys.argv[1], mode="r") as snap:
    restored = snap.restore()
    same = all(restored.arrays[k].tobytes() == v.tobytes()
               for k, v in workload_arrays(restored.step).items())
    print(restored.step, [i.step for i in snap.list()], snap.verify().ok, same)
"""
    result = run_python(reader, str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "[0]", "True", "True"]
    snap.close()
    # The same from a new writer process once this one has gone.
    result = run_python(reader.replace('mode="r"', 'mode="a"'), str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "[0]", "True", "True"]


@pytest.mark.parametrize("op", ["unlink", "fsync_dir", "fsync"])
def test_failed_prune_and_gc_keep_every_remaining_snapshot_whole(tmp_path: Path, op: str):
    index = 0
    while True:
        path = tmp_path / f"{op}-{index}"
        io = FaultIO()
        with arraysnap.open(path, chunk_bytes=CHUNK, _io=io, _retry_delays=()) as snap:
            for step in range(5):
                capture_step(snap, step)
            snap.wait()
            io.arm(op, index, errno.EIO)
            try:
                snap.prune(keep_last=2)
            except (OSError, arraysnap.ArraysnapError):
                pass
            io.disarm()
            if io.injected is None:
                break
            assert {info.step for info in snap.list()} >= {3, 4}
            assert snap.verify().ok
            for info in snap.list():
                assert_workload_step(snap.restore(seq=info.seq), info.step)
            snap.prune(keep_last=2)
            assert [info.step for info in snap.list()] == [3, 4]
            assert snap.verify().ok
            assert_workload_step(snap.restore(seq=4), 3)
        index += 1
    assert index >= 1


# --------------------------------------------------------------------------------------------
# Invariants 2 and 3 on a real full disk
# --------------------------------------------------------------------------------------------
FULL_DISK_CHILD = """
import errno, json, os, sys
import numpy as np
import arraysnap

root = sys.argv[1]
snap = arraysnap.open(os.path.join(root, "run.snap"), chunk_bytes=65536)
committed, failure = [], None


def data(step):
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
# Still full: a new array (a new baseline file) must fail cleanly too, not kill the process;
# and the changes this capture copied aside before failing must not be lost either ("k" has
# not changed since the last commit, so only this capture knows of its change).
live["u"][:100] += 1.0
live["k"][:10] = 7.0
try:
    snap.capture({**live, "extra": np.ones(200000)}, step=1000)
    snap.wait()
    extra = "ok"
except (OSError, arraysnap.ArraysnapError) as err:
    extra = type(err).__name__
# Free the space and go on without changing the arrays.
os.unlink(os.path.join(root, "filler"))
snap.capture(live, step=failure["step"] if failure else 999)
snap.wait()
restored = snap.restore()
same = all(restored.arrays[k].tobytes() == v.tobytes() for k, v in live.items())
snap.close()
print(json.dumps({"committed": committed, "failure": failure, "extra": extra, "same": same}))
"""


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that really fills) needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_full_disk_loses_no_commit_and_no_change(small_tmpfs: Path):
    filler = small_tmpfs / "filler"
    with filler.open("wb") as handle:
        handle.write(b"\xff" * (4 << 20))
    # In a child: were a baseline written through a map on a full disk, it would die of SIGBUS.
    result = run_python(FULL_DISK_CHILD, str(small_tmpfs), timeout=300)
    assert result.returncode == 0, f"child died ({result.returncode}): {result.stderr[-3000:]}"
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["failure"] is not None, "the disk never filled: the test proved nothing"
    assert outcome["failure"]["errno"] == errno.ENOSPC
    assert outcome["committed"], "nothing fitted before the disk was full"
    assert outcome["extra"] != "ok"
    assert outcome["same"]
    with arraysnap.open(small_tmpfs / "run.snap", mode="r") as reader:
        assert reader.verify().ok
        steps = [info.step for info in reader.list()]
        assert steps == [*outcome["committed"], outcome["failure"]["step"]]
        infos = reader.list()
        for info in infos:
            expected = np.random.default_rng(info.step).random(65536)
            if info is infos[-1]:
                expected[:100] += 1.0  # changed after the disk was full
            assert reader.restore(seq=info.seq).arrays["u"].tobytes() == expected.tobytes()


# --------------------------------------------------------------------------------------------
# Invariant 4: hands off
# --------------------------------------------------------------------------------------------
def test_capture_never_modifies_or_requires_writable_arrays(store_path: Path, tmp_path: Path):
    backing = tmp_path / "ro.bin"
    np.arange(5000, dtype="<u4").tofile(backing)
    mapped_ro = np.memmap(backing, dtype="<u4", mode="r")
    base = np.random.default_rng(3).standard_normal((64, 128))
    frozen = base.copy()
    frozen.flags.writeable = False
    arrays = {"c": base, "frozen": frozen, "fortran": np.asfortranarray(base[:, :100]),
              "strided": base[::3, 1::2], "mapped_ro": mapped_ro,
              "big_endian": base.astype(">f4"), "scalar": np.array(2.5)}
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        for round_ in range(4):
            originals = {name: (a.copy(order="A"), a.flags.writeable) for name, a in
                         arrays.items()}
            snap.capture(arrays, step=round_)
            snap.wait()
            for name, array in arrays.items():
                copy, writeable = originals[name]
                assert array.flags.writeable == writeable
                assert array.dtype == copy.dtype and array.shape == copy.shape
                assert np.ascontiguousarray(array).tobytes() == copy.tobytes(order="C")
            assert_arrays(snap.restore().arrays, {n: c for n, (c, _) in originals.items()})
            base[round_ * 7 % 64] += 1.0  # also moves the views that share it
            arrays["fortran"] = np.asfortranarray(base[:, :100])
            arrays["big_endian"] = base.astype(">f4")


def test_restored_arrays_never_change_under_their_holder_in_this_process(store_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        for step in range(3):
            capture_step(snap, step)
        latest = snap.restore()  # maps the baseline
        older = snap.restore(seq=1)  # materialised from chunk objects
        kept = [(latest, 2), (older, 0)]
        with arraysnap.open(store_path, mode="r") as reader:
            kept.append((reader.restore(), 2))
            for step in range(3, 9):
                capture_step(snap, step)
                snap.wait()
                kept.append((snap.restore(), step))
                snap.restore(seq=snap.list()[0].seq)
                if step == 6:
                    snap.prune(keep_last=1)
                    snap.gc()
                for restored, expected_step in kept:
                    assert_workload_step(restored, expected_step)
        # Writing into a restored array is the holder's business and reaches nobody else.
        latest.arrays["u"][:] = -1.0
        assert_workload_step(snap.restore(), 8)


def test_restored_array_used_as_the_live_array(store_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        snap.capture({"u": np.zeros((32, 512))}, step=0)
        live = snap.restore().arrays["u"]
        for step in range(1, 9):
            # Half the time someone else also holds the baseline that `live` maps.
            other = snap.restore() if step % 2 else None
            expected_other = None if other is None else np.array(other.arrays["u"])
            live[step * 5 % 32, :] = step
            live[(step * 11) % 32, 7] = -step
            expected_live = np.array(live)
            snap.capture({"u": live}, step=step)
            snap.wait()
            assert_bit_exact(live, expected_live)  # the caller's own array, even if a map
            if other is not None:
                assert_bit_exact(other.arrays["u"], expected_other)
            assert_bit_exact(snap.restore().arrays["u"], expected_live)
            assert not snap.restore(seq=1).arrays["u"].any()
            if step == 4:
                live = snap.restore().arrays["u"]  # a fresh map of the current baseline
            del other


def test_a_map_outlives_its_store_and_a_reopened_writer_leaves_it_alone(store_path: Path):
    """A restored array kept after close(): the next writer (here, in the same process) must
    not update its baseline file in place."""
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        snap.capture({"u": np.arange(20000.0)}, step=0)
        kept = snap.restore().arrays["u"]
    expected = np.array(kept)
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        for step in range(1, 4):
            snap.capture({"u": np.full(20000, float(step))}, step=step)
            snap.wait()
            assert_bit_exact(kept, expected)
        assert_bit_exact(snap.restore().arrays["u"], np.full(20000, 3.0))
    del kept
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:  # the lock went with the map
        snap.capture({"u": np.zeros(20000)}, step=4)
        snap.wait()


READER_CHILD = WORKLOAD + """
import json, sys
import arraysnap

snap = arraysnap.open(sys.argv[1], mode="r")
restored = snap.restore()
held = restored.arrays
maps = open("/proc/self/maps").read()
copies = {name: np.array(array) for name, array in held.items()}
expected = workload_arrays(restored.step)
print(json.dumps({"step": restored.step, "maps_baseline": "/mirror/" in maps,
                  "right": all(copies[n].tobytes() == expected[n].tobytes() for n in expected)}),
      flush=True)
sys.stdin.readline()
print(json.dumps({"unchanged": all(held[n].tobytes() == copies[n].tobytes() for n in held)}),
      flush=True)
"""


@pytest.mark.parametrize("scenario", ["writer-closed", "writer-open-idle",
                                      "writer-between-captures"])
def test_reader_process_maps_survive_the_writer_updating_them(store_path: Path, scenario: str):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        for step in range(3):
            capture_step(snap, step)
    writer = None
    if scenario != "writer-closed":
        writer = arraysnap.open(store_path, chunk_bytes=CHUNK)
    if scenario == "writer-between-captures":
        capture_step(writer, 3)  # type: ignore[arg-type]
        writer.wait()  # type: ignore[union-attr]
    reader = subprocess.Popen([sys.executable, "-c", READER_CHILD, str(store_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        first = json.loads(reader.stdout.readline() or "null")  # type: ignore[union-attr]
        assert first is not None, reader.communicate()[1]
        held_step = 3 if scenario == "writer-between-captures" else 2
        assert first["step"] == held_step and first["right"]
        # The hard case is exercised: the reader holds maps of the baseline files themselves.
        assert first["maps_baseline"]
        writer = writer or arraysnap.open(store_path, chunk_bytes=CHUNK)
        for step in range(held_step + 1, held_step + 8):
            capture_step(writer, step)
            if step % 2:
                writer.wait()
        writer.wait()
        writer.restore()
        writer.prune(keep_last=1)
        writer.close()
        out, err = reader.communicate("go\n", timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
        if writer is not None:
            writer.close()
    assert reader.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"unchanged": True}


# --------------------------------------------------------------------------------------------
# Invariant 5: integrity
# --------------------------------------------------------------------------------------------
def build_integrity_store(path: Path, codec: str) -> list[dict[str, np.ndarray]]:
    """Four snapshots of one 8-chunk array "u" (+ a small "t"); each step changes a chunk."""
    u = np.random.default_rng(11).standard_normal((8, 512))
    captured = []
    with arraysnap.open(path, chunk_bytes=CHUNK, codec=codec) as snap:
        for step, chunk in enumerate([None, 2, 5, 6]):
            if chunk is not None:
                u[chunk] += step
            arrays = {"u": u.copy(), "t": np.arange(10.0) * step}
            snap.capture(arrays, step=step)
            captured.append(arrays)
    return captured


def chunk_references(path: Path) -> dict[str, list[tuple[int, str, int]]]:
    """Object path -> every (seq, array, chunk) that uses it."""
    refs: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for manifest in sorted((path / "snapshots").glob("*.json")):
        body = json.loads(manifest.read_bytes())
        for name, record in body["arrays"].items():
            digests = base64.b64decode(record["chunks"])
            for index in range(len(digests) // 32):
                hexdigest = digests[index * 32 : (index + 1) * 32].hex()
                refs[f"chunks/{hexdigest[:2]}/{hexdigest[2:]}"].append(
                    (body["seq"], name, index))
    return refs


def flip_bit(file: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    file.write_bytes(bytes(data))


def damage(path: Path, how: str, victim: str, other: str) -> set[str]:
    """Damage chunk objects; return the objects whose content is now wrong or gone."""
    file, other_file = path / victim, path / other
    if how == "flip-bit":
        flip_bit(file, len(file.read_bytes()) // 2, 3)
    elif how == "flip-last-bit":
        flip_bit(file, -1, 7)
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "delete":
        file.unlink()
    elif how == "swap":
        first, second = file.read_bytes(), other_file.read_bytes()
        file.write_bytes(second)
        other_file.write_bytes(first)
        return {victim, other}
    elif how == "replace-with-directory":
        file.unlink()
        file.mkdir()
    return {victim}


DAMAGE = ["flip-bit", "flip-last-bit", "truncate", "empty", "delete", "swap",
          "replace-with-directory"]


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_chunk_objects_are_reported_with_their_array_and_chunk(
        store_path: Path, how: str, codec: str):
    captured = build_integrity_store(store_path, codec)
    refs = chunk_references(store_path)
    # Chunk 2 as first captured is used by snapshot 1 only; chunk 5's first version by 1 and 2.
    victim = next(obj for obj, users in refs.items() if users == [(1, "u", 2)])
    other = next(obj for obj, users in refs.items() if users == [(1, "u", 5), (2, "u", 5)])
    damaged = damage(store_path, how, victim, other)
    expected = {use for obj in damaged for use in refs[obj]}

    for mode in ("r", "a"):
        with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
            report = snap.verify()
            assert {(p.seq, p.array, p.chunk) for p in report.problems} == expected, str(report)
            for seq in range(1, 5):
                hit = sorted(chunk for s, _, chunk in expected if s == seq)
                if not hit:
                    assert_arrays(snap.restore(seq=seq).arrays, captured[seq - 1])
                    continue
                with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
                    snap.restore(seq=seq)
                message = str(caught.value)
                assert "array 'u'" in message
                assert any(f"chunk {chunk}" in message for chunk in hit), message
            # The latest comes from the (verified) baseline, which is still right.
            assert_arrays(snap.restore().arrays, captured[3])


def test_damage_used_by_the_latest_snapshot_never_yields_wrong_data(store_path: Path):
    captured = build_integrity_store(store_path, "zstd")
    refs = chunk_references(store_path)
    latest_only = next(obj for obj, users in refs.items() if users == [(4, "u", 6)])
    flip_bit(store_path / latest_only, 10)
    # With the baseline intact the latest still restores; verify reports the object.
    with arraysnap.open(store_path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, captured[3])
        assert {(p.seq, p.array, p.chunk) for p in reader.verify().problems} == {(4, "u", 6)}
    # Baseline damaged at the same chunk too: now there is no good copy, so an error.
    marker = json.loads((store_path / "mirror" / "state.json").read_bytes())
    flip_bit(store_path / "mirror" / marker["files"]["u"], 6 * CHUNK + 100)
    for mode in ("r", "a"):
        with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
            with pytest.raises(arraysnap.CorruptSnapshotError, match="chunk 6"):
                snap.restore()


@pytest.mark.parametrize("mode", ["r", "a"])
def test_bit_flips_in_the_baseline_are_repaired_from_chunk_objects(store_path: Path, mode: str):
    captured = build_integrity_store(store_path, "zstd")
    marker = json.loads((store_path / "mirror" / "state.json").read_bytes())
    baseline = store_path / "mirror" / marker["files"]["u"]
    for chunk in (0, 3, 7):
        flip_bit(baseline, chunk * CHUNK + 17 * chunk, chunk % 8)
    with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
        assert_arrays(snap.restore().arrays, captured[3])
        assert snap.verify().ok
        if mode == "a":
            # And a capture of the unchanged arrays still records the right content.
            snap.capture(captured[3], step=4)
            snap.wait()
            assert_arrays(snap.restore().arrays, captured[3])
    with arraysnap.open(store_path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, captured[3])


def test_damaged_manifests_are_detected_never_misread(store_path: Path):
    captured = build_integrity_store(store_path, "zstd")
    manifest = store_path / "snapshots" / "000000000002.json"
    pristine = manifest.read_bytes()
    original_body = json.loads(pristine)
    chooser = random.Random(5)
    for trial in range(40 * SCALE):
        data = bytearray(pristine)
        if trial % 4 == 3:
            data = data[: chooser.randrange(len(data))]  # a torn write
        else:
            data[chooser.randrange(len(data))] ^= 1 << chooser.randrange(8)
        manifest.write_bytes(bytes(data))
        try:
            same = json.loads(bytes(data)) == original_body
        except ValueError:
            same = False
        with arraysnap.open(store_path, mode="r") as reader:
            if same:  # e.g. a flipped letter case inside a \\u escape: the same manifest
                assert_arrays(reader.restore(seq=2).arrays, captured[1])
                continue
            # A flip in the version digit reads as a manifest from the future: also refused.
            with pytest.raises((arraysnap.CorruptSnapshotError, arraysnap.FormatVersionError),
                               match="snapshot 2"):
                reader.restore(seq=2)
            assert [info.seq for info in reader.list()] == [1, 3, 4]
            problems = reader.verify().problems
            assert [(p.seq, p.array) for p in problems] == [(2, None)], problems
            assert_arrays(reader.restore().arrays, captured[3])
            assert_arrays(reader.restore(seq=1).arrays, captured[0])
    # The writer still opens and goes on.
    manifest.write_bytes(pristine[:-5])
    with arraysnap.open(store_path) as snap:
        snap.capture(captured[0], step=9)
        snap.wait()
        assert_arrays(snap.restore().arrays, captured[0])


# --------------------------------------------------------------------------------------------
# Invariant 7: safe to open
# --------------------------------------------------------------------------------------------
def signed(body: dict[str, Any]) -> bytes:
    """A manifest whose checksum matches, so that the garbage reaches the validators."""
    body = {key: value for key, value in body.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = blake3.blake3(canonical.encode("utf-8")).hexdigest()
    return json.dumps(body).encode("utf-8")


def hostile_operations(path: Path) -> Iterator[tuple[str, Callable[[], object]]]:
    def reader(action: Callable[[arraysnap.Store], object]) -> Callable[[], object]:
        def run() -> object:
            with arraysnap.open(path, mode="r") as snap:
                return action(snap)
        return run

    def writer() -> object:
        with arraysnap.open(path) as snap:
            snap.list()
            try:
                snap.restore(seq=1)
            except arraysnap.ArraysnapError:
                pass
            # Writing on top of whatever open() made of it must work or fail cleanly too.
            arrays = {"u": np.ones((4, 500)), "s": np.array(2)}
            snap.capture(arrays, step=8)
            snap.wait()
            assert_arrays(snap.restore().arrays, arrays)
            return None

    yield "list", reader(lambda snap: snap.list())
    yield "latest", reader(lambda snap: snap.latest())
    yield "restore", reader(lambda snap: snap.restore())
    yield "restore(seq=1)", reader(lambda snap: snap.restore(seq=1))
    yield "verify", reader(lambda snap: snap.verify())
    yield "open(mode='a')", writer


def assert_only_arraysnap_errors(path: Path) -> None:
    for name, operation in hostile_operations(path):
        try:
            operation()
        except arraysnap.ArraysnapError:
            pass
        except BaseException as err:  # noqa: BLE001 - exactly what this test looks for
            raise AssertionError(f"{name} raised {type(err).__name__}: {err}") from err


@pytest.fixture
def file_size_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A hostile manifest may claim any size; with this limit an attempt to allocate a huge file
    # fails at once (EFBIG) instead of filling the disk, and shows up as a non-arraysnap error.
    # The many damaged-snapshot log records these tests provoke are expected: keep them quiet.
    monkeypatch.setattr(logging.getLogger("arraysnap"), "disabled", True)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture
def template_store(tmp_path: Path) -> Path:
    path = tmp_path / "template.snap"
    with arraysnap.open(path, chunk_bytes=CHUNK) as snap:
        snap.capture({"u": np.arange(2000.0).reshape(4, 500), "s": np.array(1)}, step=7,
                     state={"t": [1, 2]}, rng=np.random.default_rng(1))
    return path


_SPECIAL_INTS = [-1, 0, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, 10**300]
_SPECIAL_TEXT = ["", "..", ".", "/", "a/b", "../../etc/passwd", "\\", "\x00", "__x",
                 "zarr.json", "u", "!!!not base64", "AAAA", "=", "<f8", "|O", "O", "V0",
                 "<M8[xyz]", "U100000000", "zstd", "C", "F", "PCG64", "generator", "dict"]
_leaves = (st.none() | st.booleans() | st.sampled_from(_SPECIAL_INTS) | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_SPECIAL_TEXT)
           | st.text(max_size=12))
hostile_values = st.recursive(
    _leaves, lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(_SPECIAL_TEXT), children,
                      max_size=4),
    max_leaves=12)
hostile_dtypes = st.one_of(
    st.sampled_from(["<f8", "|O", "O", ">i2", "|V0", "<U0", "|S0", "<M8[D]", "f8,i4", "<c32"]),
    st.builds(lambda n: [["a", "<f8", [n]]], st.integers(-2, 2**40)),
    st.builds(lambda n: f"|V{n}", st.integers(0, 2**40)),
    st.builds(lambda n: [["a", [["b", "|O"]], [n]]], st.integers(0, 3)),
)
_DEEP = "__deep__"


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, (*prefix, index))


@st.composite
def hostile_manifests(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    body = json.loads(json.dumps(template))
    body.pop("checksum")
    deep = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(paths_of(body), key=repr)))
        if not path:
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["value", "value", "delete", "rename", "deep", "dtype"]))
        if action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_SPECIAL_TEXT) | st.text(max_size=8))] = parent.pop(key)
        elif action == "deep":
            depth = draw(st.integers(2, 3000))
            opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
            deep = opener * depth + "0" + closer * depth
            parent[key] = _DEEP
        elif action == "dtype" and "dtype" in str(path):
            parent[key] = draw(hostile_dtypes)
        else:
            parent[key] = draw(hostile_values)
    if deep is not None:
        # Too deep for json.dumps (as for arraysnap's checksum): written raw, checksum stale.
        body["checksum"] = template["checksum"]
        return json.dumps(body).replace(json.dumps(_DEEP), deep).encode()
    if draw(st.integers(0, 9)) == 0:
        body["checksum"] = draw(st.sampled_from([template["checksum"], "0" * 64, None]))
        return json.dumps(body).encode()
    return signed(body)


HOSTILE_SETTINGS = settings(max_examples=300 * SCALE, deadline=None, database=None,
                            derandomize=not TORTURE,
                            suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])


def test_hostile_manifests_give_only_arraysnap_errors(tmp_path: Path, template_store: Path,
                                                      file_size_limit: None):
    manifest = template_store / "snapshots" / "000000000001.json"
    template = json.loads(manifest.read_bytes())
    counter = iter(range(10**9))

    @HOSTILE_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        work = tmp_path / f"example-{next(counter)}"
        shutil.copytree(template_store, work)
        try:
            garbage = data.draw(hostile_manifests(template))
            (work / "snapshots" / "000000000001.json").write_bytes(garbage)
            assert_only_arraysnap_errors(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()


@st.composite
def hostile_settings(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    body = dict(template)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*body, "extra"]))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(hostile_values | st.sampled_from(
                [{"name": "zstd", "level": 99}, {"name": "evil", "level": 1}, "zstd:x", 2**70]))
    if draw(st.integers(0, 5)) == 0:
        cut = json.dumps(body).encode()
        return cut[: draw(st.integers(0, len(cut)))]
    return json.dumps(body).encode()


def test_hostile_store_settings_give_only_arraysnap_errors(tmp_path: Path, template_store: Path,
                                                           file_size_limit: None):
    template = json.loads((template_store / "arraysnap.json").read_bytes())
    counter = iter(range(10**9))

    @HOSTILE_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        work = tmp_path / f"example-{next(counter)}"
        shutil.copytree(template_store, work)
        try:
            (work / "arraysnap.json").write_bytes(data.draw(hostile_settings(template)))
            assert_only_arraysnap_errors(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()


def rewrite_manifest(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = store / "snapshots" / "000000000001.json"
    body = json.loads(manifest.read_bytes())
    change(body)
    manifest.write_bytes(signed(body))


def set_at(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


# Each one a hostile manifest that once got past arraysnap as a foreign exception.
@pytest.mark.parametrize("where, value", [
    (("time",), 10**400),
    (("stats", "pause_seconds"), 10**400),
    (("stats", "durable_seconds"), 10**400),
    (("rng", "value", "state"), nested(600)),
    (("rng", "value", "state", "state"), {"ndarray": "<u8", "data": [[[1]]]}),
    (("rng", "value", "state", "state"), {"ndarray": "<u8", "data": "x"}),
    (("arrays", "u", "dtype"), [["a", "<f8", [2**27]]]),
    (("arrays", "u", "dtype"), "|V1000000000"),
], ids=["time-huge-int", "stats-huge-int", "durable-huge-int", "rng-deep", "rng-state-shape",
        "rng-state-text", "huge-subarray-dtype", "huge-void-dtype"])
def test_hostile_manifest_regressions(template_store: Path, file_size_limit: None,
                                      where: tuple[Any, ...], value: Any):
    rewrite_manifest(template_store, set_at(where, value))
    assert_only_arraysnap_errors(template_store)


def test_hostile_rng_seed_sequence_cannot_hang_restore(template_store: Path):
    # numpy's SeedSequence work grows with pool_size squared: 10**6 would take an hour.
    rewrite_manifest(template_store,
                     set_at(("rng", "value", "seed_sequence", "pool_size"), 10**6))
    code = """
        import sys, arraysnap
        try:
            arraysnap.open(sys.argv[1], mode="r").restore()
        except arraysnap.ArraysnapError as err:
            print("refused:", err)
    """
    try:
        result = run_python(code, str(template_store), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("restore() of a manifest with a huge rng pool_size hangs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:")


@pytest.mark.parametrize("what", ["manifest", "chunk-object", "settings", "journal-segment",
                                  "history"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_files_in_a_store_give_an_error_not_a_hang(template_store: Path, what: str,
                                                            kind: str):
    if what == "manifest":
        target = template_store / "snapshots" / "000000000002.json"
    elif what == "settings":
        target = template_store / "arraysnap.json"
    elif what == "journal-segment":
        target = template_store / "journal" / "0000000000000000.jsonl"
        target.parent.mkdir(exist_ok=True)
    elif what == "history":
        target = template_store / "history.jsonl"
    else:
        target = next(p for p in (template_store / "chunks").glob("*/*"))
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    code = """
        import sys, arraysnap
        path = sys.argv[1]
        for name, action in [("list", lambda s: s.list()), ("verify", lambda s: s.verify()),
                             ("restore", lambda s: s.restore(seq=1, verify=True)),
                             ("stats", lambda s: s.stats()),
                             ("capture", lambda s: s.mode == "a" and s.capture(
                                 {"u": __import__("numpy").zeros(3)}).result())]:
            try:
                with arraysnap.open(path, mode="r") as snap:
                    action(snap)
                with arraysnap.open(path) as snap:
                    action(snap)
                print(name, "ok")
            except arraysnap.ArraysnapError as err:
                print(name, "ArraysnapError")
            except BaseException as err:
                print(name, "FOREIGN", type(err).__name__, err)
    """
    try:
        result = run_python(code, str(template_store), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {kind} in place of the {what} makes arraysnap hang")
    assert result.returncode == 0, result.stderr
    assert "FOREIGN" not in result.stdout, result.stdout


def test_newer_format_versions_are_refused_naming_both_versions(template_store: Path):
    rewrite_manifest(template_store, set_at(("version",), 7))
    with arraysnap.open(template_store, mode="r") as reader:
        assert reader.list() == []
        with pytest.raises(arraysnap.FormatVersionError) as caught:
            reader.restore(seq=1)
    message = str(caught.value)
    assert re.search(r"\b7\b", message) and re.search(r"\b1\b", message), message
    with pytest.raises(arraysnap.FormatVersionError):
        arraysnap.open(template_store)  # never write into a store from the future

    settings_file = template_store / "arraysnap.json"
    body = json.loads(settings_file.read_bytes())
    body["version"] = 7
    settings_file.write_text(json.dumps(body))
    with pytest.raises(arraysnap.FormatVersionError) as caught:
        arraysnap.open(template_store, mode="r")
    message = str(caught.value)
    assert re.search(r"\b7\b", message) and re.search(
        rf"\b{arraysnap.FORMAT_VERSION}\b", message), message


def test_hostile_mirror_links_never_make_the_writer_touch_files_outside_the_store(
        template_store: Path, tmp_path: Path):
    marker_path = template_store / "mirror" / "state.json"
    marker = json.loads(marker_path.read_bytes())
    victim = tmp_path / "victim.dat"
    baseline = template_store / "mirror" / marker["files"]["u"]
    size = baseline.stat().st_size
    victim.write_bytes(b"V" * size)  # the same size: adoptable as the baseline
    baseline.unlink()
    baseline.symlink_to(victim)
    marker["clean"] = False  # so that recovery "repairs" it
    marker_path.write_text(json.dumps(marker))
    with arraysnap.open(template_store) as snap:
        snap.capture({"u": np.ones((4, 500)), "s": np.array(2)}, step=8)
        snap.wait()
    assert victim.read_bytes() == b"V" * size


def test_hostile_mirror_directory_link_never_deletes_files_outside_the_store(
        template_store: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "results.bin").write_bytes(b"a week of computing")
    shutil.rmtree(template_store / "mirror")
    (template_store / "mirror").symlink_to(precious, target_is_directory=True)
    try:
        with arraysnap.open(template_store) as snap:
            snap.restore()
    except arraysnap.ArraysnapError:
        pass  # refusing such a store is fine too
    assert (precious / "results.bin").read_bytes() == b"a week of computing"


def test_no_pickle_anywhere_in_the_package():
    sources = [p for p in (REPO / "src" / "arraysnap").rglob("*")
               if p.suffix in (".py", ".pyx", ".pyi")]
    assert sources
    forbidden = re.compile(r"pickle|allow_pickle\s*=\s*True|marshal|shelve|\b(eval|exec)\(")
    for source in sources:
        found = forbidden.search(source.read_text())
        assert found is None, f"{source.name} uses {found.group(0)!r}"  # type: ignore[union-attr]


def test_reading_a_hostile_store_runs_no_unpickler_and_no_process(template_store: Path):
    # Audit hooks see what happens, whatever module would do it.
    rewrite_manifest(template_store, set_at(("arrays", "u", "dtype"), "|O"))
    code = """
        import sys, arraysnap
        path = sys.argv[1]
        def exercise():
            for mode in ("r", "a"):
                try:
                    with arraysnap.open(path, mode=mode) as snap:
                        snap.list(); snap.verify(); snap.restore()
                except arraysnap.ArraysnapError:
                    pass
        exercise()  # imports everything lazily imported first
        seen = []
        def hook(event, args):
            if event.startswith(("pickle.", "marshal.", "os.system", "os.exec", "os.posix_spawn",
                                 "os.spawn", "subprocess.", "ctypes.", "compile", "exec")):
                seen.append(event)
        sys.addaudithook(hook)
        exercise()
        print(sorted(set(seen)))
    """
    result = run_python(code, str(template_store))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Concurrency: one writer, the lock dies with it, one capture at a time
# --------------------------------------------------------------------------------------------
def test_second_writer_is_refused_in_this_process_and_another(store_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 0)
        snap.wait()
        with pytest.raises(arraysnap.StoreLockedError, match=str(os.getpid())):
            arraysnap.open(store_path)
        code = """
            import sys, arraysnap
            try:
                arraysnap.open(sys.argv[1])
            except arraysnap.StoreLockedError as err:
                print("locked")
            with arraysnap.open(sys.argv[1], mode="r") as reader:
                print(reader.latest().step)
        """
        result = run_python(code, str(store_path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["locked", "0"]
        capture_step(snap, 1)  # the refused opens changed nothing for the holder
        snap.wait()
        assert_workload_step(snap.restore(), 1)


def test_lock_does_not_outlive_a_sigkilled_writer(store_path: Path):
    code = WORKLOAD + """
import sys, time, arraysnap
snap = arraysnap.open(sys.argv[1], chunk_bytes=4096)
snap.capture(workload_arrays(0), step=0, state=workload_state(0), rng=workload_rng(0))
snap.wait()
print("holding", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(store_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        assert proc.stdout.readline().strip() == "holding", proc.communicate()[1]  # type: ignore
        with pytest.raises(arraysnap.StoreLockedError, match=str(proc.pid)):
            arraysnap.open(store_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_store_after_crash(store_path, 0)


def test_capture_from_two_threads_is_serialised_or_refused(store_path: Path):
    # The first capture after open writes the baseline marker; holding it there keeps that
    # capture inside capture() for as long as the test wants.
    inside = threading.Event()
    release = threading.Event()

    class Hold(FileOps):
        def write(self, fd: int, data: memoryview | bytes) -> None:
            if "/mirror/.tmp-state.json" in fd_path(fd) and not release.is_set():
                inside.set()
                release.wait(30)
            super().write(fd, data)

    with arraysnap.open(store_path, chunk_bytes=CHUNK):
        pass
    outcomes: dict[str, Any] = {}

    def capture(name: str, step: int) -> None:
        try:
            outcomes[name] = capture_step(snap, step)
        except BaseException as err:  # noqa: BLE001 - recorded and checked below
            outcomes[name] = err

    with arraysnap.open(store_path, _io=Hold()) as snap:
        first = threading.Thread(target=capture, args=("first", 0))
        first.start()
        assert inside.wait(30)
        second = threading.Thread(target=capture, args=("second", 1))
        second.start()
        second.join(2.0)  # refused at once, or waiting for the first (serialised)
        release.set()
        first.join(30)
        second.join(30)
        snap.wait()
        assert isinstance(outcomes["first"], arraysnap.CaptureInfo)
        if isinstance(outcomes["second"], BaseException):
            assert isinstance(outcomes["second"], arraysnap.ArraysnapError), outcomes["second"]
            assert "thread" in str(outcomes["second"])
            assert [info.step for info in snap.list()] == [0]
        else:
            assert outcomes["second"].seq > outcomes["first"].seq
            assert [info.step for info in snap.list()] == [0, 1]
        for info in snap.list():
            assert_workload_step(snap.restore(seq=info.seq), info.step)
        assert snap.verify().ok


def test_capture_from_many_threads_hammering_keeps_every_snapshot_exact(store_path: Path):
    # No interleaving is forced here: whichever captures get through must each be exact.
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def worker(offset: int) -> None:
        barrier.wait()
        for step in range(offset, 60, 3):
            try:
                capture_step(snap, step)
            except arraysnap.ArraysnapError as err:
                if "thread" not in str(err):
                    errors.append(err)
            except BaseException as err:  # noqa: BLE001 - checked below
                errors.append(err)

    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        snap.wait()
        assert errors == []
        infos = snap.list()
        assert infos
        assert snap.verify().ok
        for info in infos:
            assert_workload_step(snap.restore(seq=info.seq), info.step)



READER_DURING_WRITES = """
import sys, numpy as np, arraysnap
path, rounds = sys.argv[1], int(sys.argv[2])
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
                manifest = f"{path}/snapshots/{info.seq:012d}.json"
                if __import__("os").path.exists(manifest):
                    raise
                continue
            expected = np.full(20_000, restored.step, dtype="<i8")
            expected[: restored.step] = -1
            assert np.array_equal(restored.arrays["u"], expected), restored.step
            assert restored.state == {"step": restored.step}
            seen.add(info.seq)
print(len(seen))
"""


def test_readers_during_writes_see_only_committed_whole_snapshots(store_path: Path):
    reader = subprocess.Popen([sys.executable, "-c", READER_DURING_WRITES, str(store_path), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    u = np.zeros(20_000, dtype="<i8")
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        for step in range(60):
            u[:] = step
            u[:step] = -1
            snap.capture({"u": u}, step=step, state={"step": step})
            if step % 20 == 19:
                snap.prune(keep_last=5)
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    assert int(out) > 0  # the reader did see snapshots while they were being written
