"""The catalog: the one read model of a store's committed snapshots.

It lists manifests, loads and caches them, and selects one by step, seq or the command
line's SNAP forms. Restore, verify, retention, the command line and the zarr view all read
committed snapshots through it; a manifest that appears in it is committed, because the
manifest is the commit point.

>>> import arraysnap, numpy as np, tempfile
>>> from arraysnap.storage import LocalStorage
>>> path = tempfile.mkdtemp() + "/s.snap"
>>> with arraysnap.open(path) as snap:
...     for step in (10, 20, 30):
...         _ = snap.capture({"u": np.full(3, step)}, step=step)
>>> catalog = Catalog(LocalStorage(path))
>>> catalog.seqs(), [catalog.resolve(s) for s in ("latest", "2", "step:10", "~1", "-3")]
([1, 2, 3], [3, 2, 1, 2, 1])
"""

from __future__ import annotations

import logging
import re
import threading

from ..commit import manifest_key
from ..errors import ArraysnapError, CorruptSnapshotError, FormatVersionError, SnapshotNotFoundError
from ..manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from ..objects import read_pack_range
from ..packs import Location
from ..results import SnapshotInfo
from ..storage import Storage
from ..tables import MAX_NODE_BYTES, TableReader, table_key

__all__ = ["SNAPSHOT_SPEC_HELP", "Catalog"]

log = logging.getLogger("arraysnap")

PREFIX = "snapshots/"
_PREFIX_LENGTH = len(PREFIX)
# Manifests retention removed while a grace period runs (object storage): not snapshots
# (never listed), but what they name is kept until the period is over.
RETIRED_PREFIX = "retired/"
_RETIRED = re.compile(r"^retired/(\d{12})-(\d{1,12})\.json$")
_KEY_LENGTH = _PREFIX_LENGTH + len("000000000001.json")
_STEP = re.compile(r"^step:(-?\d+)$")
_BACK = re.compile(r"^(?:latest)?~(\d+)$")

SNAPSHOT_SPEC_HELP = (
    "SNAP selects a snapshot: a seq number (12), 'step:N' (the newest snapshot of step N), "
    "'latest' (the default), '~K' (K snapshots before the latest; ~0 is the latest) or, "
    "after '--', '-K' (Python-style: -1 is the latest)."
)


class Catalog:
    """Committed snapshots of one storage: listed, loaded (and cached), selected."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[Manifest, int]] = {}
        # SnapshotInfo of a cached manifest (thousands of arrays: worth keeping).
        self._infos: dict[int, tuple[Manifest, SnapshotInfo]] = {}
        self.tables = TableReader(self._table_object, self._pack_range)

    def _table_object(self, digest: bytes, location: Location | None) -> bytes:
        where = "" if location is None else (f" (in pack {location.pack.hex()[:16]} at "
                                             f"{location.offset}+{location.length})")
        try:
            if location is None:
                return self.storage.get(table_key(digest), limit=MAX_NODE_BYTES)
            return read_pack_range(self.storage, location)
        except FileNotFoundError:
            raise ValueError(f"table object {digest.hex()[:16]}{where} is missing") from None
        except OSError as err:
            raise ValueError(f"table object {digest.hex()[:16]}{where} cannot be read: "
                             f"{err}") from None

    def _pack_range(self, location: Location) -> bytes:
        return read_pack_range(self.storage, location)

    @property
    def where(self) -> str:
        return self.storage.describe()

    # -- reading ---------------------------------------------------------------------------
    def seqs(self) -> list[int]:
        """Seqs of every manifest present, damaged or not, in order."""
        # Plain string tests, not a regex: every restore lists the manifests.
        seqs = []
        for key in self.storage.list_prefix(PREFIX):
            digits = key[_PREFIX_LENGTH:-5]
            if (len(key) == _KEY_LENGTH and key.endswith(".json") and digits.isascii()
                    and digits.isdigit()):
                seqs.append(int(digits))
        seqs.sort()
        return seqs

    def load(self, seq: int, *, from_disk: bool = False) -> tuple[Manifest, int]:
        """Snapshot `seq`'s manifest and its size in bytes (cached unless `from_disk`)."""
        with self._lock:
            cached = None if from_disk else self._cache.get(seq)
        if cached is not None:
            return cached
        return self._parse(seq, self.manifest_bytes(seq), from_disk)

    def load_with_bytes(self, seq: int) -> tuple[Manifest, bytes]:
        """Snapshot `seq`'s manifest and its stored bytes, read once (a copy sends them)."""
        data = self.manifest_bytes(seq)
        with self._lock:
            cached = self._cache.get(seq)
        manifest = cached[0] if cached is not None else self._parse(seq, data, False)[0]
        return manifest, data

    def _parse(self, seq: int, data: bytes, from_disk: bool) -> tuple[Manifest, int]:
        # From disk means every table object too: verify() must see a damaged one.
        tables = TableReader(self._table_object) if from_disk else self.tables
        manifest = parse_manifest(data, expected_seq=seq, tables=tables)
        with self._lock:
            self._cache[seq] = (manifest, len(data))
        return manifest, len(data)

    def head(self, seq: int) -> tuple[Manifest, int]:
        """Snapshot `seq`'s manifest with its arrays deferred (``DeferredArrays``: its
        tables are read, and cached, only if they are looked at) and its size in bytes."""
        with self._lock:
            cached = self._cache.get(seq)
        if cached is not None:
            return cached
        data = self.manifest_bytes(seq)
        # A manifest that lists its arrays is read whole (an array's digest blocks too).
        return parse_manifest(data, expected_seq=seq, tables=self.tables,
                              defer=lambda: self.load(seq)[0].arrays), len(data)

    def manifest_bytes(self, seq: int) -> bytes:
        """The stored bytes of snapshot `seq`'s manifest, unparsed."""
        try:
            return self.storage.get(manifest_key(seq), limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise SnapshotNotFoundError(f"snapshot {seq} does not exist in {self.where}") \
                from None
        except OSError as err:
            raise CorruptSnapshotError(f"snapshot {seq}: manifest cannot be read: {err}") \
                from None

    def remember(self, manifest: Manifest, manifest_bytes: int) -> None:
        """A manifest this process just committed: no need to read it back."""
        with self._lock:
            self._cache[manifest.seq] = (manifest, manifest_bytes)

    def retire(self, seq: int, when: float) -> None:
        """Move snapshot `seq`'s manifest to ``retired/<seq>-<when>.json`` (then it is no
        snapshot: readers that hold it still find its objects until the grace is over)."""
        self.storage.put_atomic(f"{RETIRED_PREFIX}{seq:012d}-{int(when)}.json",
                                self.manifest_bytes(seq))
        self.storage.delete(manifest_key(seq))
        self.forget(seq)

    def retired(self) -> list[tuple[str, int, float]]:
        """The retired manifests: key, seq, and when each was retired."""
        found = []
        for key in self.storage.list_prefix(RETIRED_PREFIX):
            match = _RETIRED.match(key)
            if match:
                found.append((key, int(match.group(1)), float(match.group(2))))
        return sorted(found, key=lambda item: item[1])

    def load_retired(self, key: str, seq: int) -> Manifest:
        """A retired manifest, checked as a manifest is (ArraysnapError if it is not)."""
        try:
            data = self.storage.get(key, limit=MAX_MANIFEST_BYTES)
        except OSError as err:
            raise CorruptSnapshotError(f"{key} cannot be read: {err}") from None
        return parse_manifest(data, expected_seq=seq, tables=self.tables)

    def forget(self, seq: int) -> None:
        """Snapshot `seq` was removed."""
        with self._lock:
            self._cache.pop(seq, None)
            self._infos.pop(seq, None)

    def info(self, seq: int) -> SnapshotInfo:
        loaded = self.load(seq)
        with self._lock:
            cached = self._infos.get(seq)
        if cached is not None and cached[0] is loaded[0]:
            return cached[1]
        info = SnapshotInfo.from_manifest(*loaded)
        with self._lock:
            self._infos[seq] = (loaded[0], info)
        return info

    def newest_valid(self) -> Manifest | None:
        """The newest manifest that parses (a damaged one is logged and passed over)."""
        for seq in reversed(self.seqs()):
            try:
                return self.load(seq)[0]
            except CorruptSnapshotError as err:
                log.error("arraysnap: skipping damaged snapshot %d: %s", seq, err)
        return None

    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first; damaged manifests are logged and left out."""
        infos = []
        for seq in self.seqs():
            try:
                infos.append(self.info(seq))
            except SnapshotNotFoundError:
                continue  # removed by retention since the folder was listed
            except (CorruptSnapshotError, FormatVersionError) as err:
                log.warning("arraysnap: snapshot %d not listed: %s", seq, err)
        return infos

    def latest(self) -> SnapshotInfo | None:
        for seq in reversed(self.seqs()):
            try:
                return self.info(seq)
            except (CorruptSnapshotError, SnapshotNotFoundError, FormatVersionError) as err:
                # The same rule as list(): latest() is always list()[-1].
                log.warning("arraysnap: snapshot %d skipped: %s", seq, err)
        return None

    def damaged(self) -> list[int]:
        """Seqs whose manifest is present but cannot be read."""
        bad = []
        for seq in self.seqs():
            try:
                self.load(seq)
            except SnapshotNotFoundError:
                continue
            except ArraysnapError:
                bad.append(seq)
        return bad

    # -- selecting -------------------------------------------------------------------------
    def select(self, step: int | None, seq: int | None) -> Manifest:
        """The snapshot with `seq`, else the newest of `step`, else the latest."""
        seqs = self.seqs()
        if not seqs:
            raise SnapshotNotFoundError(f"{self.where} holds no snapshot yet; capture one first")
        if seq is not None:
            if seq not in seqs:
                raise SnapshotNotFoundError(
                    f"no snapshot with seq {seq} in {self.where}; seqs are "
                    f"{seqs[0]}..{seqs[-1]}")
            return self.load(seq)[0]
        if step is None:
            return self.load(seqs[-1])[0]
        for candidate in reversed(seqs):
            manifest = self.load(candidate)[0]
            if manifest.step == step:
                return manifest
        steps = sorted({s for s in (self.load(q)[0].step for q in seqs) if s is not None})
        shown = ", ".join(map(str, steps[-10:]))
        raise SnapshotNotFoundError(f"no snapshot of step {step} in {self.where}; "
                                    f"latest steps are {shown or 'none'}")

    def fallback_candidates(self, step: int | None, seq: int | None) -> list[int]:
        """Seqs to try, newest first, from the selected snapshot down to the oldest."""
        seqs = self.seqs()
        if not seqs:
            raise SnapshotNotFoundError(f"{self.where} holds no snapshot yet; capture one first")
        if seq is not None:
            return [self.select(None, seq).seq, *reversed([s for s in seqs if s < seq])]
        if step is None:
            return seqs[::-1]
        for candidate in reversed(seqs):
            try:
                if self.load(candidate)[0].step == step:
                    return [s for s in reversed(seqs) if s <= candidate]
            except ArraysnapError:
                continue
        return [self.select(step, None).seq]  # raises SnapshotNotFoundError, naming steps

    def resolve(self, spec: str | int | None) -> int:
        """The seq of the snapshot that `spec` names (see ``SNAPSHOT_SPEC_HELP``).

        SnapshotNotFoundError if there is no such snapshot, ValueError if `spec` is not
        one of the accepted forms.
        """
        seqs = self.seqs()
        if not seqs:
            raise SnapshotNotFoundError(f"{self.where} holds no snapshot yet")
        text = "latest" if spec is None else str(spec).strip()
        if text == "latest":
            return seqs[-1]
        if text.isdigit():
            seq = int(text)
            if seq not in seqs:
                raise SnapshotNotFoundError(
                    f"no snapshot with seq {seq} in {self.where}; seqs are "
                    f"{_describe_seqs(seqs)} (run 'arraysnap ls {self.where}')")
            return seq
        back = _BACK.match(text)
        if back or (text.startswith("-") and text[1:].isdigit() and int(text[1:]) > 0):
            count = int(back.group(1)) if back else int(text[1:]) - 1
            if count >= len(seqs):
                raise SnapshotNotFoundError(
                    f"{text!r} goes back {count} snapshots, but {self.where} holds only "
                    f"{len(seqs)}")
            return seqs[-1 - count]
        step = _STEP.match(text)
        if step:
            wanted = int(step.group(1))
            steps = []
            for seq in reversed(seqs):
                try:
                    manifest = self.load(seq)[0]
                except ArraysnapError:
                    continue  # a damaged manifest cannot be the one asked for by step
                if manifest.step == wanted:
                    return seq
                if manifest.step is not None:
                    steps.append(manifest.step)
            shown = ", ".join(map(str, sorted(set(steps))[-10:])) or "none"
            raise SnapshotNotFoundError(f"no snapshot of step {wanted} in {self.where}; "
                                        f"latest steps are {shown}")
        raise ValueError(f"{text!r} does not name a snapshot. {SNAPSHOT_SPEC_HELP}")


def _describe_seqs(seqs: list[int]) -> str:
    if len(seqs) <= 8:
        return ", ".join(map(str, seqs))
    return f"{', '.join(map(str, seqs[:3]))}, ..., {', '.join(map(str, seqs[-3:]))}"
