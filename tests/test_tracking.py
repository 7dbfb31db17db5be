"""Write tracking against a full comparison: it may compare more than changed, never less."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import re
import resource
import warnings

import numpy as np
import pytest
from conftest import assert_bit_exact, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap import tracking
from arraysnap.delta import as_bytes, scan_and_copy
from arraysnap.layout import plan_layout
from arraysnap.tracking import Tracking, WriteTracker, tracking_unavailable_reason

RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)

REASON = tracking_unavailable_reason()
needs_tracking = pytest.mark.skipif(REASON is not None, reason=f"no write tracking: {REASON}")
PAGE = mmap.PAGESIZE


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return bool(found) and (int(found[1]), int(found[2])) >= (major, minor)


def test_tracking_is_available_where_the_kernel_offers_it():
    """On Linux 6.7+ (x86-64, arm64) tracking must work, unless a sandbox blocks the call."""
    if platform.system() != "Linux" or not _kernel_at_least(6, 7) \
            or platform.machine() not in ("x86_64", "aarch64"):
        assert REASON is not None  # and then captures compare everything
        return
    try:
        WriteTracker().close()
    except OSError as err:
        if err.errno in (errno.EPERM, errno.ENOSYS):  # seccomp: a container's choice
            assert REASON is not None
            return
        raise
    assert REASON is None


def truly_changed(live: np.ndarray, baseline: np.ndarray, layout) -> set[int]:
    live_bytes = as_bytes(live)
    return {i for i in range(layout.n_chunks)
            if not np.array_equal(live_bytes[slice(*layout.chunk_range(i))],
                                  baseline[slice(*layout.chunk_range(i))])}


WRITES = st.lists(st.tuples(st.sampled_from(["element", "slice", "kernel", "same", "first",
                                             "last", "copyto"]),
                            st.floats(0, 1), st.floats(0, 1)), max_size=6)


@needs_tracking
@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, PAGE - 1), extra=st.integers(0, 3 * PAGE),
       order=st.sampled_from(["C", "F"]), chunk=st.sampled_from([PAGE // 2, PAGE, 5000, 1 << 16]),
       rounds=st.lists(WRITES, min_size=1, max_size=4))
def test_candidates_cover_every_change(tmp_path_factory, offset, extra, order, chunk, rounds):
    """Random writes, by the process and by the kernel, at any offset: every chunk that
    changed is a candidate, and scanning only candidates leaves the baseline equal to live."""
    rows = (tracking.MIN_TRACKED_BYTES + extra) // 8 // 64 + 1
    buffer = np.zeros(rows * 64 * 8 + offset + 64, dtype=np.uint8)
    live = np.ndarray((rows, 64), dtype="<f8", buffer=buffer.data, offset=offset,
                      order=order)  # type: ignore[call-overload]
    live[...] = np.arange(live.size).reshape(live.shape)
    layout = plan_layout(live.shape, live.dtype, order, chunk)
    baseline = as_bytes(live).copy()
    source = tmp_path_factory.mktemp("src") / "bytes"
    source.write_bytes(os.urandom(3 * PAGE))
    tracker = Tracking("auto")
    try:
        assert tracker.candidates("u", live, layout, fresh=True) == (None, None)
        flat = as_bytes(live)
        for writes in rounds:
            for kind, where, size in writes:
                at = int(where * (flat.size - 1))
                length = max(1, int(size * 3 * PAGE))
                if kind == "element":
                    flat[at] ^= 0x5A
                elif kind == "slice":
                    flat[at:at + length] += 1
                elif kind == "kernel":  # read() into the array: the kernel writes
                    with open(source, "rb", buffering=0) as handle:
                        handle.readinto(memoryview(flat[at:at + length]))
                elif kind == "same":  # written, unchanged: a candidate that compares equal
                    flat[at] = flat[at]
                elif kind == "first":  # bytes on the page shared with what lies before
                    flat[0] ^= 1
                elif kind == "last":
                    flat[-1] ^= 1
                else:
                    np.copyto(flat[at:at + length], 7)
            flags, _audit = tracker.candidates("u", live, layout, fresh=False)
            changed = truly_changed(live, baseline, layout)
            if flags is not None:
                assert changed <= set(np.flatnonzero(flags).tolist())
            found = scan_and_copy(live, baseline, layout, candidates=flags)
            assert baseline.tobytes() == as_bytes(live).tobytes()
            tracker.unprotect_changed("u", found)  # as a capture does: they stay writable
    finally:
        tracker.close()


def capture_all(snap, arrays, step):
    info = snap.capture(arrays, step=step)
    snap.wait()
    return info


@needs_tracking
def test_a_capture_compares_only_written_chunks(store_path):
    u = np.zeros((256, 4096))  # 8 MiB, 64 KiB chunks: 128 of them
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        assert capture_all(snap, {"u": u}, 0).chunks_compared == 128
        # Nothing written: the two chunks on pages the array shares with its neighbours,
        # and the audit's slice (128 / 32 chunks, 0-3).
        assert capture_all(snap, {"u": u}, 1).chunks_compared <= 6
        u[100, 5] = 1.0  # chunk 50
        info = capture_all(snap, {"u": u}, 2)
        assert snap.stats()[-1].chunks_compared == info.chunks_compared
        # The written chunk, the chunk the written page straddles into (the buffer is not
        # page-aligned), the two shared with the neighbours, the audit's slice (4-7).
        assert info.chunks_changed == 1
        assert 5 <= info.chunks_compared <= 8
        assert_bit_exact(snap.restore().arrays["u"], u)


def _faults_writing(array: np.ndarray) -> int:
    before = resource.getrusage(RUSAGE_THREAD).ru_minflt
    array += 1.0
    return resource.getrusage(RUSAGE_THREAD).ru_minflt - before


@needs_tracking
def test_chunks_found_changed_stay_writable_until_they_stop_changing():
    # 8 MiB, page-aligned (no chunk shares a page with another), 64 KiB chunks: 128 of
    # them, 16 pages each.
    memory = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    u = np.frombuffer(memory, dtype=np.float64)
    u += 1.0  # every page populated: any fault counted below is a write-protect fault
    layout = plan_layout(u.shape, u.dtype, "C", 1 << 16)
    baseline = as_bytes(u).copy()
    hot, cold = u[: 1 << 17], u[1 << 18 : (1 << 18) + (1 << 17)]  # chunks 0-15, 32-47
    tracker = Tracking("auto")
    try:
        def capture() -> list[int] | None:
            """The chunks tracking flagged (without the audit's slice, also compared)."""
            flags, audit = tracker.candidates("u", u, layout, fresh=False)
            found = scan_and_copy(u, baseline, layout, candidates=flags)
            tracker.unprotect_changed("u", found)
            return None if audit is None else np.flatnonzero(audit.tracked).tolist()

        assert capture() is None  # first sight: everything is compared, all protected
        hot_pages = hot.nbytes // PAGE
        assert _faults_writing(hot) >= hot_pages  # protected: a fault per page
        assert _faults_writing(cold) >= hot_pages
        assert capture() == list(range(16)) + list(range(32, 48))
        # Both changed, so both are writable now: written again, neither faults.
        assert _faults_writing(hot) < hot_pages // 8
        assert _faults_writing(cold) < hot_pages // 8
        assert capture() == list(range(16)) + list(range(32, 48))
        # The cold half stops changing: compared once more (unprotected pages count as
        # written), then once for the previous-capture rule, then no longer.
        assert _faults_writing(hot) < hot_pages // 8
        assert capture() == list(range(16)) + list(range(32, 48))
        assert _faults_writing(hot) < hot_pages // 8
        assert capture() == list(range(16)) + list(range(32, 48))
        assert _faults_writing(hot) < hot_pages // 8
        assert capture() == list(range(16))
        assert _faults_writing(cold) >= hot_pages  # protected again
        assert capture() == list(range(16)) + list(range(32, 48))
        assert baseline.tobytes() == as_bytes(u).tobytes()
    finally:
        tracker.close()


@needs_tracking
def test_restored_arrays_are_tracked_and_stay_exact(store_path):
    rng = np.random.default_rng(0)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": rng.random((256, 4096))}, 0)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        u = snap.restore().arrays["u"]  # a private map of the store's baseline file
        for step in range(1, 5):
            u[rng.integers(0, 256), rng.integers(0, 4096)] = rng.random()
            info = capture_all(snap, {"u": u}, step)
            assert_bit_exact(snap.restore().arrays["u"], u)
        assert info.chunks_compared <= 4 + 128 // tracking.AUDIT_EVERY  # and the audit's


@needs_tracking
@pytest.mark.parametrize("kind", ["shared anonymous", "shared file"])
def test_shared_mappings_are_compared_whole(store_path, tmp_path, kind):
    """Another process (or a write() to the file) can change a shared mapping without
    touching this process's page tables: such arrays are never tracked."""
    size = 2 << 20
    if kind == "shared anonymous":
        region = mmap.mmap(-1, size)
        u = np.frombuffer(region, dtype=np.uint8)
        external = lambda: region.__setitem__(slice(5, 6), b"\x09")  # noqa: E731
    else:
        path = tmp_path / "data.bin"
        path.write_bytes(bytes(size))
        u = np.memmap(path, mode="r+", dtype=np.uint8)
        fd = os.open(path, os.O_RDWR)

        def external():
            os.pwrite(fd, b"\x07" * 100, 1 << 20)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        for step in range(3):
            external()
            info = capture_all(snap, {"u": u}, step)
            assert info.chunks_compared == 32
            assert_bit_exact(snap.restore().arrays["u"], np.array(u))
    if kind == "shared file":
        os.close(fd)


@needs_tracking
def test_overlapping_views_are_not_both_tracked(store_path):
    buffer = np.zeros(4 << 20, dtype=np.uint8)
    a, b = buffer[: 3 << 20], buffer[1 << 20:]
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        for step in range(4):
            buffer[(1 << 20) + step * 70000] = step + 1  # in both views
            capture_all(snap, {"a": a, "b": b}, step)
            restored = snap.restore().arrays
            assert_bit_exact(restored["a"], a)
            assert_bit_exact(restored["b"], b)


@needs_tracking
def test_a_new_array_object_is_compared_whole(store_path):
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        u = np.zeros(2 << 20, dtype=np.uint8)
        capture_all(snap, {"u": u}, 0)
        capture_all(snap, {"u": u}, 1)
        u = u.copy()  # may even land at the old address once the old one is freed
        u[12345] = 1
        assert capture_all(snap, {"u": u}, 2).chunks_compared == 32
        assert_bit_exact(snap.restore().arrays["u"], u)


@needs_tracking
def test_the_audit_catches_changes_tracking_missed(store_path, monkeypatch):
    """A change the kernel did not report (as a device writing into pinned memory would
    make, injected here): the audit finds it, stores it, warns, and switches tracking off."""
    monkeypatch.setattr(tracking, "AUDIT_EVERY", 2)
    u = np.ones(2 << 20, dtype=np.uint8)
    real_written = WriteTracker.written
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)  # watch set up
        capture_all(snap, {"u": u}, 1)  # tracked capture 1: audits chunks 0-15
        u[1 << 20] = 0  # chunk 16, mid-array: not on a partial page, always compared
        monkeypatch.setattr(WriteTracker, "written", lambda self, start, length: (
            real_written(self, start, length), [])[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = capture_all(snap, {"u": u}, 2)  # tracked capture 2: audits 16-31
        assert [w.category for w in caught] == [arraysnap.ArraysnapWarning]
        assert "did not see" in str(caught[0].message)
        assert info.chunks_changed == 1
        assert_bit_exact(snap.restore().arrays["u"], u)
        monkeypatch.setattr(WriteTracker, "written", real_written)
        u[5] = 9
        assert capture_all(snap, {"u": u}, 3).chunks_compared == 32  # tracking is off
        assert_bit_exact(snap.restore().arrays["u"], u)


@given(n_chunks=st.integers(1, 5000), first=st.integers(0, 1000))
def test_the_audit_slices_of_any_consecutive_captures_tile_the_chunks(n_chunks, first):
    slices = [tracking.audit_slice(c, n_chunks)
              for c in range(first, first + tracking.AUDIT_EVERY)]
    covered = sorted(i for low, high in slices for i in range(low, high))
    assert covered == list(range(n_chunks))  # each chunk once
    assert max(high - low for low, high in slices) <= -(-n_chunks // tracking.AUDIT_EVERY)


def test_an_audit_reports_only_unflagged_changes_inside_its_slice():
    tracked = np.zeros(10, dtype=np.uint8)
    tracked[[3, 7]] = 1
    audit = tracking.Audit(tracked, 2, 6)
    assert audit.missed(np.array([1, 3, 4, 5, 7, 8])) == [4, 5]
    assert audit.missed(np.array([], dtype=np.int64)) == []


@needs_tracking
def test_a_missed_change_is_caught_when_the_rolling_audit_reaches_it(store_path,
                                                                     monkeypatch):
    """No capture compares everything, yet a change tracking never reports (a device
    writing into pinned memory) is found by the capture whose audit slice holds it."""
    assert tracking.AUDIT_EVERY == 32
    u = np.ones(2 << 20, dtype=np.uint8)  # 32 chunks: the audit takes one a capture
    real_written = WriteTracker.written
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)  # watch set up
        capture_all(snap, {"u": u}, 1)  # tracked capture 0: audits chunk 0
        u[20 << 16] = 0  # chunk 20
        monkeypatch.setattr(WriteTracker, "written", lambda self, start, length: (
            real_written(self, start, length), [])[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2, 21):  # tracked captures 1-19 audit chunks 1-19
                info = capture_all(snap, {"u": u}, step)
                assert info.chunks_changed == 0 and info.chunks_compared <= 3
            assert caught == []
            info = capture_all(snap, {"u": u}, 21)  # audits chunk 20
        assert [w.category for w in caught] == [arraysnap.ArraysnapWarning]
        assert info.chunks_changed == 1
        assert_bit_exact(snap.restore().arrays["u"], u)


@needs_tracking
def test_pages_dropped_with_madvise_count_as_written():
    region = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    u = np.frombuffer(region, dtype=np.uint8)
    u[:] = 1
    tracker = WriteTracker()
    try:
        start = u.ctypes.data
        tracker.register(start, u.nbytes)
        tracker.protect(start, u.nbytes)
        region.madvise(mmap.MADV_DONTNEED, 10 * PAGE, PAGE)  # now reads as zeros
        assert u[10 * PAGE] == 0
        assert tracker.written(start, u.nbytes) == [(10 * PAGE, 11 * PAGE)]
    finally:
        tracker.close()
        del u
        region.close()


@needs_tracking
def test_a_failed_pause_makes_the_next_capture_compare_everything(store_path, monkeypatch):
    """Invariant 3 with tracking: the failed capture consumed the written-page list, so the
    next one must not trust it."""
    from arraysnap._store import capture as store_module

    u = np.zeros(2 << 20, dtype=np.uint8)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)
        capture_all(snap, {"u": u}, 1)
        u[777] = 5
        real = store_module.scan_and_copy

        def failing(*args, **kwargs):
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(store_module, "scan_and_copy", failing)
        with pytest.raises(arraysnap.StoreWriteError):
            snap.capture({"u": u}, step=2)
        monkeypatch.setattr(store_module, "scan_and_copy", real)
        info = capture_all(snap, {"u": u}, 3)
        assert info.chunks_compared == 32
        assert_bit_exact(snap.restore().arrays["u"], u)


def test_track_writes_false_compares_everything(store_path):
    u = np.zeros(2 << 20, dtype=np.uint8)
    with arraysnap.open(store_path, chunk_bytes=1 << 16, track_writes=False) as snap:
        for step in range(3):
            u[step] = 1
            assert capture_all(snap, {"u": u}, step).chunks_compared == 32
    with pytest.raises(ValueError, match="track_writes must be"):
        arraysnap.open(store_path, track_writes="yes")
    with arraysnap.open(store_path) as snap:  # the refused open left no lock behind
        assert snap.latest().step == 2


@needs_tracking
def test_huge_pages_report_exactly_the_written_pages():
    """Transparent huge pages (numpy asks for them on large arrays) split on the first
    write: the written 4 KiB pages are reported, and only those."""
    size = 8 << 20
    region = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, dtype=np.uint8)
    skip = (-raw.ctypes.data) % (2 << 20)  # 2 MiB aligned, so whole huge pages fit
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE, skip, size)
    u = raw[skip: skip + size]
    u[:] = 1  # populated, in huge pages where the kernel allows
    rng = np.random.default_rng(5)
    tracker = WriteTracker()
    try:
        start = u.ctypes.data
        tracker.register(start, size)
        tracker.protect(start, size)
        for _ in range(3):
            pages = set(rng.choice(size // PAGE, size=20, replace=False).tolist())
            for page in pages:
                u[page * PAGE + int(rng.integers(0, PAGE))] += 1
            reported = {page for first, end in tracker.written(start, size)
                        for page in range(first // PAGE, end // PAGE)}
            assert reported == pages
    finally:
        tracker.close()
        del u, raw
        region.close()


def _drop_pages(array: np.ndarray, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the first `nbytes` (whole pages) of `array`'s memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = -(-array.ctypes.data // PAGE) * PAGE
    assert libc.madvise(ctypes.c_void_p(start), nbytes, mmap.MADV_DONTNEED) == 0


@needs_tracking
def test_io_landing_after_the_scan_is_caught_by_the_next_capture(store_path, monkeypatch):
    """Direct or asynchronous I/O marks its pages written when it starts; the device may
    fill them after the capture protected them again. Simulated: a write that lands right
    after the scan and that the kernel never reports (as a DMA into pinned pages)."""
    u = np.zeros(2 << 20, dtype=np.uint8)
    real_written = WriteTracker.written
    landing = []

    def written(self, start, length):
        while landing:  # the device writes between two captures ...
            landing.pop()()
            real_written(self, start, length)  # ... and the kernel never sees it
        return real_written(self, start, length)

    monkeypatch.setattr(WriteTracker, "written", written)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)
        capture_all(snap, {"u": u}, 1)
        capture_all(snap, {"u": u}, 2)  # no audit slice below reaches chunk 16
        u[1 << 20] = 1  # the read starts: its pages count as written ...
        capture_all(snap, {"u": u}, 3)
        # ... and its data lands after that capture's scan
        landing.append(lambda: u.__setitem__(slice((1 << 20) + 8, (1 << 20) + 16), 7))
        info = capture_all(snap, {"u": u}, 4)
        assert info.chunks_changed == 1
        assert_bit_exact(snap.restore().arrays["u"], u)


@needs_tracking
def test_a_restored_map_is_tracked_whatever_array_it_is_captured_as(store_path):
    """A private file map shows the file in pages it has not copied (and again after
    MADV_DONTNEED). A map this store's restore() handed out is tracked all the same, as
    whichever array it is captured as: before the writer updates bytes of a baseline file,
    every such map gets its own copy of those pages, so only its holder changes it."""
    rng = np.random.default_rng(1)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": rng.random(1 << 18)}, 0)  # 2 MiB, 32 chunks
        r = snap.restore().arrays["u"]
        capture_all(snap, {"u": r}, 1)
        capture_all(snap, {"u": r}, 2)  # the first tracked capture
        r[100] = 1.0
        assert capture_all(snap, {"u": r}, 3).chunks_compared <= 4  # tracked
        # A second map of u's baseline, captured as w, and both written between captures:
        # capturing u updates the bytes r2 maps, after preserving them in r2.
        r2 = snap.restore().arrays["u"]
        for step in (4, 5, 6):
            r[200 + step] = float(step)
            r2[9000 + step] = -float(step)
            expected = {"u": np.array(r), "w": np.array(r2)}
            info = capture_all(snap, {"u": r, "w": r2}, step)
            if step > 4:  # w was watched from its first capture on
                assert info.chunks_compared <= 12, info
            restored = snap.restore().arrays
            assert_bit_exact(restored["u"], expected["u"])
            assert_bit_exact(restored["w"], expected["w"])
            assert_bit_exact(r2, expected["w"])  # nothing but its holder changed it
        _drop_pages(r, 16 * PAGE)  # shows the file again: reported as written
        expected_u = np.array(r)
        capture_all(snap, {"u": r, "w": r2}, 7)
        assert_bit_exact(snap.restore().arrays["u"], expected_u)


FORK_CHILD = """
import os, sys
import numpy as np
from arraysnap.layout import plan_layout
from arraysnap.tracking import Tracking

u = np.zeros(2 << 20, dtype=np.uint8)
layout = plan_layout(u.shape, u.dtype, "C", 1 << 16)
tracker = Tracking("auto")
tracker.candidates("u", u, layout, fresh=True)
pid = os.fork()  # this interpreter runs no other thread: a fork is safe here
if pid == 0:
    # The kernel gave the child none of the parent's registrations: its first capture
    # compares everything and watches anew; then it drops everything, as a child's
    # store.close() would.
    ok = False
    try:
        ok = (tracker.candidates("u", u, layout, fresh=False) == (None, None)
              and tracker.candidates("u", u, layout, fresh=False)[0] is not None)
        tracker.close()
    finally:
        os._exit(0 if ok else 1)
assert os.waitpid(pid, 0)[1] == 0, "the child did not start afresh"
u[1 << 20] = 1
flags, _ = tracker.candidates("u", u, layout, fresh=False)
assert flags is not None and flags[16] == 1, "the parent lost its registration"
tracker.close()
print("ok")
"""


@needs_tracking
def test_a_forked_child_starts_afresh_and_leaves_the_parents_tracking_alone():
    # In a fresh interpreter: forking this one, which runs other tests' threads, is what
    # Python 3.12+ warns against (and may deadlock in the child).
    done = run_python(FORK_CHILD)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "DeprecationWarning" not in done.stderr


@needs_tracking
def test_tracked_arrays_can_still_be_resized(store_path):
    u = np.zeros(2 << 20, dtype=np.uint8)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)
        capture_all(snap, {"u": u}, 1)
        u.resize(3 << 20, refcheck=False)  # NumPy refuses this if anyone holds a weakref
        u[-1] = 3
        capture_all(snap, {"u": u}, 2)
        assert_bit_exact(snap.restore().arrays["u"], u)


@needs_tracking
def test_the_same_memory_with_other_strides_is_compared_whole(store_path):
    from numpy.lib.stride_tricks import as_strided

    buffer = np.zeros(2 << 20, dtype=np.uint8)
    rows = buffer.reshape(2048, 1024)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": rows}, 0)
        capture_all(snap, {"u": rows}, 1)
        # Same address, shape, dtype and size; other strides: other bytes in each chunk.
        other = as_strided(buffer, shape=(2048, 1024), strides=(1, 2048))
        assert capture_all(snap, {"u": other}, 2).chunks_compared == 32


@needs_tracking
def test_a_miss_switches_tracking_off_even_when_warnings_are_errors(store_path, monkeypatch):
    monkeypatch.setattr(tracking, "AUDIT_EVERY", 2)
    u = np.ones(2 << 20, dtype=np.uint8)
    real_written = WriteTracker.written
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        capture_all(snap, {"u": u}, 0)
        capture_all(snap, {"u": u}, 1)
        u[1 << 20] = 0
        monkeypatch.setattr(WriteTracker, "written", lambda self, start, length: (
            real_written(self, start, length), [])[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(arraysnap.ArraysnapWarning):
                snap.capture({"u": u}, step=2)
        snap.wait()
        assert capture_all(snap, {"u": u}, 3).chunks_compared == 32
        assert_bit_exact(snap.restore().arrays["u"], u)
