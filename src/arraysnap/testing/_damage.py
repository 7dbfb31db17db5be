"""Looking at a local store from outside, and damaging it the ways disks and people do.

Everything here reads the files themselves (manifests are JSON), never a ``Store``'s
internals, so a test can name exactly the file it damages.

>>> import tempfile, numpy as np, arraysnap
>>> path = Path(tempfile.mkdtemp()) / "run.snap"
>>> with arraysnap.open(path, chunk_bytes=4096) as snap:
...     _ = snap.capture({"u": np.arange(1024.0)}, step=1)
>>> victim = chunk_file(path, 1, "u", 1)
>>> victim.relative_to(path).parts[0], object_intact(path, victim)
('chunks', True)
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
from pathlib import Path
from typing import Any

import blake3

from arraysnap.codecs import CodecSpec, parse_codec
from arraysnap.extents import read_extents
from arraysnap.leases import LEASES, LockFile, lock_byte

__all__ = ["BASELINE_DAMAGE", "CHUNK_DAMAGE", "chunk_file", "chunk_references", "damage_baselines",
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


def _digests(record: dict[str, Any]) -> bytes:
    return base64.b64decode(record["chunks"])


def chunk_file(path: Path, seq: int, array: str, index: int) -> Path:
    """The file of chunk `index` of `array` in snapshot `seq` of the local store at `path`,
    from the manifest file itself (see the module doc for an example).

    >>> import tempfile
    >>> chunk_file(Path(tempfile.mkdtemp()), 1, "u", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...
    """
    body = json.loads((path / "snapshots" / f"{seq:012d}.json").read_bytes())
    digests = _digests(body["arrays"][array])
    if not 0 <= index < len(digests) // DIGEST_BYTES:
        raise IndexError(f"array {array!r} of snapshot {seq} has "
                         f"{len(digests) // DIGEST_BYTES} chunks, not chunk {index}")
    hexdigest = digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES].hex()
    return path / "chunks" / hexdigest[:2] / hexdigest[2:]


def chunk_references(path: Path) -> dict[str, list[tuple[int, str, int]]]:
    """Object path (relative to the store) -> every (seq, array, chunk) whose manifest uses it.

    >>> import tempfile, numpy as np, arraysnap
    >>> with arraysnap.open(Path(tempfile.mkdtemp()) / "s", chunk_bytes=4096) as snap:
    ...     _ = snap.capture({"u": np.zeros(1024)}).result()
    ...     sorted(chunk_references(snap.path).values())
    [[(1, 'u', 0), (1, 'u', 1)]]
    """
    refs: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for seq, data in sorted(manifest_files(path).items()):
        body = json.loads(data)
        for name, record in body["arrays"].items():
            digests = _digests(record)
            for index in range(len(digests) // DIGEST_BYTES):
                hexdigest = digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES].hex()
                refs[f"chunks/{hexdigest[:2]}/{hexdigest[2:]}"].append((seq, name, index))
    return refs


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
    bytes its name (a blake3 digest) promises (see the module doc)."""
    relative = Path(obj).relative_to(path).as_posix() if Path(obj).is_absolute() else str(obj)
    try:
        raw = (codec or store_codec(path)).decode((path / relative).read_bytes())
    except Exception:  # noqa: BLE001 - any failure to read or decode means damaged
        return False
    return blake3.blake3(raw).hexdigest() == relative.replace("chunks/", "").replace("/", "")


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
    ...     _ = snap.capture({"u": np.arange(1024.0)}).result()
    >>> a, b = sorted(chunk_references(snap.path))
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
