"""What a power cut may leave: a model of a file system replayed from a journal.

The journal is the one the forgetting file system writes (:mod:`._forgetting`): every
operation that changes files or names, and the barriers. :class:`FileSystemModel` replays
it over the folder as it was when the journal began and can say, after any operation, what
a power cut then may leave on disk, under the rules that POSIX and Linux file systems give
and no more:

- a file's data and size are durable as of its last fsync (or fdatasync); of what was
  written since, any page may be lost and any kept (pages are written back in any order),
  and a grown size may be kept without the data;
- a folder's entries (creations, renames, removals in it) are durable as of its last fsync;
  any of those made since may be lost, each on its own (a rename is one change of each
  folder it touches);
- a name that survives names its file as that file's data survived: a renamed file whose
  data was never fsynced may come back empty or with its old bytes.

:meth:`FileSystemModel.crash_state` with no generator gives the state in which every
change not yet made durable is lost (what the forgetting file system leaves at a cut);
with one, a random choice among all the states the rules allow.

>>> import tempfile, pathlib
>>> model = FileSystemModel.empty()
>>> model.apply({"op": "create", "path": "/a", "fh": 3})
>>> model.apply({"op": "write", "fh": 3, "offset": 0}, b"hello")
>>> sorted(model.crash_state().files), model.live_state().files
([], {'a': b'hello'})
>>> model.apply({"op": "fsync", "fh": 3}); model.apply({"op": "fsyncdir", "path": "/"})
>>> model.crash_state().files
{'a': b'hello'}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MARKS", "PAGE", "CrashState", "FileSystemModel", "Journal"]

# The folder under a forgetting file system's root in which looking a name up journals a
# mark (the name is its label): how a process under test marks an instant.
MARKS = ".powercut"

PAGE = 4096  # the unit in which written data is kept or lost


@dataclass(slots=True)
class _File:
    live: bytearray
    durable: bytes
    pending: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True)
class _Folder:
    live: dict[str, int]
    durable: dict[str, int]
    pending: list[tuple[Any, ...]] = field(default_factory=list)


def _apply_data(content: bytearray, change: tuple[Any, ...]) -> None:
    kind = change[0]
    if kind == "write":
        _, offset, data = change
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset:offset + len(data)] = data
    elif kind == "truncate":
        size = change[1]
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))
    else:  # fallocate: the size grows to cover the range; the bytes read as zeros
        end = change[1] + change[2]
        if end > len(content):
            content.extend(bytes(end - len(content)))


def _changes(kind: str, op: dict[str, Any], data: bytes | None,
             size: int) -> list[tuple[Any, ...]]:
    """The changes one operation makes, each of which a cut may keep or lose on its own:
    a write's pages, and the growth of the size apart from the data."""
    if kind == "truncate":
        return [("truncate", op["size"])]
    if kind == "fallocate":
        return [("fallocate", op["offset"], op["length"])]
    assert data is not None
    offset = op["offset"]
    changes: list[tuple[Any, ...]] = []
    if offset + len(data) > size:
        changes.append(("fallocate", 0, offset + len(data)))  # the size, without the data
    start = offset
    while start < offset + len(data):
        stop = min(offset + len(data), (start // PAGE + 1) * PAGE)
        changes.append(("write", start, data[start - offset:stop - offset]))
        start = stop
    return changes


def _apply_name(entries: dict[str, int], change: tuple[Any, ...]) -> None:
    if change[0] == "set":
        entries[change[1]] = change[2]
    else:
        entries.pop(change[1], None)


@dataclass(frozen=True, slots=True)
class CrashState:
    """The files and folders a cut leaves (paths relative to the file system's root).

    >>> state = CrashState({"a/b": b"x"}, frozenset({"a"}))
    >>> import tempfile, pathlib; root = pathlib.Path(tempfile.mkdtemp()) / "s"
    >>> state.write(root); (root / "a" / "b").read_bytes()
    b'x'
    """

    files: dict[str, bytes]
    folders: frozenset[str]

    def write(self, root: Path) -> None:
        """Create `root` holding exactly this state."""
        root.mkdir(parents=True)
        for folder in sorted(self.folders, key=len):
            (root / folder).mkdir()
        for name, data in self.files.items():
            (root / name).write_bytes(data)


class FileSystemModel:
    """Files and folders as the journal's operations left them, live and durable."""

    def __init__(self) -> None:
        self._nodes: dict[int, _File | _Folder] = {0: _Folder({}, {})}
        self._handles: dict[int, int] = {}
        self._next = 1

    @classmethod
    def empty(cls) -> FileSystemModel:
        """A model of an empty file system."""
        return cls()

    @classmethod
    def of_folder(cls, root: Path) -> FileSystemModel:
        """A model of the folder `root` as it is now, all of it durable."""
        model = cls()
        pending = [(root, 0)]
        while pending:
            folder, node = pending.pop()
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    child = model._new(_Folder({}, {}))
                    pending.append((Path(entry.path), child))
                else:
                    data = Path(entry.path).read_bytes()
                    child = model._new(_File(bytearray(data), data))
                folder_node = model._folder(node)
                folder_node.live[entry.name] = folder_node.durable[entry.name] = child
        return model

    # -- replaying ------------------------------------------------------------------------
    def _new(self, node: _File | _Folder) -> int:
        number = self._next
        self._next += 1
        self._nodes[number] = node
        return number

    def _folder(self, number: int) -> _Folder:
        node = self._nodes[number]
        if not isinstance(node, _Folder):
            raise ValueError(f"node {number} is not a folder")
        return node

    def _lookup(self, path: str) -> int:
        number = 0
        for part in path.strip("/").split("/") if path.strip("/") else []:
            number = self._folder(number).live[part]
        return number

    def _parent(self, path: str) -> tuple[_Folder, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        return self._folder(self._lookup(parent)), name

    def _name_change(self, folder: _Folder, change: tuple[Any, ...]) -> None:
        _apply_name(folder.live, change)
        folder.pending.append(change)

    def _file(self, op: dict[str, Any]) -> _File:
        number = self._handles[op["fh"]] if op.get("fh") is not None else self._lookup(
            op["path"])
        node = self._nodes[number]
        if not isinstance(node, _File):
            raise ValueError(f"{op} is not an operation on a file")
        return node

    def apply(self, op: dict[str, Any], data: bytes | None = None) -> None:
        """Replay one journaled operation (`data`: the bytes of a write)."""
        kind = op["op"]
        if kind in ("create", "mkdir"):
            folder, name = self._parent(op["path"])
            number = self._new(_File(bytearray(), b"") if kind == "create"
                               else _Folder({}, {}))
            self._name_change(folder, ("set", name, number))
            if kind == "create":
                self._handles[op["fh"]] = number
        elif kind == "open":
            self._handles[op["fh"]] = self._lookup(op["path"])
        elif kind == "release":
            self._handles.pop(op["fh"], None)
        elif kind in ("write", "truncate", "fallocate"):
            node = self._file(op)
            for change in _changes(kind, op, data, len(node.live)):
                _apply_data(node.live, change)
                node.pending.append(change)
        elif kind == "fsync":
            node = self._file(op)
            node.durable, node.pending = bytes(node.live), []
        elif kind == "fsyncdir":
            folder = self._folder(self._lookup(op["path"]))
            folder.durable, folder.pending = dict(folder.live), []
        elif kind in ("unlink", "rmdir"):
            folder, name = self._parent(op["path"])
            self._name_change(folder, ("del", name))
        elif kind == "rename":
            source, old = self._parent(op["old"])
            target, new = self._parent(op["new"])
            number = source.live[old]
            self._name_change(source, ("del", old))
            self._name_change(target, ("set", new, number))
        elif kind != "mark":
            raise ValueError(f"unknown journal operation {kind!r}")

    def pending_changes(self) -> int:
        """How many changes a cut now could lose (made since their file's or folder's
        last fsync)."""
        return sum(len(node.pending) for node in self._nodes.values())

    # -- states ---------------------------------------------------------------------------
    def live_state(self) -> CrashState:
        """What the files hold now (what a killed process, not a power cut, leaves)."""
        return self._state(lambda node: bytes(node.live), lambda folder: folder.live)

    def crash_state(self, rng: random.Random | None = None) -> CrashState:
        """What a power cut now may leave: with no `rng`, every change not yet durable is
        lost; with one, each is lost or kept at random (see the module doc)."""
        if rng is None:
            return self._state(lambda node: node.durable, lambda folder: folder.durable)
        chooser = rng

        def mixture(node: _File | _Folder, start: Any, apply: Any) -> Any:
            # One share of changes kept per file or folder: some keep all, some lose all.
            keep = chooser.random()
            for change in node.pending:
                if chooser.random() < keep:
                    apply(start, change)
            return start

        def content(node: _File) -> bytes:
            return bytes(mixture(node, bytearray(node.durable), _apply_data))

        def entries(folder: _Folder) -> dict[str, int]:
            return mixture(folder, dict(folder.durable), _apply_name)  # type: ignore[no-any-return]
        return self._state(content, entries)

    def _state(self, content: Any, entries: Any) -> CrashState:
        files: dict[str, bytes] = {}
        folders: set[str] = set()
        seen = {0}
        contents: dict[int, bytes] = {}  # one content per file, however many names it has
        pending = [(0, "")]
        while pending:
            number, prefix = pending.pop()
            for name, child in entries(self._folder(number)).items():
                node = self._nodes[child]
                if isinstance(node, _Folder):
                    if child in seen:
                        continue  # a folder renamed into its own subtree by lost changes
                    seen.add(child)
                    folders.add(prefix + name)
                    pending.append((child, f"{prefix}{name}/"))
                else:  # a file may keep two names (a rename's removal lost, not its new one)
                    if child not in contents:
                        contents[child] = content(node)
                    files[prefix + name] = contents[child]
        return CrashState(files, frozenset(folders))


@dataclass(frozen=True, slots=True)
class Journal:
    """The operations a forgetting file system journaled, with their data.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "ops.jsonl").write_text('{"op": "mark", "label": "x"}\\n')
    >>> _ = (folder / "data.bin").write_bytes(b"")
    >>> Journal.read(folder).marks()
    [(0, 'x')]
    """

    ops: tuple[dict[str, Any], ...]
    blob: bytes

    @classmethod
    def read(cls, folder: Path) -> Journal:
        """The journal in `folder`; a line torn by a dying writer is left out."""
        ops = []
        for line in (folder / "ops.jsonl").read_bytes().split(b"\n"):
            try:
                ops.append(json.loads(line))
            except ValueError:
                continue
        return cls(tuple(ops), (folder / "data.bin").read_bytes())

    def data(self, op: dict[str, Any]) -> bytes | None:
        """The bytes `op` wrote, if it is a write."""
        if "data" not in op:
            return None
        start, length = op["data"]
        return self.blob[start:start + length]

    def marks(self) -> list[tuple[int, str]]:
        """Each mark's label with its index among the operations."""
        return [(i, op["label"]) for i, op in enumerate(self.ops) if op["op"] == "mark"]

    def labels(self, before: int | None = None) -> list[str]:
        """The labels marked before operation `before` (None: all of them)."""
        return [label for i, label in self.marks() if before is None or i < before]

    def apply(self, model: FileSystemModel, before: int | None = None) -> None:
        """Apply the operations before `before` (None: all of them) to `model`."""
        for op in self.ops[:before]:
            model.apply(op, self.data(op))

    def barriers(self) -> list[int]:
        """The indices of the fsyncs of files and folders."""
        return [i for i, op in enumerate(self.ops) if op["op"] in ("fsync", "fsyncdir")]

    def replay(self, model: FileSystemModel, cuts: set[int]) -> Iterator[int]:
        """Apply every operation to `model`; stop before each index in `cuts` to yield it
        (and at the end, as index ``len(ops)``, if asked)."""
        for i, op in enumerate(self.ops):
            if i in cuts:
                yield i
            model.apply(op, self.data(op))
        if len(self.ops) in cuts:
            yield len(self.ops)
