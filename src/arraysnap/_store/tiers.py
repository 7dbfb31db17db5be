"""The local tier: captures commit into a local store, and an uploader copies each committed
snapshot to the store in object storage behind it, in order, objects first and the
manifest last.

The remote store is the authority; the local tier is a replica of (a part of) its history
plus the snapshots not uploaded yet. ``reconcile`` makes it so when a writer opens both:
a local snapshot whose seq the remote store holds with other bytes is from a history the
job left (it restarted elsewhere from an older snapshot and went on), and is dropped from
the local tier with a warning; a newer remote snapshot is copied down, so ``restore()``
returns the newest snapshot of either tier and the next capture's seq follows it.

The :class:`Uploader` owns one thread (``arraysnap-upload``) and a pool of copying
threads. A failed upload is retried after a delay that grows to the last of its delays,
for as long as the store is open; each kind of failure is warned once (the capture goes
on committing locally meanwhile). What the remote store holds of the newest uploaded
snapshot is known, so an upload sends the objects that snapshot did not use (about what
the capture wrote) with no listing; an object an older snapshot used is sent again,
create-only, which costs one request and never a wrong byte.

>>> import arraysnap, numpy as np, tempfile
>>> from obstore.store import MemoryStore
>>> remote, tmp = MemoryStore(), tempfile.mkdtemp()
>>> with arraysnap.open(remote, local=tmp + "/run.snap") as snap:
...     info = snap.capture({"u": np.zeros(8)}, step=1).result()
...     snap.wait(remote=True)
...     snap.latest().remote
True
>>> arraysnap.open(remote, "r").restore().step
1
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..codecs import parse_codec
from ..commit import manifest_key
from ..errors import ArraysnapError, ArraysnapWarning, StoreLockedError
from ..manifest import Manifest
from ..replaylog import PREFIX as JOURNAL_PREFIX
from ..storage import Storage
from .catalog import Catalog
from .copying import check_compatible, copy_journal, snapshot_keys, transfer
from .failures import failure_kind
from .opening import Settings, create_store, read_settings

__all__ = ["DEFAULT_UPLOAD_DELAYS", "Reconciled", "Uploader", "check_tiers", "reconcile",
           "tier_settings"]

log = logging.getLogger("arraysnap")

# Seconds between attempts of a failing upload: growing, then every 30 s for good.
DEFAULT_UPLOAD_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def check_tiers(local: Storage, remote: Storage, mode: str, baseline_dir: object) -> None:
    """A clear error for a local tier that cannot be one, before anything is written.

    >>> from arraysnap.storage import LocalStorage
    >>> check_tiers(LocalStorage("/tmp/x.snap"), LocalStorage("/tmp/y.snap"), "a", None)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: local= is the local tier of a store in object storage; /tmp/y.snap is a ...
    """
    if mode != "a":
        raise ValueError("local= is for a writer (mode='a'); a reader opens one tier: the "
                         "store's URL, or the local tier's folder")
    if remote.local_path is not None:
        raise ValueError("local= is the local tier of a store in object storage; "
                         f"{remote.describe()} is a local folder already")
    if local.local_path is None:
        raise ValueError(f"local= must be a local folder, not {local.describe()}")
    if baseline_dir is not None:
        raise ValueError("with local=, the baselines are in the local tier's folder: leave "
                         "baseline_dir= out")


def tier_settings(local: Storage, remote: Storage, codec: str | None) -> Settings:
    """The settings of the local tier, made if need be: a new remote store takes the
    local tier's (a local store gets a remote tier), a new local tier the remote's."""
    there = read_settings(remote, codec)
    here = read_settings(local, codec)
    if there is None and here is None:  # the local folder first: the likelier to fail
        here = create_store(local, parse_codec(codec or "zstd"))
        create_store(remote, here.codec, copied_from=local, source=here)
        return here
    if here is None:
        assert there is not None
        return create_store(local, there.codec, copied_from=remote, source=there)
    if there is None:
        create_store(remote, here.codec, copied_from=local, source=here)
    else:
        check_compatible(local, remote, here, there)
        if not here.related(there) and Catalog(local).seqs() and Catalog(remote).seqs():
            raise ValueError(
                f"the local tier {local.describe()} holds snapshots of another store than "
                f"{remote.describe()} (it was not made as its tier or copy): give local= a "
                "folder of its own for this store")
    return here


def _newest_readable(catalog: Catalog, seqs: list[int]) -> tuple[int, Manifest, bytes] | None:
    """The newest of `seqs` whose manifest reads: its seq, manifest and bytes."""
    for seq in reversed(seqs):
        try:
            return (seq, *catalog.load_with_bytes(seq))
        except ArraysnapError:
            continue
    return None


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What ``reconcile`` found: the seqs the remote store holds, those to upload, and
    whether the local tier's history was replaced (its seqs may name other snapshots)."""

    held: frozenset[int]
    pending: tuple[int, ...]
    changed: bool


def reconcile(local: Storage, remote: Storage) -> Reconciled:
    """Make the local tier a replica of the remote store plus what is not uploaded yet
    (both locks held, the local replay log not opened yet)."""
    here, there = Catalog(local), Catalog(remote)
    local_seqs, remote_seqs = here.seqs(), there.seqs()
    common = sorted(set(local_seqs) & set(remote_seqs))
    parted = []
    for seq in reversed(common):  # a history parts once: what is above the first match
        if here.manifest_bytes(seq) == there.manifest_bytes(seq):
            break
        parted.append(seq)
    newest_remote = _newest_readable(there, remote_seqs)
    changed = False
    if parted:
        first = min(parted)
        dropped = [seq for seq in local_seqs if seq >= first]
        log.warning("arraysnap: the local tier %s holds snapshots %s of a history the store %s "
                    "went on without (it holds other snapshots under those seqs, written "
                    "elsewhere); they are dropped from the local tier", local.describe(),
                    dropped, remote.describe())
        # Newest first: a drop cut short by a kill still parts at its lowest seq next time.
        for seq in reversed(dropped):
            local.delete(manifest_key(seq))
            local.barrier()
        local_seqs = [seq for seq in local_seqs if seq < first]
        changed = True
    if newest_remote is not None and (not local_seqs or newest_remote[0] > local_seqs[-1]):
        # A fresh node, or the store went on elsewhere: its newest snapshot comes down.
        seq, manifest, data = newest_remote
        transfer(remote, local, {seq: (data, manifest)})
        local_seqs.append(seq)
        changed = True
    if changed:
        # The replay log follows the history: the remote store's, whole.
        for key in list(local.list_prefix(JOURNAL_PREFIX)):
            local.delete(key)
        copy_journal(remote, local)
        local.barrier()
    held = set(remote_seqs)
    pending = [seq for seq in local_seqs if seq not in held and seq > max(held, default=0)]
    return Reconciled(frozenset(held), tuple(pending), changed)


class Uploader:
    """Uploads committed snapshots of the local tier, in seq order; see the module doc."""

    def __init__(self, local: Storage, catalog: Catalog, remote: Storage, held: Iterable[int],
                 pending: Iterable[int], delays: tuple[float, ...],
                 after_upload: Any = None) -> None:
        self.local, self.catalog, self.remote = local, catalog, remote
        self._delays = tuple(delays) or (1.0,)
        self._after_upload = after_upload  # called with each uploaded seq (remote retention)
        self._warned: set[str] = set()  # the kinds of failure warned about
        self._cond = threading.Condition()
        self._held = set(held)
        self._pending = sorted(set(pending))
        self._failing: BaseException | None = None  # the last failure, until an upload works
        self._fatal: BaseException | None = None  # the lease was lost: no upload can work
        self._closing = False
        self._stopping = False  # close(upload=False): no next upload
        # Asks for the replay log (send_journal) and the last one an upload answered.
        self._journal_asked = self._journal_sent = 0
        self._present: set[str] | None = None
        self._journal: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="arraysnap-upload", daemon=True)
        self._thread.start()

    # -- the store's side -------------------------------------------------------------------
    def enqueue(self, seq: int) -> None:
        """Snapshot `seq` committed locally: upload it."""
        with self._cond:
            self._pending.append(seq)
            self._cond.notify_all()

    def uploaded(self, seq: int) -> bool:
        """Whether snapshot `seq` is committed in the remote store."""
        with self._cond:
            return seq in self._held

    def pending(self) -> list[int]:
        """Seqs committed locally and not uploaded yet (retention keeps them)."""
        with self._cond:
            return list(self._pending)

    def send_journal(self) -> None:
        """Upload the replay log's records logged since the last upload, even if no
        capture follows them (``wait(remote=True)`` and ``close()`` ask)."""
        with self._cond:
            self._journal_asked += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every snapshot enqueued so far (and the replay log, if asked) is
        uploaded; later captures do not prolong it.

        TimeoutError after `timeout` seconds (the remote store is failing or slow); the
        uploader's fatal error (a lost lease, or a bug) is raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = max(self._pending, default=None)

            def waiting() -> list[int]:
                return [seq for seq in self._pending if target is not None and seq <= target]

            while (waiting() or self._journal_due()) and self._fatal is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    failing = f" (the remote store fails: {self._failing})" if self._failing \
                        else ""
                    raise TimeoutError(f"snapshots {waiting()} (or the replay log) not "
                                       f"uploaded to {self.remote.describe()} after {timeout} "
                                       f"s{failing}")
                self._cond.wait(left)
            if self._fatal is not None and (waiting() or self._journal_due()):
                raise ArraysnapError(
                    f"snapshots {waiting()} are committed locally only: uploads to "
                    f"{self.remote.describe()} stopped ({self._fatal})") from self._fatal

    def close(self, *, upload: bool = True) -> list[int]:
        """Upload what is pending (unless `upload` is false, or the remote store fails:
        then stop after the upload under way); return the seqs left local only."""
        with self._cond:
            first = not self._closing
            self._closing = True
            self._stopping = self._stopping or not upload
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            left = list(self._pending)
            why = self._fatal or self._failing
        if left and first:
            log.warning("arraysnap: snapshots %s are committed in the local tier %s only (%s); "
                        "opening the store %s again with the same local= uploads them", left,
                        self.local.describe(),
                        f"the store failed: {why}" if why else "closed before their upload",
                        self.remote.describe())
        return left

    # -- the thread ------------------------------------------------------------------------
    def _journal_due(self) -> bool:  # under the condition's lock
        return self._journal_asked > self._journal_sent

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - a bug: said, and wait() raises it
            log.error("arraysnap: the uploader to %s stopped: %r", self.remote.describe(), err)
            with self._cond:
                self._fatal = err
                self._cond.notify_all()

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._pending and not self._journal_due() and not self._closing:
                    self._cond.wait()
                if (not self._pending and not self._journal_due()) or self._fatal is not None:
                    return
                if self._closing and (self._failing is not None or self._stopping):
                    return  # close() does not wait for a store that fails
                seq = self._pending[0] if self._pending else None
                asked = self._journal_asked  # an upload carries the replay log as it is now
            try:
                if seq is None:
                    copy_journal(self.local, self.remote, self._journal)
                else:
                    self._upload(seq)
            except StoreLockedError as err:
                with self._cond:
                    self._fatal = err
                    self._cond.notify_all()
                self._warn_once(err)
                return
            except (OSError, ArraysnapError) as err:
                failures += 1
                with self._cond:
                    self._failing = err
                    self._cond.notify_all()
                self._warn_once(err)
                log.info("arraysnap: uploading %s to %s failed (%r); retrying",
                         "the replay log" if seq is None else f"snapshot {seq}",
                         self.remote.describe(), err)
                with self._cond:
                    if not self._closing:
                        self._cond.wait(self._delays[min(failures, len(self._delays)) - 1])
                continue
            failures = 0
            removed: Iterable[int] = ()
            if seq is not None and self._after_upload is not None:
                # Before the upload is announced: what wait() returns to is settled.
                with self._cond:
                    self._held.add(seq)
                try:
                    removed = self._after_upload(seq)
                except (OSError, ArraysnapError) as err:
                    log.error("arraysnap: retention in %s after uploading snapshot %d failed: "
                              "%r", self.remote.describe(), seq, err)
            with self._cond:
                self._failing = None
                self._journal_sent = asked
                if seq is not None:
                    self._held.add(seq)
                    self._held.difference_update(removed)
                    self._pending.remove(seq)
                self._cond.notify_all()

    def _warn_once(self, error: BaseException) -> None:
        kind, cause = failure_kind(error)
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"arraysnap: uploads to {self.remote.describe()} fail ({cause}); captures go on "
            f"committing in the local tier {self.local.describe()}, and uploads retry and "
            "catch up. Further failures of this kind are logged only", ArraysnapWarning,
            stacklevel=2)

    def _upload(self, seq: int) -> None:
        manifest, data = self.catalog.load_with_bytes(seq)
        if self._present is None:
            self._present = self._newest_remote_keys()
        with self._cond:
            held = set(self._held)
        transfer(self.local, self.remote, {seq: (data, manifest)}, present=self._present,
                 journal=self._journal, held=held)
        self._present = snapshot_keys(manifest)

    def _newest_remote_keys(self) -> set[str]:
        """The objects of the remote store's newest readable snapshot (all there: kept)."""
        remote = Catalog(self.remote)
        newest = _newest_readable(remote, remote.seqs())
        return set() if newest is None else snapshot_keys(newest[1])
