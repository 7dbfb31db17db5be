"""Looking at a local store from outside, and damaging it the ways disks and people do.

Everything here reads the files themselves (manifests are JSON), never a ``Store``'s
internals, so a test can name exactly the file it damages.

>>> import tempfile, numpy as np, arraysnap
>>> path = Path(tempfile.mkdtemp()) / "run.snap"
>>> with arraysnap.open(path, chunk_bytes=4096) as snap:
...     _ = snap.capture({"u": np.arange(1024.0)}, step=1)
>>> victim = chunk_file(path, 1, "u", 1)
>>> victim.relative_to(path).parts[0], object_intact(path, victim)
('packs', True)
>>> _ = flip_bits(victim, random.Random(0), 1)
>>> object_intact(path, victim)
False
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import blake3

from arraysnap.codecs import CodecSpec, parse_codec
from arraysnap.extents import read_extents
from arraysnap.leases import LEASES, LockFile, lock_byte
from arraysnap.manifest import parse_layout

__all__ = ["BASELINE_DAMAGE", "CHUNK_DAMAGE", "chunk_file", "chunk_ranges", "chunk_references",
           "damage_baselines", "damaged_chunks",
           "damage_object", "flip_bit", "flip_bits", "leftover_temporaries", "manifest_files",
           "baseline_extent", "baseline_files", "baseline_leased", "object_intact", "read_marker",
           "store_codec", "store_files", "truncate", "write_marker"]

DIGEST_BYTES = 32
# The ways damage_object() can damage a chunk object.
CHUNK_DAMAGE = ("flip-bit", "flip-last-bit", "truncate", "empty", "delete", "swap",
                "replace-with-directory")
# The ways damage_baselines() can damage the baselines.
BASELINE_DAMAGE = ("flip", "flip-many", "truncate", "extend", "delete", "marker-flip",
                   "marker-garbage", "marker-delete")


# -- looking -----------------------------------------------------------------------------------
def store_files(path: Path) -> dict[str, bytes]:
    """Every committed file of a store by relative path: not the baselines, the lock or the
    capture history (which only informs), to check that nothing committed changed.

    >>> import tempfile, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     sorted(store_files(snap.path))
    ['arraysnap.json']
    """
    files = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).as_posix()
        if (file.is_file() and not file.is_symlink()
                and not relative.startswith(("mirror/", "tmp/"))
                and relative not in ("lock", "history.jsonl")):
            files[relative] = file.read_bytes()
    return files


def manifest_files(path: Path) -> dict[int, bytes]:
    """The manifests of a store by seq (only well-named ones).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}).result()
    ...     sorted(manifest_files(snap.path))
    [1]
    """
    manifests = {}
    for file in (path / "snapshots").glob("*.json"):
        if len(file.stem) == 12 and file.stem.isdigit():
            manifests[int(file.stem)] = file.read_bytes()
    return manifests


def leftover_temporaries(path: Path, *, baselines: bool = True) -> list[str]:
    """Temporary files under `path` (optionally not counting those of the baselines).

    >>> import tempfile
    >>> leftover_temporaries(Path(tempfile.mkdtemp()))
    []
    """
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob(".tmp-*"))
    return found if baselines else [p for p in found if not p.startswith("mirror/")]


def _table_object(path: Path, ref: str, packs: list[str] | None = None,
                  where: list[int] | None = None) -> bytes:
    """A table object: of its own, or (format 4) at `where` of its parent's `packs`."""
    if where:
        pack, offset, length = where
        name = base64.b64decode(packs[pack]).hex()  # type: ignore[index]
        with open(path / "packs" / name[:2] / name[2:], "rb") as file:
            file.seek(offset)
            return file.read(length)
    hexdigest = base64.b64decode(ref).hex()
    return (path / "tables" / hexdigest[:2] / hexdigest[2:]).read_bytes()


def _digests(path: Path, record: dict[str, Any]) -> bytes:
    chunks = record["chunks"]
    if isinstance(chunks, str):
        return base64.b64decode(chunks)
    return b"".join(_table_object(path, ref) for ref in chunks["blocks"])


def _arrays(path: Path, body: dict[str, Any]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Each array of a manifest: its record (``chunks``, and ``where`` if packed) and the
    packs that ``where`` refers to, from the manifest or from the leaves of its tree."""
    arrays = {name: (record, body.get("packs", [])) for name, record in body["arrays"].items()}
    pending = [(body["tables"]["depth"], body["tables"])] if "tables" in body else []
    while pending:
        depth, parent = pending.pop()
        for _, _, ref, *where in parent["children"]:  # where: format 4's nodes in packs
            node = json.loads(_table_object(path, ref, parent.get("packs"), where))
            if depth > 1:
                pending.append((depth - 1, node))
                continue
            if "names" in node:  # format 5: the leaf's arrays by column
                arrays.update(_columns(node))
                continue
            for row in node["arrays"]:
                record = {"chunks": row[2]} if len(row) == 3 else {"chunks": row[2],
                                                                   "where": row[3]}
                arrays[row[0]] = (record, node.get("packs", []))
    return arrays


def _columns(node: dict[str, Any]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """A format-5 leaf's arrays as the records ``_arrays`` gives."""
    digests = base64.b64decode(node.get("digests", ""))
    where = base64.b64decode(node.get("where", ""))
    locations = struct.unpack(f"<{len(where) // 8}q", where)
    in_blocks = {row: refs for row, refs in node.get("blocks", [])}
    arrays = {}
    taken = 0
    for row, name in enumerate(node["names"]):
        if row in in_blocks:
            arrays[name] = ({"chunks": {"blocks": in_blocks[row]}}, node.get("packs", []))
            continue
        n_chunks = parse_layout(node["layouts"][node["layout"][row]]).n_chunks
        start = taken // DIGEST_BYTES
        chunks = digests[taken : taken + n_chunks * DIGEST_BYTES]
        taken += n_chunks * DIGEST_BYTES
        record = {"chunks": base64.b64encode(chunks).decode(),
                  "where": list(locations[3 * start : 3 * (start + n_chunks)])}
        arrays[name] = (record, node.get("packs", []))
    return arrays


def _chunks_of(path: Path, record: dict[str, Any],
               pack_list: list[str]) -> list[tuple[str, int, int, bytes]]:
    """(object path, offset, length or -1 for all of it, digest) of each chunk of an array
    of a manifest: a chunk object of its own, or a range of a pack (format 3)."""
    digests = _digests(path, record)
    packs = [base64.b64decode(p).hex() for p in pack_list]
    where = record.get("where")
    chunks = []
    for index in range(len(digests) // DIGEST_BYTES):
        digest = digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES]
        pack, offset, length = where[3 * index : 3 * index + 3] if where else (-1, 0, -1)
        if pack == -1:
            hexdigest = digest.hex()
            chunks.append((f"chunks/{hexdigest[:2]}/{hexdigest[2:]}", 0, -1, digest))
        else:
            chunks.append((f"packs/{packs[pack][:2]}/{packs[pack][2:]}", offset, length, digest))
    return chunks


def chunk_file(path: Path, seq: int, array: str, index: int) -> Path:
    """The file that holds chunk `index` of `array` in snapshot `seq` of the local store at
    `path` (its chunk object, or the pack it is in), from the manifest file itself (see the
    module doc for an example).

    >>> import tempfile
    >>> chunk_file(Path(tempfile.mkdtemp()), 1, "u", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...
    """
    body = json.loads((path / "snapshots" / f"{seq:012d}.json").read_bytes())
    chunks = _chunks_of(path, *_arrays(path, body)[array])
    if not 0 <= index < len(chunks):
        raise IndexError(f"array {array!r} of snapshot {seq} has {len(chunks)} chunks, "
                         f"not chunk {index}")
    return path / chunks[index][0]


def chunk_references(path: Path) -> dict[str, list[tuple[int, str, int]]]:
    """Object path (relative to the store: a chunk object or a pack) -> every (seq, array,
    chunk) whose manifest uses it.

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.zeros(1024)}).result()
    ...     sorted(chunk_references(snap.path).values())
    [[(1, 'u', 0), (1, 'u', 1)]]
    """
    refs: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for seq, data in sorted(manifest_files(path).items()):
        for name, (record, packs) in _arrays(path, json.loads(data)).items():
            for index, (obj, _, _, _) in enumerate(_chunks_of(path, record, packs)):
                refs[obj].append((seq, name, index))
    return refs


def chunk_ranges(path: Path) -> dict[tuple[int, str, int], tuple[str, int, int]]:
    """(seq, array, chunk) -> (object path relative to the store, offset, length) of every
    chunk of every manifest: a range of a pack (format 3), or all of a chunk object (offset
    0, length -1).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.zeros(1024), "v": np.ones(512)}).result()
    ...     ranges = chunk_ranges(snap.path)
    >>> sorted(ranges)  # u's two chunks are equal: stored once
    [(1, 'u', 0), (1, 'u', 1), (1, 'v', 0)]
    >>> ranges[1, "u", 0] == ranges[1, "u", 1] != ranges[1, "v", 0]
    True
    """
    ranges = {}
    for seq, data in sorted(manifest_files(path).items()):
        for name, (record, packs) in _arrays(path, json.loads(data)).items():
            for index, (obj, offset, length, _) in enumerate(_chunks_of(path, record, packs)):
                ranges[(seq, name, index)] = (obj, offset, length)
    return ranges


def damaged_chunks(path: Path, objects: set[str] | None = None,
                   codec: CodecSpec | None = None) -> set[tuple[int, str, int]]:
    """Every (seq, array, chunk) whose stored bytes (in `objects` only, if given) no longer
    decode to the content its digest names: the chunks a damage of those files hit, exactly
    (a bit flipped in a pack hits the one chunk whose range holds it).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.arange(1024.0)}).result()
    >>> pack, offset, length = chunk_ranges(snap.path)[(1, "u", 1)]
    >>> _ = flip_bit(snap.path / pack, offset + 3)
    >>> damaged_chunks(snap.path)
    {(1, 'u', 1)}
    """
    codec = codec or store_codec(path)
    verdicts: dict[tuple[str, int, int], bool] = {}
    damaged = set()
    for seq, data in sorted(manifest_files(path).items()):
        for name, (record, packs) in _arrays(path, json.loads(data)).items():
            for index, (obj, offset, length, digest) in enumerate(
                    _chunks_of(path, record, packs)):
                if objects is not None and obj not in objects:
                    continue
                key = (obj, offset, length)
                if key not in verdicts:
                    try:
                        with open(path / obj, "rb") as file:
                            file.seek(offset)
                            stored = file.read() if length < 0 else file.read(length)
                        good = (len(stored) == length or length < 0) and \
                            blake3.blake3(codec.decode(stored)).digest() == digest
                    except Exception:  # noqa: BLE001 - unreadable or undecodable: damaged
                        good = False
                    verdicts[key] = good
                if not verdicts[key]:
                    damaged.add((seq, name, index))
    return damaged


def store_codec(path: Path) -> CodecSpec:
    """The codec recorded in a store's arraysnap.json.

    >>> import tempfile, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", codec="none") as snap:
    ...     store_codec(snap.path) == arraysnap.codecs.parse_codec("none")
    True
    """
    return parse_codec(json.loads((path / "arraysnap.json").read_bytes())["codec"])


def object_intact(path: Path, obj: str | Path, codec: CodecSpec | None = None) -> bool:
    """Whether a chunk object (a path, or one relative to the store) still decodes to the
    bytes its name (a blake3 digest) promises, or a pack to the bytes each chunk the
    manifests place in it promises (see the module doc)."""
    relative = Path(obj).relative_to(path).as_posix() if Path(obj).is_absolute() else str(obj)
    codec = codec or store_codec(path)
    try:
        if not relative.startswith("chunks/"):  # a pack: the chunks placed in it
            return not damaged_chunks(path, {relative}, codec)
        digest = relative.replace("chunks/", "").replace("/", "")
        return blake3.blake3(codec.decode((path / relative).read_bytes())).hexdigest() == digest
    except Exception:  # noqa: BLE001 - any failure to read or decode means damaged
        return False


def baseline_files(path: Path) -> list[Path]:
    """The baseline files of a store.

    >>> import tempfile
    >>> baseline_files(Path(tempfile.mkdtemp()))
    []
    """
    return sorted((path / "mirror").glob("*.bin"))


def read_marker(path: Path) -> dict[str, Any]:
    """The baselines' marker (which snapshot they hold, clean or not, which extent table).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s") as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}).result()
    >>> read_marker(snap.path)["seq"], read_marker(snap.path)["clean"]
    (1, True)
    """
    return json.loads((path / "mirror" / "state.json").read_bytes())


def baseline_leased(file: Path) -> bool:
    """Whether some reader holds a lease on baseline `file` (a map of it is alive).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s") as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}).result()
    ...     reader = arraysnap.open(snap.path, mode="r"); held = reader.restore().arrays
    ...     file, _ = baseline_extent(snap.path, "u")
    ...     baseline_leased(file)
    True
    >>> del held; reader.close(); baseline_leased(file)
    False
    """
    probe = LockFile(file.parent / LEASES, writable=True)
    try:
        if not probe.try_lock(lock_byte(file.name), exclusive=True):
            return True
        probe.unlock(lock_byte(file.name))
        return False
    finally:
        probe.close()


def baseline_extent(path: Path, name: str) -> tuple[Path, int]:
    """The baseline file that holds array `name` of the store at `path`, and the offset of
    the array's bytes in it.

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s") as snap:
    ...     _ = snap.capture({"u": np.arange(3.0), "v": np.ones(3)}).result()
    >>> file, offset = baseline_extent(snap.path, "v")
    >>> np.frombuffer(file.read_bytes()[offset : offset + 24]).tolist()
    [1.0, 1.0, 1.0]
    """
    extents = read_extents(path / "mirror", read_marker(path))
    if not extents or name not in extents or extents[name][0] is None:
        raise KeyError(f"array {name!r} has no baseline in {path}")
    filename, offset = extents[name]
    return path / "mirror" / str(filename), offset


def write_marker(path: Path, **changes: Any) -> None:
    """Rewrite the baselines' marker with `changes` (e.g. ``clean=False``).

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s") as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}).result()
    >>> write_marker(snap.path, clean=False); read_marker(snap.path)["clean"]
    False
    """
    marker = read_marker(path)
    marker.update(changes)
    (path / "mirror" / "state.json").write_text(json.dumps(marker))


# -- damaging ----------------------------------------------------------------------------------
def flip_bits(file: Path, chooser: random.Random, count: int) -> list[int]:
    """Flip `count` random bits of `file`; return the byte offsets touched.

    >>> import tempfile
    >>> file = Path(tempfile.mkdtemp()) / "f"; _ = file.write_bytes(b"\\0\\0")
    >>> len(flip_bits(file, random.Random(1), 1)), file.read_bytes() != b"\\0\\0"
    (1, True)
    """
    data = bytearray(file.read_bytes())
    offsets = []
    for _ in range(count):
        if not data:
            break
        offset = chooser.randrange(len(data))
        data[offset] ^= 1 << chooser.randrange(8)
        offsets.append(offset)
    file.write_bytes(bytes(data))
    return offsets


def flip_bit(file: Path, offset: int, bit: int = 0) -> None:
    """Flip bit `bit` of byte `offset` (modulo the size; -1 is the last byte) of `file`.

    >>> import tempfile
    >>> file = Path(tempfile.mkdtemp()) / "f"; _ = file.write_bytes(b"\\0\\0")
    >>> flip_bit(file, -1, 7); file.read_bytes()
    b'\\x00\\x80'
    """
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    file.write_bytes(bytes(data))


def truncate(file: Path, size: int) -> None:
    """Cut `file` to its first `size` bytes (a torn write).

    >>> import tempfile
    >>> file = Path(tempfile.mkdtemp()) / "f"; _ = file.write_bytes(b"abc")
    >>> truncate(file, 1); file.read_bytes()
    b'a'
    """
    os.truncate(file, size)


def damage_object(path: Path, how: str, victim: str, other: str = "") -> set[str]:
    """Damage chunk object `victim` (relative to the store) the way `how` names (one of
    :data:`CHUNK_DAMAGE`; "swap" exchanges it with `other`); return the objects whose
    content is now wrong or gone.

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.arange(512.0 * 70)}).result()  # 70 chunk objects
    >>> a, b = sorted(chunk_references(snap.path))[:2]
    >>> sorted(damage_object(snap.path, "swap", a, b)) == [a, b]
    True
    """
    file, other_file = path / victim, path / other
    if how == "flip-bit":
        flip_bit(file, len(file.read_bytes()) // 2, 3)
    elif how == "flip-last-bit":
        flip_bit(file, -1, 7)
    elif how == "truncate":
        truncate(file, len(file.read_bytes()) // 2)
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "delete":
        file.unlink()
    elif how == "swap":
        first, second = file.read_bytes(), other_file.read_bytes()
        file.write_bytes(second)
        other_file.write_bytes(first)
        return {victim, other}
    elif how == "replace-with-directory":
        file.unlink()
        file.mkdir()
    else:
        raise ValueError(f"unknown damage {how!r}: use one of {', '.join(CHUNK_DAMAGE)}")
    return {victim}


def damage_baselines(path: Path, how: str, chooser: random.Random) -> str:
    """Damage the baselines of the store at `path` the way `how` names (one of
    :data:`BASELINE_DAMAGE`); return what was done. Without baseline files, the marker is
    flipped instead.

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s") as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}).result()
    >>> damage_baselines(snap.path, "delete", random.Random(0)), baseline_files(snap.path)
    ('delete', [])
    """
    files = baseline_files(path)
    victim = chooser.choice(files) if files else None
    if victim is None and not how.startswith("marker-"):
        how = "marker-flip"
    marker = path / "mirror" / "state.json"
    if how in ("flip", "flip-many") and victim is not None:
        flip_bits(victim, chooser, 1 if how == "flip" else chooser.randint(2, 30))
    elif how == "truncate" and victim is not None:
        truncate(victim, chooser.randrange(max(1, victim.stat().st_size)))
    elif how == "extend" and victim is not None:
        with victim.open("ab") as handle:
            handle.write(b"\0" * chooser.randint(1, 4096))
    elif how == "delete" and victim is not None:
        victim.unlink()
    elif how == "marker-flip":
        if marker.exists():
            flip_bits(marker, chooser, chooser.randint(1, 3))
    elif how == "marker-garbage":
        marker.write_bytes(chooser.randbytes(chooser.randint(0, 200)))
    elif how == "marker-delete":
        marker.unlink(missing_ok=True)
    else:
        raise ValueError(f"unknown damage {how!r}: use one of {', '.join(BASELINE_DAMAGE)}")
    return how
