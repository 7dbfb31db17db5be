"""What tripped a newcomer: clear errors for unusual inputs, honest figures, quiet pipes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bit_exact

import arraysnap
from arraysnap import store as store_module


def arraysnap_command() -> list[str]:
    return [sys.executable, "-m", "arraysnap"]


# -- arrays that are more than their data ----------------------------------------------------
def test_a_masked_array_is_refused_with_the_fix_and_spends_no_seq(snap):
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    with pytest.raises(TypeError, match=r"masked array.*np\.ma\.getmaskarray"):
        snap.capture({"ma": masked}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # numpy's, on np.matrix
        matrix = np.matrix([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="matrix"):
        snap.capture({"m": matrix}, step=0)
    info = snap.capture({"data": masked.data, "mask": np.ma.getmaskarray(masked)}, step=0)
    assert info.seq == 1  # the refused captures spent no seq
    restored = snap.restore()
    rebuilt = np.ma.masked_array(restored.arrays["data"], restored.arrays["mask"])
    assert rebuilt.tolist() == [1.0, None, 3.0]


def test_memmaps_and_recarrays_are_captured_as_their_data(snap, tmp_path):
    mapped = np.memmap(tmp_path / "m.bin", dtype="<f4", mode="w+", shape=(64, 3))
    mapped[:] = np.arange(192, dtype="<f4").reshape(64, 3)
    records = np.rec.fromarrays([np.arange(5), np.linspace(0, 1, 5)], names="a,b")
    snap.capture({"mapped": mapped, "records": records}, step=1)
    restored = snap.restore()
    assert type(restored.arrays["mapped"]) is not np.memmap
    assert_bit_exact(restored.arrays["mapped"], np.asarray(mapped))
    assert_bit_exact(restored.arrays["records"], records.view(np.ndarray))


@pytest.mark.parametrize("value, error", [(object(), TypeError), ({1, 2}, TypeError),
                                          (float("nan"), ValueError),
                                          (float("inf"), ValueError)])
def test_state_errors_follow_json_dumps(snap, value, error):
    with pytest.raises(error, match="JSON-serialisable"):
        snap.capture({"u": np.zeros(3)}, step=0, state={"x": value})
    assert snap.capture({"u": np.zeros(3)}, step=0).seq == 1


# -- what a capture held the caller ----------------------------------------------------------
def test_blocked_is_reported_beside_the_pause(store_path):
    u = np.zeros(2 << 20)
    with arraysnap.open(store_path, chunk_bytes=1 << 16) as snap:
        infos = []
        for step in range(3):  # back to back: the second and third wait for the reader
            u[step] = step
            infos.append(snap.capture({"u": u}, step=step))
        snap.wait()
        listed = snap.list()
    for info, committed in zip(infos, listed, strict=True):
        assert info.blocked_seconds >= info.pause_seconds > 0
        assert committed.blocked_seconds >= committed.pause_seconds
        assert committed.blocked_seconds == pytest.approx(
            committed.stats["pause_seconds"] + committed.stats["queue_seconds"])
    assert "blocked=" in repr(infos[0])
    out = subprocess.run([*arraysnap_command(), "ls", str(store_path)], capture_output=True,
                         text=True, check=True).stdout
    header = out.splitlines()[0].split()
    assert "blocked" in header and "pause" in header


def test_restored_has_a_short_repr(snap):
    snap.capture({"u": np.zeros((1000, 100))}, step=4, state={"t": 1.0})
    text = repr(snap.restore())
    assert text.startswith("Restored(seq=1, step=4, arrays={'u': (1000, 100) float64}")
    assert len(text) < 200 and "pause_seconds" not in text


# -- paths that are not stores ---------------------------------------------------------------
def test_missing_parents_are_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create that folder first"):
        arraysnap.open(tmp_path / "no" / "such" / "run.snap")
    assert not (tmp_path / "no").exists()


def test_a_file_or_a_missing_path_is_named_so(tmp_path):
    (tmp_path / "afile.txt").write_text("hello")
    with pytest.raises(NotADirectoryError, match="is a file, not an arraysnap store"):
        arraysnap.open(tmp_path / "afile.txt", mode="r")
    with pytest.raises(FileExistsError, match="is a file"):
        arraysnap.open(tmp_path / "afile.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        arraysnap.open(tmp_path / "missing.snap", mode="r")
    for path, words in ((tmp_path / "afile.txt", "is a file"),
                        (tmp_path / "missing.snap", "does not exist")):
        done = subprocess.run([*arraysnap_command(), "ls", str(path)], capture_output=True,
                              text=True)
        assert done.returncode == 2 and words in done.stderr, done.stderr


def immutable(path: Path, on: bool) -> bool:
    """chattr +i (or -i): even root may not write an immutable file; False where unsupported."""
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_store_this_user_cannot_write_says_so_and_reads(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.arange(4.0)}, step=1)
    # The tests run as root, whom file modes do not stop: an immutable lock file does.
    if not immutable(store_path / "lock", True):
        pytest.skip("chattr +i is not supported here (it needs ext4, xfs or btrfs)")
    try:
        with pytest.raises(arraysnap.ReadOnlyStoreError,
                           match=r"not writable by this user .*mode='r'"):
            arraysnap.open(store_path)
        with arraysnap.open(store_path, mode="r") as reader:
            assert reader.restore().step == 1
        pruned = subprocess.run([*arraysnap_command(), "prune", str(store_path), "--keep-last",
                                 "1"], capture_output=True, text=True)
        assert pruned.returncode == 2 and "not writable by this user" in pruned.stderr
        assert "Errno" not in pruned.stderr
    finally:
        immutable(store_path / "lock", False)


# -- the command line ------------------------------------------------------------------------
def test_a_closed_pipe_ends_the_command_quietly(store_path):
    with arraysnap.open(store_path) as snap:
        for step in range(200):  # --json of 200 captures: more than a pipe holds
            snap.capture({"u": np.full(4, step)}, step=step)
    command = f"{sys.executable} -m arraysnap stats --json {store_path} | head -c 10"
    done = subprocess.run(["bash", "-c", f"{command}; echo ${{PIPESTATUS[0]}} >&2"],
                          capture_output=True, text=True)
    assert len(done.stdout) == 10
    assert "Broken pipe" not in done.stderr and "Error" not in done.stderr, done.stderr
    assert done.stderr.strip() == "141"  # ended by SIGPIPE, as other Unix tools are


def test_a_negative_snapshot_without_dashes_gets_the_hint(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.zeros(2)}, step=0)
        snap.capture({"u": np.ones(2)}, step=1)
    done = subprocess.run([*arraysnap_command(), "show", str(store_path), "-2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "-- -2" in done.stderr and "~1" in done.stderr
    shown = subprocess.run([*arraysnap_command(), "show", str(store_path), "--json", "--", "-2"],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["seq"] == 1


def test_export_refuses_a_name_it_would_not_honour(store_path, tmp_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.zeros(2)}, step=0)
    done = subprocess.run([*arraysnap_command(), "export", str(store_path), "latest",
                           str(tmp_path / "x.h5")], capture_output=True, text=True)
    assert done.returncode == 2 and ".h5" in done.stderr and not (tmp_path / "x.h5").exists()
    subprocess.run([*arraysnap_command(), "export", str(store_path), "latest",
                    str(tmp_path / "x.h5"), "--format", "zarr"], check=True, capture_output=True)
    assert (tmp_path / "x.h5" / "zarr.json").is_file()


def test_prune_dry_run_removes_nothing_and_says_what_would_go(store_path):
    with arraysnap.open(store_path) as snap:
        for step in range(4):
            snap.capture({"u": np.full(100, step)}, step=step)
    before = sorted(p.name for p in (store_path / "snapshots").iterdir())
    done = subprocess.run([*arraysnap_command(), "prune", str(store_path), "--keep-last", "1",
                           "--dry-run"], capture_output=True, text=True, check=True)
    assert "would remove snapshots: 1, 2, 3" in done.stdout
    assert sorted(p.name for p in (store_path / "snapshots").iterdir()) == before
    with arraysnap.open(store_path) as snap:
        planned = snap.prune(keep_last=1, dry_run=True)
        assert planned == snap.prune(keep_last=1)


def test_the_zarr_json_name_error_gives_the_right_reason(snap):
    with pytest.raises(ValueError, match="zarr keeps a group's metadata"):
        snap.capture({"zarr.json": np.zeros(2)})


# -- the demo and growth ---------------------------------------------------------------------
def test_the_demo_explains_itself_and_refuses_what_it_cannot_do(tmp_path):
    where = tmp_path / "demo"
    first = subprocess.run([*arraysnap_command(), "demo", str(where)], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "repaired" not in first.stderr and "WARNING" not in first.stderr, first.stderr
    again = subprocess.run([*arraysnap_command(), "demo", str(where)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "exists from an earlier run" in again.stderr
    assert "killed the run" not in again.stdout
    lost = subprocess.run([*arraysnap_command(), "demo", str(tmp_path / "no" / "dir")],
                          capture_output=True, text=True, timeout=60)
    assert lost.returncode == 2 and "does not exist" in lost.stderr
    assert not (tmp_path / "no").exists()


def test_an_unbounded_store_warns_once_when_it_grows(store_path, monkeypatch):
    monkeypatch.setattr(store_module, "GROWTH_FLOOR", 1 << 20)
    u = np.random.default_rng(0).random(1 << 15)  # 256 KiB, all of it new every capture
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with arraysnap.open(store_path, codec="none") as snap:
            for step in range(30):
                u += 1.0
                snap.capture({"u": u}, step=step).result()
    growth = [w for w in caught if "keeps every snapshot" in str(w.message)]
    assert len(growth) == 1 and "keep_last" in str(growth[0].message)
    assert issubclass(growth[0].category, arraysnap.ArraysnapWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with arraysnap.open(store_path, keep_last=2) as snap:
            for step in range(30, 60):
                u += 1.0
                snap.capture({"u": u}, step=step).result()
    assert not [w for w in caught if "keeps every snapshot" in str(w.message)]


def test_a_capture_that_fails_with_a_bug_spends_no_seq(snap, monkeypatch):
    from arraysnap._store import capture as capture_module

    snap.capture({"u": np.zeros(3)}, step=0)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the pause")

    # Both comparisons: one by one, and in bulk (np.ones may land where np.zeros was).
    with monkeypatch.context() as patched:
        patched.setattr(capture_module, "scan_and_copy", broken)
        patched.setattr(capture_module, "compare_many", broken)
        with pytest.raises(RuntimeError, match="a bug"):
            snap.capture({"u": np.ones(3)}, step=1)
    assert snap.capture({"u": np.ones(3)}, step=1).result().seq == 2
    assert_bit_exact(snap.restore().arrays["u"], np.ones(3))
