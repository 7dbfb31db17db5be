"""Opening a store: its settings file, creating a new one, and recovery after a killed writer.

>>> import tempfile
>>> from arraysnap.codecs import parse_codec
>>> from arraysnap.storage import LocalStorage
>>> storage = LocalStorage(tempfile.mkdtemp() + "/s.snap")
>>> create_store(storage, parse_codec("zstd")).chunk_bytes
1048576
>>> read_settings(storage, codec=None).codec.name
'zstd'
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..baselines import Baselines
from ..bulk import paused_collector
from ..chunks import assemble, find_bad_chunks, load_chunk
from ..codecs import CodecSpec, parse_codec
from ..errors import CorruptSnapshotError, FormatVersionError
from ..manifest import ArrayEntry, Manifest
from ..objects import ChunkObjects
from ..storage import Storage

__all__ = ["DEFAULT_CHUNK_BYTES", "FORMAT_NAME", "FORMAT_VERSION", "SETTINGS_KEY", "Recovered",
           "Settings", "create_store", "not_a_store", "read_settings", "recover_baselines",
           "upgrade_settings"]

log = logging.getLogger("arraysnap")

FORMAT_NAME = "arraysnap"
# 4: table nodes in packs too (arraysnap.tablewriter); 3: small chunks in pack objects
# (arraysnap.packs); 2: table objects (arraysnap.tables); 1: whole tables in manifests
FORMAT_VERSION = 5
DEFAULT_CHUNK_BYTES = 1 << 20
SETTINGS_KEY = "arraysnap.json"
_MAX_SETTINGS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Settings:
    """What a store fixes at creation: its codec and default chunk size; and its format
    version (a writer writes what that version holds; ``upgrade_store`` raises it)."""

    codec: CodecSpec
    chunk_bytes: int
    version: int = FORMAT_VERSION
    # A random name given at creation (stores made before it have none): what a baseline
    # folder outside the store records, so it is never taken for another store's.
    store_id: str | None = None
    # The id of the store this one was made a copy or tier of (``copied_from_id``).
    source_id: str | None = None

    def related(self, other: Settings) -> bool:
        """Whether this store and `other` are known to hold one history: one is the
        other's copy or tier, or both are of one source."""
        mine, theirs = (self.store_id, self.source_id), (other.store_id, other.source_id)
        return any(a is not None and a == b for a in mine for b in theirs)


def read_settings(storage: Storage, codec: str | None) -> Settings | None:
    """The settings of the store in `storage`, or None if there is no store there yet.

    `codec`, if given, must be the store's own: a store keeps one codec for life.
    """
    where = f"{storage.describe()}/{SETTINGS_KEY}"
    try:
        data = storage.get(SETTINGS_KEY, limit=_MAX_SETTINGS_BYTES)
    except FileNotFoundError:
        return None
    except OSError as err:
        if storage.local_path is None:
            # An object store that cannot be reached is not a damaged store.
            raise OSError(err.errno, f"{where} cannot be read: {err.strerror}; check the "
                          "store's URL, its storage_options (endpoint, region, credentials, "
                          "allow_http) and the network") from err
        raise CorruptSnapshotError(f"{where} cannot be read: {err}") from None
    try:
        settings = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise CorruptSnapshotError(f"{where} cannot be read: {err}") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT_NAME:
        raise CorruptSnapshotError(f"{where} is not an arraysnap format file")
    version = settings.get("version")
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise FormatVersionError(
            f"{storage.describe()} has store format version {version!r}; this arraysnap "
            f"{__version__} reads format version {FORMAT_VERSION} and older; upgrade arraysnap"
        )
    stored = settings.get("codec")
    chunk_bytes = settings.get("chunk_bytes")
    try:
        stored_codec = parse_codec(stored)
    except (TypeError, ValueError) as err:
        raise CorruptSnapshotError(f"{where}: bad codec: {err}") from None
    if type(chunk_bytes) is not int or chunk_bytes < 1:
        raise CorruptSnapshotError(f"{where}: bad chunk_bytes {chunk_bytes!r}")
    store_id, source_id = settings.get("id"), settings.get("copied_from_id")
    for name, value in (("id", store_id), ("copied_from_id", source_id)):
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= 64):
            raise CorruptSnapshotError(f"{where}: bad {name} {value!r}")
    if codec is not None and parse_codec(codec) != stored_codec:
        raise ValueError(
            f"{storage.describe()} was created with codec "
            f"{stored_codec.name}:{stored_codec.level}; open it without codec= (or with that "
            f"codec), or start a new store for {codec!r}"
        )
    return Settings(stored_codec, chunk_bytes, version, store_id, source_id)


def not_a_store(storage: Storage) -> FileNotFoundError:
    """The error for a reader pointed at `storage`, where there is no store.

    >>> from arraysnap.storage import LocalStorage
    >>> print(not_a_store(LocalStorage("/no/such/run.snap")))
    /no/such/run.snap does not exist: give the folder of an arraysnap store (mode='a' creates one)
    """
    path = storage.local_path
    if path is None:
        return FileNotFoundError(f"{storage.describe()} holds no arraysnap store (no "
                                 "arraysnap.json under it): give the URL of a store "
                                 "(mode='a' creates one)")
    if not path.exists():
        return FileNotFoundError(f"{path} does not exist: give the folder of an arraysnap store "
                                 "(mode='a' creates one)")
    return FileNotFoundError(f"{path} is not an arraysnap store (no arraysnap.json in it): give "
                             "the folder that arraysnap.open() created")


def create_store(storage: Storage, codec: CodecSpec, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, version: int = FORMAT_VERSION,
                 copied_from: Storage | None = None,
                 source: Settings | None = None) -> Settings:
    """Make a new, empty store in `storage`; its settings file is written last. A copy's
    destination, or a tier, records where it came from (`copied_from`, its `source`'s
    settings), whose chunk size and format version it takes."""
    if source is not None:
        chunk_bytes, version = source.chunk_bytes, source.version
    storage.create()
    store_id = uuid.uuid4().hex
    settings: dict[str, object] = {
        "format": FORMAT_NAME, "version": version, "chunk_bytes": chunk_bytes,
        "codec": codec.to_json(), "id": store_id, "created": time.time(),
        "created_by": f"arraysnap {__version__}"}
    source_id = None if source is None else source.store_id
    if copied_from is not None:
        settings["copied_from"] = copied_from.describe()
    if source_id is not None:
        settings["copied_from_id"] = source_id
    storage.put_atomic(SETTINGS_KEY, json.dumps(settings).encode())
    storage.barrier()  # the store's own name, in the folder that holds it
    return Settings(codec, chunk_bytes, version, store_id, source_id)


def upgrade_settings(storage: Storage) -> int:
    """Record the current format version in the store's settings (the caller holds the
    writer's lock); return the version it had. Nothing else is rewritten: every version
    this arraysnap writes reads the older manifests of the store too."""
    settings = json.loads(storage.get(SETTINGS_KEY, limit=_MAX_SETTINGS_BYTES))
    old = settings["version"]
    if old < FORMAT_VERSION:
        settings.update(version=FORMAT_VERSION, upgraded=time.time(),
                        upgraded_by=f"arraysnap {__version__}")
        storage.put_atomic(SETTINGS_KEY, json.dumps(settings).encode())
        storage.barrier()
    return old  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Recovered:
    """What recovery found: the snapshot the baselines now equal, and its usable tables."""

    head: Manifest | None
    # The head's arrays whose baselines hold its bytes; an array left out is written whole
    # by the next capture (its baseline could not be rebuilt).
    tables: dict[str, ArrayEntry]


def recover_baselines(head: Manifest | None, baselines: Baselines, objects: ChunkObjects,
                      codec: CodecSpec, pool: ThreadPoolExecutor, *,
                      distrust: bool = False) -> Recovered:
    """Make the baselines equal `head`, the newest committed snapshot (a killed writer may
    have left them ahead of it, half-updated, or gone); drop those that cannot be. With
    `distrust` (a local tier whose history was just replaced: its seqs now name other
    snapshots), a clean marker is not believed either: every baseline is compared."""
    if head is None:
        baselines.clear_directory()
        return Recovered(None, {})
    tables = dict(head.arrays)
    marker = baselines.read_marker()
    if marker is not None and not baselines.owns(marker):
        # A baseline folder last used for another store: nothing in it is this store's.
        baselines.clear_directory()
        marker = None
    trusted = not distrust and baselines.trusted_seq(marker) == head.seq
    # A dirty marker: a capture was under way when the writer stopped (killed, or its
    # process ended). Its changes were never committed; rolling them back is routine.
    interrupted = marker is not None and marker.get("clean") is False
    # A clean marker of an older snapshot: another writer (on another node, with baselines
    # of its own) has moved the store on since; catching up is routine too.
    behind = (marker is not None and marker.get("clean") is True
              and type(marker.get("seq")) is int and marker["seq"] < head.seq)
    with paused_collector():
        adopted = baselines.adopt({name: entry.layout for name, entry in head.arrays.items()},
                                  marker)
    repaired = False
    rolled_back: dict[str, int] = {}
    unusable: dict[str, CorruptSnapshotError] = {}
    for name, entry in head.arrays.items():
        try:
            if name not in adopted:
                if entry.n_chunks:  # one real chunk vouches for the size before allocating
                    load_chunk(objects, codec, entry, 0, verify=True, seq=head.seq)
                target = baselines.baseline(name, entry.layout)
                assemble(target.buffer, objects, codec, entry, pool, verify=True, seq=head.seq)
                repaired = True
            elif not trusted:
                bad = find_bad_chunks(baselines.flat(name), entry, pool)
                if bad:
                    target = baselines.baseline(name, entry.layout)
                    assemble(target.buffer, objects, codec, entry, pool, verify=True,
                             seq=head.seq, indices=bad)
                    rolled_back[name] = len(bad)
                repaired = True
        except CorruptSnapshotError as err:
            # The newest snapshot itself is damaged: the next capture of this array is
            # written whole, and verify() reports the damage.
            unusable[name] = err
            baselines.forget(name)
            tables.pop(name, None)
    if unusable:
        names = sorted(unusable)
        log.error("arraysnap: cannot rebuild the baselines of %d arrays of snapshot %d (the "
                  "next capture writes them whole; verify() reports the damage): %s%s",
                  len(names), head.seq,
                  "; ".join(f"{name!r}: {unusable[name]}" for name in names[:5]),
                  f"; and {len(names) - 5} more" if len(names) > 5 else "")
    if rolled_back:
        _report_rollback(baselines.dir.parent, head.seq, rolled_back,
                         "behind" if behind else "interrupted" if interrupted else "")
    baselines.remove_strays()
    if repaired or not trusted or not baselines.table_on_disk():
        try:
            baselines.mark_clean(head.seq)
        except OSError as err:
            # A full disk: the baselines are right, only unmarked; the next open checks
            # them again instead of trusting them.
            log.warning("arraysnap: could not mark the rebuilt baselines clean: %r", err)
    return Recovered(head, tables)


def _report_rollback(where: Path, seq: int, chunks: dict[str, int], why: str) -> None:
    """One line for all the arrays recovery put back (not one per array: a store may have
    thousands); `why` is "interrupted", "behind" or "" (damage: a warning)."""
    names = sorted(chunks)
    shown = ", ".join(f"{name!r} ({chunks[name]})" for name in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    total = sum(chunks.values())
    if why == "interrupted":
        log.info("arraysnap: %s: %d chunks of %d arrays (%s%s) held changes of a capture "
                 "that was interrupted before it committed; they are back at snapshot %d, "
                 "the latest committed", where, total, len(names), shown, more, seq)
    elif why == "behind":
        log.info("arraysnap: %s: %d chunks of %d arrays (%s%s) were of an older snapshot "
                 "(the store was written elsewhere since); brought up to snapshot %d",
                 where, total, len(names), shown, more, seq)
    else:
        log.warning("arraysnap: %s: %d chunks of %d baselines (%s%s) did not match snapshot "
                    "%d; repaired from its chunk objects", where, total, len(names), shown,
                    more, seq)
