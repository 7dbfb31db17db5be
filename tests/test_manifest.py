"""Manifests: round trip, checksum, strict validation of everything read from disk."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arraysnap.manifest as manifest_module
from arraysnap.errors import CorruptSnapshotError, FormatVersionError
from arraysnap.manifest import (
    MANIFEST_VERSION,
    ArrayEntry,
    Manifest,
    _checksum,
    check_array_name,
    dtype_from_json,
    dtype_to_json,
    parse_manifest,
)


def sample() -> Manifest:
    record = ArrayEntry("u", (3, 4), np.dtype(">f8"), "F", 0, 2, bytes(range(32)) * 2)
    return Manifest(seq=7, step=70, time=12.5, parent=6, codec={"name": "zstd", "level": 1},
                    arrays={"u": record}, state={"t": 1.5}, rng=None,
                    stats={"pause_seconds": 0.1}, provenance={"host": "x"})


def test_round_trip():
    manifest = sample()
    parsed = parse_manifest(manifest.to_json(), expected_seq=7)
    assert parsed == manifest


def test_compact_chunk_table():
    digests = bytes(32) * 10_000
    record = ArrayEntry("u", (10_000, 128), np.dtype("f8"), "C", 0, 1, digests)
    manifest = Manifest(1, None, 0.0, None, {"name": "none", "level": 0}, {"u": record})
    # 32-byte digests in base64: under 44 bytes of JSON per chunk, not a list of hex strings.
    assert len(manifest.to_json()) < 44 * 10_000 + 2048


def edit(manifest: Manifest, change, fix_checksum: bool = True) -> bytes:
    body = json.loads(manifest.to_json())
    body.pop("checksum")
    change(body)
    if fix_checksum:
        body["checksum"] = _checksum(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize("change, match", [
    (lambda b: b.update(seq=8), "does not match its file name"),
    (lambda b: b["arrays"]["u"].update(shape=[3, -4]), "non-negative"),
    (lambda b: b["arrays"]["u"].update(shape=[3, 5]), "chunk table"),
    (lambda b: b["arrays"]["u"].update(dtype="|O"), "object"),
    (lambda b: b["arrays"]["u"].update(dtype=["weird"]), "dtype"),
    (lambda b: b["arrays"]["u"].update(chunks="!!!"), "base64"),
    (lambda b: b["arrays"]["u"].update(order="K"), "order"),
    (lambda b: b["arrays"]["u"].update(shape=[1 << 40, 1 << 40]), "too large"),
    (lambda b: b.update(arrays={"../x": b["arrays"]["u"]}), "must not contain"),
    (lambda b: b.update(arrays=[]), "arrays must be"),
    (lambda b: b.update(step="7"), "step"),
    (lambda b: b.update(version=0), "unknown manifest version"),
])
def test_malformed_manifests_are_corrupt(change, match):
    with pytest.raises(CorruptSnapshotError, match=match):
        parse_manifest(edit(sample(), change), expected_seq=7)


def test_checksum_detects_any_edit():
    data = edit(sample(), lambda b: b.update(step=71), fix_checksum=False)
    body = json.loads(data)
    body["checksum"] = json.loads(sample().to_json())["checksum"]
    with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
        parse_manifest(json.dumps(body).encode(), expected_seq=7)


def test_newer_version_names_both_versions():
    newer = MANIFEST_VERSION + 1
    with pytest.raises(FormatVersionError, match=rf"version {newer}.*version {MANIFEST_VERSION}"):
        parse_manifest(edit(sample(), lambda b: b.update(version=newer)), expected_seq=7)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"{" * 100_000, b'{"format": 1}',
                                  b"NaN", b'{"a": Infinity}'])
def test_garbage_is_corrupt_not_a_crash(data):
    with pytest.raises(CorruptSnapshotError):
        parse_manifest(data, expected_seq=1)


@pytest.mark.parametrize("dtype", ["<f8", ">i2", "S3", "<U2", "V5", "<M8[us]",
                                   [("a", "<i4"), ("b", ">f4", (2, 3))]])
def test_dtype_json_round_trip(dtype):
    dt = np.dtype(dtype)
    assert dtype_from_json(json.loads(json.dumps(dtype_to_json(dt)))) == dt


def test_aligned_struct_round_trips_with_padding():
    dt = np.dtype([("a", "u1"), ("b", "<f8")], align=True)
    back = dtype_from_json(json.loads(json.dumps(dtype_to_json(dt))))
    assert back.itemsize == 16 and back.fields["b"][1] == 8


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", ".", "..", "__x", "a\x00", "\u200b", 3])
def test_bad_names(name):
    with pytest.raises((ValueError, TypeError)):
        check_array_name(name)


@pytest.mark.parametrize("name", ["u", "temperature.K", "ü", "a b", "...x", "_x", "x" * 200])
def test_good_names(name):
    assert check_array_name(name) == name


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=8)
       | st.sampled_from([".", "..", "...", "zarr.json", "__x", "_x", "a" * 255, "a" * 256]))
def test_the_plain_name_fast_path_accepts_exactly_what_the_full_checks_accept(name):
    """check_array_name() passes plain ASCII names with one regular expression: it must
    accept exactly the names its checks one by one accept."""
    def full(value: str) -> bool:
        saved = manifest_module._PLAIN_NAME
        manifest_module._PLAIN_NAME = re.compile(r"(?!)")  # matches nothing: the full checks
        try:
            return manifest_module.check_array_name(value) == value
        except (ValueError, TypeError):
            return False
        finally:
            manifest_module._PLAIN_NAME = saved

    try:
        fast = manifest_module.check_array_name(name) == name
    except (ValueError, TypeError):
        fast = False
    assert fast == full(name)
