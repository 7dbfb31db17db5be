"""One writer at a time: a second writer is refused (in this process and another), the lock
dies with a SIGKILLed writer, captures from several threads are serialised or refused, and
readers in other processes see only committed, whole snapshots while the writer works.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    CHUNK,
    assert_workload_step,
    capture_step,
    check_store_after_crash,
    run_child,
    start_child,
)

import arraysnap
from arraysnap.testing import Call, FaultPlan


def test_second_writer_is_refused_in_this_process_and_another(store_path: Path):
    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        capture_step(snap, 0)
        snap.wait()
        with pytest.raises(arraysnap.StoreLockedError, match=str(os.getpid())):
            arraysnap.open(store_path)
        result = run_child("second-writer", store_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["locked", "0"]
        capture_step(snap, 1)  # the refused opens changed nothing for the holder
        snap.wait()
        assert_workload_step(snap.restore(), 1)


def test_lock_does_not_outlive_a_sigkilled_writer(store_path: Path):
    proc = start_child("hold-lock", store_path)
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

    def hold(call: Call) -> None:
        if ".tmp-state.json" in call.where and not release.is_set():
            inside.set()
            release.wait(30)

    with arraysnap.open(store_path, chunk_bytes=CHUNK):
        pass
    plan = FaultPlan(store_path)
    plan.before("write", "mirror", hold)
    outcomes: dict[str, Any] = {}

    def capture(name: str, step: int) -> None:
        try:
            outcomes[name] = capture_step(snap, step)
        except BaseException as err:  # noqa: BLE001 - recorded and checked below
            outcomes[name] = err

    with arraysnap.open(plan.storage, _baseline_ops=plan.baseline_ops) as snap:
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


def test_readers_during_writes_see_only_committed_whole_snapshots(store_path: Path):
    reader = start_child("reader-during-writes", store_path, "--rounds", 40)
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
