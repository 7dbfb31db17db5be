"""Background persistence: point-in-time snapshots, overlap, backpressure, failures, retries."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_bit_exact

import arraysnap
from arraysnap import budget as budget_module
from arraysnap import pipeline
from arraysnap.codecs import CodecSpec
from arraysnap.testing import Call, FaultPlan, Gate, Rule

CHUNK = 4096


def faulty(store_path: Path) -> tuple[FaultPlan, dict[str, Any]]:
    """A fault plan for the store at `store_path`, and the options that open it through it."""
    plan = FaultPlan(store_path)
    return plan, {"path": plan.storage, "_baseline_ops": plan.baseline_ops}


def gated(store_path: Path) -> tuple[Gate, dict[str, Any]]:
    """Chunk-object writes wait while the gate is closed (so tests control when the disk
    'finishes'); the options that open the store through it."""
    plan, options = faulty(store_path)
    return plan.gate("put_if_absent", "chunks"), options


class Flaky:
    """Chunk-object writes fail with `err` `times` times (then succeed), while armed."""

    def __init__(self, store_path: Path) -> None:
        self.plan, self.options = faulty(store_path)
        self.rule: Rule | None = None

    def arm(self, err: int, times: int) -> None:
        if self.rule is not None:
            self.plan.remove(self.rule)
        self.rule = self.plan.fail("put_if_absent", "chunks", err, times=times)

    @property
    def failed(self) -> int:
        return 0 if self.rule is None else self.rule.fired


def in_thread(function, *args):
    """Run `function` in a thread; return (thread, result box)."""
    box: dict = {}

    def target():
        try:
            box["value"] = function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_each_snapshot_is_the_state_at_its_capture_while_writes_lag(store_path: Path):
    gate, options = gated(store_path)
    gate.close()
    rng = np.random.default_rng(0)
    u = rng.random(20_000)
    expected = {}
    with arraysnap.open(chunk_bytes=CHUNK, **options) as snap:
        infos = []
        for step in range(5):
            infos.append(snap.capture({"u": u}, step=step))
            expected[step] = u.copy()
            u[rng.integers(0, u.size, 50)] = rng.random(50)  # the program runs on at once
        assert not any(info.done() for info in infos)  # nothing durable yet: writes wait
        gate.open()
        snap.wait()
        assert [info.result().step for info in infos] == list(range(5))
        for step in range(5):
            assert_bit_exact(snap.restore(step=step).arrays["u"], expected[step])


def test_a_capture_waits_only_until_the_previous_one_has_read_its_chunks(store_path: Path):
    gate, options = gated(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, **options) as snap:
        u = np.zeros(8 * 1024)
        snap.capture({"u": u}, step=0).result()
        gate.close()
        u[:] = 1.0
        first = snap.capture({"u": u}, step=1)
        assert gate.started.wait(30)  # the first one is now stuck writing
        u[:] = 2.0
        thread, box = in_thread(lambda: snap.capture({"u": u}, step=2))
        thread.join(30)
        assert not thread.is_alive(), "capture waited for the previous capture's writes"
        assert not first.done()
        gate.open()
        snap.wait()
        assert box["value"].result().step == 2
        assert snap.restore(step=1).arrays["u"][0] == 1.0
        assert snap.restore(step=2).arrays["u"][0] == 2.0


def budget_use_after(monkeypatch, method: str) -> list[int]:
    """The budget's `used` after each call of ``Budget.<method>``, as the calls happen."""
    seen: list[int] = []
    real = getattr(budget_module.Budget, method)

    def spy(self, *args):
        result = real(self, *args)
        seen.append(self.used)
        return result

    monkeypatch.setattr(budget_module.Budget, method, spy)
    return seen


def test_backpressure_bounds_the_chunk_data_held_in_memory(store_path: Path, monkeypatch):
    held = budget_use_after(monkeypatch, "acquire")
    gate, options = gated(store_path)
    limit = 1 << 16
    with arraysnap.open(chunk_bytes=CHUNK, buffer_bytes=limit, **options) as snap:
        rng = np.random.default_rng(1)
        u = rng.random(64 * 1024)  # 512 KiB of noise: 128 chunks that hardly compress
        snap.capture({"u": u}, step=0).result()
        gate.close()
        u[:] = rng.random(u.size)
        first = snap.capture({"u": u}, step=1)
        u[:] = rng.random(u.size)
        thread, box = in_thread(lambda: snap.capture({"u": u}, step=2))
        thread.join(1.0)
        # The reader filled the buffer and waits for the (stuck) disk; so does the caller.
        assert thread.is_alive(), "capture went on while the buffer was full"
        assert max(held) <= limit
        gate.open()
        thread.join(60)
        assert not thread.is_alive()
        snap.wait()
        assert first.result().chunks_changed == 128
        assert_bit_exact(snap.restore().arrays["u"], u)
        assert max(held) <= limit


def test_a_background_failure_is_raised_by_the_next_capture_with_its_cause(store_path: Path,
                                                                           caplog):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, **io.options, _retry_delays=(0.0,)) as snap:
        u = np.zeros(4096)
        snap.capture({"u": u}, step=0).result()
        io.arm(errno.EIO, 100)
        u[0] = 1.0
        with caplog.at_level(logging.ERROR, logger="arraysnap"):
            failed = snap.capture({"u": u}, step=1)
            with pytest.raises(arraysnap.StoreWriteError) as caught:
                failed.result(timeout=30)
        assert "failed to persist" in caplog.text  # logged when it happened
        assert caught.value.errno == errno.EIO
        u[1] = 2.0
        with pytest.raises(arraysnap.StoreWriteError) as raised:
            snap.capture({"u": u}, step=2)
        assert isinstance(raised.value.__cause__, OSError)
        assert raised.value.__cause__.errno == errno.EIO
        io.arm(errno.EIO, 0)
        snap.capture({"u": u}, step=3).result()
        # Invariant 3: the committed snapshot after the failure holds every change.
        assert_bit_exact(snap.restore().arrays["u"], u)
        assert [info.step for info in snap.list()] == [0, 3]
        statuses = [(row.step, row.status) for row in snap.stats()]
        assert (1, "failed") in statuses and statuses[-1] == (3, "committed")


def test_wait_and_close_raise_a_pending_failure(store_path: Path):
    io = Flaky(store_path)
    snap = arraysnap.open(chunk_bytes=CHUNK, **io.options, _retry_delays=())
    io.arm(errno.ENOSPC, 100)
    snap.capture({"u": np.ones(100)}, step=0)
    with pytest.raises(arraysnap.StoreWriteError) as caught:
        snap.wait()
    assert caught.value.errno == errno.ENOSPC
    snap.capture({"u": np.full(100, 2.0)}, step=1)
    with pytest.raises(arraysnap.ArraysnapError) as at_close:
        snap.close()
    assert isinstance(at_close.value.__cause__, OSError)
    assert snap.__repr__().endswith("(closed)>")
    with arraysnap.open(store_path, mode="r") as reader:
        assert reader.list() == []  # never half-committed


def test_transient_errors_are_retried_and_counted(store_path: Path):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, **io.options,
                        _retry_delays=(0.0, 0.0, 0.0)) as snap:
        io.arm(errno.EIO, 2)
        u = np.arange(3000.0)
        info = snap.capture({"u": u}, step=0).result()
        assert io.failed == 2 and info.step == 0
        assert snap.stats()[-1].retries == 2
        io.arm(errno.EINVAL, 1)  # not transient: no retry
        with pytest.raises(arraysnap.StoreWriteError):
            snap.capture({"u": u + 1}, step=1).result()
        with pytest.raises(arraysnap.StoreWriteError):
            snap.wait()
        assert_bit_exact(snap.restore().arrays["u"], u)


def test_disk_full_first_frees_space_then_retries(store_path: Path):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, **io.options, _retry_delays=(0.0,)) as snap:
        snap.capture({"u": np.zeros(2048)}, step=0).result()
        # Leftovers of a killed writer: objects no snapshot uses.
        orphan = store_path / "chunks" / "ff" / ("ee" * 31)
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"x" * 50_000)
        io.arm(errno.ENOSPC, 1)
        info = snap.capture({"u": np.ones(2048)}, step=1).result()
        assert info.step == 1 and not orphan.exists()


def test_disk_full_prunes_by_the_retention_policy(store_path: Path):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, keep_within=3600, **io.options,
                        _retry_delays=(0.0,)) as snap:
        for step in range(3):
            snap.capture({"u": np.full(2048, float(step))}, step=step).result()
        # Make the old snapshots fall out of keep_within: the next ENOSPC prunes them.
        snap.retention = arraysnap.retention.Retention(keep_within=1e-9)
        io.arm(errno.ENOSPC, 1)
        snap.capture({"u": np.full(2048, 9.0)}, step=3).result()
        snap.wait()  # retention after the commit runs after result() returns
        assert [info.step for info in snap.list()] == [3]


def test_on_error_warn_goes_on_keeps_changes_and_warns_once_per_kind(store_path: Path):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, on_error="warn", **io.options,
                        _retry_delays=()) as snap:
        u = np.zeros(4096)
        snap.capture({"u": u}, step=0).result()
        io.arm(errno.ENOSPC, 10_000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 5):
                u[step * 100] = step
                snap.capture({"u": u}, step=step)  # never raises
                snap.wait()  # nor does wait
        kinds = [w for w in caught if issubclass(w.category, arraysnap.ArraysnapWarning)]
        assert len(kinds) == 1 and "injected ENOSPC" in str(kinds[0].message)
        assert [info.step for info in snap.list()] == [0]
        io.arm(errno.ENOSPC, 0)  # the disk has room again
        u[4000] = 7.0
        snap.capture({"u": u}, step=5).result()
        assert_bit_exact(snap.restore().arrays["u"], u)  # every pending change is there


def test_interpreter_exit_finishes_pending_work(store_path: Path):
    from conftest import run_python

    done = run_python(f"""
        import arraysnap, numpy as np
        snap = arraysnap.open({str(store_path)!r}, chunk_bytes=4096)
        snap.capture({{"u": np.arange(200_000.0)}}, step=7)
        # no wait(), no close(): exit must finish the capture
    """)
    assert done.returncode == 0, done.stderr
    with arraysnap.open(store_path, mode="r") as reader:
        assert reader.latest().step == 7
        assert_bit_exact(reader.restore().arrays["u"], np.arange(200_000.0))


def test_retention_never_deletes_an_object_a_capture_in_flight_dedups_against(store_path):
    import time

    plan, options = faulty(store_path)
    plan.slow("delete", "chunks", 0.3)  # a slow file system: deleting a chunk object takes 0.3 s

    a, b = np.full(1 << 14, 1.0), np.full(1 << 14, 2.0)  # one chunk each
    with arraysnap.open(keep_last=1, chunk_bytes=1 << 17, **options) as snap:
        snap.capture({"u": a}, step=1).result()
        snap.capture({"u": b}, step=2)  # its commit removes snapshot 1 and object(a)...
        time.sleep(0.1)
        snap.capture({"u": a}, step=3)  # ...while this one finds object(a) and reuses it
        snap.wait()
        assert snap.verify().ok
    with arraysnap.open(store_path, mode="r") as reader:  # not from the writer's baseline
        assert_bit_exact(reader.restore(step=3, verify=True).arrays["u"], a)


def test_space_freed_for_a_commit_never_takes_objects_it_inherited(store_path):
    plan, options = faulty(store_path)
    full_journal: list[Rule] = []

    def fail_manifest_2(call: Call) -> None:
        full_journal.append(plan.fail("append", "journal", errno.ENOSPC))
        time.sleep(0.5)  # let the next capture be read from this one's tables
        raise OSError(errno.EROFS, "injected on manifest 2")

    import time

    manifest_2 = plan.add(Rule("put_if_absent", "snapshots", match="000000000002",
                               before=fail_manifest_2, times=1))
    with arraysnap.open(chunk_bytes=CHUNK, on_error="warn", _retry_delays=(0.0,),
                        **options) as snap:
        u = np.zeros(2 * 512)  # two chunks
        snap.capture({"u": u}, step=1).result()
        u[:512] = 1.0  # chunk 0 changes in 2 (which fails) and stays so in 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            snap.capture({"u": u}, step=2)  # its objects are written, its manifest fails
            u[512:] = 2.0
            snap.capture({"u": u}, step=3)  # read from 2's tables: chunk 0 is 2's object
            time.sleep(0.1)
            snap.log({"after": 3})  # 3's commit has a record to flush: the disk is full
            snap.wait()
            assert snap.verify().ok
            u[0] = 5.0
            snap.capture({"u": u}, step=4).result()
        assert snap.verify().ok
        # Both faults did happen.
        assert manifest_2.fired == 1 and full_journal and full_journal[0].fired == 1
        assert_bit_exact(arraysnap.open(store_path, mode="r").restore().arrays["u"], u)


def test_held_chunks_live_in_mappings_the_budget_counts_and_gives_back():
    """What waits for a writer is counted in whole pages, kept for reuse, and unmapped when
    the pipeline goes idle: nothing held escapes the budget."""
    import mmap

    page = mmap.PAGESIZE
    budget = budget_module.Budget(64 * page)
    held = [budget.hold(b"x" * (page + 1)) for _ in range(3)]
    for buffer, counted in held:
        assert isinstance(buffer.map, mmap.mmap)  # not malloc'd: unmapping returns the pages
        assert counted == 2 * page
        assert buffer.write_with(bytes) == b"x" * (page + 1)
    assert budget.used == 6 * page
    for buffer, counted in held:
        budget.give(buffer, counted)
    assert budget.used == 6 * page  # kept for reuse, and still counted
    again, counted = budget.hold(b"y" * (2 * page))  # fits a kept mapping: no new one
    assert budget.used == 6 * page and again.write_with(bytes) == b"y" * (2 * page)
    budget.give(again, counted)
    budget.trim()
    assert budget.used == 0


def test_a_held_chunk_waits_for_room_and_kept_mappings_make_way():
    import mmap

    page = mmap.PAGESIZE
    budget = budget_module.Budget(4 * page)
    first = budget.hold(b"a" * (2 * page))
    second = budget.hold(b"b" * page)
    budget.give(*second)  # kept for reuse, but a larger chunk needs the room
    third = budget.hold(b"c" * (2 * page))
    assert budget.used == 4 * page
    thread, box = in_thread(budget.hold, b"d" * (3 * page))
    thread.join(0.2)
    assert thread.is_alive(), "held more than the budget"
    budget.give(*first)  # a chunk waits: this mapping is unmapped, not kept
    thread.join(0.2)
    assert thread.is_alive() and budget.used == 2 * page
    budget.give(*third)
    thread.join(10)
    assert not thread.is_alive()
    assert budget.used == 3 * page  # only the waiting chunk: nothing was kept meanwhile
    budget.give(*box["value"])
    budget.trim()
    assert budget.used == 0


def test_the_pipeline_unmaps_every_held_chunk_once_idle(store_path: Path, monkeypatch):
    peaks = budget_use_after(monkeypatch, "hold")
    limit = 1 << 16
    with arraysnap.open(store_path, chunk_bytes=CHUNK, buffer_bytes=limit) as snap:
        rng = np.random.default_rng(2)
        u = rng.random(64 * 1024)
        snap.capture({"u": u}, step=0)
        u[:] = rng.random(u.size)
        snap.capture({"u": u}, step=1)
        snap.wait()
        assert peaks and max(peaks) <= limit
        assert snap._persister.budget.used == 0
        assert_bit_exact(snap.restore().arrays["u"], u)


def test_chunk_objects_are_written_by_more_than_one_thread(store_path: Path):
    plan, options = faulty(store_path)
    lock = threading.Lock()
    inside = [0]
    two = threading.Event()

    def enter(call: Call) -> None:
        with lock:
            inside[0] += 1
            if inside[0] >= 2:
                two.set()

    def leave(call: Call) -> None:
        with lock:
            inside[0] -= 1

    plan.add(Rule("put_if_absent", "chunks", before=enter, after=leave))
    gate = plan.gate("put_if_absent", "chunks")  # after enter(): writers wait inside
    with arraysnap.open(chunk_bytes=CHUNK, **options) as snap:
        # 70 chunks: more than a pack takes, so each is a chunk object of its own.
        snap.capture({"u": np.zeros(70 * 512)}, step=0).result()
        gate.close()
        info = snap.capture({"u": np.arange(70 * 512.0)}, step=1)
        assert two.wait(30), "one chunk object at a time"
        gate.open()
        assert info.result().chunks_changed == 70
        assert snap.verify().ok


def test_freeing_space_from_an_object_writer_excludes_commits(store_path: Path):
    io = Flaky(store_path)
    with arraysnap.open(chunk_bytes=CHUNK, **io.options, _retry_delays=(0.0,)) as snap:
        persister = snap._persister
        owned = []
        real_free_space = persister.listener.free_space

        def free_space():
            owned.append(persister._commit_lock._is_owned())
            return real_free_space() or 1

        persister.listener.free_space = free_space
        snap.capture({"u": np.zeros(2048)}, step=0).result()
        io.arm(errno.ENOSPC, 1)
        assert snap.capture({"u": np.ones(2048)}, step=1).result().step == 1
        assert owned == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness: Linux")
def test_background_threads_yield_the_cpu_to_the_program(tmp_path):
    """Every arraysnap thread runs nicer than the caller's, which stays as it was."""

    def niceness(tid: int) -> int:
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])

    def named_threads() -> dict[str, int]:
        return {thread.name: thread.native_id for thread in threading.enumerate()
                if thread.native_id is not None}

    mine = niceness(threading.get_native_id())
    with arraysnap.open(tmp_path / "s.snap", chunk_bytes=1 << 12) as snap:
        for step in range(3):
            snap.capture({"u": np.random.default_rng(step).random(50_000)}, step=step)
        snap.wait()
        ours = {name: tid for name, tid in named_threads().items()
                if name.startswith("arraysnap")}
        assert {name.split("_")[0] for name in ours} >= {
            "arraysnap", "arraysnap-read", "arraysnap-commit", "arraysnap-write"}
        assert all(niceness(tid) == min(19, mine + 10) for tid in ours.values()), ours
    assert niceness(threading.get_native_id()) == mine


def test_mappings_are_kept_between_captures_and_unmapped_after_idling(store_path: Path,
                                                                      monkeypatch):
    """Captures a second apart reuse the held mappings (no unmapping, whose TLB flush
    interrupts the program's threads); an idle pipeline gives them back."""
    new_mappings = []
    real_reuse = budget_module.Budget._reuse

    def reuse(self, need):
        mapping = real_reuse(self, need)
        if mapping is None:
            new_mappings.append(need)
        return mapping

    monkeypatch.setattr(budget_module.Budget, "_reuse", reuse)
    monkeypatch.setattr(pipeline, "IDLE_TRIM_SECONDS", 60.0)
    rng = np.random.default_rng(4)
    u = rng.random(256 * 1024)  # 2 MiB of noise: 8 chunk objects of one size
    with arraysnap.open(store_path, chunk_bytes=256 << 10) as snap:
        for step in range(6):
            u[:] = rng.random(u.size)
            snap.capture({"u": u}, step=step).result()
            assert snap._persister.budget.used > 0  # kept after the commit
        # At most one mapping per chunk of a capture was ever made (never one per chunk
        # object written: 48 of them), as mappings were reused rather than unmapped.
        assert 0 < len(new_mappings) <= 8
        monkeypatch.setattr(pipeline, "IDLE_TRIM_SECONDS", 0.05)
        snap.capture({"u": u}, step=6).result()  # wakes the reader: it waits 0.05 s now
        deadline = time.monotonic() + 30
        while snap._persister.budget.used and time.monotonic() < deadline:
            time.sleep(0.02)
        assert snap._persister.budget.used == 0
        assert_bit_exact(snap.restore().arrays["u"], u)


def test_a_mapping_kept_while_a_chunk_makes_room_is_dropped_for_it(monkeypatch):
    """A mapping given back (and kept for reuse) between a chunk's look for a reusable
    mapping and its wait for room makes way for it; otherwise the chunk waits for ever,
    as nothing trims while a job is in flight."""
    mib = 1 << 20
    budget = budget_module.Budget(2 * mib)
    held = budget.hold(bytes(3 * mib // 2))
    in_between, resume = threading.Event(), threading.Event()
    real_reuse = budget_module.Budget._reuse

    def reuse(self, need):
        mapping = real_reuse(self, need)  # finds nothing to reuse: 1.5 + 1 MiB > 2 MiB
        in_between.set()
        resume.wait(10)
        return mapping

    monkeypatch.setattr(budget_module.Budget, "_reuse", reuse)
    thread, box = in_thread(budget.hold, bytes(mib))
    assert in_between.wait(10)
    budget.give(*held)  # nobody waits yet: the mapping is kept, and still counted
    resume.set()
    thread.join(10)
    assert not thread.is_alive(), "waited for ever on room a kept mapping held"
    budget.give(*box["value"])
    budget.trim()
    assert budget.used == 0


def test_a_large_chunk_waiting_for_room_a_pack_holds_does_not_wait_for_ever(store_path: Path):
    """With a small buffer budget, a chunk larger than the budget waits until nothing else is
    held; the open pack (small arrays' chunks, format 3) would be written only at the end of
    the job, which waits for that chunk: the wait must first have the pack written. (In a
    child process: were it to hang, the test fails instead of hanging too.)"""
    script = textwrap.dedent(f"""
        import numpy as np, arraysnap
        rng = np.random.default_rng(8)
        arrays = {{f"small{{i:02d}}": rng.random(64) for i in range(20)}}
        arrays["big"] = rng.random(70 * (512 << 10) // 8)  # 70 chunks of 512 KiB, random
        with arraysnap.open({str(store_path)!r}, chunk_bytes=512 << 10,
                            buffer_bytes=256 << 10) as snap:
            assert snap.capture(arrays, step=0).result().chunks_changed == 90
            restored = snap.restore()
            assert all(np.array_equal(restored.arrays[n], a) for n, a in arrays.items())
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_chunk_too_large_for_a_pack_is_encoded_once(store_path: Path, monkeypatch):
    """A small array's chunk is encoded to see whether it fits a pack; one that does not is
    written as an object of its own from that encoding, not encoded a second time."""
    calls = []
    original = CodecSpec.encode_lazily

    def counting(self, raw, itemsize):
        calls.append(len(memoryview(raw).cast("B")))
        return original(self, raw, itemsize)

    monkeypatch.setattr(CodecSpec, "encode_lazily", counting)
    u = np.random.default_rng(3).random(4 * (2 << 20) // 8)  # 4 chunks of 2 MiB of noise
    with arraysnap.open(store_path, chunk_bytes=2 << 20) as snap:
        snap.capture({"u": u, "small": np.arange(10.0)}, step=0).result()
        assert sorted(calls) == [80] + [2 << 20] * 4
        assert sum(1 for p in (store_path / "chunks").rglob("*") if p.is_file()) == 4
        assert np.array_equal(snap.restore().arrays["u"], u)
