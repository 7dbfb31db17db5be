"""Coverage-guided fuzzing (atheris) of every parser of store contents.

Each target feeds arbitrary bytes to one reader of what a store holds, the way a damaged
or hostile store would, and accepts only the errors that reader documents (a
``CorruptSnapshotError`` naming what is wrong, and the like); anything else (a
``TypeError``, a ``KeyError``, a crash, a hang) is a finding, and atheris stops there with
the input that caused it. The targets:

- ``manifest``: a manifest file's bytes (``parse_manifest``, tables read from a real store);
- ``manifest-sealed``: the same, with a checksum that matches whatever the input holds, as a
  hostile writer would compute (otherwise almost every input stops at the checksum);
- ``table``: a table object under its own digest (any content has a valid name), read as a
  leaf and as an inner node of a tree;
- ``settings``: ``arraysnap.json``; ``replaylog``: two replay-log segments;
- ``history``: ``history.jsonl`` (never raises: damaged lines are skipped);
- ``extents``: the baseline marker and extent table a reader trusts;
- ``zarr-key``: a key asked of the zarr adapter; ``snap-spec``: the CLI's SNAP syntax.

The seeds are the real contents of a store made at start (``seed_store``).

    python -m arraysnap.testing.fuzz manifest-sealed --seconds 600   # a long run
    python -m arraysnap.testing.fuzz table --runs 2000                 # the suite's kind

>>> sorted(TARGETS)[:3]
['extents', 'history', 'manifest']
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np

import arraysnap
from arraysnap._store.opening import read_settings
from arraysnap.errors import ArraysnapError, CorruptSnapshotError, FormatVersionError
from arraysnap.extents import MARKER, TABLE, TABLE_DIGEST, read_extents, read_mirror, table_digest
from arraysnap.history import History
from arraysnap.manifest import parse_manifest, seal_manifest
from arraysnap.objects import pack_key
from arraysnap.packs import Location
from arraysnap.replaylog import ReplayLog, record_line
from arraysnap.storage import LocalStorage
from arraysnap.tables import TableReader
from arraysnap.zarr_view import SnapshotZarrStore

__all__ = ["TARGETS", "main", "seed_store"]


class _Contents:
    """Storage that holds a few keys in memory: what the readers under test ask of one."""

    local_path = None  # no folder: as an object store

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values

    def describe(self) -> str:
        return "fuzz"

    def get(self, key: str, *, limit: int = 1 << 30) -> bytes:
        if key not in self.values:
            raise FileNotFoundError(key)
        data = self.values[key]
        if len(data) > limit:
            raise OSError(f"{len(data)} bytes, more than {limit}")
        return data

    def list_prefix(self, prefix: str) -> Iterator[str]:
        return iter(sorted(key for key in self.values if key.startswith(prefix)))


def seed_store(directory: Path) -> Path:
    """A store of every kind of content (a table tree, packs, a replay log, history, a
    baseline marker), for seeds and for the targets that need a store."""
    path = directory / "seed.snap"
    rng = np.random.default_rng(0)
    arrays = {f"a{i:03d}": rng.random(8) for i in range(80)}
    arrays["big"] = np.arange(1 << 17, dtype=np.float64)
    with arraysnap.open(path, chunk_bytes=1 << 12) as snap:
        for step in range(3):
            arrays[f"a{step:03d}"] += 1.0
            snap.log({"step": step})
            snap.capture(arrays, step=step, state={"t": step / 2})
        snap.wait()
    return path


class _Seeds:
    """What the seed store holds, read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.storage = LocalStorage(path)
        self.manifests = [self.storage.get(key) for key in
                          self.storage.list_prefix("snapshots/")]
        # Every table object, of its own or (format 4) a node in a pack, by its digest.
        self.tables = {blake3.blake3(data).digest(): data for data in
                       (self.storage.get(key) for key in self.storage.list_prefix("tables/"))}
        for manifest in self.manifests:
            parse_manifest(manifest, None, TableReader(self._read_node))
        self.settings = self.storage.get("arraysnap.json")
        self.journal = [self.storage.get(key) for key in self.storage.list_prefix("journal/")]
        self.history = self.storage.get("history.jsonl")
        self.marker = (path / "mirror" / MARKER).read_bytes()
        self.extents = (path / "mirror" / TABLE).read_bytes()
        self.scratch = path.parent / "extents"
        self.scratch.mkdir(exist_ok=True)

    def _read_node(self, digest: bytes, location: Location | None) -> bytes:
        if location is None:
            return self.fetch(digest)
        data = self.storage.get_range(pack_key(location.pack), location.offset, location.length)
        self.tables[digest] = data
        return data

    def fetch(self, digest: bytes, location: Location | None = None) -> bytes:
        """A table object by its digest, wherever the store keeps it."""
        found = self.tables.get(digest)
        if found is None:  # as the catalog says of a missing table object
            raise ValueError(f"table object {digest.hex()[:16]} is missing")
        return found


_seeds: _Seeds | None = None
_workdir: Path | None = None  # where the seed store goes (main: beside the corpus)


def _state() -> _Seeds:
    global _seeds
    if _seeds is None:
        directory = _workdir or Path(tempfile.mkdtemp(prefix="arraysnap-fuzz-"))
        _seeds = _Seeds(seed_store(directory))
    return _seeds


# -- structure-aware inputs -----------------------------------------------------------------
# Byte-level mutations of JSON rarely stay JSON, and the C parts of the readers (the leaf
# kernel) give the fuzzer no coverage to climb: the JSON targets also take a seed's
# structure and replace a node the input picks with a value the input makes, of any type.
_ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**63, -(2**63) - 1, 10**400, 0.5,
                          -0.0, 1e308, "", "a", "a/b", "..", "__x", "zarr.json", "\x00", [],
                          {}, [0], [None], {"": None}, "AAAA", "=" * 8, [-1, 0, 0]]


def _value(data: Any, depth: int = 0) -> Any:
    kind = data.ConsumeIntInRange(0, 7 if depth < 3 else 4)
    if kind == 0:
        return _ODD_VALUES[data.ConsumeIntInRange(0, len(_ODD_VALUES) - 1)]
    if kind == 1:
        return data.ConsumeInt(data.ConsumeIntInRange(1, 10))
    if kind == 2:
        return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 40))
    if kind == 3:
        return data.ConsumeFloat()
    if kind == 4:
        return base64.b64encode(data.ConsumeBytes(data.ConsumeIntInRange(0, 64))).decode()
    if kind == 5:
        return [_value(data, depth + 1) for _ in range(data.ConsumeIntInRange(0, 4))]
    if kind == 6:
        return {data.ConsumeUnicodeNoSurrogates(8): _value(data, depth + 1)
                for _ in range(data.ConsumeIntInRange(0, 3))}
    return []


def _mutated(seed: Any, data: Any) -> Any:
    """`seed` (parsed JSON) with a few nodes the input picks replaced, dropped or added."""
    for _ in range(data.ConsumeIntInRange(1, 4)):
        node, path = seed, []
        while isinstance(node, (dict, list)) and node and data.ConsumeBool():
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = keys[data.ConsumeIntInRange(0, len(keys) - 1)]
            path.append((node, key))
            node = node[key]
        if not path:
            seed = _value(data)
            continue
        parent, key = path[-1]
        action = data.ConsumeIntInRange(0, 3)
        if action == 0 and isinstance(parent, dict):
            del parent[key]
        elif action == 1 and isinstance(parent, list):
            parent.insert(int(key), _value(data))
        elif action == 2 and isinstance(parent, dict):
            parent[data.ConsumeUnicodeNoSurrogates(12)] = _value(data)
        else:
            parent[key] = _value(data)
    return seed


def _structured(seeds: list[bytes], data: bytes) -> Any:
    """A seed's JSON, mutated as the input says (None if the seed is not JSON)."""
    import atheris

    provider = atheris.FuzzedDataProvider(data)
    if not seeds:
        return None
    seed = seeds[provider.ConsumeIntInRange(0, len(seeds) - 1)]
    try:
        parsed = json.loads(seed)
    except ValueError:
        return None
    return _mutated(parsed, provider)


def _encode(value: Any) -> bytes | None:
    try:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        return None


# -- the targets ---------------------------------------------------------------------------
def _manifest(data: bytes) -> None:
    try:
        parse_manifest(data, None, TableReader(_state().fetch))
    except (CorruptSnapshotError, FormatVersionError):
        pass


def _manifest_sealed(data: bytes) -> None:
    body = _structured(_state().manifests, data)
    if not isinstance(body, dict):
        return
    try:
        sealed = seal_manifest(body)
    except (ValueError, TypeError, RecursionError):  # not JSON a checksum can cover
        return
    _manifest(sealed)


def _table(data: bytes) -> None:
    _table_object(data)
    structured = _encode(_structured(list(_state().tables.values()), data))
    if structured is not None:
        _table_object(structured)


def _table_object(data: bytes) -> None:
    digest = blake3.blake3(data).digest()
    seeds = _state()
    reader = TableReader(lambda wanted, location: data if wanted == digest
                         else seeds.fetch(wanted))
    ref = base64.b64encode(digest).decode("ascii")
    pack = base64.b64encode(bytes(16)).decode("ascii")
    for depth in (1, 2):
        packed = ["a000", 1, ref, 0, 0, len(data)]
        for version, child in ((3, ["a000", 1, ref]), (4, packed), (5, packed)):
            try:  # as an object of its own, and as a node in a pack (leaves by row, by column)
                reader.read({"arrays": 1, "depth": depth, "packs": [pack], "children": [child]}
                            if version >= 4 else
                            {"arrays": 1, "depth": depth, "children": [child]}, version)
            except ValueError:
                pass


def _settings(data: bytes) -> None:
    structured = _encode(_structured([_state().settings], data))
    for value in (data, structured):
        if value is None:
            continue
        try:
            read_settings(_Contents({"arraysnap.json": value}), None)  # type: ignore[arg-type]
        except (CorruptSnapshotError, FormatVersionError):
            pass


def _replaylog(data: bytes) -> None:
    seeds = _state()
    first, _, second = data.partition(b"\x00")
    _segments({0: first, 2: second} if second else {0: first})
    # Lines whose checks hold, the first record one the input makes: as a hostile writer
    # would write them.
    records = [json.loads(line)["r"] for line in b"".join(seeds.journal).splitlines()]
    records[:1] = [_structured([_encode(record) or b"" for record in records], data)]
    texts = [_encode(record) for record in records]
    _segments({0: b"".join(record_line(number, text.decode()).encode()
                           for number, text in enumerate(texts) if text is not None)})


def _segments(segments: dict[int, bytes]) -> None:
    contents = {f"journal/{first:016d}.jsonl": data for first, data in segments.items()}
    log = ReplayLog(_Contents(contents), writable=False)  # type: ignore[arg-type]
    for position in (0, 1, 2, 5):
        try:
            log.read_from(position)
        except CorruptSnapshotError:
            pass


def _history(data: bytes) -> None:
    lines = _state().history.splitlines()
    line = _encode(_structured(lines, data))
    for value in (data, b"\n".join([*lines[:1], line or b""])):
        History(_Contents({"history.jsonl": value})).read()  # type: ignore[arg-type]


def _extents(data: bytes) -> None:
    seeds = _state()
    _extent_files(data)
    table = _encode(_structured([seeds.extents], data))
    if table is not None:
        _extent_files(seeds.marker + b"\x00" + table)


def _extent_files(data: bytes) -> None:
    marker, _, table = data.partition(b"\x00")
    directory = _state().scratch  # this process's own: fuzzers may run side by side
    (directory / TABLE).write_bytes(table)
    try:
        parsed = json.loads(marker.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return
    if isinstance(parsed, dict):
        for current_only in (False, True):
            read_extents(directory, parsed, current_only=current_only)
        read_mirror(directory, parsed)
        # Sealed as its writer would have: the layouts' checks, not the digest, decide.
        read_mirror(directory, {**parsed, TABLE_DIGEST: table_digest(table)})


_zarr: SnapshotZarrStore | None = None


def _zarr_key(data: bytes) -> None:
    global _zarr
    if _zarr is None:
        _zarr = arraysnap.open_zarr(_state().path).store  # type: ignore[assignment]
    assert _zarr is not None
    key = data.decode("utf-8", "replace")
    asyncio.run(_zarr.get(key))  # None, or the checked bytes of a key it has
    asyncio.run(_zarr.exists(key))


_reader: arraysnap.Store | None = None


def _snap_spec(data: bytes) -> None:
    global _reader
    if _reader is None:
        _reader = arraysnap.open(_state().path, mode="r")
    spec = data.decode("utf-8", "replace")
    for value in (spec, int.from_bytes(data[:8], "little", signed=True)):
        try:
            _reader.snapshot(value)
        except (ValueError, ArraysnapError):  # no such form; no such snapshot
            pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": _manifest, "manifest-sealed": _manifest_sealed, "table": _table,
    "settings": _settings, "replaylog": _replaylog, "history": _history,
    "extents": _extents, "zarr-key": _zarr_key, "snap-spec": _snap_spec,
}


def seeds_of(target: str) -> list[bytes]:
    """The real contents a target starts from."""
    seeds = _state()
    return {
        "manifest": seeds.manifests, "manifest-sealed": seeds.manifests,
        "table": list(seeds.tables.values()), "settings": [seeds.settings],
        "replaylog": [b"\x00".join(seeds.journal[:2]) or b""],
        "history": [seeds.history], "extents": [seeds.marker + b"\x00" + seeds.extents],
        "zarr-key": [b"zarr.json", b"a000/zarr.json", b"big/c/3", b"a001/c/0"],
        "snap-spec": [b"latest", b"2", b"step:1", b"~1", b"-2"],
    }[target]


def _instrument_arraysnap(atheris: Any) -> None:
    """Coverage for arraysnap's own Python code only (all of NumPy's and zarr's as well
    took longer than a short run itself)."""
    seen: set[int] = set()

    def instrument(namespace: dict[str, Any]) -> None:
        for value in list(namespace.values()):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if inspect.isfunction(value) and value.__module__.startswith("arraysnap"):
                atheris.instrument_func(value)
            elif inspect.isclass(value) and value.__module__.startswith("arraysnap"):
                instrument(dict(vars(value)))
                for member in vars(value).values():
                    if isinstance(member, property):
                        instrument({"get": member.fget, "set": member.fset})

    for name, module in list(sys.modules.items()):
        if name.startswith("arraysnap") and module is not None:
            instrument(dict(vars(module)))


def main(argv: list[str] | None = None) -> int:
    """Fuzz one target for `--runs` inputs or `--seconds` (atheris; exits 0 when nothing
    was found)."""
    parser = argparse.ArgumentParser(prog="python -m arraysnap.testing.fuzz")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--corpus", type=Path, default=None,
                        help="kept between runs; the seed store is made beside it")
    args = parser.parse_args(argv)
    import atheris  # the test extra; only the fuzzer needs it

    global _workdir
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="arraysnap-fuzz-")) / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    _workdir = corpus.parent
    for index, seed in enumerate(seeds_of(args.target)):
        (corpus / f"seed-{index}").write_bytes(seed)
    options = [f"-max_len={1 << 16}", "-timeout=20", "-rss_limit_mb=4096"]
    if args.runs is not None:
        options.append(f"-runs={args.runs}")
    if args.seconds is not None:
        options.append(f"-max_total_time={args.seconds}")
    target = TARGETS[args.target]
    logging.getLogger("arraysnap").setLevel(logging.CRITICAL)  # damage is the point here
    _state()  # the seed store, made before the coverage counts
    _instrument_arraysnap(atheris)
    atheris.Setup([sys.argv[0], *options, str(corpus)], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
