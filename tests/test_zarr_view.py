"""Snapshots read through zarr: the Store adapter, open_zarr, and export."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zarr

import arraysnap
from arraysnap.testing import chunk_ranges


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "c": rng.standard_normal((37, 11)),
        "f": np.asfortranarray(rng.integers(0, 100, (9, 13, 4)).astype(">i4")),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3)),
        "text": np.array(["ab", "cde", ""], dtype="<U3"),
        "flags": rng.random(50) > 0.5,
        "time": np.arange(6).astype("M8[s]"),
        "wide": rng.standard_normal((3, 40)),  # rows larger than the chunk: split on axis 1
    }


@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
def test_open_zarr_reads_every_array(store_path, codec):
    data = arrays()
    with arraysnap.open(store_path, chunk_bytes=96, codec=codec) as snap:
        snap.capture(data, step=3, state={"t": 1.0})
        snap.capture({k: np.zeros_like(v) for k, v in data.items()}, step=4)
    group = arraysnap.open_zarr(store_path, step=3)
    assert group.attrs["arraysnap"]["step"] == 3 and group.attrs["arraysnap"]["state"] == {"t": 1.0}
    for name, expected in data.items():
        actual = group[name][...]
        assert actual.shape == expected.shape
        assert np.array_equal(actual, expected), name
    assert not np.any(arraysnap.open_zarr(store_path)["c"][:])  # latest is the zeros


def test_structured_arrays_appear_as_raw_bytes_with_their_dtype(store_path):
    dt = np.dtype([("a", "u1"), ("b", ">f8", (2,))], align=True)
    value = np.zeros(5, dtype=dt)
    value["a"] = np.arange(5)
    value["b"][:, 1] = 1.5
    with arraysnap.open(store_path) as snap:
        snap.capture({"s": value})
    array = arraysnap.open_zarr(store_path)["s"]
    described = arraysnap.dtypes.dtype_from_json(array.attrs["arraysnap_dtype"])
    view = np.ascontiguousarray(array[...]).view(described)
    assert np.array_equal(view["a"], value["a"]) and np.array_equal(view["b"], value["b"])


def test_export_is_a_plain_zarr_store(store_path, tmp_path):
    data = arrays()
    with arraysnap.open(store_path, chunk_bytes=128) as snap:
        snap.capture(data, step=1)
        out = snap.export(tmp_path / "out.zarr")
        with pytest.raises(FileExistsError):
            snap.export(out)
    group = zarr.open_group(out, mode="r")
    for name, expected in data.items():
        assert np.array_equal(group[name][...], expected), name
    assert not list(tmp_path.glob(".out.zarr.partial-*"))


def test_corrupt_chunk_is_reported_through_zarr(store_path):
    with arraysnap.open(store_path, chunk_bytes=64) as snap:
        snap.capture({"u": np.arange(100.0)})
        store = snap.zarr_store()
        victim, offset, length = chunk_ranges(store_path)[(1, "u", 3)]
    data = bytearray((store_path / victim).read_bytes())
    data[offset + length - 1] ^= 1
    (store_path / victim).write_bytes(bytes(data))
    array = zarr.open_array(store, path="u", mode="r")
    with pytest.raises(arraysnap.CorruptSnapshotError, match="array 'u', chunk 3"):
        array[...]


def test_adapter_is_read_only(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.arange(3)})
        store = snap.zarr_store()
    with pytest.raises(ValueError, match="read-only"):
        zarr.open_array(store, path="u", mode="r+")[0] = 5
    with pytest.raises(PermissionError):
        asyncio.run(store.set("u/zarr.json", None))
    assert arraysnap.open_zarr(store_path)["u"][0] == 0
