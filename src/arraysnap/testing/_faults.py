"""One fault plan for a whole local store: its storage calls, the file operations below them
and the baselines' file operations are counted, and can fail, wait, slow down or kill.

A :class:`FaultPlan` gives a :class:`FaultyStorage` (a ``WrapperStorage`` around a
``LocalStorage`` whose file operations go through the plan too) and a :class:`FaultyOps`
for the baselines. Every call is named by its *operation* and its *area*:

- storage operations (``get``, ``get_range``, ``exists``, ``size``, ``list_prefix``,
  ``put_if_absent``, ``put_atomic``, ``append``, ``delete``, ``barrier``), whose area is the
  key's first part ("chunks", "snapshots", "journal"; packs of chunks are in "chunks" too)
  or "root" for a top-level key (and for a barrier, which names no key);
- file operations (``write``, ``fsync``, ``replace``, ``unlink``, ``fsync_dir``) below the
  storage and in the baselines, whose area is the first folder of the path inside the store
  ("chunks", "snapshots", "journal", "mirror"), "root" at the top, "other" outside.

Arm a fault to raise ``OSError(err)`` at the `index`-th call (from 0) of one (operation,
area), once (area ``"*"``: counted over the whole store); or add rules that act on every
matching call (fail, wait at a gate, slow down, call back before or after).

>>> import errno, tempfile, numpy as np, arraysnap
>>> plan = FaultPlan(tempfile.mkdtemp() + "/run.snap")
>>> snap = arraysnap.open(plan.storage, chunk_bytes=4096, _baseline_ops=plan.baseline_ops,
...                       _retry_delays=())
>>> snap.capture({"u": np.zeros(2048)}, step=0).result().step
0
>>> plan.counts[("put_if_absent", "chunks")] > 0, plan.counts[("write", "mirror")] > 0
(True, True)
>>> plan.arm("put_if_absent", "snapshots", 0, errno.EIO)
>>> _ = snap.capture({"u": np.ones(2048)}, step=1)
>>> try:
...     snap.wait()
... except arraysnap.StoreWriteError as err:
...     print(err.__cause__ is plan.injected, plan.injected_at)
True snapshots/000000000002.json
>>> [info.step for info in snap.list()]
[0]
>>> snap.capture({"u": np.ones(2048)}, step=2).result().step  # the fault fired once
2
>>> snap.close()
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arraysnap.fsio import FileOps
from arraysnap.storage import DEFAULT_GET_LIMIT, LocalStorage, Storage, WrapperStorage, WriterLock

__all__ = ["ANY", "Call", "FaultPlan", "FaultyOps", "FaultyStorage", "Gate", "Rule", "key_area",
           "path_area"]

STORAGE_OPERATIONS = ("get", "get_range", "exists", "size", "list_prefix", "put_if_absent",
                      "put_atomic", "append", "delete", "barrier")
FILE_OPERATIONS = ("write", "fsync", "replace", "unlink", "fsync_dir")
# The area that stands for every area: ("write", ANY) counts the writes of the whole store.
ANY = "*"
# Folders of a store whose own entry (an fsync_dir of the folder itself) belongs to them.
_FOLDERS = ("chunks", "packs", "snapshots", "mirror", "journal", "tmp")
_AREA_OF = {"packs": "chunks"}  # the chunks' data, in objects of their own or in packs


def key_area(key: str) -> str:
    """The area of a storage key: its first part, or "root" for a top-level key; packs
    (format 3) hold chunks, and are in the area "chunks" with the chunk objects.

    >>> key_area("chunks/ab/cd"), key_area("packs/ab/cd"), key_area("arraysnap.json")
    ('chunks', 'chunks', 'root')
    """
    first, slash, _ = key.partition("/")
    return _AREA_OF.get(first, first) if slash else "root"


def path_area(root: str, where: str) -> str:
    """The area of a file path inside the store at `root` (a resolved path).

    >>> path_area("/s", "/s/chunks/ab/.tmp-x"), path_area("/s", "/s/mirror")
    ('chunks', 'mirror')
    >>> path_area("/s", "/s/.tmp-arraysnap.json.1"), path_area("/s", "/t/x")
    ('root', 'other')
    """
    if where == root:
        return "root"
    if not where.startswith(root + "/"):
        return "other"
    inside = where[len(root) + 1 :].split("/")
    if len(inside) > 1 or inside[0] in _FOLDERS:
        return _AREA_OF.get(inside[0], inside[0])
    return "root"


@dataclass(frozen=True, slots=True)
class Call:
    """One counted call: operation, area, where (a key, or a path relative to the store),
    its number among the calls of its (operation, area), and whether the main thread made it.

    >>> Call("put_if_absent", "chunks", "chunks/ab/cd", 0, True).where
    'chunks/ab/cd'
    """

    op: str
    area: str
    where: str
    number: int
    main_thread: bool


class Rule:
    """What to do on the calls that match (`op`, `area` if not None, `where` containing
    `match`): `before` and `after` callbacks get the :class:`Call`; a `before` may raise,
    block or sleep. Only calls from `skip` on count; the rule ends after `times` (None: never).

    >>> rule = Rule("delete", "chunks", before=lambda call: None, times=2)
    >>> rule.matches(Call("delete", "chunks", "chunks/ab/cd", 0, True))
    True
    """

    def __init__(self, op: str, area: str | None = None, *, match: str = "",
                 before: Callable[[Call], None] | None = None,
                 after: Callable[[Call], None] | None = None,
                 skip: int = 0, times: int | None = None) -> None:
        self.op, self.area, self.match = op, area, match
        self.before, self.after = before, after
        self.skip, self.times = skip, times
        self.seen = 0  # matching calls so far
        self.fired = 0  # calls acted on
        self.errors: list[OSError] = []  # what `fail` rules raised

    def matches(self, call: Call) -> bool:
        """Whether `call` is one this rule looks at (its `skip` and `times` aside)."""
        return (call.op == self.op and (self.area is None or call.area == self.area)
                and self.match in call.where)

    def _take(self) -> bool:
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class FaultPlan:
    """Counts, faults and rules for the store at `path`; see the module doc.

    `storage` and `baseline_ops` go to ``arraysnap.open(plan.storage,
    _baseline_ops=plan.baseline_ops)``; `file_ops` are the operations below `storage` and
    are the same object as `baseline_ops`. Thread-safe: the background threads of a store
    call it too.

    >>> import tempfile
    >>> plan = FaultPlan(tempfile.mkdtemp())
    >>> plan.storage.put_if_absent("chunks/ab/cd", b"x")
    True
    >>> sorted(op for op, area in plan.counts if area == "chunks")
    ['fsync', 'put_if_absent', 'replace', 'write']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.root = os.path.realpath(self.path)
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.log: list[Call] = []  # every file operation, in order (the kill points)
        self.rules: list[Rule] = []
        self.target: tuple[str, str] | None = None
        self.index = -1
        self.err = errno.EIO
        self.injected: OSError | None = None
        self.injected_at = ""
        self.injected_area = ""
        self._kill: tuple[int, bool] | None = None
        self.file_ops = FaultyOps(self)
        self.baseline_ops = self.file_ops
        self.storage = FaultyStorage(LocalStorage(self.path, self.file_ops), self)

    def around(self, storage: Storage) -> FaultyStorage:
        """`storage` (an :class:`~arraysnap.storage.ObjectStorage`, say) under this plan's
        counts, faults and rules too: the storage interface's fault wrapper for any store.

        >>> import tempfile
        >>> from obstore.store import MemoryStore
        >>> from arraysnap.storage import ObjectStorage
        >>> plan = FaultPlan(tempfile.mkdtemp())
        >>> remote = plan.around(ObjectStorage(MemoryStore()))
        >>> _ = plan.fail("put_if_absent", "chunks")
        >>> remote.put_if_absent("chunks/ab/cd", b"x")
        Traceback (most recent call last):
        ...
        OSError: [Errno 5] injected EIO at put_if_absent #0 in chunks (chunks/ab/cd)
        >>> remote.put_if_absent("chunks/ab/cd", b"x")
        True
        """
        return FaultyStorage(storage, self)

    # -- the one armed fault ---------------------------------------------------------------
    def arm(self, op: str, area: str, index: int, err: int) -> None:
        """Raise ``OSError(err)`` at the `index`-th call of `op` in `area` (``"*"``: in any
        area) from now (counts start again from 0), once.

        >>> import tempfile
        >>> plan = FaultPlan(tempfile.mkdtemp())
        >>> plan.arm("put_if_absent", "*", 1, errno.ENOSPC)
        >>> plan.storage.put_if_absent("chunks/ab/cd", b"x")
        True
        >>> plan.storage.put_if_absent("snapshots/1.json", b"x")
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] injected ENOSPC at put_if_absent #1 in snapshots (snapshots/1.json)
        >>> plan.injected_area, plan.counts[("put_if_absent", "*")]
        ('snapshots', 2)
        """
        if op not in STORAGE_OPERATIONS + FILE_OPERATIONS:
            raise ValueError(f"unknown operation {op!r}: use one of "
                             f"{', '.join(STORAGE_OPERATIONS + FILE_OPERATIONS)}")
        with self._lock:
            self.counts.clear()
            self.target, self.index, self.err = (op, area), index, err
            self.injected, self.injected_at, self.injected_area = None, "", ""

    def disarm(self) -> None:
        """Stop injecting the armed fault (the counts are kept)."""
        with self._lock:
            self.target = None

    def reset(self) -> None:
        """Forget the counts."""
        with self._lock:
            self.counts.clear()

    # -- rules -----------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        """Apply `rule` from now on; return it (``plan.remove(rule)`` ends it)."""
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Stop applying `rule`."""
        with self._lock:
            if rule in self.rules:
                self.rules.remove(rule)

    def fail(self, op: str, area: str | None = None, err: int = errno.EIO, *,
             match: str = "", skip: int = 0, times: int | None = 1) -> Rule:
        """Raise ``OSError(err)`` on matching calls: `times` of them (None: all) from the
        `skip`-th on; e.g. ``plan.fail("put_if_absent", "chunks", skip=1)`` fails only the
        second chunk object written. The errors raised are in ``rule.errors``."""

        def raise_it(call: Call) -> None:
            error = OSError(err, f"injected {errno.errorcode[err]} at {call.op} #{call.number} "
                                 f"in {call.area} ({call.where})")
            rule.errors.append(error)
            raise error

        rule = Rule(op, area, match=match, before=raise_it, skip=skip, times=times)
        return self.add(rule)

    def gate(self, op: str, area: str | None = None, *, match: str = "") -> Gate:
        """Make matching calls wait while the returned :class:`Gate` is closed."""
        gate = Gate()
        gate.rule = self.add(Rule(op, area, match=match, before=gate._pass))
        return gate

    def slow(self, op: str, area: str | None = None, seconds: float = 0.1, *,
             match: str = "") -> Rule:
        """Make each matching call take `seconds` longer (a slow file system)."""
        return self.add(Rule(op, area, match=match, before=lambda call: time.sleep(seconds)))

    def before(self, op: str, area: str | None, callback: Callable[[Call], None], *,
               match: str = "") -> Rule:
        """Call `callback(call)` before every matching call."""
        return self.add(Rule(op, area, match=match, before=callback))

    def after(self, op: str, area: str | None, callback: Callable[[Call], None], *,
              match: str = "") -> Rule:
        """Call `callback(call)` after every matching call that succeeded."""
        return self.add(Rule(op, area, match=match, after=callback))

    def kill_at(self, number: int, *, after: bool = False) -> None:
        """SIGKILL this process just before (or just after) its `number`-th file operation
        (from 1, counting every operation of ``log``, from the plan's creation)."""
        self._kill = (number, after)

    # -- the seam --------------------------------------------------------------------------
    def run(self, op: str, area: str, where: str, operation: Callable[[], Any]) -> Any:
        """Count one call, apply the armed fault and the rules, and do `operation`."""
        main = threading.current_thread() is threading.main_thread()
        with self._lock:
            number = self.counts[(op, area)]
            self.counts[(op, area)] += 1
            self.counts[(op, ANY)] += 1
            call = Call(op, area, where, number, main)
            killed = False
            if op in FILE_OPERATIONS:
                self.log.append(call)
                killed = self._kill is not None and len(self.log) == self._kill[0]
            if self.target is not None and self.target[0] == op:
                counted = self.counts[(op, ANY)] - 1 if self.target[1] == ANY else number
                if self.target[1] in (area, ANY) and counted == self.index:
                    self.target = None
                    self.injected_at, self.injected_area = where, area
                    self.injected = OSError(self.err, f"injected {errno.errorcode[self.err]} "
                                                      f"at {op} #{counted} in {area} ({where})")
                    raise self.injected
            rules = [rule for rule in self.rules if rule.matches(call) and rule._take()]
        if killed and self._kill is not None and not self._kill[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        for rule in rules:
            if rule.before is not None:
                rule.before(call)
        result = operation()
        if killed and self._kill is not None and self._kill[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        for rule in rules:
            if rule.after is not None:
                rule.after(call)
        return result

    def relative(self, where: str) -> str:
        """`where` (an absolute path) relative to the store, if inside it."""
        return where[len(self.root) + 1 :] if where.startswith(self.root + "/") else where


class Gate:
    """Holds matching calls while closed; ``started`` is set once one arrived.

    >>> gate = Gate(); gate.close(); gate.opened.is_set()
    False
    """

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.started = threading.Event()
        self.rule: Rule | None = None

    def close(self) -> None:
        """Make the next matching calls wait."""
        self.opened.clear()

    def open(self) -> None:
        """Let them go."""
        self.opened.set()

    def _pass(self, call: Call) -> None:
        self.started.set()
        if not self.opened.wait(60):
            raise TimeoutError(f"the gate on {call.op} in {call.area} was never opened")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class FaultyOps(FileOps):
    """The file operations of a :class:`FaultPlan`: counted, and subject to its faults.

    >>> import tempfile, pathlib
    >>> plan = FaultPlan(tempfile.mkdtemp())
    >>> (plan.path / "mirror").mkdir()
    >>> plan.file_ops.write_atomic(plan.path / "mirror" / "m.json", b"{}")
    >>> [(c.op, c.area) for c in plan.log][-3:]
    [('replace', 'mirror'), ('fsync_dir', 'mirror'), ('fsync', 'mirror')]
    """

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan

    def _run(self, op: str, where: str, operation: Callable[[], Any]) -> Any:
        plan = self.plan
        where = os.path.realpath(where) if where.startswith("/") else where
        return plan.run(op, path_area(plan.root, where), plan.relative(where), operation)

    def write(self, fd: int, data: memoryview | bytes) -> None:
        """Write, counted."""
        self._run("write", _fd_path(fd), lambda: FileOps.write(self, fd, data))

    def fsync(self, fd: int) -> None:
        """Fsync, counted."""
        self._run("fsync", _fd_path(fd), lambda: FileOps.fsync(self, fd))

    def replace(self, source: Path, target: Path) -> None:
        """Rename, counted by its target."""
        self._run("replace", str(target), lambda: FileOps.replace(self, source, target))

    def unlink(self, path: Path) -> None:
        """Unlink, counted."""
        self._run("unlink", str(path), lambda: FileOps.unlink(self, path))

    def fsync_dir(self, path: Path) -> None:
        """Fsync of a folder, counted (its inner fsync counts too)."""
        self._run("fsync_dir", str(path), lambda: FileOps.fsync_dir(self, path))


class FaultyStorage(WrapperStorage):
    """The storage of a :class:`FaultPlan`: every call counted, and subject to its faults.

    >>> import tempfile
    >>> plan = FaultPlan(tempfile.mkdtemp())
    >>> plan.fail("get", "root")  # doctest: +ELLIPSIS
    <arraysnap.testing._faults.Rule object at ...>
    >>> plan.storage.get("arraysnap.json")
    Traceback (most recent call last):
    ...
    OSError: [Errno 5] injected EIO at get #0 in root (arraysnap.json)
    """

    def __init__(self, inner: Storage, plan: FaultPlan) -> None:
        super().__init__(inner)
        self.plan = plan

    def _run(self, op: str, key: str, operation: Callable[[], Any]) -> Any:
        return self.plan.run(op, key_area(key), key, operation)

    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        return self._run("get", key, lambda: super(FaultyStorage, self).get(key, limit=limit))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._run("get_range", key, lambda: self.inner.get_range(key, start, length))

    def exists(self, key: str) -> bool:
        return self._run("exists", key, lambda: self.inner.exists(key))

    def size(self, key: str) -> int:
        return self._run("size", key, lambda: self.inner.size(key))

    def list_prefix(self, prefix: str) -> Iterator[str]:
        return self._run("list_prefix", prefix, lambda: iter(list(self.inner.list_prefix(prefix))))

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        return self._run("put_if_absent", key, lambda: self.inner.put_if_absent(key, data))

    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._run("put_atomic", key, lambda: self.inner.put_atomic(key, data, durable=durable))

    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        self._run("append", key, lambda: self.inner.append(key, data, at=at, durable=durable))

    def delete(self, key: str) -> None:
        self._run("delete", key, lambda: self.inner.delete(key))

    def barrier(self, keys: Iterable[str] = ()) -> None:
        keys = list(keys)
        self._run("barrier", "", lambda: self.inner.barrier(keys))

    def lock_writer(self, holder: str) -> WriterLock:
        return self.inner.lock_writer(holder)
