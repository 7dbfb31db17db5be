"""Invariant 4, hands off: capture never modifies the caller's arrays; a restored array never
changes under its holder because of a later capture, restore or prune, in this process or
another one (a reader's map of a baseline the writer updates in place is the hard case).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from conftest import (
    CHUNK,
    assert_arrays,
    assert_bit_exact,
    assert_workload_step,
    capture_step,
    start_child,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap import baselines as baselines_module


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


@pytest.mark.parametrize("holder", ["writer", "assembled", "reader"])
def test_arrays_first_looked_up_after_later_captures_hold_the_restored_snapshot(
        store_path: Path, holder: str):
    """``Restored.arrays`` makes each array when first looked up: one looked up only after
    the writer captured (and pruned) again still holds the snapshot restored: a map of the
    writer's baselines, arrays assembled from chunk objects, or a reader's map of the
    writer's files under leases. Many small arrays share baseline files, so the held maps
    are of shared files (each holder alone: a reader's leases would keep the writer off
    the files a writer's own restore maps)."""
    def arrays(step: int) -> dict[str, np.ndarray]:
        return {f"a{i:03d}": np.full(16 + i % 5, step * 1000.0 + i) for i in range(300)}

    with arraysnap.open(store_path, chunk_bytes=CHUNK) as snap:
        snap.capture(arrays(0), step=0)
        snap.capture(arrays(1), step=1)
        snap.wait()
        reader = arraysnap.open(store_path, mode="r") if holder == "reader" else None
        source = snap if reader is None else reader
        restored = source.restore(seq=1 if holder == "assembled" else None)
        for step in range(2, 6):
            snap.capture(arrays(step), step=step)
            snap.wait()
        snap.prune(keep_last=1)
        snap.gc()
        expected = 0 if holder == "assembled" else 1
        assert list(restored.arrays) == sorted(arrays(expected))
        assert_arrays(restored.arrays, arrays(expected))
        if reader is not None:
            reader.close()


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
    reader = start_child("reader-holds", store_path, stdin=subprocess.PIPE)
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



OPERATIONS = st.lists(st.tuples(st.sampled_from(["change", "restore", "reader", "resume",
                                                 "drop", "add", "reshape", "holder-writes"]),
                                st.integers(0, 47)), min_size=1, max_size=20)


@pytest.mark.parametrize("preserving", [True, False], ids=["preserve", "kernel-cannot"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPERATIONS)
def test_arrays_sharing_baseline_files_never_change_under_their_holders(tmp_path_factory, ops,
                                                                       preserving):
    """Small arrays share baseline files: any mix of captures that change, drop, add and
    reshape arrays, restores held in the writer and in a reader, restored maps used as the
    live state, and holders writing into what they hold, leaves every held array as its
    holder last saw it, and every snapshot as captured. Also on a kernel that cannot
    preserve a map's pages (before Linux 5.14): the writer then moves what it changes."""
    with patch.object(baselines_module, "preserving_supported", lambda: preserving):
        _shared_files_run(tmp_path_factory.mktemp("shared") / "s.snap", ops)


def _shared_files_run(path: Path, ops: list[tuple[str, int]]) -> None:
    arrays = {f"a{i:02d}": np.full(16 + i, float(i)) for i in range(48)}
    held: list[tuple[np.ndarray, np.ndarray]] = []
    captured: list[dict[str, np.ndarray]] = []
    with arraysnap.open(path, chunk_bytes=256) as snap, \
            arraysnap.open(path, mode="r") as reader:
        snap.capture(arrays, step=0)
        snap.wait()  # a reader finds a snapshot from the start
        captured.append({name: a.copy() for name, a in arrays.items()})
        for step, (operation, k) in enumerate(ops, 1):
            name = f"a{k:02d}"
            if operation == "change" and name in arrays:
                arrays[name] = np.array(arrays[name])
                arrays[name][k % arrays[name].size] += 1.0
            elif operation in ("restore", "reader"):
                source = snap if operation == "restore" else reader
                held += [(a, a.copy()) for a in source.restore(verify=False).arrays.values()]
            elif operation == "resume":  # go on from restored maps, as a restarted job does
                arrays = dict(snap.restore(verify=False).arrays)
                if name in arrays:
                    arrays[name][0] = -float(step)  # written in place, copy-on-write
            elif operation == "drop":
                arrays.pop(name, None)
            elif operation == "add":
                arrays[name] = np.full(3 + k, -float(step))
            elif operation == "reshape" and name in arrays:
                arrays[name] = np.zeros(arrays[name].size + 5)
            elif operation == "holder-writes" and held:
                array, expected = held[k % len(held)]
                array[0] += 0.5  # a holder may write into what restore() gave it
                expected[0] += 0.5
            snap.capture(arrays, step=step)
            captured.append({name: a.copy() for name, a in arrays.items()})
            for array, expected in held:
                assert_bit_exact(array, expected)
        snap.wait()
        for seq, expected in enumerate(captured, 1):
            restored = snap.restore(seq=seq).arrays
            assert sorted(restored) == sorted(expected)
            for name, array in expected.items():
                assert_bit_exact(restored[name], array)
