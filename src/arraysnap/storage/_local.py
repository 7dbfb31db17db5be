"""A store in a local directory: a key is a file, a ``/`` a folder.

Writes go to a temporary file beside the target (``.tmp-<name>.<random>``), which is
fsynced and renamed into place, so a name that exists always holds a whole value. The
folders whose entries changed are fsynced in one batch at the next ``barrier()``: a
capture's objects cost one folder fsync per folder, not one per object. Deletions are
batched the same way, so a prune's removal of a manifest is durable before the chunk
objects it used go.

The file operations themselves go through a :class:`~arraysnap.fsio.FileOps`, the seam
where the tests of this module (and only they) inject faults below the storage interface.

>>> import tempfile
>>> storage = LocalStorage(tempfile.mkdtemp())
>>> storage.append("journal/0.jsonl", b"a\\n", at=0)
>>> storage.append("journal/0.jsonl", b"b\\n", at=2)
>>> storage.barrier(); storage.get("journal/0.jsonl")
b'a\\nb\\n'
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ReadOnlyStoreError, StoreLockedError
from ..fsio import TMP_PREFIX, FileOps, read_regular_file
from ._abc import DEFAULT_GET_LIMIT, Storage, WriterLock, parse_key

__all__ = ["LocalStorage"]

LOCK_NAME = "lock"
# Values at least this large (chunk objects, packs) leave the page cache once durable
# (FileOps.drop_cached says why); smaller ones, table nodes above all, are read soon by readers.
UNCACHED_BYTES = 256 << 10
# Folders a new store starts with; a creation that died may leave them, empty.
STORE_FOLDERS = ("chunks", "snapshots", "mirror")


def _not_writable(path: Path, err: OSError) -> ReadOnlyStoreError:
    return ReadOnlyStoreError(
        f"{path} is not writable by this user ({err.strerror}); open it with mode='r' to "
        "read it, or write a store of your own elsewhere")


class _FileLock(WriterLock):
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalStorage(Storage):
    """Keys as files under `path` (see the module doc); `ops` is the file-operation seam.
    With `keep_cached`, large values stay in the page cache too (a local tier, whose
    uploader reads each object back at once).

    >>> import tempfile
    >>> storage = LocalStorage(tempfile.mkdtemp())
    >>> storage.put_if_absent("a/b", b"xyz"), storage.get_range("a/b", 1, 5), storage.size("a/b")
    (True, b'yz', 3)
    """

    def __init__(self, path: str | os.PathLike[str], ops: FileOps | None = None, *,
                 keep_cached: bool = False) -> None:
        self.path = Path(path)
        self._uncached_bytes = 1 << 62 if keep_cached else UNCACHED_BYTES
        self._root = os.fspath(self.path)
        self.ops = ops or FileOps()
        self._lock = threading.Lock()
        self._unsynced_dirs: set[Path] = set()
        self._unsynced_files: set[Path] = set()
        # Appended with durable=False: synced only by a barrier that names them.
        self._lazy_files: set[Path] = set()

    @property
    def local_path(self) -> Path:
        return self.path

    def describe(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.path)!r})"

    def _file(self, key: str) -> Path:
        return self.path / parse_key(key)

    # -- reading ---------------------------------------------------------------------------
    def get(self, key: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
        # A string path: opening a store of 10,000 arrays reads 500 table objects, and a
        # Path a key cost more than the read.
        return read_regular_file(os.path.join(self._root, parse_key(key)), limit)

    def modified(self, key: str) -> float:
        return os.stat(os.path.join(self._root, parse_key(key))).st_mtime

    def read_once(self, key: str) -> bytes:
        path = os.path.join(self._root, parse_key(key))
        data = read_regular_file(path, DEFAULT_GET_LIMIT)
        if len(data) >= UNCACHED_BYTES:
            try:  # a hint: a value deleted meanwhile has nothing left to drop
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return data
            try:
                self.ops.drop_cached(fd)
            finally:
                os.close(fd)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        fd = os.open(self._file(key), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._file(key))

    def size(self, key: str) -> int:
        return os.stat(self._file(key)).st_size

    def list_prefix(self, prefix: str) -> Iterator[str]:
        folder, _, start = prefix.rpartition("/")
        top = os.path.join(self.path, parse_key(folder)) if folder else os.fspath(self.path)
        # Iterative, never following links to folders: a hostile store's deep or looping
        # tree can neither overflow the stack nor lead outside the store. Plain strings:
        # the catalog lists the manifests at every restore.
        pending = [(top, f"{folder}/" if folder else "", True)]
        while pending:
            directory, relative, at_top = pending.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = list(listing)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(TMP_PREFIX) or (at_top and not name.startswith(start)):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, f"{relative}{name}/", False))
                else:
                    yield relative + name

    # -- writing ---------------------------------------------------------------------------
    def _made_parent(self, path: Path) -> None:
        """Create `path`'s folder if needed (a new folder's entry needs a sync too).

        A link planted in place of one of the folders is removed first: writes never
        follow one out of the store.
        """
        parent = path.parent
        current = self.path
        for part in parent.relative_to(self.path).parts:
            current = current / part
            if current.is_symlink():
                self.ops.unlink(current)
        if parent.is_dir():
            return
        created = []  # the folders this call makes: each one's entry is new in its parent
        ancestor = parent
        while ancestor != self.path and not ancestor.is_dir():
            created.append(ancestor)
            ancestor = ancestor.parent
        parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._unsynced_dirs.update(folder.parent for folder in created)

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        path = self._file(key)
        if path.is_file():
            return False
        self._made_parent(path)
        # One writer holds the lock, and content-addressed values are equal: a rename over
        # a value that appeared meanwhile replaces it with the same bytes.
        temp = self.ops.write_new(path, data,
                                  cached=memoryview(data).nbytes < self._uncached_bytes)
        try:
            self.ops.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._unsynced_dirs.add(path.parent)
        return True

    def put_atomic(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        path = self._file(key)
        self._made_parent(path)
        self.ops.write_atomic(path, data, durable=durable)

    def append(self, key: str, data: bytes | memoryview, *, at: int,
               durable: bool = True) -> None:
        path = self._file(key)
        self._made_parent(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if at == 0:
                with self._lock:  # a new value, perhaps under a new name
                    self._unsynced_dirs.add(path.parent)
            if size != at:
                self.ops.truncate(fd, at)
            os.lseek(fd, at, os.SEEK_SET)
            try:
                self.ops.write(fd, data)
            except BaseException:
                # Cut off whatever part reached the file: a retry writes it all again.
                self.ops.truncate(fd, at)
                raise
        finally:
            os.close(fd)
        with self._lock:
            (self._unsynced_files if durable else self._lazy_files).add(path)

    def delete(self, key: str) -> None:
        path = self._file(key)
        try:
            self.ops.unlink(path)
        except FileNotFoundError:
            return
        with self._lock:
            self._unsynced_dirs.add(path.parent)

    def barrier(self, keys: Iterable[str] = ()) -> None:
        with self._lock:
            for key in keys:
                # A name a killed writer may not have synced; the data of a put was synced
                # before its rename, only lazily appended data still needs it.
                path = self._file(key)
                self._unsynced_dirs.add(path.parent)
                if path.parent != self.path:
                    self._unsynced_dirs.add(path.parent.parent)
                if path in self._lazy_files:
                    self._lazy_files.discard(path)
                    self._unsynced_files.add(path)
            files, self._unsynced_files = self._unsynced_files, set()
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        try:
            while files:
                self._sync_file(files.pop())
            # Deepest first: a new folder's entries before the entry that names it.
            for directory in sorted(dirs, key=lambda d: -len(d.parts)):
                if directory.is_dir():
                    self.ops.fsync_dir(directory)
                dirs.discard(directory)
        except BaseException:
            with self._lock:  # still owed: the next barrier tries again
                self._unsynced_files |= files
                self._unsynced_dirs |= dirs
            raise

    def _sync_file(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # deleted since: nothing of it to keep
        try:
            self.ops.fsync(fd)
        finally:
            os.close(fd)

    # -- a store's life --------------------------------------------------------------------
    def create(self) -> None:
        if self.path.exists():
            if not self.path.is_dir():
                raise FileExistsError(f"{self.path} exists and is not a directory")
            # A creation that died leaves `lock`, temporaries and empty store folders.
            leftovers = [p.name for p in self.path.iterdir()
                         if p.name != LOCK_NAME and not p.name.startswith(TMP_PREFIX)
                         and not (p.name in STORE_FOLDERS
                                  and p.is_dir() and not p.is_symlink()
                                  and not any(p.iterdir()))]
            if leftovers:
                raise FileExistsError(
                    f"{self.path} is not empty and not an arraysnap store (no arraysnap.json); "
                    "choose a new path"
                )
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot create the store {self.path}: its folder {self.path.parent} does not "
                "exist; create that folder first (arraysnap creates only the store's own)")
        try:
            self.path.mkdir(exist_ok=True)
        except PermissionError as err:
            raise _not_writable(self.path, err) from None
        for sub in STORE_FOLDERS:
            (self.path / sub).mkdir(exist_ok=True)
        with self._lock:
            self._unsynced_dirs.add(self.path.parent)

    def lock_writer(self, holder: str) -> WriterLock:
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _not_writable(self.path, err) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.path} is being written by another process ({other}); only one writer "
                "at a time: stop it, or open this store with mode='r' to read"
            ) from None
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, holder.encode(), 0)
        except OSError:
            pass  # only for another writer's message: a full disk must not stop an open
        return _FileLock(fd)

    def remove_temporaries(self) -> int:
        # Where writes happen: the top, the manifests' folder and the folders of the chunk,
        # table and pack objects (plain strings: this runs at every writer's open, over 768
        # folders).
        root = os.fspath(self.path)
        folders = [root, os.path.join(root, "snapshots")]
        for objects in ("chunks", "tables", "packs"):
            top = os.path.join(root, objects)
            if os.path.isdir(top) and not os.path.islink(top):
                with os.scandir(top) as listing:
                    folders += [e.path for e in listing if e.is_dir(follow_symlinks=False)]
        removed = 0
        for folder in folders:
            try:
                with os.scandir(folder) as listing:
                    leftovers = [e.path for e in listing if e.name.startswith(TMP_PREFIX)
                                 and not e.is_dir(follow_symlinks=False)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for leftover in leftovers:
                self.ops.unlink(Path(leftover))
                removed += 1
        return removed
