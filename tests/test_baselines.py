"""The baselines: ownership of their maps, detaching, and recovery of dirty baselines."""

from __future__ import annotations

import fcntl
import json
import os
import signal

import numpy as np
import pytest
from conftest import run_python

import arraysnap
from arraysnap.baselines import Baselines
from arraysnap.layout import plan_layout


def test_held_restore_never_changes_when_the_writer_updates_the_baseline(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture({"u": np.zeros(10_000)}, step=1)
        held = snap.restore().arrays["u"]
        live = np.zeros(10_000)
        for step in range(2, 5):
            live[:] = step
            snap.capture({"u": live}, step=step)
            assert not held.any()  # still the step-1 zeros
        # The restored array used as the live state, modified in place: also safe.
        resumed = snap.restore().arrays["u"]
        resumed[:100] = -1.0
        snap.capture({"u": resumed}, step=5)
        assert snap.restore(step=5).arrays["u"][:101].tolist() == [-1.0] * 100 + [4.0]
        assert not held.any()


def test_detach_happens_only_while_maps_are_alive(tmp_path):
    baselines = Baselines(tmp_path)
    layout = plan_layout((1024,), np.dtype("u1"), "C", 256)
    baselines.baseline("u", layout)
    first = baselines.entries["u"].path
    held = baselines.hand_out("u")
    baselines.baseline("u", layout)
    second = baselines.entries["u"].path
    assert second != first and not first.exists()  # detached; the holder keeps the old inode
    del held
    baselines.baseline("u", layout)
    assert baselines.entries["u"].path == second  # no map alive: updated in place
    baselines.close()


def test_dirty_mirror_is_verified_and_repaired_on_open(store_path):
    data = np.random.default_rng(0).standard_normal(50_000)
    with arraysnap.open(store_path, chunk_bytes=8192) as snap:
        snap.capture({"u": data}, step=1)
    marker_path = store_path / "mirror" / "state.json"
    marker = json.loads(marker_path.read_text())
    assert marker["clean"] is True and marker["seq"] == 1
    # A writer killed mid-update: garbage in the baseline, marker dirty.
    baseline = store_path / "mirror" / marker["files"]["u"]
    raw = bytearray(baseline.read_bytes())
    raw[20_000:20_100] = b"\xff" * 100
    baseline.write_bytes(bytes(raw))
    marker_path.write_text(json.dumps({**marker, "clean": False, "seq": None}))
    with arraysnap.open(store_path) as snap:
        assert np.array_equal(snap.restore(verify=False).arrays["u"], data)
        # And the repaired baseline is what later deltas compare against.
        data[0] = 7
        assert snap.capture({"u": data}, step=2).result().chunks_changed == 1


def test_damaged_clean_baseline_is_caught_by_verify_on_restore(store_path):
    data = np.arange(20_000.0)
    with arraysnap.open(store_path, chunk_bytes=8192) as snap:
        snap.capture({"u": data}, step=1)
    marker = json.loads((store_path / "mirror" / "state.json").read_text())
    baseline = store_path / "mirror" / marker["files"]["u"]
    raw = bytearray(baseline.read_bytes())
    raw[100] ^= 0x10  # a flipped bit that the clean marker does not know about
    baseline.write_bytes(bytes(raw))
    with arraysnap.open(store_path, mode="r") as reader:
        assert np.array_equal(reader.restore().arrays["u"], data)
    with arraysnap.open(store_path) as snap:
        assert np.array_equal(snap.restore().arrays["u"], data)
        assert snap.capture({"u": data}, step=2).result().chunks_changed == 0


def test_missing_baseline_file_is_rebuilt(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture({"u": np.arange(5000.0)}, step=1)
    for file in (store_path / "mirror").glob("*.bin"):
        file.unlink()
    with arraysnap.open(store_path) as snap:
        assert np.array_equal(snap.restore().arrays["u"], np.arange(5000.0))


def test_restored_map_used_as_live_state_needs_no_detach(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture({"u": np.zeros(10_000)}, step=1)
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        live = snap.restore().arrays["u"]
        path = snap._baselines.entries["u"].path
        live[5000] = 3.0
        assert snap.capture({"u": live}, step=2).result().chunks_changed == 1
        assert snap._baselines.entries["u"].path == path  # updated in place, no copy
        other = snap.restore().arrays["u"]  # a second holder: now a copy is required
        live[0] = 1.0
        snap.capture({"u": live}, step=3)
        assert snap._baselines.entries["u"].path != path
        assert other[0] == 0.0 and other[5000] == 3.0


def test_failure_inside_the_pause_loses_no_change(store_path, monkeypatch):
    """Invariant 3 when capture() itself fails after updating some baselines."""
    a, b = np.zeros(8192), np.zeros(8192)
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture({"a": a, "b": b}, step=1)
        a[0] = 1.0  # changes only in the capture that fails
        real = Baselines.baseline

        def fail_for_b(self, name, layout, live=None):
            if name == "b":
                raise OSError(28, "No space left on device")
            return real(self, name, layout, live)

        monkeypatch.setattr(Baselines, "baseline", fail_for_b)
        with pytest.raises(OSError):
            snap.capture({"a": a, "b": b}, step=2)
        monkeypatch.setattr(Baselines, "baseline", real)
        snap.capture({"a": a, "b": b}, step=3)  # a has not changed since the failed capture
        restored = snap.restore()
        assert restored.step == 3 and restored.arrays["a"][0] == 1.0


def holds_shared_lock(path) -> bool:
    """True if some open file description holds a lock on `path` (probe with a try-lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def baseline_file(store_path, name="u"):
    marker = json.loads((store_path / "mirror" / "state.json").read_text())
    return store_path / "mirror" / marker["files"][name]


def test_reader_maps_the_baseline_between_captures_and_writer_then_detaches(store_path):
    data = np.arange(50_000.0)
    with arraysnap.open(store_path, chunk_bytes=8192) as writer:
        writer.capture({"u": data}, step=1).result()
        with arraysnap.open(store_path, mode="r") as reader:
            held = reader.restore(verify=False).arrays["u"]
        shared = baseline_file(store_path)
        assert holds_shared_lock(shared)  # served from the baseline, under a reader lease
        data[:10] = -5
        writer.capture({"u": data}, step=2).result()
        assert baseline_file(store_path) != shared  # the writer moved to a copy
        assert held[0] == 0.0 and np.array_equal(held, np.arange(50_000.0))


def test_kill_between_captures_needs_no_rehash(store_path):
    code = f"""
        import os, signal, numpy as np, arraysnap
        snap = arraysnap.open({str(store_path)!r}, chunk_bytes=8192)
        snap.capture({{"u": np.arange(40_000.0)}}, step=7).result()
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_python(code)
    assert result.returncode == -signal.SIGKILL, result.stderr
    baselines = Baselines(store_path)
    assert baselines.trusted_seq() == 1  # clean for this boot, though never fsynced
    with arraysnap.open(store_path, mode="r") as reader:
        assert np.array_equal(reader.restore(verify=False).arrays["u"], np.arange(40_000.0))
        assert holds_shared_lock(baseline_file(store_path)) is False  # the map is gone again


def test_unsynced_marker_from_another_boot_is_not_trusted(store_path):
    with arraysnap.open(store_path, chunk_bytes=8192) as snap:
        snap.capture({"u": np.arange(40_000.0)}, step=1).result()
    marker_path = store_path / "mirror" / "state.json"
    marker = json.loads(marker_path.read_text())
    marker.update(synced=False, boot_id="an-earlier-boot")
    marker_path.write_text(json.dumps(marker))
    # A power loss may have kept the marker but not all baseline pages.
    target = baseline_file(store_path)
    raw = bytearray(target.read_bytes())
    raw[8:16] = b"\x00" * 8
    target.write_bytes(bytes(raw))
    assert Baselines(store_path).trusted_seq() is None
    with arraysnap.open(store_path) as snap:
        assert np.array_equal(snap.restore(verify=False).arrays["u"], np.arange(40_000.0))
