"""Snapshots read by other tools: xarray, dask and tensorstore (optional test extras)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import arraysnap
from arraysnap.manifest import ArrayEntry, Manifest, parse_manifest
from arraysnap.zarr_view import dimension_names

xarray = pytest.importorskip("xarray")
dask_array = pytest.importorskip("dask.array")


def captured() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    field = rng.standard_normal((40, 30))
    field[3, 4] = np.nan                  # must come back as this NaN, not masked
    return {
        "u": field,
        "zeros": np.zeros((40, 30)),      # zarr's fill value is 0: must not become NaN
        "counts": rng.integers(-5, 5, 200).astype(np.int32),
        "fortran": np.asfortranarray(rng.standard_normal((7, 9))),
        "flags": rng.random(13) > 0.5,
        "scalar": np.array(1.5),
    }


def same_bits(actual: object, expected: np.ndarray) -> bool:
    """Bit-exact values (xarray/dask may hand back another memory order)."""
    actual = np.asarray(actual)
    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes())


@pytest.fixture
def store(store_path):
    data = captured()
    with arraysnap.open(store_path, chunk_bytes=1024) as snap:   # several chunks per array
        snap.capture(data, step=7, state={"t": 0.7})
        snap.capture({k: np.zeros_like(v) for k, v in data.items()}, step=8)
    return store_path, data


@pytest.mark.parametrize("opener", ["open_zarr", "open_dataset"])
def test_xarray_reads_a_snapshot_bit_exactly(store, opener):
    path, data = store
    group = arraysnap.open_zarr(path, step=7, dims={"u": ("y", "x"), "zeros": ("y", "x")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no "consolidated metadata" fallback warning
        if opener == "open_zarr":
            dataset = xarray.open_zarr(group.store)
        else:
            dataset = xarray.open_dataset(group.store, engine="zarr")
    assert dataset["u"].dims == ("y", "x") and dataset["zeros"].dims == ("y", "x")
    assert dataset.sizes["y"] == 40 and dataset["counts"].dims == ("counts_dim_0",)
    assert dataset["scalar"].dims == ()
    for name, expected in data.items():
        assert same_bits(dataset[name].values, expected), name
    assert dataset.attrs["arraysnap"]["step"] == 7
    assert dataset.attrs["arraysnap"]["state"] == {"t": 0.7}


def test_xarray_reads_an_export(store, tmp_path):
    path, data = store
    with arraysnap.open(path, mode="r") as snap:
        snap.export(tmp_path / "out.zarr", step=7)
    dataset = xarray.open_zarr(tmp_path / "out.zarr")
    for name, expected in data.items():
        assert same_bits(dataset[name].values, expected), name


def test_dask_from_zarr(store):
    path, data = store
    group = arraysnap.open_zarr(path, step=7)
    for name, expected in data.items():
        lazy = dask_array.from_zarr(group[name])
        assert lazy.shape == expected.shape
        assert same_bits(lazy.compute(), expected), name
    total = dask_array.from_zarr(group["counts"]).sum().compute()
    assert total == data["counts"].sum()


def test_default_dimension_names_are_per_array_and_zarr_shows_them(store):
    path, _ = store
    group = arraysnap.open_zarr(path)
    assert group["u"].metadata.dimension_names == ("u_dim_0", "u_dim_1")
    assert group["fortran"].metadata.dimension_names == ("fortran_dim_0", "fortran_dim_1")


def test_bad_dims_are_refused_with_the_reason(store):
    path, _ = store
    with pytest.raises(ValueError, match="has 2 dimensions but 1 dimension names"):
        arraysnap.open_zarr(path, dims={"u": ("x",)})
    with pytest.raises(ValueError, match="does not have: \\['w'\\]"):
        arraysnap.open_zarr(path, dims={"w": ("x",)})
    with pytest.raises(ValueError, match="repeat a name"):
        arraysnap.open_zarr(path, dims={"u": ("x", "x")})
    with pytest.raises(TypeError, match="dict of array name"):
        arraysnap.open_zarr(path, dims=[("x", "y")])


def test_dims_recorded_at_capture_reach_xarray_and_are_remembered(store_path):
    xarray = pytest.importorskip("xarray")
    with arraysnap.open(store_path) as snap:
        snap.capture({"u": np.zeros((4, 3)), "t": np.arange(4.0)}, step=1,
                     dims={"u": ("y", "x"), "t": ["y"]})
        snap.capture({"u": np.ones((4, 3)), "t": np.arange(4.0)}, step=2)  # remembered
        with pytest.raises(ValueError, match="has 2 dimensions but 1"):
            snap.capture({"u": np.ones((4, 3))}, dims={"u": ("x",)})
        with pytest.raises(ValueError, match="not captured"):
            snap.capture({"u": np.ones((4, 3))}, dims={"w": ("x",)})
        with pytest.raises(ValueError, match="repeat a name"):
            snap.capture({"u": np.ones((4, 3))}, dims={"u": ("x", "x")})
    with arraysnap.open(store_path) as snap:  # a resumed run remembers them too
        snap.capture({"u": np.full((4, 3), 2.0), "t": np.arange(4.0)}, step=3)
        snap.capture({"u": np.zeros(5), "t": np.arange(4.0)}, step=4)  # u lost a dimension
    for step in (1, 2, 3):
        dataset = xarray.open_zarr(arraysnap.open_zarr(store_path, step=step).store)
        assert dataset["u"].dims == ("y", "x") and dataset["t"].dims == ("y",)
        assert dataset.sizes == {"y": 4, "x": 3}
    dataset = xarray.open_zarr(arraysnap.open_zarr(store_path, step=4).store)
    assert dataset["u"].dims == ("u_dim_0",) and dataset["t"].dims == ("y",)
    # Given when opening, names win over the recorded ones.
    group = arraysnap.open_zarr(store_path, step=1, dims={"u": ("a", "b")})
    assert group["u"].metadata.dimension_names == ("a", "b")


def test_recorded_dims_are_validated_when_read():
    record = ArrayEntry("u", (2, 3), np.dtype("f8"), "C", 0, 2, bytes(32), ("row",))
    manifest = Manifest(1, None, 0.0, None, {"name": "none", "level": 0}, {"u": record})
    with pytest.raises(arraysnap.CorruptSnapshotError, match="has 2 dimensions but 1"):
        parse_manifest(manifest.to_json(), expected_seq=1)
    good = dataclasses.replace(record, dims=("row", "col"))
    parsed = parse_manifest(dataclasses.replace(manifest, arrays={"u": good}).to_json())
    assert parsed.arrays["u"].dims == ("row", "col")
    assert dimension_names(parsed) == {"u": ("row", "col")}


@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
def test_tensorstore_opens_an_export(store_path, tmp_path, codec):
    ts = pytest.importorskip("tensorstore")
    data = {
        "c": np.random.default_rng(1).standard_normal((33, 17)),
        "f": np.asfortranarray(np.arange(60, dtype=np.int16).reshape(6, 10)),
        "big_endian": np.arange(50, dtype=">u4"),
        "wide": np.random.default_rng(2).standard_normal((3, 400)),  # split on axis 1
    }
    with arraysnap.open(store_path, chunk_bytes=256, codec=codec) as snap:
        snap.capture(data, step=1)
        snap.export(tmp_path / "out.zarr")
    for name, expected in data.items():
        array = ts.open({"driver": "zarr3",
                         "kvstore": {"driver": "file", "path": str(tmp_path / "out.zarr" / name)}},
                        read=True).result()
        values = array.read().result()
        assert array.domain.labels == tuple(f"{name}_dim_{i}" for i in range(expected.ndim))
        assert values.shape == expected.shape
        # tensorstore hands back native byte order: same values, converted exactly.
        assert same_bits(values, expected.astype(expected.dtype.newbyteorder("=")))
