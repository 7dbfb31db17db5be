"""The baselines: ownership of their maps, detaching, and recovery of dirty baselines."""

from __future__ import annotations

import base64
import json
import shutil
import signal

import numpy as np
import pytest
from conftest import REPO, run_python

import arraysnap
from arraysnap.baselines import Baselines
from arraysnap.extents import (
    MARKER,
    MARKER_VERSION,
    TABLE,
    TABLE_DIGEST,
    read_extents,
    read_mirror,
    table_digest,
)
from arraysnap.layout import plan_layout
from arraysnap.leases import LEASES, LockFile, lock_byte
from arraysnap.testing import baseline_extent, baseline_leased


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


def test_held_maps_are_preserved_in_place_and_leased_files_are_moved_from(tmp_path):
    """A map handed out in this process keeps its bytes by preservation (the array stays
    where it is); a file another description holds a lease on is never written: the array
    moves."""
    baselines = Baselines(tmp_path)
    layout = plan_layout((8192,), np.dtype("u1"), "C", 4096)
    baselines.baseline("u", layout).buffer[:] = 1
    baselines.mark_committed(1)
    place = baselines.location("u")
    held = baselines.hand_out(["u"]).array("u")
    target = baselines.baseline("u", layout)
    assert target.held and not target.fresh and baselines.location("u") == place
    baselines.preserve("u", np.array([1]))
    target.buffer[4096:] = 2  # the chunk preserved: the holder keeps its ones
    assert held.tolist() == [1] * 8192
    del held
    baselines.mark_committed(2)
    assert baselines.baseline("u", layout).held is False  # no map alive
    baselines.mark_committed(3)
    file, _ = place
    reader = LockFile(file.parent / LEASES, writable=False)
    assert reader.try_lock(lock_byte(file.name), exclusive=False)
    moved = baselines.baseline("u", layout)
    assert baselines.location("u") != place and not moved.held
    assert moved.buffer[:4096].tolist() == [1] * 4096 and moved.buffer[4096:].tolist() == [2] * 4096
    reader.close()
    baselines.close()


def test_dirty_mirror_is_verified_and_repaired_on_open(store_path):
    data = np.random.default_rng(0).standard_normal(50_000)
    with arraysnap.open(store_path, chunk_bytes=8192) as snap:
        snap.capture({"u": data}, step=1)
    marker_path = store_path / "mirror" / "state.json"
    marker = json.loads(marker_path.read_text())
    assert marker["clean"] is True and marker["seq"] == 1
    # A writer killed mid-update: garbage in the baseline, marker dirty.
    baseline, offset = baseline_extent(store_path, "u")
    raw = bytearray(baseline.read_bytes())
    raw[offset + 20_000 : offset + 20_100] = b"\xff" * 100
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
    baseline, offset = baseline_extent(store_path, "u")
    raw = bytearray(baseline.read_bytes())
    raw[offset + 100] ^= 0x10  # a flipped bit that the clean marker does not know about
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


def test_restored_map_used_as_live_state_needs_no_copy(store_path):
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        snap.capture({"u": np.zeros(10_000)}, step=1)
    with arraysnap.open(store_path, chunk_bytes=4096) as snap:
        live = snap.restore().arrays["u"]
        place = snap._baselines.location("u")
        live[5000] = 3.0
        assert snap.capture({"u": live}, step=2).result().chunks_changed == 1
        assert snap._baselines.location("u") == place  # updated in place, no copy
        other = snap.restore().arrays["u"]  # a second holder: preserved, still no copy
        live[0] = 1.0
        snap.capture({"u": live}, step=3)
        assert snap._baselines.location("u") == place
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


def test_reader_maps_the_baseline_between_captures_and_writer_then_detaches(store_path):
    data = np.arange(50_000.0)
    with arraysnap.open(store_path, chunk_bytes=8192) as writer:
        writer.capture({"u": data}, step=1).result()
        with arraysnap.open(store_path, mode="r") as reader:
            held = reader.restore(verify=False).arrays["u"]
        shared = baseline_extent(store_path, "u")
        assert baseline_leased(shared[0])  # served from the baseline, under a reader lease
        data[:10] = -5
        writer.capture({"u": data}, step=2).result()
        assert baseline_extent(store_path, "u") != shared  # the writer moved the array
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
        assert baseline_leased(baseline_extent(store_path, "u")[0]) is False  # map gone


def test_unsynced_marker_from_another_boot_is_not_trusted(store_path):
    with arraysnap.open(store_path, chunk_bytes=8192) as snap:
        snap.capture({"u": np.arange(40_000.0)}, step=1).result()
    marker_path = store_path / "mirror" / "state.json"
    marker = json.loads(marker_path.read_text())
    marker.update(synced=False, boot_id="an-earlier-boot")
    marker_path.write_text(json.dumps(marker))
    # A power loss may have kept the marker but not all baseline pages.
    target, offset = baseline_extent(store_path, "u")
    raw = bytearray(target.read_bytes())
    raw[offset + 8 : offset + 16] = b"\x00" * 8
    target.write_bytes(bytes(raw))
    assert Baselines(store_path).trusted_seq() is None
    with arraysnap.open(store_path) as snap:
        assert np.array_equal(snap.restore(verify=False).arrays["u"], np.arange(40_000.0))


def test_baselines_of_one_file_per_array_are_migrated_by_a_writer(tmp_path):
    """A store from before shared baseline files (the v1 fixture): a reader does not map
    those files (they are locked another way), a writer copies each array into a shared
    file at open and removes the old files, trusting their bytes when the marker says so."""
    store = tmp_path / "old.snap"
    shutil.copytree(REPO / "tests" / "fixtures" / "v1-store", store)
    marker_path = store / "mirror" / "state.json"
    marker = json.loads(marker_path.read_text())
    old_files = sorted(marker["files"].values())
    marker["synced"] = True  # trusted: adopted as they are
    marker_path.write_text(json.dumps(marker))
    field = np.frombuffer((store / "mirror" / marker["files"]["field"]).read_bytes())
    with arraysnap.open(store, mode="r") as reader:
        restored = reader.restore(verify=False).arrays["field"]
        assert np.array_equal(restored.reshape(-1), field)
        assert "/mirror/" not in _mapped_file_of(restored)
    with arraysnap.open(store) as snap:
        assert not any((store / "mirror" / name).exists() for name in old_files)
        file, offset = baseline_extent(store, "field")
        assert file.name.startswith("s-")
        assert np.frombuffer(file.read_bytes()[offset : offset + field.nbytes]).tolist() == (
            field.tolist())
        restored = snap.restore(verify=False).arrays["field"]
        assert "/mirror/s-" in _mapped_file_of(restored)  # served from the migrated baseline
        assert np.array_equal(restored.reshape(-1), field)
        assert snap.capture({"field": np.array(restored)}, step=30).result().chunks_changed == 0


def _mapped_file_of(array: np.ndarray) -> str:
    """The path /proc/self/maps gives for the memory of `array` ('' if anonymous)."""
    address = array.ctypes.data
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(part, 16) for part in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


def test_recovery_of_thousands_of_arrays_logs_one_line_not_one_per_array(store_path, caplog):
    """A re-open that cannot rebuild the baselines of many arrays (their chunk objects are
    gone) says so once, naming a few, and the next capture writes them whole."""
    arrays = {f"a{i:04d}": np.full(4, float(i)) for i in range(300)}
    with arraysnap.open(store_path) as snap:
        snap.capture(arrays, step=0)
    shutil.rmtree(store_path / "mirror")
    manifest = json.loads((store_path / "snapshots" / f"{1:012d}.json").read_text())
    nodes = {base64.b64decode(pack).hex() for pack in manifest["tables"]["packs"]}
    for folder in ("chunks", "packs"):
        for chunk in (store_path / folder).rglob("*"):
            # The chunks, not the pack of table nodes (format 4) that says what they were.
            if chunk.is_file() and chunk.parent.name + chunk.name not in nodes:
                chunk.unlink()
    with caplog.at_level("INFO", logger="arraysnap"):
        with arraysnap.open(store_path) as snap:
            lines = [r for r in caplog.records if "baselines of" in r.getMessage()]
            assert len(lines) == 1, [r.getMessage()[:80] for r in caplog.records]
            assert "300 arrays" in lines[0].getMessage() and "295 more" in lines[0].getMessage()
            assert len(caplog.records) < 10
            snap.capture(arrays, step=1)
            snap.wait()
            assert np.array_equal(snap.restore(step=1).arrays["a0123"], np.full(4, 123.0))


def test_a_capture_whose_baselines_would_not_fit_is_refused_before_anything_is_written(
        store_path, monkeypatch):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.zeros(1000)}, step=0).result()
        files = sorted(p.name for p in (store_path / "mirror").iterdir())
        monkeypatch.setattr(Baselines, "free_bytes", lambda self: 1 << 20)
        with pytest.raises(arraysnap.StoreWriteError, match=r"needs 0\.01 GiB of new baseline "
                           r"space .* has 0\.00 GiB free; free space there"):
            snap.capture({"u": np.zeros(1000), "big": np.zeros(10 << 17)}, step=1)
        assert sorted(p.name for p in (store_path / "mirror").iterdir()) == files
        assert [s.step for s in snap.list()] == [0]
        # Arrays whose baselines exist need no new space: captured as usual.
        assert snap.capture({"u": np.ones(1000)}, step=2).result().step == 2


def _table_round_trip(tmp_path, table: dict) -> dict | None:
    (tmp_path / TABLE).write_text(json.dumps(table))
    return read_extents(tmp_path, {"version": MARKER_VERSION, "table": table["generation"]})


def test_the_extent_table_is_read_back_by_column_and_in_an_earlier_writers_form(tmp_path):
    """A writer's table (by column) reads back as the extents it had; a table of an earlier
    writer (a dict of lists) still reads, so that a store it left keeps its baselines."""
    baselines = Baselines(tmp_path)
    for i, size in enumerate((16, 0, 5000, 16)):
        baselines.baseline(f"a{i}", plan_layout((size,), np.dtype("u1"), "C", 4096))
    baselines.mark_committed(1)
    marker = baselines.read_marker()
    table = json.loads((tmp_path / "mirror" / TABLE).read_text())
    assert set(table) == {"generation", "files", "names", "file", "offsets", "layouts",
                          "layout"}
    extents = read_extents(tmp_path / "mirror", marker)
    assert list(extents) == ["a0", "a1", "a2", "a3"] and extents["a1"] == (None, 0)
    mirror = read_mirror(tmp_path / "mirror", marker)
    assert mirror.names == ["a0", "a1", "a2", "a3"] and mirror.extents == extents
    assert mirror.layouts == [baselines.layout_of(name) for name in mirror.names]
    assert len(table["layouts"]) == 3  # a0 and a3 share theirs
    for name in ("a0", "a2", "a3"):
        file, offset = baselines.location(name)
        assert extents[name] == (file.name, offset)
    assert extents["a0"][0] == extents["a3"][0] and extents["a0"][1] != extents["a3"][1]
    earlier = {"generation": 4, "extents": {name: list(place) for name, place in
                                            extents.items()}}
    assert _table_round_trip(tmp_path, earlier) == extents


@pytest.mark.parametrize("damage", [
    {"names": "a"}, {"file": [0]}, {"offsets": [0, -1]}, {"file": [1, 0]}, {"file": [-2, 0]},
    {"file": [0, True]}, {"offsets": [0, 0.5]}, {"names": ["a", 3]},
    {"files": ["../x.bin"]}, {"files": [7]},
])
def test_a_malformed_extent_table_is_not_read(tmp_path, damage):
    good = {"generation": 1, "files": ["s-1.bin"], "names": ["a", "b"], "file": [0, -1],
            "offsets": [0, 0]}
    assert _table_round_trip(tmp_path, good) == {"a": ("s-1.bin", 0), "b": (None, 0)}
    assert _table_round_trip(tmp_path, {**good, **damage}) is None


_LAYOUT = {"shape": [4], "dtype": "<f8", "order": "C", "split_axis": 0, "rows_per_chunk": 4}


@pytest.mark.parametrize("damage", [
    {"layouts": "x"}, {"layout": [0]}, {"layout": [0, 1]}, {"layout": [0, -1]},
    {"layout": [0, True]}, {"layouts": [{**_LAYOUT, "dtype": "|O"}]},
    {"layouts": [{**_LAYOUT, "shape": [-1]}]}, {"layouts": [{**_LAYOUT, "order": "K"}]},
    {"layouts": [{"shape": [4]}]}, {"names": ["a", 3]},
])
def test_a_mirror_with_malformed_layouts_is_not_read(tmp_path, damage):
    good = {"generation": 1, "files": ["s-1.bin"], "names": ["a", "b"], "file": [0, -1],
            "offsets": [0, 0], "layouts": [_LAYOUT], "layout": [0, 0]}
    def sealed(table: dict) -> dict:  # the table written, and the marker naming it
        data = json.dumps(table).encode()
        (tmp_path / TABLE).write_bytes(data)
        return {"version": MARKER_VERSION, "table": 1, TABLE_DIGEST: table_digest(data)}

    marker = sealed(good)
    mirror = read_mirror(tmp_path, marker)
    assert mirror.names == ["a", "b"] and mirror.layouts[1].shape == (4,)
    assert read_mirror(tmp_path, sealed({**good, **damage})) is None
    earlier = {key: value for key, value in good.items() if key not in ("layouts", "layout")}
    marker = sealed(earlier)
    assert read_mirror(tmp_path, marker) is None  # an earlier writer's: no layouts
    assert read_extents(tmp_path, marker) is not None  # yet its extents still read


def test_a_mirror_is_read_only_by_the_digest_its_marker_names(tmp_path):
    good = {"generation": 1, "files": ["s-1.bin"], "names": ["a"], "file": [0],
            "offsets": [0], "layouts": [_LAYOUT], "layout": [0]}
    data = json.dumps(good).encode()
    (tmp_path / TABLE).write_bytes(data)
    marker = {"version": MARKER_VERSION, "table": 1, TABLE_DIGEST: table_digest(data)}
    assert read_mirror(tmp_path, marker) is not None
    (tmp_path / TABLE).write_bytes(data.replace(b'"shape": [4]', b'"shape": [2]'))
    assert read_mirror(tmp_path, marker) is None  # damaged: no wrong shape from it
    assert read_mirror(tmp_path, {**marker, TABLE_DIGEST: None}) is None  # an earlier marker


def test_the_marker_names_its_tables_digest_across_commits_and_opens(tmp_path):
    store = tmp_path / "s.snap"
    with arraysnap.open(store) as snap:
        snap.capture({"u": np.zeros(10)}, step=1).result()
        snap.capture({"u": np.ones(10)}, step=2).result()  # the same table: not rewritten
        first = json.loads((store / "mirror" / MARKER).read_text())
    with arraysnap.open(store) as snap:  # adopted, still not rewritten
        snap.capture({"u": np.full(10, 2.0)}, step=3).result()
    marker = json.loads((store / "mirror" / MARKER).read_text())
    assert marker["table"] == first["table"] and marker["seq"] == 3
    assert marker[TABLE_DIGEST] == table_digest((store / "mirror" / TABLE).read_bytes())
