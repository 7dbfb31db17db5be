"""The torture's kills: a writer SIGKILLed at a random moment or at its n-th file operation.

>>> import io, tempfile
>>> from pathlib import Path
>>> events = KillEvents(Path(tempfile.mkdtemp()), seed=2, out=io.StringIO())
>>> events.new_store(); events.kill_at_operation()
>>> events.tally.failures
[]
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import arraysnap
from arraysnap.testing._damage import leftover_temporaries, manifest_files
from arraysnap.testing._processes import child_command, committed_reports
from arraysnap.testing._tally import LOST, UNEXPECTED, WRONG
from arraysnap.testing._torture_base import (
    CHILD_TIMEOUT,
    CHUNK_BYTES,
    TortureBase,
    capture_step,
)

__all__ = ["KillEvents"]


class KillEvents(TortureBase):
    """Kill events of the torture, and the checks of a store after a crash."""

    # -- kills -----------------------------------------------------------------------------
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
                child_command("loop", self.store, "--workload", "torture",
                              "--chunk-bytes", self._child_chunk_bytes()),
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
            child_command("kill", self.store, "--workload", "torture", "--routine", "torture",
                          "--chunk-bytes", self._child_chunk_bytes(), "--at", target,
                          *(["--after"] if after else [])),
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
            total = len(json.loads(out.rsplit("ops ", 1)[1])) if "ops " in out else 0
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

