"""Format 2's table objects (format 4: nodes in packs): round trips, costs that follow the
change, damage and hostility."""

from __future__ import annotations

import base64
import json
import shutil
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, assert_bit_exact
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap import FORMAT_VERSION as CURRENT
from arraysnap.cli import cli
from arraysnap.manifest import ArrayEntry
from arraysnap.packs import Location
from arraysnap.tables import (
    BLOCK_CHUNKS,
    COLUMNAR_LEAVES,
    FANOUT,
    INLINE_ARRAYS,
    INLINE_CHUNKS,
    MAX_NODE_BYTES,
    PACKED_NODES,
    READ_AHEAD_BYTES,
    TableReader,
)
from arraysnap.tablewriter import TableWriter
from arraysnap.testing import chunk_ranges, chunk_references

SIGNED_KEYS = ("format", "version", "seq", "step", "time", "parent", "codec", "arrays",
               "state", "rng", "stats", "provenance")


def entry(name: str, n_chunks: int, salt: int) -> ArrayEntry:
    digests = b"".join(blake3.blake3(b"%d:%s:%d" % (salt, name.encode(), i)).digest()
                       for i in range(n_chunks))
    return ArrayEntry(name, (n_chunks,), np.dtype("u1"), "C", 0, 1, digests)


class Objects(dict):
    """A table-object store that counts what is written, with the packs of format 4."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.packs: dict[bytes, bytes] = {}

    def put(self, digest: bytes, data: bytes) -> None:
        assert blake3.blake3(data).digest() == digest
        if digest not in self:
            self.written.append(digest)
        self[digest] = data

    def put_pack(self, pack: bytes, data: bytes) -> None:
        assert pack not in self.packs  # written once, create-only
        self.packs[pack] = data

    def fetch(self, digest: bytes, location: Location | None) -> bytes:
        if location is None:
            return self[digest]
        return self.packs[location.pack][location.offset : location.offset + location.length]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abcxyz_019", min_size=1, max_size=6),
                          st.integers(0, 3 * INLINE_CHUNKS)), min_size=0, max_size=300,
                unique_by=lambda item: item[0]),
       st.data())
def test_tables_read_back_what_was_built_and_a_change_writes_little(items, data):
    version = data.draw(st.sampled_from([2, PACKED_NODES, COLUMNAR_LEAVES]))
    objects = Objects()
    writer = TableWriter(version)
    entries = {name: entry(name, n, 0) for name, n in items}
    built = writer.build(entries, objects.put, objects.put_pack)
    writer.committed(built)
    reader = TableReader(objects.fetch)
    if built.tables is None:  # few arrays: listed in the manifest, as format 1 does
        assert len(entries) <= INLINE_ARRAYS and list(built.arrays) == list(entries)
    else:
        read, used, nodes = reader.read(built.tables, version)
        assert read == entries and list(read) == sorted(entries)  # name order
        packs = {location.pack for location in nodes.values()}
        assert used == built.objects and packs == built.table_packs and nodes == built.nodes
        assert len(packs) == (version >= PACKED_NODES)  # one pack a build
    if not entries:
        return
    # Change one array: what is written is its blocks, one leaf and the nodes above.
    name = data.draw(st.sampled_from(sorted(entries)))
    changed = dict(entries)
    changed[name] = entry(name, entries[name].n_chunks, 1)
    objects.written.clear()
    rebuilt = writer.build(changed, objects.put, objects.put_pack)
    blocks = -(-changed[name].n_chunks // BLOCK_CHUNKS) if changed[name].n_chunks > \
        INLINE_CHUNKS else 0
    depth = 0 if rebuilt.tables is None else rebuilt.tables["depth"]
    assert len(objects.written) + len(rebuilt.packed - built.packed) <= blocks + depth
    if rebuilt.tables is not None:
        assert reader.read(rebuilt.tables, version)[0] == changed


@pytest.mark.parametrize("range_fails", [False, True])
def test_a_reader_reads_the_children_of_a_node_that_lie_together_at_once(range_fails):
    """The nodes of a first capture are all in one pack: a reader reads each parent's
    children in one range (29 reads for 10,000 arrays, where it made 514), and when that
    read fails, reads each node alone; either way it reads what was built."""
    objects = Objects()
    writer = TableWriter(COLUMNAR_LEAVES)
    entries = {f"a{i:05d}": entry(f"a{i:05d}", 1, 0) for i in range(40 * FANOUT)}
    built = writer.build(entries, objects.put, objects.put_pack)
    assert built.tables is not None and built.tables["depth"] == 2
    singles, ranges = [], []

    def fetch(digest: bytes, location: Location | None) -> bytes:
        singles.append(location)
        return objects.fetch(digest, location)

    def fetch_range(location: Location) -> bytes:
        ranges.append(location)
        if range_fails:
            raise OSError("the range read failed")
        return objects.fetch(b"", location)

    read, _, nodes = TableReader(fetch, fetch_range).read(built.tables, COLUMNAR_LEAVES)
    assert read == entries
    inner = len(built.tables["children"])
    assert len(ranges) == 1 + inner  # the root's children, then each inner node's
    assert len(singles) == (len(nodes) if range_fails else 0)


def test_a_reader_fetches_overlapping_nodes_alone_never_as_one_range():
    """A hostile parent whose children overlap in a pack (a writer never packs them so)
    could make copies of one range add up to far more than the range: each is fetched
    alone, and the overlap fails as a node that does not match its name."""
    pack = bytes(16)
    data = bytes(range(200))
    ranges: list[Location] = []

    def fetch(digest: bytes, location: Location | None) -> bytes:
        assert location is not None
        return data[location.offset : location.offset + location.length]

    def fetch_range(location: Location) -> bytes:
        ranges.append(location)
        return fetch(b"", location)

    def child(first: str, offset: int) -> list:
        digest = blake3.blake3(data[offset : offset + 120]).digest()
        return [first, 1, base64.b64encode(digest).decode(), 0, offset, 120]

    tables = {"arrays": 2, "depth": 1, "packs": [base64.b64encode(pack).decode()],
              "children": [child("a", 0), child("b", 60)]}
    with pytest.raises(ValueError, match="not valid JSON|leaf"):
        TableReader(fetch, fetch_range).read(tables, COLUMNAR_LEAVES)
    assert ranges == []


def test_a_reader_reads_ahead_a_bounded_amount_whatever_the_tree_names():
    """A hostile parent naming ranges of many large packs (the store's chunk packs, say)
    made the reader read all of them before it checked its first child: it now reads
    ahead at most READ_AHEAD_BYTES, then fetches each child alone, failing at the first."""
    half = 1 << 19
    packs = [bytes([n]) * 16 for n in range(12)]
    ranges: list[Location] = []
    singles: list[Location] = []

    def fetch(digest: bytes, location: Location | None) -> bytes:
        assert location is not None
        singles.append(location)
        return bytes(location.length)

    def fetch_range(location: Location) -> bytes:
        ranges.append(location)
        return bytes(location.length)

    children = [[f"a{n:03d}", 1, base64.b64encode(bytes(32)).decode(), n // 2,
                 (n % 2) * half, half] for n in range(2 * len(packs))]
    tables = {"arrays": len(children), "depth": 1, "children": children,
              "packs": [base64.b64encode(pack).decode() for pack in packs]}
    with pytest.raises(ValueError, match="does not match its name"):
        TableReader(fetch, fetch_range).read(tables, COLUMNAR_LEAVES)
    assert 0 < sum(location.length for location in ranges) <= READ_AHEAD_BYTES
    assert len(singles) <= 1


@pytest.mark.parametrize("version", [2, PACKED_NODES, COLUMNAR_LEAVES])
def test_adding_an_array_rewrites_the_nodes_around_it_not_all_after_it(version):
    objects = Objects()
    writer = TableWriter(version)
    first = writer.build({f"a{i:05d}": entry(f"a{i:05d}", 1, 0) for i in range(20 * FANOUT)},
                         objects.put, objects.put_pack)
    writer.committed(first)
    objects.written.clear()
    entries = {f"a{i:05d}": entry(f"a{i:05d}", 1, 0) for i in range(20 * FANOUT)}
    entries["a00000x"] = entry("a00000x", 1, 0)  # sorts near the front
    built = writer.build(entries, objects.put, objects.put_pack)
    assert built.tables is not None
    # A leaf (maybe split) and the nodes above.
    assert len(objects.written) + len(built.packed - first.packed) <= built.tables["depth"] + 1


def test_a_node_a_build_did_not_commit_is_packed_again_never_referred_to_where_it_was():
    """Format 4: a node whose pack may never have been written (a failed commit), or may be
    collected (only a pruned snapshot used it), goes into the next build's pack again, and
    so do the nodes above it, which name it where it now is."""
    objects = Objects()
    writer = TableWriter(PACKED_NODES)
    names = [f"a{i:04d}" for i in range(2000)]  # a tree of depth 2

    def entries(changed: str | None = None) -> dict[str, ArrayEntry]:
        return {name: entry(name, 1, int(name == changed)) for name in names}

    built_one = writer.build(entries(), objects.put, objects.put_pack)
    writer.committed(built_one)
    assert built_one.tables["depth"] == 2
    (pack_one,) = built_one.table_packs

    def lost(pack: bytes, data: bytes) -> None:
        raise OSError("the pack's write failed")

    with pytest.raises(OSError):
        writer.build(entries("a0100"), objects.put, lost)  # never committed nor written
    built_two = writer.build(entries("a0100"), objects.put, objects.put_pack)
    writer.committed(built_two)
    assert TableReader(objects.fetch).read(built_two.tables, PACKED_NODES)[0] == \
        entries("a0100")
    # Back to the first snapshot's arrays: the leaf holding a0100 is the first snapshot's
    # leaf again, which the last committed snapshot does not use (it may be gone with the
    # first snapshot): it is packed again, and every node naming it names it there.
    one_leaves: set[bytes] = set()
    TableReader(lambda d, location: one_leaves.add(d) or objects.fetch(d, location)).read(
        built_one.tables, PACKED_NODES)
    built_three = writer.build(entries(), objects.put, objects.put_pack)
    (new_pack,) = built_three.table_packs - {pack_one}
    refs: dict[bytes, set[bytes]] = {}

    def fetch(digest: bytes, location: Location | None) -> bytes:
        assert location is not None
        refs.setdefault(digest, set()).add(location.pack)
        return objects.fetch(digest, location)

    assert TableReader(fetch).read(built_three.tables, PACKED_NODES)[0] == entries()
    two_nodes = built_two.packed
    moved = {digest for digest in refs if digest not in two_nodes}
    assert len(moved & one_leaves) == 1  # the leaf, as snapshot 1 had it
    assert len(moved - one_leaves) == 1  # the inner node above it, new: it names it anew
    assert all(refs[digest] == {new_pack} for digest in moved)
    assert all(refs[digest] != {new_pack} for digest in refs.keys() - moved)


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


def _pack_file(path: Path, ref: str) -> Path:
    name = base64.b64decode(ref).hex()
    return path / "packs" / name[:2] / name[2:]


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_a_damaged_table_object_is_reported_never_read_as_other_arrays(tmp_path, damage):
    path = tmp_path / "s.snap"
    arrays = _tree_store(path)
    tables = _manifest(path, 2)["tables"]
    assert tables["depth"] == 1
    # The first leaf holds x005, which step 1 changed: only snapshot 2 uses it, and (format
    # 4) it is all of snapshot 2's pack of nodes.
    _first, _count, _ref, pack, offset, length = tables["children"][0]
    leaf = _pack_file(path, tables["packs"][pack])
    assert leaf.stat().st_size == offset + length
    if damage == "flip":
        raw = bytearray(leaf.read_bytes())
        raw[offset + length // 2] ^= 0x01
        leaf.write_bytes(bytes(raw))
    elif damage == "delete":
        leaf.unlink()
    else:
        leaf.write_bytes(leaf.read_bytes()[: offset + 10])
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError, match="table object"):
            reader.restore(step=1, verify=True)
        # Unverified, the latest comes from the writer's baselines, which hold it exactly
        # (their table vouches for every array's layout): the damage is verify()'s to find,
        # as damage to its chunk objects is.
        mirrored = reader.restore(step=1, verify=False)
        assert mirrored.seq == 2
        for name, array in mirrored.arrays.items():
            assert_bit_exact(array, arrays[name])
        with pytest.raises(arraysnap.CorruptSnapshotError, match="table object"):
            dict(mirrored.info.arrays)  # the entries themselves come from the tables
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
    body["version"] = 3  # a tree of table objects of their own (formats 2 and 3)
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
    body["version"] = 3
    good = base64.b64encode(blake3.blake3(b"\x00").digest()).decode()
    where = body["arrays"]["u"]["where"]  # u's zero byte, in a pack (format 3)
    rows = [["a", 0, good, where], ["b", 0, good, where]]
    tables = {"arrays": 2, "depth": 1, "children": [["a", 2, _leaf(path, rows, body["packs"])]]}
    body["arrays"] = {}
    body["tables"] = tables
    (path / "snapshots" / f"{1:012d}.json").write_bytes(_signed(body))
    with arraysnap.open(path, mode="r") as reader:
        assert set(reader.restore(seq=1).arrays) == {"a", "b"}  # chunk "u"'s zero byte


def _packed_tree(path: Path, hostile: str | None) -> None:
    """Snapshot 1 of `path` made a format-4 tree of two arrays whose leaf (and, at depth 2,
    inner node) are in a pack: as a writer makes it, or with one thing `hostile`."""
    with arraysnap.open(path) as snap:
        snap.capture({"u": np.zeros(1, dtype="u1")}, step=0)
    body = _manifest(path, 1)
    body["version"] = PACKED_NODES  # leaves by row
    good = base64.b64encode(blake3.blake3(b"\x00").digest()).decode()
    where = body["arrays"]["u"]["where"]
    leaf = json.dumps({"layouts": [LAYOUT], "packs": body["packs"],
                       "arrays": [["a", 0, good, where], ["b", 0, good, where]]}).encode()
    pack_id = bytes(range(16))
    pack_ref = base64.b64encode(pack_id).decode()
    junk = b"junk before the leaf"
    leaf_ref = base64.b64encode(blake3.blake3(leaf).digest()).decode()
    child = ["a", 2, leaf_ref, 0, len(junk), len(leaf)]
    inner = json.dumps({"packs": [pack_ref],
                        "children": [] if hostile == "empty-inner" else [child]}).encode()
    data = junk + leaf + inner
    inner_child = ["a", 2, base64.b64encode(blake3.blake3(inner).digest()).decode(), 0,
                   len(junk) + len(leaf), len(inner)]
    tables: dict = {"arrays": 2, "depth": 2, "packs": [pack_ref], "children": [inner_child]}
    if hostile == "child-of-three":
        tables["children"] = [inner_child[:3]]
    elif hostile == "no-packs":
        del tables["packs"]
    elif hostile == "pack-index-out-of-range":
        tables["children"] = [[*inner_child[:3], 1, *inner_child[4:]]]
    elif hostile == "past-the-pack":
        tables["children"] = [[*inner_child[:4], len(data) - 5, inner_child[5]]]
    elif hostile == "wrong-range":
        tables["children"] = [[*inner_child[:4], inner_child[4] - 1, inner_child[5]]]
    elif hostile == "pack-missing":
        tables["packs"] = [base64.b64encode(bytes(16)).decode()]
    elif hostile == "huge-length":
        tables["children"] = [[*inner_child[:5], MAX_NODE_BYTES + 1]]
    elif hostile == "negative-offset":
        tables["children"] = [[*inner_child[:4], -1, inner_child[5]]]
    elif hostile == "not-ints":
        tables["children"] = [[*inner_child[:4], 0.5, inner_child[5]]]
    elif hostile == "packs-in-a-version-3-tree":
        body["version"] = 3
    elif hostile == "count-zero":  # a child of no arrays, which a tree could name again
        tables["children"] = [[inner_child[0], 0, *inner_child[2:]], inner_child]
    target = _pack_file(path, pack_ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    body["arrays"], body["packs"], body["tables"] = {}, [], tables
    (path / "snapshots" / f"{1:012d}.json").write_bytes(_signed(body))


def test_a_packed_tree_as_a_writer_makes_it_reads(tmp_path):
    """The template of the test below is a valid format-4 tree: each case breaks one thing."""
    path = tmp_path / "s.snap"
    _packed_tree(path, None)
    with arraysnap.open(path, mode="r") as reader:
        assert set(reader.restore(seq=1).arrays) == {"a", "b"}
        assert reader.verify().ok


@pytest.mark.parametrize("hostile", [
    "child-of-three", "no-packs", "pack-index-out-of-range", "past-the-pack", "wrong-range",
    "pack-missing", "huge-length", "negative-offset", "not-ints", "packs-in-a-version-3-tree",
    "empty-inner", "count-zero",
])
def test_a_hostile_packed_tree_gives_a_clear_error_never_a_crash(tmp_path, hostile):
    path = tmp_path / "s.snap"
    _packed_tree(path, hostile)
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
            reader.restore(seq=1)
        assert "snapshot 1" in str(caught.value)
        # Refused where they are met: a tree of such nodes, each naming the next many times
        # over, took the reader hours to find wrong (the counts are checked after a visit).
        assert {"count-zero": "arrays (1 or more)", "empty-inner": "has no children"}.get(
            hostile, "") in str(caught.value)
        assert not reader.verify().ok


def _columnar_tree(path: Path, hostile: str | None) -> None:
    """Snapshot 1 of `path` made a format-5 tree of two arrays whose leaf (in a pack) holds
    them by column: as a writer makes it, or with one thing `hostile`."""
    with arraysnap.open(path) as snap:
        snap.capture({"u": np.zeros(1, dtype="u1")}, step=0)
    body = _manifest(path, 1)
    assert body["version"] == COLUMNAR_LEAVES
    good = blake3.blake3(b"\x00").digest()
    where = tuple(body["arrays"]["u"]["where"])  # u's zero byte, packed
    block = _put_table(path, good)
    columns: dict = {"layouts": [LAYOUT], "packs": body["packs"], "names": ["a", "b"],
                     "layout": [0, 0], "digests": base64.b64encode(good * 2).decode(),
                     "where": _where([where, where])}
    bad_where = {"where-pack-out-of-range": (7, 0, where[2]), "where-negative-length":
                 (0, 0, -1), "where-own-object-with-offset": (-1, 5, 0),
                 "where-past-the-pack": (0, 1 << 30, 9)}
    if hostile in bad_where:
        columns["where"] = _where([where, bad_where[hostile]])
    changed = {
        "names-not-a-list": {"names": "ab"}, "layout-short": {"layout": [0]},
        "layout-not-an-int": {"layout": [0, "0"]}, "layout-out-of-range": {"layout": [0, 5]},
        "name-with-newline": {"names": ["a", "b\nc"]}, "name-not-a-string": {"names": ["a", 7]},
        "names-out-of-order": {"names": ["b", "a"]}, "names-repeat": {"names": ["a", "a"]},
        "digests-not-base64": {"digests": "@@"},
        "digests-short": {"digests": base64.b64encode(good).decode()},
        "digests-long": {"digests": base64.b64encode(good * 3).decode()},
        "where-not-whole": {"where": base64.b64encode(
            base64.b64decode(columns["where"]) + b"x").decode()},
        "where-short": {"where": _where([where])},
        "where-not-base64": {"where": 5},
        "blocks-row-out-of-range": {"blocks": [[2, [block]]]},
        "blocks-not-increasing": {"blocks": [[1, [block]], [0, [block]]]},
        "blocks-bad-ref": {"blocks": [[1, ["../../etc/passwd"]]],
                           "digests": base64.b64encode(good).decode(),
                           "where": _where([where])},
    }
    columns.update(changed.get(hostile, {}))
    leaf = json.dumps(columns).encode()
    pack_ref = base64.b64encode(bytes(range(16))).decode()
    target = _pack_file(path, pack_ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(leaf)
    child = ["a", 2, base64.b64encode(blake3.blake3(leaf).digest()).decode(), 0, 0, len(leaf)]
    body["arrays"], body["packs"] = {}, []
    body["tables"] = {"arrays": 3 if hostile == "count-lies" else 2, "depth": 1,
                      "packs": [pack_ref], "children": [child]}
    (path / "snapshots" / f"{1:012d}.json").write_bytes(_signed(body))


def test_a_columnar_leaf_as_a_writer_makes_it_reads(tmp_path):
    """The template of the test below is a valid format-5 tree: each case breaks one thing."""
    path = tmp_path / "s.snap"
    _columnar_tree(path, None)
    with arraysnap.open(path, mode="r") as reader:
        restored = reader.restore(seq=1)
        assert list(restored.arrays) == ["a", "b"]
        assert_bit_exact(restored.arrays["b"], np.zeros(1, dtype="u1"))
        assert reader.verify().ok


@pytest.mark.parametrize("hostile", [
    "names-not-a-list", "layout-short", "layout-not-an-int", "layout-out-of-range",
    "name-with-newline", "name-not-a-string", "names-out-of-order", "names-repeat",
    "digests-not-base64", "digests-short", "digests-long", "where-not-whole", "where-short",
    "where-not-base64", "where-pack-out-of-range", "where-negative-length",
    "where-own-object-with-offset", "where-past-the-pack", "blocks-row-out-of-range",
    "blocks-not-increasing", "blocks-bad-ref", "count-lies",
])
def test_a_hostile_columnar_leaf_gives_a_clear_error_never_a_crash(tmp_path, hostile):
    path = tmp_path / "s.snap"
    _columnar_tree(path, hostile)
    with arraysnap.open(path, mode="r") as reader:
        with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
            reader.restore(seq=1)
        assert "snapshot 1" in str(caught.value)
        assert not reader.verify().ok


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
    assert result.exit_code == 0 and f"from format 1 to format {CURRENT}" in result.output
    assert json.loads((store / "arraysnap.json").read_text())["version"] == CURRENT
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == CURRENT
        snap.capture(arrays, step=40)
    assert _manifest(store, 4)["version"] == CURRENT and "packs" in _manifest(store, 4)["tables"]
    assert any((store / "packs").rglob("*"))
    _assert_upgraded_store_reads(store)
    again = CliRunner().invoke(cli, ["upgrade", str(store)])
    assert again.exit_code == 0 and f"already format {CURRENT}" in again.output


def test_a_writer_continues_a_format_2_store_in_format_2_until_it_is_upgraded(tmp_path):
    """Format 2 has no packs: its writer writes chunk objects until the store is upgraded,
    so that a release reading format 2 only still reads it."""
    store, arrays = _captured_in_fixture(tmp_path, 2)
    assert _manifest(store, 3)["version"] == 2 and not (store / "packs").exists()
    assert arraysnap.upgrade(store) == 2
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == CURRENT
        snap.capture(arrays, step=40)
    assert _manifest(store, 4)["version"] == CURRENT and any((store / "packs").rglob("*"))
    _assert_upgraded_store_reads(store)


def test_a_writer_continues_a_format_3_store_in_format_3_until_it_is_upgraded(tmp_path):
    """Format 3 writes table nodes as objects of their own, which a release reading format 3
    only can read; after the upgrade, new nodes go into packs (the old ones stay)."""
    tables_before = set((REPO / "tests" / "fixtures" / "v3-store" / "tables").rglob("*"))
    store, arrays = _captured_in_fixture(tmp_path, 3)
    newest = _manifest(store, 3)
    assert newest["version"] == 3 and "packs" not in newest["tables"]
    assert all(len(child) == 3 for child in newest["tables"]["children"])
    assert len(list((store / "tables").rglob("*"))) > len(tables_before)  # its new leaves
    assert arraysnap.upgrade(store) == 3
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == CURRENT
        snap.capture(arrays, step=40)
    upgraded = _manifest(store, 4)
    assert upgraded["version"] == CURRENT
    assert all(len(child) == 6 for child in upgraded["tables"]["children"])
    _assert_upgraded_store_reads(store)


def test_a_writer_continues_a_format_4_store_in_format_4_until_it_is_upgraded(tmp_path):
    """Format 4 leaves hold their arrays by row, which a release reading format 4 only can
    read; after the upgrade, new leaves hold them by column (the old ones stay)."""
    store, arrays = _captured_in_fixture(tmp_path, 4)
    assert _manifest(store, 3)["version"] == 4
    assert all("arrays" in leaf for leaf in _leaves(store, 3))
    assert arraysnap.upgrade(store) == 4
    arrays["p003"] = arrays["p003"] + 1
    with arraysnap.open(store) as snap:
        assert snap.format_version == CURRENT
        snap.capture(arrays, step=40)
    assert _manifest(store, 4)["version"] == CURRENT
    assert all("names" in leaf and "arrays" not in leaf for leaf in _leaves(store, 4))
    _assert_upgraded_store_reads(store)


def _where(triples: list[tuple[int, int, int]]) -> str:
    """A format-5 leaf's where column."""
    flat = [value for triple in triples for value in triple]
    return base64.b64encode(struct.pack(f"<{len(flat)}q", *flat)).decode()


def _leaves(path: Path, seq: int) -> list[dict]:
    """The leaves of snapshot `seq`'s tree of packed nodes (formats 4 and 5)."""
    tables = _manifest(path, seq)["tables"]
    pending, leaves = [(tables["depth"], tables)], []
    while pending:
        depth, parent = pending.pop()
        for _first, _count, _ref, pack, offset, length in parent["children"]:
            with open(_pack_file(path, parent["packs"][pack]), "rb") as file:
                file.seek(offset)
                node = json.loads(file.read(length))
            (pending.append((depth - 1, node)) if depth > 1 else leaves.append(node))
    return leaves


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
    """Table objects of their own (digest blocks here; format 4 packs the nodes, which
    count with the packs)."""
    path = tmp_path / "s.snap"
    with arraysnap.open(path, chunk_bytes=1024) as snap:
        arrays = {f"x{i:03d}": np.zeros(4) for i in range(100)}
        snap.capture({**arrays, "long": np.zeros(20_000)}, step=0).result()
        usage = snap.disk_usage()
    assert usage.table_bytes == _bytes_under(path, "tables") > 0
    assert usage.to_json()["table_bytes"] == usage.table_bytes
    result = CliRunner().invoke(cli, ["du", str(path)])
    assert result.exit_code == 0 and "; tables " in result.output


@pytest.mark.parametrize("version", [3, PACKED_NODES, COLUMNAR_LEAVES])
def test_an_object_named_as_a_leaf_and_as_an_inner_node_is_damage_not_a_crash(version):
    """The fuzzer's finding: a node read as a leaf was handed out again, from the reader's
    cache, where the tree named the same object as an inner node (a TypeError)."""
    layout = {**LAYOUT, "shape": [1]}
    leaf = json.dumps({"layouts": [layout], "arrays": [["a", 0, "A" * 43 + "="]]}
                      if version < COLUMNAR_LEAVES else
                      {"layouts": [layout], "names": ["a"], "layout": [0],
                       "digests": "A" * 43 + "=", "where": _where([(-1, 0, 0)])}).encode()
    objects = Objects()
    leaf_digest = blake3.blake3(leaf).digest()
    objects[leaf_digest] = leaf
    pack = bytes(16)
    objects.packs[pack] = leaf
    pack_ref = base64.b64encode(pack).decode()

    def child(first: str, digest: bytes, data: bytes) -> list:
        ref = [first, 1, base64.b64encode(digest).decode()]
        return ref if version < PACKED_NODES else [*ref, 0, 0, len(data)]

    def parent(children: list) -> dict:
        return {"children": children} if version < PACKED_NODES else {
            "packs": [pack_ref], "children": children}

    inner = json.dumps(parent([child("a", leaf_digest, leaf)])).encode()
    inner_digest = blake3.blake3(inner).digest()
    objects[inner_digest] = inner

    def fetch(digest: bytes, location: Location | None) -> bytes:
        return objects[digest]  # wherever the tree says it is

    tables = {"arrays": 2, "depth": 2,
              **parent([child("a", inner_digest, inner), child("a", leaf_digest, leaf)])}
    with pytest.raises(ValueError, match="inner node|children"):
        TableReader(fetch).read(tables, version)


def test_the_harness_finds_every_chunk_of_a_tree_whose_nodes_are_packed(tmp_path):
    """arraysnap.testing's damage oracles walk format 4's trees (nodes in packs) too."""
    path = tmp_path / "s.snap"
    arrays = _tree_store(path)
    assert len(_manifest(path, 2)["tables"]["children"][0]) == 6  # packed nodes
    ranges = chunk_ranges(path)
    for seq in (1, 2):
        assert {name for s, name, _ in ranges if s == seq} == set(arrays)
    assert sum(1 for s, name, _ in ranges if s == 2 and name == "long") == 157
    assert set(chunk_references(path)) <= {relative for relative, _, _ in ranges.values()}


def test_a_writer_that_opens_a_store_goes_on_from_its_tree_not_a_new_one(tmp_path):
    """Format 4: the first capture after an open changes one leaf and the nodes above it,
    where the open writer finds the newest snapshot's nodes (it packed the whole tree again,
    0.85 MB at 10,000 arrays)."""
    path = tmp_path / "s.snap"
    arrays = {f"x{i:04d}": np.full(4, float(i)) for i in range(2000)}
    with arraysnap.open(path) as snap:
        first = snap.capture(arrays, step=0).result()
    assert first.bytes_written > 100 << 10  # the whole tree, and every array's chunk
    arrays["x0100"] = arrays["x0100"] + 1
    with arraysnap.open(path) as snap:
        info = snap.capture(arrays, step=1).result()
        assert info.bytes_written < 16 << 10, info.bytes_written
        assert_bit_exact(snap.restore().arrays["x0100"], arrays["x0100"])
    with arraysnap.open(path, mode="r") as reader:
        assert reader.verify().ok
