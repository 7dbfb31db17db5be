"""Snapshots as zarr v3: a read-only zarr Store adapter, ``open_zarr``, and export.

Chunk objects already are zarr v3 chunks (``bytes`` codec, then the store's compressor), so
the adapter only generates ``zarr.json`` documents from the manifest and resolves chunk keys
(``<array>/c/<i>/<j>...``) to chunk objects through the manifest's digests. Arrays kept in
Fortran order carry a ``transpose`` codec; structured dtypes, which zarr cannot describe
exactly (padding, byte order, sub-arrays), appear as raw bytes (``V<itemsize>``) with the
NumPy description in the array attribute ``arraysnap_dtype``: ``a.view(np.dtype(...))``.

Every array carries zarr v3 ``dimension_names`` (xarray needs them): the names recorded for it
at capture, else those given to ``open_zarr(dims=...)``, else ``<array>_dim_<axis>``. Names
are per array by default because xarray requires one size per dimension name in a dataset.

>>> import arraysnap, numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/s.snap"
>>> with arraysnap.open(path) as snap:
...     _ = snap.capture({"u": np.arange(6.0).reshape(2, 3)}, step=4)
>>> group = arraysnap.open_zarr(path)
>>> group["u"][1, :].tolist(), group.attrs["arraysnap"]["step"]
([3.0, 4.0, 5.0], 4)
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from ._store.catalog import Catalog
from ._store.locating import as_storage
from ._store.opening import not_a_store, read_settings
from .chunks import decode_chunk, read_object
from .codecs import CodecSpec
from .dtypes import dtype_to_json
from .fsio import FileOps
from .manifest import ArrayEntry, Manifest, check_dims
from .objects import ChunkObjects
from .storage import LocalStorage

__all__ = ["SnapshotZarrStore", "array_metadata", "dimension_names", "export_snapshot",
           "open_zarr"]

Dims = dict[str, tuple[str, ...]]


def _zarr_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"V{dtype.itemsize}") if dtype.fields is not None else dtype


def dimension_names(manifest: Manifest, dims: Dims | None = None) -> Dims:
    """The dimension names of every array: `dims`, then those recorded at capture, then
    ``<array>_dim_<axis>``.

    >>> from arraysnap.manifest import ArrayEntry
    >>> entry = ArrayEntry("u", (2, 1), np.dtype("u1"), "C", 0, 2, bytes(32))
    >>> m = Manifest(1, None, 0.0, None, {"name": "none", "level": 0}, {"u": entry})
    >>> dimension_names(m), dimension_names(m, {"u": ("y", "x")})
    ({'u': ('u_dim_0', 'u_dim_1')}, {'u': ('y', 'x')})
    """
    if dims is not None and not isinstance(dims, dict):
        raise TypeError(f"dims must be a dict of array name -> dimension names, got "
                        f"{type(dims).__name__}")
    unknown = sorted(set(dims or {}) - set(manifest.arrays))
    if unknown:
        raise ValueError(f"dims names arrays that snapshot {manifest.seq} does not have: "
                         f"{unknown}; it has {sorted(manifest.arrays)}")
    names: Dims = {}
    for name, entry in manifest.arrays.items():
        ndim = len(entry.shape)
        if dims and name in dims:
            try:
                names[name] = check_dims(name, ndim, dims[name])
            except ValueError as err:
                raise ValueError(f"open_zarr(dims=...): {err}") from None
        elif entry.dims is not None:
            names[name] = entry.dims
        else:
            names[name] = tuple(f"{name}_dim_{axis}" for axis in range(ndim))
    return names


def array_metadata(entry: ArrayEntry, codec: CodecSpec,
                   dims: tuple[str, ...] | None = None) -> bytes:
    """The ``zarr.json`` document of one array of a snapshot (`dims`: its dimension names)."""
    from zarr.codecs import BloscCodec, BytesCodec, TransposeCodec, ZstdCodec
    from zarr.storage import MemoryStore

    layout = entry.layout
    dtype = _zarr_dtype(entry.dtype)
    chunk_shape = layout.chunk_shape if layout.order == "C" else layout.chunk_shape[::-1]
    ndim = len(entry.shape)
    filters = [TransposeCodec(order=tuple(range(ndim))[::-1])] if layout.order == "F" else []
    if dtype.itemsize > 1 and dtype.byteorder != "|" and dtype.kind != "V":
        endian = "big" if dtype.byteorder == ">" or (
            dtype.byteorder == "=" and np.little_endian is False) else "little"
        serializer: Any = BytesCodec(endian=endian)
    else:
        serializer = BytesCodec(endian=None)
    compressors: list[Any] = []
    if codec.name == "zstd":
        compressors = [ZstdCodec(level=codec.level, checksum=False)]
    elif codec.name == "blosc":
        compressors = [BloscCodec(typesize=max(1, entry.dtype.itemsize), cname="lz4",
                                  clevel=codec.level, shuffle="shuffle", blocksize=0)]
    attributes: dict[str, Any] = {"arraysnap_order": layout.order}
    if dtype != entry.dtype:
        attributes["arraysnap_dtype"] = dtype_to_json(entry.dtype)
    documents: dict[str, Any] = {}  # what zarr writes into the store, read back below
    store = MemoryStore(documents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that some NumPy dtypes are not in the spec
        zarr.create_array(store=store, shape=entry.shape, chunks=chunk_shape, dtype=dtype,
                          filters=filters, serializer=serializer, compressors=compressors,
                          fill_value=None, attributes=attributes, zarr_format=3,
                          dimension_names=dims, write_data=False)
    return bytes(documents["zarr.json"].to_bytes())


def _group_metadata(manifest: Manifest, arrays: dict[str, bytes]) -> bytes:
    attributes = {"arraysnap": {"seq": manifest.seq, "step": manifest.step,
                                "time": manifest.time, "state": manifest.state}}
    # Inline consolidated metadata (zarr-python's v3 convention, ignorable by other readers):
    # xarray then opens the group from this one document, without a warning.
    consolidated = {"kind": "inline", "must_understand": False,
                    "metadata": {name: json.loads(document) for name, document in arrays.items()}}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes,
                       "consolidated_metadata": consolidated}).encode()


def _chunk_key(entry: ArrayEntry, index: int) -> str:
    coords = entry.layout.chunk_coords(index)
    return f"{entry.name}/c" + "".join(f"/{c}" for c in coords)


ChunkKeys = dict[str, tuple[ArrayEntry, int]]


def snapshot_keys(manifest: Manifest, codec: CodecSpec,
                  dims: Dims | None = None) -> tuple[dict[str, bytes], ChunkKeys]:
    """Metadata documents and chunk keys (to array entry and chunk index) of a snapshot."""
    chunks: ChunkKeys = {}
    names = dimension_names(manifest, dims)
    arrays = {}
    for name, entry in manifest.arrays.items():
        arrays[name] = array_metadata(entry, codec, names[name])
        for index in range(entry.n_chunks):
            chunks[_chunk_key(entry, index)] = (entry, index)
    metadata = {"zarr.json": _group_metadata(manifest, arrays)}
    metadata.update((f"{name}/zarr.json", document) for name, document in arrays.items())
    return metadata, chunks


class SnapshotZarrStore(Store):
    """A read-only zarr v3 Store showing one snapshot; every chunk read is verified.

    >>> import arraysnap, numpy as np, tempfile, zarr
    >>> path = tempfile.mkdtemp() + "/s.snap"
    >>> with arraysnap.open(path) as snap:
    ...     _ = snap.capture({"u": np.ones(3)})
    ...     store = snap.zarr_store()
    >>> float(zarr.open_array(store, path="u", mode="r")[:].sum())
    3.0
    """

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(self, manifest: Manifest, objects: ChunkObjects, codec: CodecSpec,
                 dims: Dims | None = None) -> None:
        super().__init__(read_only=True)
        self.manifest = manifest
        self._objects = objects
        self._codec = codec
        self._metadata, self._chunks = snapshot_keys(manifest, codec, dims)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SnapshotZarrStore) and other.manifest.seq == self.manifest.seq
                and other._objects.storage.describe() == self._objects.storage.describe())

    def __hash__(self) -> int:
        return hash((self.manifest.seq, self._objects.storage.describe()))

    def _read(self, key: str) -> bytes | None:
        if key in self._metadata:
            return self._metadata[key]
        found = self._chunks.get(key)
        if found is None:
            return None
        entry, index = found
        data = read_object(self._objects, entry, index, self.manifest.seq)
        decode_chunk(data, self._codec, entry, index, verify=True, seq=self.manifest.seq)
        return data

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        data = self._read(key)
        if data is None:
            return None
        if isinstance(byte_range, RangeByteRequest):
            data = data[byte_range.start : byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            data = data[byte_range.offset :]
        elif byte_range is not None:
            data = data[len(data) - byte_range.suffix :]
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return key in self._metadata or key in self._chunks

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError("arraysnap snapshots are read-only through zarr")

    async def delete(self, key: str) -> None:
        raise PermissionError("arraysnap snapshots are read-only through zarr")

    async def list(self) -> AsyncIterator[str]:
        for key in (*self._metadata, *self._chunks):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in (*self._metadata, *self._chunks):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        prefix = f"{prefix}/" if prefix else ""
        seen = set()
        for key in (*self._metadata, *self._chunks):
            if key.startswith(prefix):
                child = key[len(prefix):].split("/", 1)[0]
                if child not in seen:
                    seen.add(child)
                    yield child


def open_zarr(path: str | os.PathLike[str] | Any, step: int | None = None, *,
              seq: int | None = None, dims: Dims | None = None,
              storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open one snapshot of the store at `path` (a folder, a URL such as
    ``s3://bucket/run.snap`` with its `storage_options`, or a store object, as
    :func:`arraysnap.open` takes) as a read-only zarr v3 group.

    Works wherever zarr takes a group or store: ``dask.array.from_zarr(group["u"])``,
    ``xarray.open_zarr(group.store)``. The group's attribute ``arraysnap`` holds seq, step,
    time and state. `dims` names the dimensions of arrays, e.g. ``{"u": ("y", "x")}``,
    for xarray (arrays not named get ``u_dim_0``, ``u_dim_1``, ...).

    >>> import arraysnap, numpy as np, tempfile
    >>> path = tempfile.mkdtemp() + "/s.snap"
    >>> with arraysnap.open(path) as snap:
    ...     _ = snap.capture({"u": np.zeros(3)}, step=9)
    >>> arraysnap.open_zarr(path, step=9)["u"].shape
    (3,)
    >>> arraysnap.open_zarr(path, dims={"u": ("x",)})["u"].metadata.dimension_names
    ('x',)
    """
    storage = as_storage(path, storage_options)
    settings = read_settings(storage, codec=None)
    if settings is None:
        raise not_a_store(storage)
    manifest = Catalog(storage).select(step, seq)
    view = SnapshotZarrStore(manifest, ChunkObjects(storage), settings.codec, dims)
    return zarr.open_group(view, mode="r", zarr_format=3)


def export_snapshot(manifest: Manifest, objects: ChunkObjects, codec: CodecSpec,
                    out: Path, dims: Dims | None = None) -> Path:
    """Write `manifest`'s snapshot to a new plain zarr v3 directory store at `out`.

    >>> import arraysnap, numpy as np, tempfile, zarr
    >>> tmp = tempfile.mkdtemp()
    >>> from arraysnap._store.catalog import Catalog
    >>> from arraysnap.objects import ChunkObjects
    >>> from arraysnap.storage import LocalStorage
    >>> with arraysnap.open(tmp + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.arange(2.0)}).result()
    >>> storage = LocalStorage(tmp + "/s.snap")
    >>> manifest = Catalog(storage).select(None, None)
    >>> _ = export_snapshot(manifest, ChunkObjects(storage), snap.codec, Path(tmp) / "o.zarr",
    ...                     dims={"u": ("x",)})
    >>> zarr.open_array(tmp + "/o.zarr", path="u", mode="r").metadata.dimension_names
    ('x',)
    """
    if out.exists():
        raise FileExistsError(f"{out} already exists; export writes a new store")
    metadata, chunks = snapshot_keys(manifest, codec, dims)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    target = LocalStorage(staging)
    try:
        for key, document in metadata.items():
            target.put_if_absent(key, document)
        for key, (entry, index) in chunks.items():
            target.put_if_absent(key, read_object(objects, entry, index, manifest.seq))
        target.barrier()  # every file and folder of the copy, before its name appears
        ops = FileOps()
        ops.replace(staging, out)
        ops.fsync_dir(out.parent)  # the copy's name survives a power cut too
    except BaseException:
        FileOps().remove_tree(staging)
        raise
    return out
