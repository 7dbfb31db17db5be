"""A store in an object store (S3, GCS, Azure, S3-compatible servers) through obstore.

Everything the storage interface asks for maps onto what such a store offers: a
create-only write is a conditional PUT (``If-None-Match: *``), a replacement is a plain
PUT (atomic for every reader), and every acknowledged write is durable, so ``barrier()``
has nothing left to do. Two things an object store lacks are built here:

- ``append``: an object cannot grow, so an append reads the value and writes it again
  whole, conditional on the version it read (``If-Match``): two requests and the value's
  size each time. The engine appends only small logs (the replay log, the history).
- the writer's lock: a *lease*, the object ``lock`` (``{"holder", "token", "expires"}``),
  created create-only, renewed every quarter of ``lease_seconds`` by a thread of the lease
  with conditional writes, given up by a conditional write that marks it expired, and
  taken over by another writer only once it has expired (by the clock of the writer that
  looks), or at once when its holder was a process of the same machine that no longer runs
  (same host, boot and pid namespace; the pid's start time differs or the pid is gone): a
  killed job restarted on its node need not wait out the lease. A writer whose lease was
  taken over, or not renewed for half of it, is refused every write from then on
  (``StoreLockedError``): it stops before its next commit. A write sent before that lands
  before the lease can expire: requests made from a URL are bounded by a quarter of the
  lease (obstore's ``timeout`` and ``retry_timeout``, unless `storage_options` set them),
  and clocks of the hosts are taken to differ by less than a quarter of it. A store object
  passed in keeps its own timeouts: keep them under a quarter of the lease.

A lost reply to a conditional write (the write landed, the reply did not, and the
client's retry meets its own write) is resolved by reading back: ``put_if_absent``
returns False for it, which the engine already resolves by comparing what is there
(``commit.put_manifest``), and an append compares the value with what it wrote.

Failures come back as the builtin errors the interface promises: an absent key as
:class:`FileNotFoundError`, a refused credential as :class:`PermissionError`, anything
else (the network, 5xx after the client's retries, throttling) as :class:`OSError` with
``errno.EIO`` and the store's message.

>>> from obstore.store import MemoryStore
>>> storage = ObjectStorage(MemoryStore())
>>> storage.create()
>>> storage.put_if_absent("chunks/ab/cd", b"x"), storage.put_if_absent("chunks/ab/cd", b"y")
(True, False)
>>> storage.append("history.jsonl", b"a\\n", at=0); storage.append("history.jsonl", b"b\\n", at=2)
>>> storage.get("history.jsonl"), sorted(storage.list_prefix("chunks/"))
(b'a\\nb\\n', ['chunks/ab/cd'])
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import StoreLockedError
from ._abc import DEFAULT_GET_LIMIT, Storage, WriterLock, parse_key

__all__ = ["ObjectStorage"]

LOCK_KEY = "lock"
DEFAULT_LEASE_SECONDS = 60.0
# Settings of obstore's HTTP client (its ClientConfig); every other key of
# `storage_options` configures the store itself (endpoint, region, credentials, ...).
_CLIENT_KEYS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "default_headers", "http1_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
    "proxy_url", "proxy_ca_certificate", "proxy_excludes", "root_certificate",
    "randomize_addresses", "read_timeout", "timeout", "user_agent"})


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError("a store in object storage needs obstore: pip install "
                          "'arraysnap[object]' (or pip install obstore)") from None
    return obstore


def _split_options(options: Mapping[str, Any], lease_seconds: float) -> dict[str, Any]:
    """`storage_options` as obstore's from_url takes them: config, client, retries. A
    request, retries included, is bounded by a quarter of the lease unless they say
    otherwise (see ``_Lease``)."""
    config: dict[str, Any] = {}
    client = dict(options.get("client_options") or {})
    retry = dict(options.get("retry_config") or {})
    for name, value in options.items():
        if name in ("client_options", "retry_config"):
            continue
        (client if name in _CLIENT_KEYS else config)[name] = value
    bound = datetime.timedelta(seconds=lease_seconds / 4)
    client.setdefault("timeout", bound)
    retry.setdefault("retry_timeout", bound)
    return {"config": config, "client_options": client, "retry_config": retry}


@contextlib.contextmanager
def _as_os_errors(key: str) -> Iterator[None]:
    """obstore's errors as the builtin ones the storage interface promises."""
    obstore = _obstore()
    failures = obstore.exceptions
    try:
        yield
    except (failures.NotFoundError, FileNotFoundError) as err:
        if isinstance(err, FileNotFoundError) and err.filename == key:
            raise  # already ours (a nested call)
        # obstore raises the builtin without the key: the caller's message needs it.
        raise FileNotFoundError(errno.ENOENT, "no such key in the object store", key) from None
    except (failures.PermissionDeniedError, failures.UnauthenticatedError) as err:
        raise PermissionError(errno.EACCES, f"refused by the object store: {_first_line(err)}",
                              key) from err
    except failures.BaseError as err:
        raise OSError(errno.EIO, f"object store error: {_first_line(err)}", key) from err


def _first_line(err: BaseException) -> str:
    # obstore's messages go on with a multi-line debug dump of the request.
    return str(err).strip().split("\n", 1)[0]


class _Lease(WriterLock):
    """The writer's lease on an object store (see the module doc).

    Writes stop once half the lease has passed without a renewal (renewals come every
    quarter): a write sent then still lands before the lease can expire, given requests
    bounded by a quarter of it (``ObjectStorage`` sets obstore's timeouts so) and clocks
    that differ by less than a quarter between hosts.
    """

    def __init__(self, storage: ObjectStorage, holder: str, seconds: float) -> None:
        self._storage = storage
        self._holder = holder
        self._seconds = seconds
        self._token = os.urandom(8).hex()
        self._tag: str | None = None
        self._renewed = 0.0  # monotonic start of the last renewal known to have landed
        self._lost: str | None = None  # once set, for good
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def body(self, *, released: bool = False) -> bytes:
        expires = 0.0 if released else time.time() + self._seconds
        return json.dumps({"holder": self._holder, "token": self._token,
                           "expires": expires, "process": _this_process()}).encode()

    def take(self) -> None:
        """Create the lease, or take over an expired one; StoreLockedError if held."""
        obstore, store = _obstore(), self._storage.store
        failures = obstore.exceptions
        for _ in range(3):  # a lease released or deleted between two of the requests
            started = time.monotonic()
            with _as_os_errors(LOCK_KEY):
                try:
                    self._tag = obstore.put(store, LOCK_KEY, self.body(), mode="create",
                                            use_multipart=False)["e_tag"]
                except (failures.AlreadyExistsError, failures.PreconditionError):
                    try:
                        self._take_over(started)
                    except FileNotFoundError:
                        continue
            if self._tag is not None:
                break
        if self._tag is None:
            raise StoreLockedError(f"{self._storage.describe()}: the lease object changed at "
                                   "every try; is another writer starting? Try again")
        self._renewed = started
        self._thread = threading.Thread(target=self._renew_loop, name="arraysnap-lease",
                                        daemon=True)
        self._thread.start()

    def _take_over(self, started: float) -> None:
        obstore, store = _obstore(), self._storage.store
        current = obstore.get(store, LOCK_KEY)
        tag, held = current.meta["e_tag"], _parse_lease(bytes(current.bytes()))
        if held.get("token") == self._token:
            self._tag = tag  # our own create, whose reply was lost
            return
        expires = _expiry(held)
        if expires > time.time() and not _holder_is_gone(held.get("process")):
            raise StoreLockedError(
                f"{self._storage.describe()} is being written by another process "
                f"({held.get('holder', 'unknown')}, its lease runs until "
                f"{time.ctime(expires)}); only one writer at a time: stop it, or open "
                "this store with mode='r' to read") from None
        try:
            self._tag = obstore.put(store, LOCK_KEY, self.body(), mode={"e_tag": tag},
                                    use_multipart=False)["e_tag"]
        except obstore.exceptions.PreconditionError:
            # Another writer's takeover, or ours whose reply was lost: the token says.
            current = obstore.get(store, LOCK_KEY)
            if _parse_lease(bytes(current.bytes())).get("token") != self._token:
                raise StoreLockedError(
                    f"{self._storage.describe()}: another writer took over the expired "
                    "lease at the same moment; only one writer at a time") from None
            self._tag = current.meta["e_tag"]

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._seconds / 4):
            self.renew()

    def renew(self) -> None:
        """Extend the lease (conditional on still holding it); note it lost if not."""
        obstore = _obstore()
        failures = obstore.exceptions
        started = time.monotonic()
        with self._lock:
            if self.lost is not None or self._tag is None:
                return
            try:
                self._tag = obstore.put(self._storage.store, LOCK_KEY, self.body(),
                                        mode={"e_tag": self._tag}, use_multipart=False)["e_tag"]
            except failures.PreconditionError:
                self._settle_precondition(started)
                return
            except failures.BaseError:
                return  # tried again at the next tick; `lost` notices if it never works
            self._renewed = started

    def _settle_precondition(self, started: float) -> None:
        # Either another writer took the lease over, or our renewal landed and its reply
        # was lost (the client's retry then met our own write): the token says which. The
        # renewal that landed counts from when it was sent, as its "expires" does.
        try:
            current = _obstore().get(self._storage.store, LOCK_KEY)
            held = _parse_lease(bytes(current.bytes()))
        except Exception:  # noqa: BLE001 - unknown: keep trying; `lost` times out
            return
        if held.get("token") == self._token:
            self._tag = current.meta["e_tag"]
            self._renewed = started
        else:
            self._lost = (f"another writer ({held.get('holder', 'unknown')}) took over this "
                          "writer's lease on the store")

    @property
    def lost(self) -> str | None:
        """Why this writer may no longer write (None while the lease holds)."""
        if (self._lost is None and self._tag is not None
                and time.monotonic() - self._renewed > self._seconds / 2):
            self._lost = (f"this writer's lease was not renewed for half of its "
                          f"{self._seconds:g} s (the object store unreachable or slow): "
                          "another writer may take it over")
        return self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            lost = self.lost
            tag, self._tag = self._tag, None
        self._storage.released(self)
        if tag is None or lost is not None:
            return  # not ours to give up: it expires, or another writer holds it
        # Given up by marking it expired, conditional on holding it still (a delete cannot
        # be conditional on every store): the next writer takes it over at once.
        with contextlib.suppress(Exception):  # an expired lease frees the store anyway
            _obstore().put(self._storage.store, LOCK_KEY, self.body(released=True),
                           mode={"e_tag": tag}, use_multipart=False)


def _process_identity(pid: int) -> dict[str, Any] | None:
    """What names process `pid` on this machine across pid reuse, containers and reboots
    (Linux: host, boot, pid namespace, pid and start time); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The start time is field 22; the command name (field 2) may hold spaces.
            start = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except (OSError, ValueError, IndexError):
        return None
    return {"host": socket.gethostname(), "boot": boot_id, "pidns": namespace, "pid": pid,
            "start": start}


_identities: dict[int, dict[str, Any] | None] = {}


def _this_process() -> dict[str, Any] | None:
    # By pid, not once at import: a process forked after the import is another process.
    pid = os.getpid()
    if pid not in _identities:
        _identities[pid] = _process_identity(pid)
    return _identities[pid]


def _holder_is_gone(process: object) -> bool:
    """Whether the lease's holder is a process of this machine (same host, boot and pid
    namespace) that no longer runs: a killed writer restarted on its node need not wait
    for its lease to expire. Anything unsure is "not gone"."""
    mine = _this_process()
    if mine is None or not isinstance(process, dict) or any(
            process.get(key) != mine[key] for key in ("host", "boot", "pidns")):
        return False
    pid = process.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # ESRCH: no such process; EPERM: one alive (another user's)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    alive = _process_identity(pid)  # alive: gone only if the pid now names another process
    return alive is not None and alive["pidns"] == mine["pidns"] and (
        alive["start"] != process.get("start"))


def _expiry(held: dict[str, Any]) -> float:
    """A lease's expiry time; 0 (expired) for a malformed one, which nobody renews."""
    expires = held.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool) \
            and 0 <= expires < 1e11:
        return float(expires)
    return 0.0


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


class ObjectStorage(Storage):
    """Keys to objects under a prefix of a bucket; see the module doc.

    `store` is an obstore store object (``S3Store``, ``GCSStore``, ``AzureStore``,
    ``MemoryStore``, ...) or a URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ...),
    with `storage_options` passed to obstore (``endpoint``, ``region``, credentials,
    ``allow_http``, ``timeout``; ``retry_config`` for its retries).

    >>> from obstore.store import MemoryStore
    >>> storage = ObjectStorage(MemoryStore())
    >>> storage.local_path is None, storage.barrier()
    (True, None)
    """

    def __init__(self, store: Any, *, storage_options: Mapping[str, Any] | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        obstore = _obstore()
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        if isinstance(store, str):
            self._url = store.rstrip("/")
            self.store = obstore.store.from_url(
                self._url, **_split_options(storage_options or {}, lease_seconds))
        else:
            if storage_options:
                raise ValueError("storage_options configure a store made from a URL; this "
                                 "store object is configured already")
            self._url = repr(store)
            self.store = store
        self.lease_seconds = float(lease_seconds)
        self._lease: _Lease | None = None

    @property
    def local_path(self) -> Path | None:
        return None

    def describe(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"ObjectStorage({self._url!r})"

    # -- reading ---------------------------------------------------------------------------
    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        key = parse_key(key)
        with _as_os_errors(key):
            result = _obstore().get(self.store, key)
            if result.meta["size"] > limit:
                raise OSError(errno.EFBIG, f"more than {limit} bytes", key)
            return bytes(result.bytes())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        key = parse_key(key)
        if start < 0 or length < 0:
            raise ValueError(f"a range starts and lasts at least 0 bytes, not {start}+{length}")
        with _as_os_errors(key):
            if length > 0:
                try:
                    return bytes(_obstore().get_range(self.store, key, start=start,
                                                      length=length))
                except _obstore().exceptions.NotFoundError:
                    raise
                except _obstore().exceptions.BaseError:
                    # A range starting at or past the end is refused (416): the value is
                    # shorter; anything else fails again below or is raised.
                    if start < self.size(key):
                        raise
                    return b""
            self.size(key)  # absent is FileNotFoundError, as for any read
            return b""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        key = parse_key(key)
        with _as_os_errors(key):
            return int(_obstore().head(self.store, key)["size"])

    def modified(self, key: str) -> float:
        key = parse_key(key)
        with _as_os_errors(key):
            return float(_obstore().head(self.store, key)["last_modified"].timestamp())

    def list_prefix(self, prefix: str) -> Iterator[str]:
        # obstore lists whole path segments; a prefix that ends inside one (``snap``)
        # lists its folder and keeps what matches.
        folder = prefix.rpartition("/")[0]
        with _as_os_errors(prefix or "/"):
            for batch in _obstore().list(self.store, folder or None):
                for meta in batch:
                    path = meta["path"]
                    if path.startswith(prefix):
                        yield path

    # -- writing ---------------------------------------------------------------------------
    def _writable(self, key: str) -> None:
        lease = self._lease
        why = lease.lost if lease is not None else None
        if why is not None:
            raise StoreLockedError(f"{self.describe()}: {why}; nothing more is written (the "
                                   f"write of {key!r} was refused): open the store again")

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        key = parse_key(key)
        self._writable(key)
        obstore = _obstore()
        with _as_os_errors(key):
            try:
                obstore.put(self.store, key, _flat(data), mode="create", use_multipart=False)
            except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
                return False
        return True

    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        key = parse_key(key)
        self._writable(key)
        with _as_os_errors(key):
            _obstore().put(self.store, key, _flat(data), mode="overwrite", use_multipart=False)

    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        key = parse_key(key)
        self._writable(key)
        obstore = _obstore()
        failures = obstore.exceptions
        with _as_os_errors(key):
            if at == 0:
                obstore.put(self.store, key, _flat(data), mode="overwrite", use_multipart=False)
                return
            mode: Any
            try:
                current = obstore.get(self.store, key)
                head, mode = bytes(current.bytes())[:at], {"e_tag": current.meta["e_tag"]}
            except failures.NotFoundError:
                head, mode = b"", "create"
            value = head.ljust(at, b"\0") + bytes(_flat(data))  # zeros, as a file extended
            try:
                obstore.put(self.store, key, value, mode=mode, use_multipart=False)
            except (failures.PreconditionError, failures.AlreadyExistsError):
                if bytes(obstore.get(self.store, key).bytes()) != value:
                    # Not retried (the one writer's own values never change under it):
                    # writing again would overwrite the other writer's change.
                    raise StoreLockedError(
                        f"{self.describe()}: {key!r} was changed by another writer during an "
                        "append; only one writer at a time") from None

    def delete(self, key: str) -> None:
        key = parse_key(key)
        self._writable(key)
        with _as_os_errors(key), contextlib.suppress(FileNotFoundError):
            _obstore().delete(self.store, key)

    def barrier(self, keys: Iterable[str] = ()) -> None:
        for key in keys:
            parse_key(key)
        # Every write above returned once the store acknowledged it: durable already.

    # -- a store's life --------------------------------------------------------------------
    def create(self) -> None:
        # A creation that died may have left the lock (as a local store's).
        others = [key for key in self.list_prefix("") if key != LOCK_KEY]
        if others:
            raise FileExistsError(
                f"{self.describe()} holds {len(others)} objects (such as {others[0]!r}) and "
                "is not an arraysnap store (no arraysnap.json); choose a new prefix")

    def lock_writer(self, holder: str) -> WriterLock:
        lease = _Lease(self, holder, self.lease_seconds)
        lease.take()
        self._lease = lease
        return lease

    def released(self, lease: _Lease) -> None:
        """The lease `lease` was given up: writes are no longer checked against it."""
        if self._lease is lease:
            self._lease = None

    def remove_temporaries(self) -> int:
        return 0  # every write is one request: nothing is ever left half-written

    def close(self) -> None:
        lease = self._lease
        if lease is not None:
            lease.release()


def _flat(data: bytes | memoryview) -> bytes | memoryview:
    """`data` as the one-dimensional bytes obstore takes."""
    if isinstance(data, bytes):
        return data
    return memoryview(data).cast("B")
