"""Codec names, levels, and their encode/decode round trip."""

from __future__ import annotations

import numpy as np
import pytest

from arraysnap.codecs import CodecSpec, parse_codec


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
