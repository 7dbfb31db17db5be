"""The invariants in object storage (a real S3 server: moto's server mode on 127.0.0.1):
integrity (damaged objects and manifests are reported, never returned as data), hostile
contents refused, and a writer SIGKILLed at random moments leaving only whole snapshots.

A damaged store is made the way the local invariant tests make one (in a folder, with the
same damage helpers) and its files are then put into the bucket byte for byte: the reads
under test are the object store's."""

from __future__ import annotations

import json
import random
from pathlib import Path

import obstore
import pytest
from conftest import (
    SCALE,
    assert_arrays,
    assert_workload_step,
    kill_at_a_random_moment,
    s3_url,
)
from test_inv_integrity import assert_damage_reported, build_integrity_store

import arraysnap
from arraysnap.testing import CHUNK_DAMAGE, chunk_references, damage_object

WAIT_SECONDS = 60.0
KILLS = 20 * SCALE
_LEFT_OUT = {"mirror", "tmp", "lock"}  # the writer's own: no part of a store's data


def _options(server) -> dict:
    return {**server.storage_options, "retry_config": {"max_retries": 0}}


def _upload_tree(folder: Path, url: str, options: dict) -> None:
    """Every file of the store in `folder` as an object of the store at `url`, as it is."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    store = obstore.store.S3Store(
        bucket, prefix=prefix, endpoint=options["endpoint"], region=options["region"],
        access_key_id=options["access_key_id"], secret_access_key=options["secret_access_key"],
        client_options={"allow_http": True})
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in _LEFT_OUT or not path.is_file() or path.name.startswith("."):
            continue
        obstore.put(store, relative.as_posix(), path.read_bytes())


@pytest.mark.parametrize("how", [h for h in CHUNK_DAMAGE if h != "replace-with-directory"])
def test_damaged_objects_in_the_bucket_are_reported_never_returned(s3_server, tmp_path,
                                                                  how):
    folder = tmp_path / "made.snap"
    captured = build_integrity_store(folder, "zstd")
    refs = chunk_references(folder)
    victim = next(obj for obj, users in refs.items() if users == [(1, "u", 2)])
    other = next(obj for obj, users in refs.items() if users == [(1, "u", 5), (2, "u", 5)])
    damaged = damage_object(folder, how, victim, other)
    expected = {use for obj in damaged for use in refs[obj]}
    url, options = s3_url(s3_server), _options(s3_server)
    _upload_tree(folder, url, options)
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert_damage_reported(reader, expected, captured)
    # A writer with a fresh baseline folder rebuilds from the bucket and goes on.
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "b") as snap:
        assert_arrays(snap.restore().arrays, captured[3])
        snap.capture(captured[3], step=9)
        snap.wait()
        assert_arrays(snap.restore(seq=5).arrays, captured[3])


def test_damaged_and_hostile_manifests_in_the_bucket_are_refused(s3_server, tmp_path):
    folder = tmp_path / "made.snap"
    captured = build_integrity_store(folder, "zstd")
    manifests = sorted((folder / "snapshots").glob("*.json"))
    body = bytearray(manifests[1].read_bytes())
    body[len(body) // 2] ^= 0x01  # snapshot 2: a flipped bit
    manifests[1].write_bytes(bytes(body))
    hostile = json.loads(manifests[2].read_text())  # snapshot 3: valid JSON, wrong claims
    hostile["seq"] = 99
    manifests[2].write_text(json.dumps(hostile))
    (folder / "snapshots" / "000000000007.json").write_bytes(b"\x00" * 64)  # garbage
    url, options = s3_url(s3_server), _options(s3_server)
    _upload_tree(folder, url, options)
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert set(reader.damaged()) == {2, 3, 7}
        assert [info.seq for info in reader.list()] == [1, 4]
        for seq in (2, 3, 7):
            with pytest.raises(arraysnap.CorruptSnapshotError):
                reader.restore(seq=seq)
        assert_arrays(reader.restore(seq=4).arrays, captured[3])
        restored = reader.restore(fallback=True)
        assert restored.seq == 4
    with pytest.raises(arraysnap.CorruptSnapshotError):
        arraysnap.copy(url, tmp_path / "copy.snap", [2], src_options=options)


def test_a_writer_killed_at_random_moments_lists_only_whole_snapshots(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    random.seed(17)
    last_committed = None
    for _ in range(KILLS):
        reports = kill_at_a_random_moment("tiered-loop", url, "--baseline-dir",
                                          str(tmp_path / "base"), "--options",
                                          json.dumps(options), latest=0.4)
        if reports:
            last_committed = reports[-1][0]
        with arraysnap.open(url, "r", storage_options=options) as reader:
            infos = reader.list()
            assert reader.damaged() == []  # nothing partial is listed, nothing half-read
            for info in infos:
                assert_workload_step(reader.restore(seq=info.seq, verify=True), info.step)
            if last_committed is not None:  # what a wait() returned for is there
                assert infos and infos[-1].step >= last_committed
    assert last_committed is not None
