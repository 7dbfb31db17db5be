"""A store in object storage: ``arraysnap.open("s3://...")`` against a real S3 server (moto's
server mode on 127.0.0.1), its baseline folder, readers, zarr and the command line on URLs."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_bit_exact, s3_url
from obstore.store import MemoryStore

import arraysnap
from arraysnap.cli import cli
from arraysnap.errors import CorruptSnapshotError, StoreLockedError


@pytest.fixture
def url(s3_server) -> str:
    return s3_url(s3_server)


@pytest.fixture
def options(s3_server) -> dict:
    return s3_server.storage_options


def _field(seed: int, shape=(64, 512)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def test_a_writer_captures_and_restores_bit_exact_and_a_reader_sees_it(url, options, tmp_path):
    u, v = _field(1), np.arange(1000, dtype=np.int32)
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "b",
                        chunk_bytes=1 << 14) as snap:
        assert snap.path == url and snap.baseline_dir == tmp_path / "b"
        for step in range(3):
            u[step] += 1.0
            snap.capture({"u": u, "v": v}, step=step, state={"t": step / 10})
        snap.wait()
        restored = snap.restore()
        assert_bit_exact(restored.arrays["u"], u)
    assert (tmp_path / "b" / "mirror").is_dir()  # the baselines are local
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert [info.step for info in reader.list()] == [0, 1, 2]
        restored = reader.restore(verify=True)
        assert_bit_exact(restored.arrays["u"], u)
        assert_bit_exact(restored.arrays["v"], v)
        assert restored.state == {"t": 0.2}
        assert reader.verify().ok
    group = arraysnap.open_zarr(url, storage_options=options, step=2)
    assert_bit_exact(group["u"][:], u)


def test_a_fresh_node_restores_from_the_remote_store_and_goes_on(url, options, tmp_path):
    u = _field(2)
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "node-a",
                        chunk_bytes=1 << 14) as snap:
        snap.capture({"u": u}, step=1)
    # Another node, an empty baseline folder: the newest snapshot comes from the store.
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "node-b") as snap:
        restored = snap.restore()
        assert restored.step == 1
        assert_bit_exact(restored.arrays["u"], u)
        u[5, :7] = -1.0
        info = snap.capture({"u": u}, step=2).result()
        assert info.chunks_changed == 1  # the delta ran against the rebuilt baselines
    # Node A again: its baselines are of snapshot 1, the store moved on to 2.
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "node-a") as snap:
        assert_bit_exact(snap.restore().arrays["u"], u)
        u[9, :3] = 7.0
        assert snap.capture({"u": u}, step=3).result().chunks_changed == 1
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert_bit_exact(reader.restore(verify=True).arrays["u"], u)


def test_catching_up_on_a_store_written_elsewhere_is_not_a_warning(url, options, tmp_path,
                                                                    caplog):
    u = _field(3)
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "a") as snap:
        snap.capture({"u": u}, step=1)
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "b") as snap:
        u[0] += 1
        snap.capture({"u": u}, step=2)
    with caplog.at_level(logging.INFO, logger="arraysnap"):
        arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "a").close()
    caught_up = [r for r in caplog.records if "written elsewhere" in r.getMessage()]
    assert caught_up and all(r.levelno == logging.INFO for r in caught_up)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_baselines_of_another_store_in_the_folder_are_never_trusted(s3_server, options,
                                                                     tmp_path):
    first, second = s3_url(s3_server), s3_url(s3_server)
    shared = tmp_path / "shared"
    with arraysnap.open(first, storage_options=options, baseline_dir=shared,
                        chunk_bytes=8192) as snap:
        snap.capture({"u": np.ones(4096)}, step=1)  # the folder's marker: clean, seq 1
    with arraysnap.open(second, storage_options=options, baseline_dir=tmp_path / "own",
                        chunk_bytes=8192) as snap:
        snap.capture({"u": np.full(4096, 2.0)}, step=1)  # seq 1 too, other bytes
    with arraysnap.open(second, storage_options=options, baseline_dir=shared) as snap:
        assert_bit_exact(snap.restore(verify=False).arrays["u"], np.full(4096, 2.0))
        grown = np.full(4096, 2.0)
        grown[0] = 3.0
        # Compared with baselines of the second store: one chunk of four changed.
        assert snap.capture({"u": grown}, step=2).result().chunks_changed == 1
    with arraysnap.open(second, "r", storage_options=options) as reader:
        assert_bit_exact(reader.restore(verify=True).arrays["u"], grown)


def test_a_baseline_folder_serves_one_writer_at_a_time(s3_server, options, tmp_path):
    shared = tmp_path / "shared"
    with arraysnap.open(s3_url(s3_server), storage_options=options, baseline_dir=shared):
        with pytest.raises(StoreLockedError, match=r"baseline folder .*shared.* baseline_dir="):
            arraysnap.open(s3_url(s3_server), storage_options=options, baseline_dir=shared)
    arraysnap.open(s3_url(s3_server), storage_options=options, baseline_dir=shared).close()


def test_the_default_baseline_folder_is_in_the_users_cache(url, options, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with arraysnap.open(url, storage_options=options) as snap:
        snap.capture({"u": np.zeros(10)}, step=1)
        folder = snap.baseline_dir
    assert folder.parent == tmp_path / "cache" / "arraysnap" / "baselines"
    assert folder.name.startswith("run.snap-") and (folder / "mirror").is_dir()
    with arraysnap.open(url, storage_options=options) as snap:
        assert snap.baseline_dir == folder  # the same store, the same folder


def test_an_obstore_store_object_is_a_store(tmp_path):
    memory = MemoryStore()
    with arraysnap.open(memory, baseline_dir=tmp_path / "b") as snap:
        snap.capture({"u": np.arange(5.0)}, step=4)
    with arraysnap.open(memory, "r") as reader:
        assert_bit_exact(reader.restore().arrays["u"], np.arange(5.0))


def test_bad_locations_and_options_are_refused_before_anything_is_written(url, options,
                                                                          tmp_path):
    with pytest.raises(ValueError, match="storage_options configure a store in object storage"):
        arraysnap.open(tmp_path / "run.snap", storage_options={"region": "x"})
    assert not (tmp_path / "run.snap").exists()
    with pytest.raises(TypeError, match="a store is a folder"):
        arraysnap.open(42)
    with pytest.raises(FileNotFoundError, match="holds no arraysnap store"):
        arraysnap.open(url, "r", storage_options=options)
    with pytest.raises(FileNotFoundError, match="holds no arraysnap store"):
        arraysnap.open_zarr(url, storage_options=options)


def test_an_unreachable_object_store_is_an_os_error_that_names_the_settings(tmp_path):
    closed = {"endpoint": "http://127.0.0.1:9", "allow_http": True, "region": "us-east-1",
              "access_key_id": "x", "secret_access_key": "y",
              "retry_config": {"max_retries": 0}}
    with pytest.raises(OSError, match="storage_options") as caught:
        arraysnap.open("s3://nowhere/run.snap", storage_options=closed,
                       baseline_dir=tmp_path / "b")
    assert not isinstance(caught.value, CorruptSnapshotError)
    assert not (tmp_path / "b").exists()


def test_the_command_line_takes_urls_and_storage_options(url, options, tmp_path):
    u = _field(4, (32, 64))
    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "b") as snap:
        snap.capture({"u": u}, step=7)
    flags = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
    runner = CliRunner()
    listed = runner.invoke(cli, ["ls", url, "--json", *flags])
    assert listed.exit_code == 0, listed.output
    assert [row["step"] for row in json.loads(listed.output)] == [7]
    assert runner.invoke(cli, ["verify", url, *flags]).exit_code == 0
    out = tmp_path / "out"
    restored = runner.invoke(cli, ["restore", url, "--to", str(out), *flags])
    assert restored.exit_code == 0, restored.output
    assert_bit_exact(np.load(out / "u.npy"), u)
    bad = runner.invoke(cli, ["ls", url, "-o", "endpoint"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    env = runner.invoke(cli, ["ls", url, "--json"],
                        env={"ARRAYSNAP_STORAGE_OPTIONS": " ".join(flags[1::2])})
    assert env.exit_code == 0 and json.loads(env.output)[0]["step"] == 7


def test_a_local_path_keeps_its_baselines_beside_it(tmp_path):
    with arraysnap.open(tmp_path / "run.snap") as snap:
        snap.capture({"u": np.zeros(3)})
        assert snap.baseline_dir == tmp_path / "run.snap"
    assert (tmp_path / "run.snap" / "mirror").is_dir()
    with arraysnap.open(f"file://{tmp_path}/run.snap", "r") as reader:
        assert reader.path == tmp_path / "run.snap"


def _slow_reader(url, proxy_options, seq, results):
    try:
        with arraysnap.open(url, "r", storage_options=proxy_options) as reader:
            results["restored"] = np.array(reader.restore(seq=seq, verify=True).arrays["u"])
    except Exception as err:  # noqa: BLE001 - handed to the test
        results["error"] = err


@pytest.mark.parametrize("grace", [None, 0])
def test_a_reader_restoring_a_snapshot_that_retention_removes_finishes(s3_server, options,
                                                                        tmp_path, grace):
    from arraysnap.testing.faultproxy import FaultProxy

    url = s3_url(s3_server)
    u = _field(7, (64, 1024))
    with FaultProxy(s3_server.endpoint) as proxy, arraysnap.open(
            url, storage_options=options, baseline_dir=tmp_path / "b", chunk_bytes=1 << 15,
            keep_last=1, grace_seconds=grace) as snap:
        snap.capture({"u": u}, step=1).result()
        slow = proxy.fail("GET", r"/(chunks|packs)/", "slow", times=None, delay=0.2)
        results: dict = {}
        reader = threading.Thread(target=_slow_reader, args=(
            url, {**options, "endpoint": proxy.endpoint}, 1, results))
        reader.start()
        deadline = time.monotonic() + 60
        while slow.hits < 1:  # the reader is reading snapshot 1's chunks
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.01)
        for step in (2, 3):  # keep_last=1: snapshot 1 goes
            snap.capture({"u": u + step}, step=step)
        snap.wait()
        assert [info.seq for info in snap.list()] == [3]
        reader.join(60)
    if grace is None:  # 600 s in object storage: what the reader needs stays meanwhile
        assert "error" not in results, results.get("error")
        assert_bit_exact(results["restored"], u)
    else:  # no grace: a clear error, never wrong data
        assert isinstance(results.get("error"), arraysnap.ArraysnapError), results


def test_what_a_removed_snapshot_named_goes_once_the_grace_is_over(url, options, tmp_path):
    import obstore

    with arraysnap.open(url, storage_options=options, baseline_dir=tmp_path / "b",
                        chunk_bytes=1 << 12, grace_seconds=1.0) as snap:
        snap.capture({"u": _field(8, (16, 512))}, step=1)
        snap.capture({"u": _field(9, (16, 512))}, step=2)  # every chunk differs
        snap.wait()
        storage = obstore.store.from_url(url, **{
            "config": {k: v for k, v in options.items() if k != "allow_http"},
            "client_options": {"allow_http": True}})

        def keys(prefix):
            return [m["path"] for page in obstore.list(storage, prefix) for m in page]

        chunks = len(keys("chunks/")) + len(keys("packs/"))
        # Snapshot 1's objects are older than the grace (and its clock margin) by now; its
        # retirement is not: that is what must keep them.
        time.sleep(2.2)
        report = snap.prune(keep_last=1)
        assert report.snapshots_removed == (1,) and report.chunks_removed == 0
        assert [info.seq for info in snap.list()] == [2]
        assert len(keys("retired/")) == 1  # kept, with what it names, for the grace
        assert len(keys("chunks/")) + len(keys("packs/")) == chunks
        assert snap.gc().chunks_removed == 0  # still within it, objects old or not
        assert len(keys("chunks/")) + len(keys("packs/")) == chunks
        time.sleep(3.1)  # the retirement's grace runs out (1 s, + 1 s margin, + 1 s)
        assert snap.gc().chunks_removed > 0
        assert keys("retired/") == []
        with arraysnap.open(url, "r", storage_options=options) as reader:
            assert reader.verify().ok
    with pytest.raises(ValueError, match="grace_seconds"):
        arraysnap.open(url, storage_options=options, grace_seconds=-1)


def test_the_replay_log_in_object_storage_keeps_small_segments_and_is_trimmed(tmp_path):
    from arraysnap.storage import ObjectStorage

    memory = MemoryStore()
    storage = ObjectStorage(memory)
    record = {"note": "x" * 1000}

    def segments():
        return sorted(k for k in storage.list_prefix("journal/"))

    with arraysnap.open(storage, baseline_dir=tmp_path / "b", keep_last=1,
                        grace_seconds=1.0) as snap:
        for step in range(6):
            for _ in range(100):
                snap.log(record)
            snap.capture({"u": np.full(8, float(step))}, step=step)
        snap.wait()
        first = segments()
        # About 600 KiB of records: segments of 256 KiB (and a flush) each, not one of all.
        assert len(first) >= 2
        assert all(storage.size(key) <= 512 << 10 for key in first)
        assert list(snap.restore().events) == []  # all logged before the newest capture
        time.sleep(3.1)  # retired snapshots' grace (1 s + 1 s margin + 1 s) runs out
        snap.log(record)
        snap.capture({"u": np.full(8, 9.0)}, step=9)
        snap.wait()
        assert len(segments()) < len(first)  # what only retired snapshots needed went
        assert [info.step for info in snap.list()] == [9]
