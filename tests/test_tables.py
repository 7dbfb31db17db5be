"""Format 2's table objects: round trips, costs that follow the change, damage and hostility."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, assert_bit_exact
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap.cli import cli
from arraysnap.manifest import ArrayEntry
from arraysnap.tables import (
    BLOCK_CHUNKS,
    FANOUT,
    INLINE_ARRAYS,
    INLINE_CHUNKS,
    TableReader,
    TableWriter,
)

SIGNED_KEYS = ("format", "version", "seq", "step", "time", "parent", "codec", "arrays",
               "state", "rng", "stats", "provenance")


def entry(name: str, n_chunks: int, salt: int) -> ArrayEntry:
    digests = b"".join(blake3.blake3(b"%d:%s:%d" % (salt, name.encode(), i)).digest()
                       for i in range(n_chunks))
    return ArrayEntry(name, (n_chunks,), np.dtype("u1"), "C", 0, 1, digests)


class Objects(dict):
    """A table-object store that counts what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def put(self, digest: bytes, data: bytes) -> None:
        assert blake3.blake3(data).digest() == digest
        if digest not in self:
            self.written.append(digest)
        self[digest] = data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abcxyz_019", min_size=1, max_size=6),
                          st.integers(0, 3 * INLINE_CHUNKS)), min_size=0, max_size=300,
                unique_by=lambda item: item[0]),
       st.data())
def test_tables_read_back_what_was_built_and_a_change_writes_little(items, data):
    objects = Objects()
    writer = TableWriter()
    entries = {name: entry(name, n, 0) for name, n in items}
    built = writer.build(entries, objects.put)
    writer.committed(built)
    reader = TableReader(objects.__getitem__)
    if built.tables is None:  # few arrays: listed in the manifest, as format 1 does
        assert len(entries) <= INLINE_ARRAYS and list(built.arrays) == list(entries)
    else:
        read, used = reader.read(built.tables)
        assert read == entries and list(read) == sorted(entries)  # name order
        assert used == built.digests
    if not entries:
        return
    # Change one array: what is written is its blocks, one leaf and the nodes above.
    name = data.draw(st.sampled_from(sorted(entries)))
    changed = dict(entries)
    changed[name] = entry(name, entries[name].n_chunks, 1)
    objects.written.clear()
    rebuilt = writer.build(changed, objects.put)
    blocks = -(-changed[name].n_chunks // BLOCK_CHUNKS) if changed[name].n_chunks > \
        INLINE_CHUNKS else 0
    depth = 0 if rebuilt.tables is None else rebuilt.tables["depth"]
    assert len(objects.written) <= blocks + depth
    if rebuilt.tables is not None:
        assert reader.read(rebuilt.tables)[0] == changed


def test_adding_an_array_rewrites_the_nodes_around_it_not_all_after_it():
    objects = Objects()
    writer = TableWriter()
    entries = {f"a{i:05d}": entry(f"a{i:05d}", 1, 0) for i in range(20 * FANOUT)}
    writer.committed(writer.build(entries, objects.put))
    objects.written.clear()
    entries["a00000x"] = entry("a00000x", 1, 0)  # sorts near the front
    built = writer.build(entries, objects.put)
    assert built.tables is not None
    assert len(objects.written) <= built.tables["depth"] + 1  # a leaf (maybe split), nodes


def test_a_capture_of_many_arrays_writes_what_changed_not_the_table(tmp_path):
    arrays = {f"x{i:04d}": np.full(4, float(i)) for i in range(2000)}
    with arraysnap.open(tmp_path / "s.snap") as snap:
        snap.capture(arrays, step=0)
        snap.wait()
        before = _bytes_under(tmp_path / "s.snap", "tables", "snapshots")
        arrays["x0100"][0] = -1.0
        snap.capture(arrays, step=1)
        snap.wait()
        written = _bytes_under(tmp_path / "s.snap", "tables", "snapshots") - before
        assert written < 16 << 10, written  # format 1 wrote the whole table: ~250 kB
        restored = snap.restore(step=1).arrays
        assert restored["x0100"][0] == -1.0 and len(restored) == 2000
    with arraysnap.open(tmp_path / "s.snap", mode="r") as reader:
        assert reader.verify().ok
        assert_bit_exact(reader.restore(step=0).arrays["x0100"], np.full(4, 100.0))


def _bytes_under(root: Path, *folders: str) -> int:
    return sum(f.stat().st_size for folder in folders for f in (root / folder).rglob("*")
               if f.is_file())


# -- damage and hostility --------------------------------------------------------------------
def _tree_store(path: Path) -> dict[str, np.ndarray]:
    arrays = {f"x{i:03d}": np.arange(i, i + 3.0) for i in range(200)}
    arrays["long"] = np.arange(20_000.0)  # 157 chunks at 1 KiB: digest blocks
    with arraysnap.open(path, chunk_bytes=1024) as snap:
        snap.capture(arrays, step=0)
        arrays["x005"] = arrays["x005"] * 2
        snap.capture(arrays, step=1)
    return arrays


def _manifest(path: Path, seq: int) -> dict:
    return json.loads((path / "snapshots" / f"{seq:012d}.json").read_text())


def _table_file(path: Path, ref: str) -> Path:
    name = base64.b64decode(ref).hex()
    return path / "tables" / name[:2] / name[2:]


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_a_damaged_table_object_is_reported_never_read_as_other_arrays(tmp_path, damage):
    path = tmp_path / "s.snap"
    arrays = _tree_store(path)
    leaf = _table_file(path, _manifest(path, 2)["tables"]["children"][0][2])
    assert _manifest(path, 2)["tables"]["depth"] == 1
    # The first leaf holds x005, which step 1 changed: only snapshot 2 uses it.
    if damage == "flip":
        raw = bytearray(leaf.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        leaf.write_bytes(bytes(raw))
    elif damage == "delete":
        leaf.unlink()
    else:
        leaf.write_bytes(leaf.read_bytes()[:10])
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError, match="table object"):
            reader.restore(step=1, verify=False)
        report = reader.verify()
        assert not report.ok and 2 in {problem.seq for problem in report.problems}
    with arraysnap.open(path) as writer:  # the damaged latest is passed over, never trusted
        restored = writer.restore(fallback=True)
        for name, array in restored.arrays.items():
            expected = arrays[name] if restored.step == 1 else (
                arrays[name] / 2 if name == "x005" else arrays[name])
            assert_bit_exact(array, expected)


def _signed(body: dict) -> bytes:
    body = {key: value for key, value in body.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
    return json.dumps(body).encode()


def _put_table(path: Path, data: bytes) -> str:
    digest = blake3.blake3(data).digest()
    target = path / "tables" / digest.hex()[:2] / digest.hex()[2:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return base64.b64encode(digest).decode()


LAYOUT = {"shape": [1], "dtype": "|u1", "order": "C", "split_axis": 0, "rows_per_chunk": 1}


def _leaf(path: Path, rows: list, packs: list | None = None) -> str:
    body: dict = {"layouts": [LAYOUT], "arrays": rows}
    if packs is not None:
        body["packs"] = packs
    return _put_table(path, json.dumps(body).encode())


@pytest.mark.parametrize("hostile", [
    "depth-too-deep", "count-lies", "names-out-of-order", "names-repeat", "not-a-digest",
    "leaf-is-a-list", "layout-index-out-of-range", "too-few-digests", "first-name-lies",
    "block-of-odd-size", "both-arrays-and-tables",
    # format 3: where packed chunks are
    "where-too-short", "where-pack-out-of-range", "where-negative-offset", "where-not-ints",
    "where-past-the-pack", "where-with-blocks", "packs-not-ids", "pack-missing",
])
def test_hostile_tables_give_a_clear_error_never_a_crash(tmp_path, hostile):
    path = tmp_path / "s.snap"
    with arraysnap.open(path) as snap:
        snap.capture({"u": np.zeros(1, dtype="u1")}, step=0)
    body = _manifest(path, 1)
    good = base64.b64encode(bytes(32)).decode()
    rows = [["a", 0, good], ["b", 0, good]]
    tables = {"arrays": 2, "depth": 1, "children": [["a", 2, _leaf(path, rows)]]}
    if hostile == "depth-too-deep":
        tables["depth"] = 99
    elif hostile == "count-lies":
        tables["arrays"] = 3
    elif hostile == "names-out-of-order":
        tables["children"] = [["b", 2, _leaf(path, rows[::-1])]]
    elif hostile == "names-repeat":
        tables["children"] = [["a", 2, _leaf(path, [rows[0], rows[0]])]]
    elif hostile == "not-a-digest":
        tables["children"] = [["a", 2, "../../etc/passwd"]]
    elif hostile == "leaf-is-a-list":
        tables["children"] = [["a", 2, _put_table(path, b"[1, 2]")]]
    elif hostile == "layout-index-out-of-range":
        tables["children"] = [["a", 2, _leaf(path, [["a", 5, good], ["b", 0, good]])]]
    elif hostile == "too-few-digests":
        tables["children"] = [["a", 2, _leaf(path, [["a", 0, ""], ["b", 0, good]])]]
    elif hostile == "first-name-lies":
        tables["children"] = [["z", 2, _leaf(path, rows)]]
    elif hostile == "block-of-odd-size":
        block = _put_table(path, b"\x00" * 33)
        tables["children"] = [["a", 2, _leaf(path, [["a", 0, {"blocks": [block]}],
                                                    ["b", 0, good]])]]
    elif hostile.startswith(("where", "pack")):
        packs, where = body["packs"], body["arrays"]["u"]["where"]  # u's zero byte, packed
        bad = {"where-too-short": where[:2], "where-pack-out-of-range": [7, 0, where[2]],
               "where-negative-offset": [0, -1, where[2]],
               "where-not-ints": [0, 0.5, where[2]], "where-past-the-pack": [0, 1 << 30, 9],
               "where-with-blocks": where, "packs-not-ids": where,
               "pack-missing": where}[hostile]
        chunks: object = good
        if hostile == "where-with-blocks":
            chunks = {"blocks": [_put_table(path, bytes(32))]}
        if hostile == "packs-not-ids":
            packs = ["../../etc/passwd"]
        if hostile == "pack-missing":
            packs = [base64.b64encode(bytes(16)).decode()]
        tables["children"] = [["a", 2, _leaf(path, [["a", 0, chunks, bad], ["b", 0, good]],
                                             packs)]]
    body["arrays"] = {} if hostile != "both-arrays-and-tables" else body["arrays"]
    body["tables"] = tables
    (path / "snapshots" / f"{1:012d}.json").write_bytes(_signed(body))
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
            reader.restore(seq=1)
        assert "snapshot 1" in str(caught.value)


def test_the_hostile_template_itself_reads(tmp_path):
    """The template of the test above is a valid tree: each case breaks one thing only."""
    path = tmp_path / "s.snap"
    with arraysnap.open(path) as snap:
        snap.capture({"u": np.zeros(1, dtype="u1")}, step=0)
    body = _manifest(path, 1)
    good = base64.b64encode(blake3.blake3(b"\x00").digest()).decode()
    where = body["arrays"]["u"]["where"]  # u's zero byte, in a pack (format 3)
    rows = [["a", 0, good, where], ["b", 0, good, where]]
    tables = {"arrays": 2, "depth": 1, "children": [["a", 2, _leaf(path, rows, body["packs"])]]}
    body["arrays"] = {}
    body["tables"] = tables
    (path / "snapshots" / f"{1:012d}.json").write_bytes(_signed(body))
    with arraysnap.open(path, mode="r") as reader:
        assert set(reader.restore(seq=1).arrays) == {"a", "b"}  # chunk "u"'s zero byte


# -- format 1 stores ----------------------------------------------------------------------
def _assert_upgraded_store_reads(store: Path) -> None:
    """The fixture's snapshots, one captured before the upgrade (step 30) and one after (40)
    all verify and restore."""
    with arraysnap.open(store, mode="r") as reader:
        assert reader.verify().ok
        assert_bit_exact(reader.restore(step=30).arrays["p003"], np.full(3, 3.0))
        assert_bit_exact(reader.restore(step=40).arrays["p003"], np.full(3, 4.0))
        assert reader.restore(step=10).step == 10  # the fixture's own snapshots


def _captured_in_fixture(tmp_path, version):
    """A copy of the committed fixture store of `version`, captured into once at step 30
    by a writer that keeps its format; the store and the arrays captured."""
    store = tmp_path / f"v{version}.snap"
    shutil.copytree(REPO / "tests" / "fixtures" / f"v{version}-store", store)
    arrays = {f"p{i:03d}": np.full(3, float(i)) for i in range(INLINE_ARRAYS + 10)}
    with arraysnap.open(store) as snap:
        assert snap.format_version == version
        snap.capture(arrays, step=30)
    return store, arrays


def test_a_writer_continues_a_format_1_store_in_format_1_until_it_is_upgraded(tmp_path):
    store, arrays = _captured_in_fixture(tmp_path, 1)
    newest = _manifest(store, 3)
    assert newest["version"] == 1 and "tables" not in newest and not (store / "tables").exists()
    assert json.loads((store / "arraysnap.json").read_text())["version"] == 1
    with arraysnap.open(store):  # a running writer holds the lock: no upgrade under it
        with pytest.raises(arraysnap.StoreLockedError):
            arraysnap.upgrade(store)
    result = CliRunner().invoke(cli, ["upgrade", str(store)])
    assert result.exit_code == 0 and "from format 1 to format 3" in result.output
    assert json.loads((store / "arraysnap.json").read_text())["version"] == 3
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == 3
        snap.capture(arrays, step=40)
    assert _manifest(store, 4)["version"] == 3 and "tables" in _manifest(store, 4)
    assert any((store / "packs").rglob("*"))
    _assert_upgraded_store_reads(store)
    again = CliRunner().invoke(cli, ["upgrade", str(store)])
    assert again.exit_code == 0 and "already format 3" in again.output


def test_a_writer_continues_a_format_2_store_in_format_2_until_it_is_upgraded(tmp_path):
    """Format 2 has no packs: its writer writes chunk objects until the store is upgraded,
    so that a release reading format 2 only still reads it."""
    store, arrays = _captured_in_fixture(tmp_path, 2)
    assert _manifest(store, 3)["version"] == 2 and not (store / "packs").exists()
    assert arraysnap.upgrade(store) == 2
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == 3
        snap.capture(arrays, step=40)
    assert _manifest(store, 4)["version"] == 3 and any((store / "packs").rglob("*"))
    _assert_upgraded_store_reads(store)


def test_bytes_written_counts_the_table_objects_a_capture_wrote(tmp_path):
    """SnapshotInfo.bytes_written is what the capture added to the store: chunk objects,
    table objects and the manifest."""
    path = tmp_path / "s.snap"
    arrays = {f"x{i:03d}": np.full(4, float(i)) for i in range(100)}
    with arraysnap.open(path) as snap:
        snap.capture(arrays, step=0).result()
        before = _bytes_under(path, "chunks", "packs", "tables", "snapshots")
        arrays["x050"] = arrays["x050"] + 1
        info = snap.capture(arrays, step=1).result()
        assert info.bytes_written == (_bytes_under(path, "chunks", "packs", "tables", "snapshots")
                                      - before)


def test_disk_usage_counts_the_table_objects(tmp_path):
    path = tmp_path / "s.snap"
    with arraysnap.open(path) as snap:
        snap.capture({f"x{i:03d}": np.zeros(4) for i in range(100)}, step=0).result()
        usage = snap.disk_usage()
    assert usage.table_bytes == _bytes_under(path, "tables") > 0
    assert usage.to_json()["table_bytes"] == usage.table_bytes
    result = CliRunner().invoke(cli, ["du", str(path)])
    assert result.exit_code == 0 and "; tables " in result.output
