"""Copying snapshots between two stores: only what the destination lacks, manifests last.

A snapshot is its manifest and the objects it names (chunk objects, packs, table objects
and table packs), all immutable. So a copy lists what the destination holds once, puts
the objects it lacks (create-only, in parallel), waits for the destination's barrier, and
only then writes the manifest, create-only: the commit point, as in a capture. A copy
killed at any moment leaves objects no manifest names yet (the next copy, or ``gc``,
finds them) and never a listed snapshot with missing parts; running it again goes on
where it stopped. The replay log's segments go along (a restore returns the records
after its snapshot); the capture history (``stats``) stays with the source.

The destination is the source's or empty: a seq both hold must be the same snapshot
(the same manifest bytes), or the copy stops before writing anything. A new destination
gets the source's codec, chunk size and format version, and an id of its own (a baseline
folder is never taken for both). The destination's writer lock is held throughout.

>>> import arraysnap, numpy as np, tempfile
>>> tmp = tempfile.mkdtemp()
>>> with arraysnap.open(tmp + "/a.snap") as snap:
...     _ = snap.capture({"u": np.arange(4.0)}, step=1)
>>> report = arraysnap.copy(tmp + "/a.snap", tmp + "/b.snap")
>>> report.copied, arraysnap.copy(tmp + "/a.snap", tmp + "/b.snap").copied
((1,), ())
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..commit import manifest_key, put_manifest
from ..errors import SnapshotNotFoundError
from ..manifest import Manifest
from ..objects import object_key, pack_key
from ..packs import PACK_PREFIX
from ..replaylog import PREFIX as JOURNAL_PREFIX
from ..results import CopyReport
from ..storage import Storage
from ..tables import PREFIX as TABLES_PREFIX
from ..tables import table_key
from .catalog import Catalog
from .locating import as_storage
from .opening import create_store, not_a_store, read_settings

__all__ = ["COPY_THREADS", "check_compatible", "check_snapshot_specs", "copy", "copy_journal",
           "copy_objects", "copy_snapshots", "snapshot_keys", "transfer"]

COPY_THREADS = 8  # requests in flight; each holds one object (at most a pack) in memory
_OBJECT_PREFIXES = ("chunks/", PACK_PREFIX, TABLES_PREFIX)


def snapshot_keys(manifest: Manifest) -> set[str]:
    """The keys of every object snapshot `manifest` needs, its manifest aside.

    >>> import arraysnap, numpy as np, tempfile
    >>> from arraysnap.storage import LocalStorage
    >>> path = tempfile.mkdtemp() + "/s.snap"
    >>> with arraysnap.open(path, codec="none") as snap:
    ...     _ = snap.capture({"u": np.zeros(4)}).result()
    >>> sorted(key.split("/")[0] for key in snapshot_keys(Catalog(LocalStorage(path)).load(1)[0]))
    ['packs']
    """
    keys = {object_key(digest) for digest in manifest.chunk_digests()}
    keys |= {pack_key(pack) for pack in manifest.pack_ids() | manifest.table_packs}
    keys |= {table_key(digest) for digest in manifest.table_digests}
    return keys


def _listed(storage: Storage, prefixes: Iterable[str]) -> set[str]:
    return {key for prefix in prefixes for key in storage.list_prefix(prefix)}


def copy(src: Any, dst: Any, snapshots: Iterable[str | int] | str | int | None = None, *,
         src_options: Mapping[str, Any] | None = None,
         dst_options: Mapping[str, Any] | None = None,
         progress: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy `snapshots` of the store at `src` into the store at `dst`, which is created if
    it does not exist: only the objects `dst` lacks, each snapshot's manifest after its
    objects. Idempotent, and resumable after a kill (run it again).

    `src` and `dst` are what :func:`arraysnap.open` takes (folders, ``s3://`` and other
    URLs, obstore store objects), with `src_options` and `dst_options` as their
    ``storage_options``. `snapshots` is None (every snapshot), a seq or a spec
    (``"latest"``, ``"step:40"``, ``"~1"``), or a list of them. A seq `dst` holds already
    must be the same snapshot there; codecs must match. Takes `dst`'s writer lock
    (``StoreLockedError`` while a job writes it); `src` may be written meanwhile.
    `progress(done, total)` is called as objects are copied. Returns a
    :class:`~arraysnap.results.CopyReport`.

    >>> import arraysnap, numpy as np, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> with arraysnap.open(tmp + "/a.snap") as snap:
    ...     for step in range(3):
    ...         _ = snap.capture({"u": np.full(8, float(step))}, step=step)
    >>> arraysnap.copy(tmp + "/a.snap", tmp + "/b.snap", ["step:0", "latest"]).copied
    (1, 3)
    >>> arraysnap.copy(tmp + "/a.snap", tmp + "/b.snap").copied   # what b lacked
    (2,)
    >>> arraysnap.open(tmp + "/b.snap", "r").restore().arrays["u"][0]
    np.float64(2.0)
    """
    check_snapshot_specs(snapshots)
    return copy_snapshots(as_storage(src, src_options), as_storage(dst, dst_options),
                          snapshots, progress=progress)


def copy_snapshots(src: Storage, dst: Storage,
                   snapshots: Iterable[str | int] | str | int | None = None,
                   *, progress: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy `snapshots` (specs or seqs; all if None) of the store in `src` to `dst`; see
    :func:`copy`."""
    check_snapshot_specs(snapshots)
    settings = read_settings(src, codec=None)
    if settings is None:
        raise not_a_store(src)
    source = Catalog(src)
    if snapshots is None:
        seqs = source.seqs()
    else:
        specs = [snapshots] if isinstance(snapshots, (str, int)) else list(snapshots)
        seqs = sorted({source.resolve(spec) for spec in specs})
    # Everything about the source is read and checked before the destination is touched.
    manifests: dict[int, tuple[bytes, Manifest]] = {}
    for seq in seqs:
        manifest, data = source.load_with_bytes(seq)
        manifests[seq] = (data, manifest)
    target = read_settings(dst, codec=None)
    if target is not None:
        check_compatible(src, dst, settings, target)
    else:
        target = create_store(dst, settings.codec, copied_from=src, source=settings)
    lock = dst.lock_writer(f"pid {os.getpid()} on {socket.gethostname()} (copy)")
    try:
        dst.remove_temporaries()
        return transfer(src, dst, manifests, progress=progress,
                        related=settings.related(target))
    finally:
        lock.release()


def transfer(src: Storage, dst: Storage, manifests: Mapping[int, tuple[bytes, Manifest]], *,
             progress: Callable[[int, int], None] | None = None,
             present: set[str] | None = None,
             journal: dict[str, int] | None = None,
             held: set[int] | None = None, related: bool = True) -> CopyReport:
    """Put the snapshots `manifests` (seq: their bytes and parse) of `src` into `dst`,
    whose writer's lock the caller holds: the objects `dst` lacks, then each manifest.

    `present` are keys known to be in `dst` (else `dst` is listed); `journal` remembers
    the sizes of the replay log's segments sent, between calls; `held` the seqs `dst`
    holds (else `dst` is listed). Unless the two are `related` (see ``Settings.related``),
    a `dst` that holds snapshots must hold one of these too."""
    held = set(Catalog(dst).seqs()) if held is None else held
    for seq in sorted(held & set(manifests)):
        if dst.get(manifest_key(seq)) != manifests[seq][0]:
            raise FileExistsError(
                f"{dst.describe()} holds a snapshot {seq} that differs from "
                f"{src.describe()}'s: it is not a copy of that store. Copy into an "
                "empty destination (or one copied from this source)")
    if held and not related and not held & set(manifests):
        raise FileExistsError(
            f"{dst.describe()} holds snapshots of its own, none of them {src.describe()}'s: "
            "it is not a copy of that store. Copy into an empty destination (or one copied "
            "from this source)")
    wanted = [seq for seq in sorted(manifests) if seq not in held]
    if present is None:
        present = _listed(dst, _OBJECT_PREFIXES) if wanted else set()
    missing = sorted(set().union(*(snapshot_keys(manifests[seq][1]) for seq in wanted))
                     - present) if wanted else []
    copied_bytes = copy_objects(src, dst, missing, progress)
    for seq in wanted:
        dst.barrier()  # every object of the snapshot, before the manifest names them
        put_manifest(dst, seq, manifests[seq][0])
    copied_bytes += copy_journal(src, dst, journal)
    dst.barrier()
    return CopyReport(tuple(wanted), tuple(sorted(held & set(manifests))), len(missing),
                      copied_bytes)


def check_compatible(src: Storage, dst: Storage, settings: Any, target: Any) -> None:
    """A clear error unless a store of `settings` can be copied into one of `target`."""
    if target.codec != settings.codec:
        raise ValueError(f"{dst.describe()} uses codec {target.codec.name}, "
                         f"{src.describe()} {settings.codec.name}: a copy needs the same "
                         "codec (copy into a new destination)")
    if target.version < settings.version:
        raise ValueError(f"{dst.describe()} is a store of format {target.version}, "
                         f"{src.describe()} of format {settings.version}: run 'arraysnap "
                         f"upgrade {dst.describe()}' first")


def copy_objects(src: Storage, dst: Storage, keys: list[str],
                  progress: Callable[[int, int], None] | None) -> int:
    """Put each of `keys` from `src` into `dst` (create-only), a few at a time."""
    done = 0
    total_bytes = 0
    lock = threading.Lock()

    def one(key: str) -> None:
        nonlocal done, total_bytes
        try:
            data = src.read_once(key)
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"{src.describe()} lost {key} during the copy (a writer's retention or gc "
                "removed a snapshot that was being copied); copy again") from None
        dst.put_if_absent(key, data)
        with lock:
            done += 1
            total_bytes += len(data)
            if progress is not None:
                progress(done, len(keys))

    if progress is not None:
        progress(0, len(keys))
    if keys:
        with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="arraysnap-copy") as pool:
            for future in [pool.submit(one, key) for key in keys]:
                future.result()
    return total_bytes


def copy_journal(src: Storage, dst: Storage, sent: dict[str, int] | None = None) -> int:
    """The replay log's segments the destination lacks, or holds shorter (a segment only
    grows); `sent` (key: size) skips those already sent at their present size."""
    copied = 0
    for key in sorted(src.list_prefix(JOURNAL_PREFIX)):
        size = src.size(key)
        if sent is not None and sent.get(key) == size:
            continue
        data = src.get(key)
        if sent is not None and key in sent:
            there = sent[key]
        else:
            try:  # a segment only grows: what the destination holds must begin this one
                held = dst.get(key)
            except FileNotFoundError:
                held = None
            # (A line torn by a killed writer at the end may differ: the next one rewrote it.)
            if held is not None and not data.startswith(held[:held.rfind(b"\n") + 1]):
                raise FileExistsError(
                    f"{dst.describe()}/{key} holds other records than {src.describe()}'s: "
                    "the two replay logs are of different histories")
            there = -1 if held is None else len(held)
        if there < len(data):
            dst.put_atomic(key, data, durable=False)
            copied += len(data)
        if sent is not None:
            sent[key] = len(data)
    return copied


def check_snapshot_specs(snapshots: object) -> None:
    """A clear error for `snapshots` that cannot name snapshots."""
    if snapshots is None or isinstance(snapshots, (str, int)):
        return
    if not isinstance(snapshots, Iterable) or isinstance(snapshots, (bytes, Mapping)):
        raise TypeError(f"snapshots must be None, a snapshot (a seq or a spec such as "
                        f"'latest' or 'step:40') or a list of them, not {snapshots!r}")

