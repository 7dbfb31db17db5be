"""Codec names, levels, and their encode/decode round trip."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest

import arraysnap
from arraysnap.codecs import CodecSpec, parse_codec, zstd_raw_frame


@pytest.mark.parametrize("text, expected", [
    ("zstd", CodecSpec("zstd", 1)), ("zstd:9", CodecSpec("zstd", 9)),
    ("blosc", CodecSpec("blosc", 5)), ("none", CodecSpec("none", 0)),
])
def test_parse(text, expected):
    assert parse_codec(text) == expected
    assert parse_codec(expected.to_json()) == expected


@pytest.mark.parametrize("value, error", [
    ("lzma", ValueError), ("zstd:x", ValueError), ("zstd:40", ValueError), (3, TypeError),
    ({"name": "zstd"}, TypeError), ({"name": "zstd", "level": True}, ValueError),
])
def test_parse_errors(value, error):
    with pytest.raises(error):
        parse_codec(value)


@pytest.mark.parametrize("name", ["zstd", "blosc", "none"])
def test_round_trip(name):
    spec = parse_codec(name)
    raw = np.random.default_rng(1).standard_normal(1000).tobytes()
    assert spec.decode(spec.encode(np.frombuffer(raw, np.uint8), 8)) == raw


def _zstd_blocks(frame: bytes) -> list[tuple[int, int]]:
    """(type, size) of each block of a zstd frame with a window byte and a 4-byte size."""
    assert frame[4] & 0x20 == 0, "Single_Segment: the window would be the whole content"
    blocks, position = [], 10
    while position < len(frame):
        header = int.from_bytes(frame[position:position + 3], "little")
        kind, size = header >> 1 & 3, header >> 3
        blocks.append((kind, size))
        position += 3 + (size if kind != 1 else 1)
        if header & 1:
            break
    assert position == len(frame)
    return blocks


# Not 0: numcodecs cannot decode even its own empty frame, and no chunk is empty.
@pytest.mark.parametrize("size", [1, (128 << 10) - 1, 128 << 10, (128 << 10) + 1,
                                  (1 << 20) + 3])
def test_a_raw_zstd_frame_decodes_to_its_data(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    frame = zstd_raw_frame(data)
    assert numcodecs.Zstd().decode(frame) == data
    assert all(kind == 0 for kind, _ in _zstd_blocks(frame))
    assert frame[5] == 0x38  # a 128 KiB window, whatever the size
    assert len(frame) == len(data) + 10 + 3 * max(1, -(-size // (128 << 10)))


@pytest.mark.parametrize("kind, compressed", [
    ("random float64", False), ("zeros", True), ("half zeros", True), ("counting int32", True),
])
def test_zstd_stores_incompressible_chunks_as_raw_blocks(kind, compressed):
    rng = np.random.default_rng(0)
    data = {
        "random float64": rng.random(1 << 17),
        "zeros": np.zeros(1 << 17),
        "half zeros": np.concatenate([np.zeros(1 << 16), rng.random(1 << 16)]),
        "counting int32": np.arange(1 << 18, dtype=np.int32),
    }[kind]
    raw = data.view(np.uint8)
    spec = parse_codec("zstd")
    encoded = spec.encode(raw, data.dtype.itemsize)
    assert spec.decode(encoded) == raw.tobytes()
    kinds = {kind for kind, _ in _zstd_blocks(encoded)} if not compressed else None
    if compressed:
        assert len(encoded) < 0.9 * raw.nbytes
    else:
        assert kinds == {0} and len(encoded) == raw.nbytes + 10 + 3 * 8


def test_small_zstd_chunks_are_always_compressed():
    raw = np.random.default_rng(0).random(1 << 12).view(np.uint8)  # 32 KiB: not sampled
    encoded = parse_codec("zstd").encode(raw, 8)
    assert zstd_raw_frame(raw) != encoded and parse_codec("zstd").decode(encoded) == raw.tobytes()


def test_raw_blocks_read_through_zarr(store_path):
    noise = np.random.default_rng(5).random((512, 512))  # 2 MiB, two 1 MiB chunks
    with arraysnap.open(store_path) as snap:
        snap.capture({"noise": noise, "zeros": np.zeros((512, 512))})
    group = arraysnap.open_zarr(store_path)
    assert np.array_equal(group["noise"][...], noise)
    assert not group["zeros"][...].any()
