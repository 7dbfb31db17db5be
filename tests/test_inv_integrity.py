"""Invariant 5, integrity: every chunk is checked against its blake3 on restore and verify;
damaged objects, manifests and baselines are reported (with the array and chunk they hit) or
repaired, never returned as data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import CHUNK, SCALE, assert_arrays

import arraysnap
from arraysnap.testing import (
    CHUNK_DAMAGE,
    baseline_extent,
    chunk_ranges,
    chunk_references,
    damage_object,
    flip_bit,
    truncate,
)


def build_integrity_store(path: Path, codec: str, rows: int = 70) -> list[dict[str, np.ndarray]]:
    """Four snapshots of one array "u" of `rows` chunks (+ a small "t"); each step changes a
    chunk. (70 chunks, more than a pack takes: each is a chunk object of its own; at 8,
    they are packed, see the tests of packs below.)"""
    u = np.random.default_rng(11).standard_normal((rows, 512))
    captured = []
    with arraysnap.open(path, chunk_bytes=CHUNK, codec=codec) as snap:
        for step, chunk in enumerate([None, 2, 5, 6]):
            if chunk is not None:
                u[chunk] += step
            arrays = {"u": u.copy(), "t": np.arange(10.0) * step}
            snap.capture(arrays, step=step)
            captured.append(arrays)
    return captured



@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("how", CHUNK_DAMAGE)
def test_damaged_chunk_objects_are_reported_with_their_array_and_chunk(
        store_path: Path, how: str, codec: str):
    captured = build_integrity_store(store_path, codec)
    refs = chunk_references(store_path)
    # Chunk 2 as first captured is used by snapshot 1 only; chunk 5's first version by 1 and 2.
    victim = next(obj for obj, users in refs.items() if users == [(1, "u", 2)])
    other = next(obj for obj, users in refs.items() if users == [(1, "u", 5), (2, "u", 5)])
    damaged = damage_object(store_path, how, victim, other)
    expected = {use for obj in damaged for use in refs[obj]}

    for mode in ("r", "a"):
        with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
            assert_damage_reported(snap, expected, captured)
            # The latest comes from the (verified) baseline, which is still right.
            assert_arrays(snap.restore().arrays, captured[3])


def assert_damage_reported(snap: arraysnap.Store, expected: set[tuple[int, str, int]],
                           captured: list[dict[str, np.ndarray]]) -> None:
    """verify() reports exactly the chunks `expected` hits; a restore of a snapshot they
    hit names the array and chunk, the others restore what was `captured`."""
    report = snap.verify()
    assert {(p.seq, p.array, p.chunk) for p in report.problems} == expected, str(report)
    for seq in range(1, 5):
        hit = sorted(chunk for s, _, chunk in expected if s == seq)
        if not hit:
            assert_arrays(snap.restore(seq=seq).arrays, captured[seq - 1])
            continue
        with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
            snap.restore(seq=seq)
        message = str(caught.value)
        assert "array 'u'" in message
        assert any(f"chunk {chunk}" in message for chunk in hit), message


def test_damage_used_by_the_latest_snapshot_never_yields_wrong_data(store_path: Path):
    captured = build_integrity_store(store_path, "zstd")
    refs = chunk_references(store_path)
    latest_only = next(obj for obj, users in refs.items() if users == [(4, "u", 6)])
    flip_bit(store_path / latest_only, 10)
    # With the baseline intact the latest still restores; verify reports the object.
    with arraysnap.open(store_path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, captured[3])
        assert {(p.seq, p.array, p.chunk) for p in reader.verify().problems} == {(4, "u", 6)}
    # Baseline damaged at the same chunk too: now there is no good copy, so an error.
    baseline, offset = baseline_extent(store_path, "u")
    flip_bit(baseline, offset + 6 * CHUNK + 100)
    for mode in ("r", "a"):
        with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
            with pytest.raises(arraysnap.CorruptSnapshotError, match="chunk 6"):
                snap.restore()


@pytest.mark.parametrize("mode", ["r", "a"])
def test_bit_flips_in_the_baseline_are_repaired_from_chunk_objects(store_path: Path, mode: str):
    captured = build_integrity_store(store_path, "zstd")
    baseline, offset = baseline_extent(store_path, "u")
    for chunk in (0, 3, 7):
        flip_bit(baseline, offset + chunk * CHUNK + 17 * chunk, chunk % 8)
    with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
        assert_arrays(snap.restore().arrays, captured[3])
        assert snap.verify().ok
        if mode == "a":
            # And a capture of the unchanged arrays still records the right content.
            snap.capture(captured[3], step=4)
            snap.wait()
            assert_arrays(snap.restore().arrays, captured[3])
    with arraysnap.open(store_path, mode="r") as reader:
        assert_arrays(reader.restore().arrays, captured[3])


def test_damaged_manifests_are_detected_never_misread(store_path: Path):
    captured = build_integrity_store(store_path, "zstd")
    manifest = store_path / "snapshots" / "000000000002.json"
    pristine = manifest.read_bytes()
    original_body = json.loads(pristine)
    chooser = random.Random(5)
    for trial in range(40 * SCALE):
        data = bytearray(pristine)
        if trial % 4 == 3:
            data = data[: chooser.randrange(len(data))]  # a torn write
        else:
            data[chooser.randrange(len(data))] ^= 1 << chooser.randrange(8)
        manifest.write_bytes(bytes(data))
        try:
            same = json.loads(bytes(data)) == original_body
        except ValueError:
            same = False
        with arraysnap.open(store_path, mode="r") as reader:
            if same:  # e.g. a flipped letter case inside a \\u escape: the same manifest
                assert_arrays(reader.restore(seq=2).arrays, captured[1])
                continue
            # A flip in the version digit reads as a manifest from the future: also refused.
            with pytest.raises((arraysnap.CorruptSnapshotError, arraysnap.FormatVersionError),
                               match="snapshot 2"):
                reader.restore(seq=2)
            assert [info.seq for info in reader.list()] == [1, 3, 4]
            problems = reader.verify().problems
            assert [(p.seq, p.array) for p in problems] == [(2, None)], problems
            assert_arrays(reader.restore().arrays, captured[3])
            assert_arrays(reader.restore(seq=1).arrays, captured[0])
    # The writer still opens and goes on.
    manifest.write_bytes(pristine[:-5])
    with arraysnap.open(store_path) as snap:
        snap.capture(captured[0], step=9)
        snap.wait()
        assert_arrays(snap.restore().arrays, captured[0])



# -- packs (format 3): the chunks of small arrays, many to an object ----------------------------
PACK_DAMAGE = ("flip-in-chunk", "truncate-at-chunk", "empty", "delete", "replace-with-directory")


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("how", PACK_DAMAGE)
def test_damaged_packs_are_reported_with_their_array_and_chunk(store_path: Path, how: str,
                                                               codec: str):
    captured = build_integrity_store(store_path, codec, rows=8)
    ranges = chunk_ranges(store_path)
    assert all(obj.startswith("packs/") for obj, _, _ in ranges.values())
    pack, offset, length = ranges[(1, "u", 2)]  # chunk 2 as first captured: snapshot 1 only
    file = store_path / pack
    if how == "flip-in-chunk":
        flip_bit(file, offset + length // 2, 2)
        hit = {(pack, offset)}
    elif how == "truncate-at-chunk":
        truncate(file, offset + length // 2)
        hit = {(obj, start) for obj, start, size in ranges.values()
               if obj == pack and start + size > offset + length // 2}
    else:
        if how == "empty":
            file.write_bytes(b"")
        else:
            file.unlink()
            if how == "replace-with-directory":
                file.mkdir()
        hit = {(obj, start) for obj, start, _ in ranges.values() if obj == pack}
    expected = {use for use, (obj, start, _) in ranges.items() if (obj, start) in hit}
    assert (1, "u", 2) in expected and (2, "u", 2) not in expected

    for mode in ("r", "a"):
        with arraysnap.open(store_path, mode=mode) as snap:  # type: ignore[arg-type]
            report = snap.verify()
            assert {(p.seq, p.array, p.chunk) for p in report.problems} == expected, str(report)
            for seq in range(1, 5):
                chunks = sorted((name, chunk) for s, name, chunk in expected if s == seq)
                if not chunks or seq == 4:  # the latest comes from the (verified) baseline
                    assert_arrays(snap.restore(seq=seq).arrays, captured[seq - 1])
                    continue
                with pytest.raises(arraysnap.CorruptSnapshotError) as caught:
                    snap.restore(seq=seq)
                message = str(caught.value)
                assert any(f"array {name!r}" in message and f"chunk {chunk}" in message
                           for name, chunk in chunks), message
                assert "pack" in message
