"""Maintenance: verify, retention (prune), gc, and the one model of a store's size.

Everything that reads every snapshot or deletes anything lives here. Deleting a chunk
object or a pack goes through the engine's :class:`~arraysnap.pins.Pins`, so an object an
in-flight capture relies on is never deleted from under it. A pack (format 3) is kept, and
counted, whole while any snapshot uses a chunk of it.

>>> import arraysnap, numpy as np, tempfile
>>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap", codec="none") as snap:
...     _ = snap.capture({"u": np.zeros(4), "v": np.ones(4)})  # one pack of u and v
...     _ = snap.capture({"u": np.zeros(4), "v": np.full(4, 2.0)})  # and one of v
...     snap.wait()
...     [(s.unique_bytes, s.shared_bytes) for s in snap.disk_usage().snapshots]
[(0, 64), (32, 64)]
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

from ..baselines import Baselines
from ..chunks import load_chunk
from ..codecs import CodecSpec
from ..commit import manifest_key
from ..errors import ArraysnapError, CorruptSnapshotError
from ..manifest import Manifest
from ..objects import ChunkObjects, pack_key
from ..packs import PACK_ID_BYTES, Location
from ..pins import Pins
from ..replaylog import ReplayLog
from ..results import Problem, PruneReport, SnapshotUsage, StoreUsage, VerifyReport
from ..retention import Candidate, Retention
from ..storage import Storage
from .catalog import Catalog

__all__ = ["DEFAULT_GRACE_SECONDS", "Maintenance", "Progress", "Usage", "grace_of",
           "stored_objects"]

log = logging.getLogger("arraysnap")

Progress = Callable[[int, int], None]


# In object storage, what a removed snapshot named outlives it this long (see prune).
DEFAULT_GRACE_SECONDS = 600.0
# Clocks of hosts and of the store are taken to differ by less than this (as the lease
# takes them to: a quarter of it); a grace is extended by it (or by itself, if shorter).
CLOCK_MARGIN_SECONDS = 15.0


def grace_of(storage: Storage, grace_seconds: float | None) -> float:
    """The grace period of a store in `storage`: `grace_seconds`, else 600 s in object
    storage (readers elsewhere) and none in a folder.

    >>> from arraysnap.storage import LocalStorage
    >>> grace_of(LocalStorage("/tmp/s.snap"), None), grace_of(LocalStorage("/x"), 5)
    (0.0, 5.0)
    """
    if grace_seconds is not None:
        return float(grace_seconds)
    return 0.0 if storage.local_path is not None else DEFAULT_GRACE_SECONDS


def stored_objects(manifest: Manifest) -> set[bytes]:
    """The objects a snapshot's chunks and (format 4) table nodes are in: chunk objects by
    digest, packs by id (a pack is kept, and counted, whole while any snapshot uses a chunk
    or a node of it)."""
    return manifest.chunk_digests() | manifest.pack_ids() | manifest.table_packs


class Usage:
    """The size of a set of snapshots (their chunk objects, packs and manifests), as some
    are taken away: what retention's ``max_bytes`` weighs and what ``disk_usage()`` reports.

    >>> class M:  # a stand-in manifest: two snapshots sharing object b"a"
    ...     table_packs = frozenset()
    ...     def __init__(self, digests): self.digests = digests
    ...     def chunk_digests(self): return self.digests
    ...     def pack_ids(self): return set()
    >>> usage = Usage({1: (M({b"a", b"b"}), 10), 2: (M({b"a"}), 10)}, lambda d: 100)
    >>> usage.total, usage.size_without([1])
    (220, 110)
    """

    def __init__(self, manifests: Mapping[int, tuple[Manifest, int]],
                 size_of: Callable[[bytes], int]) -> None:
        # A snapshot's objects: chunk objects by digest (32 bytes) and packs by id (16).
        self._sets = {seq: stored_objects(manifest) for seq, (manifest, _) in manifests.items()}
        self._manifest_bytes = {seq: size for seq, (_, size) in manifests.items()}
        self.refs: Counter[bytes] = Counter()
        for digests in self._sets.values():
            self.refs.update(digests)
        self.sizes = {digest: size_of(digest) for digest in self.refs}
        self.total = sum(self.sizes.values()) + sum(self._manifest_bytes.values())
        self._removed: set[int] = set()

    def size_without(self, doomed: Iterable[int]) -> int:
        """The size once the snapshots `doomed` (seqs) are gone, with those before."""
        for seq in doomed:
            if seq in self._removed:
                continue
            self._removed.add(seq)
            self.total -= self._manifest_bytes[seq]
            for digest in self._sets[seq]:
                self.refs[digest] -= 1
                if self.refs[digest] == 0:
                    self.total -= self.sizes[digest]
        return self.total

    def snapshots(self, steps: Mapping[int, int | None],
                  chunks: Mapping[int, int]) -> list[SnapshotUsage]:
        """One row a snapshot, oldest first: what it uses, alone, shared and first added."""
        seen: set[bytes] = set()
        rows = []
        for seq in sorted(self._sets):
            digests = self._sets[seq]
            total = sum(self.sizes[d] for d in digests)
            unique = sum(self.sizes[d] for d in digests if self.refs[d] == 1)
            new = sum(self.sizes[d] for d in digests - seen)
            seen |= digests
            rows.append(SnapshotUsage(seq, steps[seq], chunks[seq], total, unique,
                                      total - unique, new, self._manifest_bytes[seq]))
        return rows


class Maintenance:
    """Verify, prune and collect garbage in one store (a writer's, for anything that deletes)."""

    def __init__(self, catalog: Catalog, objects: ChunkObjects, codec: CodecSpec,
                 baselines: Baselines, *, pins: Pins | None = None,
                 replay_log: ReplayLog | None = None,
                 retention: Retention | None = None,
                 tables: ChunkObjects | None = None,
                 withheld: Callable[[], Collection[int]] | None = None,
                 grace: float = 0.0) -> None:
        self.catalog = catalog
        self.objects = objects
        self.tables = tables  # the table objects (format 2), deleted with what uses them
        self.codec = codec
        self.baselines = baselines
        self.pins = pins
        self.replay_log = replay_log
        self.retention = retention or Retention()
        self._object_sizes: dict[bytes, int] = {}  # content-addressed: a size never changes
        # Seqs retention must keep whatever its rules say (a local tier's snapshots not
        # uploaded yet).
        self.withheld = withheld
        # Seconds an object outlives the last kept snapshot that named it, and an object no
        # snapshot names lives at least (object storage: readers elsewhere, see prune).
        self.grace = grace
        self._retired: dict[str, Manifest | None] = {}  # retired manifests read, by key

    # -- verify ----------------------------------------------------------------------------
    def verify(self, seqs: list[int] | None = None,
               progress: Progress | None = None) -> VerifyReport:
        """Check the manifests `seqs` (all if None) and every chunk's digest.

        Manifests are read again from the storage (what a restarted job would read); each
        distinct chunk object is decoded and checked once, and every chunk that uses a bad
        object is reported. `progress(done, total)` is called as chunks are checked.
        """
        seqs = self.catalog.seqs() if seqs is None else seqs
        problems: list[Problem] = []
        loaded: list[Manifest] = []
        for seq in seqs:
            try:
                loaded.append(self.catalog.load(seq, from_disk=True)[0])
            except ArraysnapError as err:
                problems.append(Problem(seq, None, None, getattr(err, "reason", str(err))))
        total = sum(entry.n_chunks for m in loaded for entry in m.arrays.values())
        checked: dict[tuple[bytes, Location | None], str | None] = {}
        done = 0
        for manifest in loaded:
            for name, entry in manifest.arrays.items():
                for index in range(entry.n_chunks):
                    digest = (entry.digest(index), entry.location(index))
                    if digest not in checked:
                        try:
                            load_chunk(self.objects, self.codec, entry, index, verify=True,
                                       seq=manifest.seq)
                            checked[digest] = None
                        except CorruptSnapshotError as err:
                            checked[digest] = err.reason
                    reason = checked[digest]
                    if reason is not None:
                        problems.append(Problem(manifest.seq, name, index, reason))
                    done += 1
                    if progress is not None and (done % 64 == 0 or done == total):
                        progress(done, total)
        problems.sort(key=lambda p: (p.seq if p.seq is not None else -1))
        return VerifyReport(len(seqs), total, tuple(problems))

    # -- size ------------------------------------------------------------------------------
    def _calls(self, name: bytes) -> tuple[Callable[[bytes], int], Callable[[bytes], bool],
                                           Callable[[bytes], None]]:
        """Size, exists and delete for a stored object: a chunk object by its digest, or a
        pack (format 3) by its 16-byte id."""
        objects = self.objects
        if len(name) == PACK_ID_BYTES:
            return objects.pack_size, objects.has_pack, objects.delete_pack
        return objects.size, objects.has, objects.delete

    def _stored_names(self) -> Iterator[bytes]:
        """Every stored chunk object's digest and pack's id."""
        return itertools.chain(self.objects.digests(), self.objects.pack_ids())

    def _size_of(self, digest: bytes) -> int:
        """The stored size of a chunk object (by digest) or a pack (by id)."""
        size = self._object_sizes.get(digest)
        if size is None:
            try:
                size = self._object_sizes[digest] = self._calls(digest)[0](digest)
            except OSError:
                return 0  # missing: verify reports it; it takes no room
        return size

    def disk_usage(self, progress: Progress | None = None) -> StoreUsage:
        """Bytes per snapshot (unique versus shared) and for the whole store.

        Objects count their stored (encoded) size; a missing object counts 0 bytes.
        Damaged manifests are listed in ``damaged`` and left out.
        """
        seqs = self.catalog.seqs()
        manifests: dict[int, tuple[Manifest, int]] = {}
        damaged: list[str] = []
        for position, seq in enumerate(seqs):
            try:
                manifests[seq] = self.catalog.load(seq)
            except ArraysnapError as err:
                damaged.append(str(err))
            if progress is not None:
                progress(position + 1, len(seqs))
        stored = {}
        for name in self._stored_names():
            try:
                stored[name] = self._calls(name)[0](name)
            except FileNotFoundError:
                continue  # removed by a concurrent gc
        usage = Usage(manifests, lambda digest: stored.get(digest, 0))
        rows = usage.snapshots({seq: m.step for seq, (m, _) in manifests.items()},
                               {seq: sum(r.n_chunks for r in m.arrays.values())
                                for seq, (m, _) in manifests.items()})
        referenced = sum(size for digest, size in stored.items() if digest in usage.refs)
        unreferenced = [size for digest, size in stored.items() if digest not in usage.refs]
        return StoreUsage(rows, len(stored), sum(stored.values()), referenced,
                          len(unreferenced), sum(unreferenced),
                          sum(size for _, size in manifests.values()),
                          self.baselines.stored_bytes(), damaged, self._table_bytes())

    def _table_bytes(self) -> int:
        if self.tables is None:
            return 0
        total = 0
        for digest in self.tables.digests():
            try:
                total += self.tables.size(digest)
            except FileNotFoundError:
                continue  # removed by a concurrent gc
        return total

    # -- deleting --------------------------------------------------------------------------
    def _all_manifests(self, action: str) -> dict[int, tuple[Manifest, int]]:
        manifests = {}
        for seq in self.catalog.seqs():
            try:
                manifests[seq] = self.catalog.load(seq)
            except ArraysnapError as err:
                # What a damaged manifest uses is unknown: keep everything it might use.
                raise CorruptSnapshotError(
                    f"{action} stopped: snapshot {seq} cannot be read ({err}); without it the "
                    "chunks it uses are unknown. Remove or repair that manifest first"
                ) from None
        return manifests

    def prune(self, retention: Retention, *, dry_run: bool = False,
              pressed: bool = False) -> PruneReport:
        """Remove what `retention` does not keep: manifests first (durably), then the chunk
        objects no kept snapshot uses, then replay-log records older than every kept one.
        With `dry_run`, only say what would go."""
        manifests = self._all_manifests("retention")
        candidates = [Candidate(seq, m.step, m.time) for seq, (m, _) in manifests.items()]
        usage = Usage(manifests, self._size_of) if retention.max_bytes is not None else None
        doomed = retention.doomed(
            candidates, time.time(),
            (lambda gone: usage.size_without(c.seq for c in gone)) if usage else None)
        kept = set(self.withheld()) if self.withheld is not None else set()
        spared = sorted(c.seq for c in doomed if c.seq in kept)
        doomed = [c for c in doomed if c.seq not in kept]
        if spared and pressed:
            log.warning("arraysnap: %s is full, and retention keeps snapshots %s, which are "
                        "not uploaded yet (the remote store is failing or behind); free space "
                        "there or let the uploads catch up", self.catalog.where, spared)
        if not doomed:
            if self.grace > 0 and not dry_run:  # retirements whose grace ran out meanwhile
                self._retention_under_grace(manifests, set())
            return PruneReport((), 0, 0)
        gone = {c.seq for c in doomed}
        used: set[bytes] = set()
        for seq, (manifest, _) in manifests.items():
            if seq not in gone:
                used.update(stored_objects(manifest))
        dropped: set[bytes] = set()
        for seq in gone:
            dropped.update(stored_objects(manifests[seq][0]))
        if dry_run:
            sizes = [self._size_of(digest) for digest in dropped - used
                     if self._calls(digest)[1](digest)]
            return PruneReport(tuple(sorted(gone)), len(sizes), sum(sizes))
        storage = self.objects.storage
        if self.grace > 0:
            removed, freed = self._retention_under_grace(manifests, gone)
            log.info("arraysnap: retention retired snapshots %s", sorted(gone))
            return PruneReport(tuple(sorted(gone)), removed, freed)
        for seq in sorted(gone):
            storage.delete(manifest_key(seq))
            self.catalog.forget(seq)
        # The manifests are gone for good before any object they used goes.
        storage.barrier()
        removed, freed = self._delete_objects(dropped - used)
        self._delete_tables(
            set().union(*(manifests[seq][0].table_digests for seq in gone))
            - set().union(*(m.table_digests for seq, (m, _) in manifests.items()
                            if seq not in gone)))
        positions = [m.replay_position for seq, (m, _) in manifests.items() if seq not in gone]
        if self.replay_log is not None and positions and None not in positions:
            self.replay_log.trim(min(p for p in positions if p is not None))
        log.info("arraysnap: retention removed snapshots %s (%d chunks, %d bytes)",
                 sorted(gone), removed, freed)
        return PruneReport(tuple(sorted(gone)), removed, freed)

    def _retention_under_grace(self, manifests: Mapping[int, tuple[Manifest, int]],
                               gone: set[int]) -> tuple[int, int]:
        """Prune with a grace period: the snapshots `gone` retire (a reader elsewhere may
        be restoring one: what they name goes once the grace is over), the retirements
        whose grace is over go with what only they named, and the replay log is trimmed
        to what kept and still retired snapshots need. The objects and bytes removed."""
        for seq in sorted(gone):
            self.catalog.retire(seq, time.time())
        self.objects.storage.barrier()
        kept = [m for seq, (m, _) in manifests.items() if seq not in gone]
        used = set().union(*(stored_objects(m) for m in kept))
        tables = set().union(*(m.table_digests for m in kept))
        removed, freed, young = self._expire_retired(used, tables)
        positions = [m.replay_position for m in kept] + [m.replay_position for m in young]
        if self.replay_log is not None and positions and None not in positions:
            self.replay_log.trim(min(p for p in positions if p is not None))
        return removed, freed

    def gc(self) -> PruneReport:
        """Delete the chunk objects no snapshot uses (left by prune or a killed writer);
        with a grace period, only those older than it, and none a retired manifest still
        in its grace names."""
        used: set[bytes] = set()
        tables: set[bytes] = set()
        for manifest, _ in self._all_manifests("gc").values():
            used.update(stored_objects(manifest))
            tables |= manifest.table_digests
        removed = freed = 0
        if self.grace > 0:
            removed, freed, young = self._expire_retired(used, tables)
            for manifest in young:  # still in their grace: kept as the listed ones are
                used.update(stored_objects(manifest))
                tables |= manifest.table_digests
        unused = [name for name in self._stored_names() if name not in used]
        more, more_freed = self._delete_objects(self._old_enough(unused))
        if self.tables is not None:
            self._delete_tables(set(self._old_enough(
                [d for d in self.tables.digests() if d not in tables], self.tables)))
        return PruneReport((), removed + more, freed + more_freed)

    def _margin(self) -> float:
        # Clocks (this host's, another writer's, the object store's) are taken to differ by
        # less than this: anything younger than the grace plus it is kept.
        return min(CLOCK_MARGIN_SECONDS, self.grace)

    def _old_enough(self, names: list[bytes], objects: ChunkObjects | None = None) -> list[bytes]:
        """Those of `names` (objects, packs) written longer than the grace period ago."""
        if self.grace <= 0:
            return names
        objects = objects or self.objects
        cutoff, old = time.time() - self.grace - self._margin(), []
        for name in names:
            key = (objects.key(name) if len(name) != PACK_ID_BYTES or objects is self.tables
                   else pack_key(name))
            try:
                if objects.storage.modified(key) < cutoff:
                    old.append(name)
            except FileNotFoundError:
                continue
        return old

    def _expire_retired(self, used: set[bytes], tables: set[bytes]
                        ) -> tuple[int, int, list[Manifest]]:
        """Delete the retired manifests whose grace is over, and what only they named
        (`used` and `tables`: what kept snapshots name); the objects and bytes removed,
        and the retired manifests still in their grace."""
        now = time.time()
        keep, keep_tables = set(used), set(tables)
        dropped: set[bytes] = set()
        dropped_tables: set[bytes] = set()
        expired, young = [], []
        listed = self.catalog.retired()
        for key in set(self._retired) - {key for key, _, _ in listed}:
            del self._retired[key]
        for key, seq, when in listed:
            if key not in self._retired:  # read once: a retired manifest never changes
                try:
                    self._retired[key] = self.catalog.load_retired(key, seq)
                except ArraysnapError:
                    self._retired[key] = None  # what it named is unknown: gc, by age
            manifest = self._retired[key]
            in_grace = now - when < self.grace + self._margin() + 1  # its key has seconds
            if not in_grace:
                expired.append(key)
            if manifest is not None:
                (keep if in_grace else dropped).update(stored_objects(manifest))
                (keep_tables if in_grace else dropped_tables).update(manifest.table_digests)
                if in_grace:
                    young.append(manifest)
        if not expired:
            return 0, 0, young
        removed, freed = self._delete_objects(dropped - keep)
        self._delete_tables(dropped_tables - keep_tables)
        for key in expired:
            self.objects.storage.delete(key)
            self._retired.pop(key, None)
        return removed, freed, young

    def _delete_tables(self, digests: set[bytes]) -> None:
        """Delete table objects no kept snapshot uses (unless a commit under way does)."""
        if self.tables is None:
            return
        for digest in digests:
            try:
                if self.pins is not None:
                    self.pins.delete_unless_pinned(digest, self.tables.delete)
                else:
                    self.tables.delete(digest)
            except FileNotFoundError:
                continue

    def free_space(self) -> int:
        """The disk is full (an object writer's ENOSPC): apply the retention policy, then
        collect garbage; return the bytes freed."""
        freed = 0
        try:
            if self.retention.active:
                freed += self.prune(self.retention, pressed=True).bytes_freed
            freed += self.gc().bytes_freed
        except (OSError, ArraysnapError) as err:
            log.error("arraysnap: pruning to free space failed: %r", err)
        return freed

    def _delete_objects(self, digests: Iterable[bytes]) -> tuple[int, int]:
        """Delete chunk objects (by digest) and packs (by id) unless pinned."""
        removed = freed = 0
        for digest in digests:
            size_of, _, delete = self._calls(digest)
            try:
                size = size_of(digest)
            except FileNotFoundError:
                continue
            if self.pins is not None:
                if not self.pins.delete_unless_pinned(digest, delete):
                    continue
            else:
                delete(digest)
            self._object_sizes.pop(digest, None)
            removed += 1
            freed += size
        return removed, freed
