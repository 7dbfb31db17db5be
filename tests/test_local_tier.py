"""A local tier (``open(url, local=...)``): captures commit locally and are uploaded in the
background to a real S3 server (moto's server mode on 127.0.0.1), through a fault-injecting
proxy where a test needs the store to fail."""

from __future__ import annotations

import json
import random
import time
import warnings

import numpy as np
import pytest
from conftest import (
    SCALE,
    assert_bit_exact,
    assert_workload_step,
    kill_at_a_random_moment,
    s3_url,
)

import arraysnap
from arraysnap.testing.faultproxy import FaultProxy

WAIT_SECONDS = 60.0  # a deadline for what must happen, never a duration a test relies on
DATA = r"/(chunks|packs|tables|snapshots|journal)/"  # every request but the lease's
FAST = (0.01, 0.02, 0.05)  # upload retry delays for tests


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint) as running:
        yield running


def _options(server, proxy=None) -> dict:
    options = {**server.storage_options, "retry_config": {"max_retries": 0}}
    if proxy is not None:
        options["endpoint"] = proxy.endpoint
    return options


def _field(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((64, 256))


def _open(url, options, local, **kwargs):
    return arraysnap.open(url, storage_options=options, local=local, chunk_bytes=1 << 13,
                          _upload_delays=FAST, **kwargs)


def _eventually(condition) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _remote_steps(url, options) -> list[int | None]:
    with arraysnap.open(url, "r", storage_options=options) as reader:
        return [info.step for info in reader.list()]


def test_captures_commit_locally_and_are_uploaded(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    u = _field(1)
    with _open(url, options, tmp_path / "tier") as snap:
        assert snap.path == url and snap.local == tmp_path / "tier"
        for step in range(4):
            u[step] += 1.0
            snap.capture({"u": u}, step=step, state={"step": step})
        snap.wait(remote=True, timeout=WAIT_SECONDS)
        assert [info.remote for info in snap.list()] == [True] * 4
        assert snap.restore().info.remote
    with arraysnap.open(url, "r", storage_options=options) as reader:
        restored = reader.restore(verify=True)
        assert restored.step == 3 and restored.state == {"step": 3}
        assert_bit_exact(restored.arrays["u"], u)
        assert reader.verify().ok and reader.latest().remote
    with arraysnap.open(tmp_path / "tier", "r") as local_reader:  # the tier is a store too
        assert [info.remote for info in local_reader.list()] == [False] * 4


def test_a_fresh_node_restores_from_the_remote_store_and_goes_on(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    u = _field(2)
    with _open(url, options, tmp_path / "node-a") as snap:
        snap.capture({"u": u}, step=10)
        snap.capture({"u": u * 2}, step=20)
    with _open(url, options, tmp_path / "node-b") as snap:
        restored = snap.restore()
        assert restored.step == 20
        assert_bit_exact(restored.arrays["u"], u * 2)
        info = snap.capture({"u": u * 2}, step=30).result()
        assert info.seq == 3 and info.chunks_changed == 0
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    assert _remote_steps(url, options) == [10, 20, 30]


def test_the_remote_store_down_for_a_while(s3_server, proxy, tmp_path):
    url = s3_url(s3_server)
    options = _options(s3_server, proxy)
    u = _field(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _open(url, options, tmp_path / "tier", keep_last=2) as snap:
            snap.capture({"u": u}, step=0)
            snap.wait(remote=True, timeout=WAIT_SECONDS)
            outage = proxy.fail("PUT", DATA, "error", times=None)
            for step in range(1, 6):
                u[step] += 1.0
                info = snap.capture({"u": u}, step=step).result()  # durable locally
                assert not info.remote
            with pytest.raises(TimeoutError, match="not uploaded"):
                snap.wait(remote=True, timeout=0.2)
            # Retention keeps what is not uploaded, whatever keep_last says (step 0, uploaded,
            # it removed).
            assert [i.step for i in snap.list()] == [1, 2, 3, 4, 5]
            assert [i.remote for i in snap.list()] == [False] * 5
            assert _eventually(lambda: outage.hits >= 3)  # uploads retry
            proxy.clear()
            snap.wait(remote=True, timeout=WAIT_SECONDS)
            # All uploaded, and the remote store's retention kept its newest two of them.
            assert [(i.step, i.remote) for i in snap.list()] == [
                (1, False), (2, False), (3, False), (4, True), (5, True)]
            u[9] += 1.0
            snap.capture({"u": u}, step=6)
            snap.wait(remote=True, timeout=WAIT_SECONDS)
            assert [i.step for i in snap.list()] == [5, 6]
    failures = [w for w in caught if "uploads to" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in failures]  # one kind, warned once
    assert _remote_steps(url, _options(s3_server)) == [5, 6]
    with arraysnap.open(url, "r", storage_options=_options(s3_server)) as reader:
        assert_bit_exact(reader.restore(verify=True).arrays["u"], u)


def test_close_does_not_wait_for_a_failing_store_and_the_next_open_uploads(s3_server, proxy,
                                                                          tmp_path, caplog):
    url = s3_url(s3_server)
    options = _options(s3_server, proxy)
    u = _field(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snap = _open(url, options, tmp_path / "tier")
        snap.capture({"u": u}, step=1)
        snap.wait(remote=True, timeout=WAIT_SECONDS)
        proxy.fail("PUT", DATA, "error", times=None)
        snap.capture({"u": u + 1}, step=2)
        snap.capture({"u": u + 2}, step=3)
        snap.wait()
        snap.close()  # returns: the store fails
    assert "committed in the local tier" in caplog.text and "[2, 3]" in caplog.text
    assert _remote_steps(url, _options(s3_server)) == [1]
    proxy.clear()
    with _open(url, options, tmp_path / "tier") as snap:
        assert [i.remote for i in snap.list()] == [True, False, False]
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    assert _remote_steps(url, _options(s3_server)) == [1, 2, 3]


def test_a_lost_reply_to_an_upload_is_settled_by_reading_back(s3_server, proxy, tmp_path):
    url = s3_url(s3_server)
    options = _options(s3_server, proxy)
    lost = proxy.fail("PUT", r"/snapshots/", "lose_reply", times=1)
    with _open(url, options, tmp_path / "tier") as snap:
        snap.capture({"u": _field(5)}, step=1)
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    assert lost.hits == 1
    assert _remote_steps(url, _options(s3_server)) == [1]


def _parted(s3_server, proxy, tmp_path, seed: int) -> tuple[str, dict, np.ndarray]:
    """Node A commits step 2 (u + 100) locally only; the job goes on on node B from step 1,
    which commits another step 2 (u + 1) under the same seq."""
    url = s3_url(s3_server)
    via_proxy, direct = _options(s3_server, proxy), _options(s3_server)
    u = _field(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open(url, via_proxy, tmp_path / "node-a") as snap:
            snap.capture({"u": u}, step=1)
            snap.wait(remote=True, timeout=WAIT_SECONDS)
            proxy.fail("PUT", DATA, "error", times=None)
            snap.capture({"u": u + 100}, step=2)  # never uploaded: node A's baselines hold it
    proxy.clear()
    with _open(url, direct, tmp_path / "node-b") as snap:  # the job went on elsewhere
        assert snap.restore().step == 1
        snap.capture({"u": u + 1}, step=2)
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    return url, direct, u


def test_a_local_history_the_store_went_on_without_is_dropped(s3_server, proxy, tmp_path,
                                                              caplog):
    url, direct, u = _parted(s3_server, proxy, tmp_path, 6)
    with _open(url, direct, tmp_path / "node-a") as snap:
        assert "went on without" in caplog.text
        restored = snap.restore()
        assert restored.step == 2
        assert_bit_exact(restored.arrays["u"], u + 1)
        assert [i.seq for i in snap.list()] == [1, 2]


def test_a_local_store_gets_a_remote_tier(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    with arraysnap.open(tmp_path / "run.snap") as snap:
        for step in range(3):
            snap.capture({"u": np.full(100, float(step))}, step=step)
    with _open(url, options, tmp_path / "run.snap") as snap:
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    assert _remote_steps(url, options) == [0, 1, 2]


def test_bad_tier_settings_are_refused_before_anything_is_written(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    with pytest.raises(ValueError, match="local= is for a writer"):
        arraysnap.open(url, "r", storage_options=options, local=tmp_path / "t")
    with pytest.raises(ValueError, match="local folder already"):
        arraysnap.open(tmp_path / "a.snap", local=tmp_path / "t")
    with pytest.raises(ValueError, match="leave baseline_dir= out"):
        arraysnap.open(url, storage_options=options, local=tmp_path / "t",
                       baseline_dir=tmp_path / "b")
    assert not (tmp_path / "t").exists()
    arraysnap.open(tmp_path / "raw.snap", codec="none").close()
    with pytest.raises(ValueError, match="codec"):
        arraysnap.open(url, storage_options=options, local=tmp_path / "raw.snap",
                       codec="zstd")
    with pytest.raises(FileNotFoundError):
        arraysnap.open(url, "r", storage_options=options)  # nothing was created remotely
    with pytest.raises(ValueError, match="no remote tier"):
        with arraysnap.open(tmp_path / "plain.snap") as plain:
            plain.wait(remote=True)


KILLS = 30 * SCALE


def test_the_writer_killed_at_random_moments_mid_upload(s3_server, tmp_path):
    """SIGKILL a tiered writer at random moments: after each, every snapshot either tier
    lists restores exactly and verifies; the next writer goes on and uploads what was left."""
    url, options = s3_url(s3_server), _options(s3_server)
    local = tmp_path / "tier"
    random.seed(14)
    last_committed = None
    for _ in range(KILLS):
        reports = kill_at_a_random_moment("tiered-loop", url, "--local", str(local),
                                          "--options", json.dumps(options), latest=0.5)
        if reports:
            last_committed = reports[-1][0]
        for tier, kwargs in ((url, {"storage_options": options}), (local, {})):
            with arraysnap.open(tier, "r", **kwargs) as reader:
                infos = reader.list()
                for info in infos:
                    assert_workload_step(reader.restore(seq=info.seq, verify=True), info.step)
                assert reader.verify().ok
                if tier == local and last_committed is not None:
                    assert infos and infos[-1].step >= last_committed
    with _open(url, options, local) as snap:
        snap.wait(remote=True, timeout=WAIT_SECONDS)
        local_seqs = [info.seq for info in snap.list()]
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert [info.seq for info in reader.list()][-len(local_seqs):] == local_seqs


def test_the_replay_log_follows_the_history_across_nodes(s3_server, tmp_path):
    url, options = s3_url(s3_server), _options(s3_server)
    with _open(url, options, tmp_path / "node-a") as snap:
        snap.capture({"u": np.zeros(64)}, step=1)
        for i in range(3):
            snap.log({"a": i})
        snap.capture({"u": np.ones(64)}, step=2)
    with _open(url, options, tmp_path / "node-b") as snap:  # a fresh node
        restored = snap.restore()  # seq 2, the one copied down: logged before it, nothing
        assert restored.seq == 2 and list(restored.events) == []
        for i in range(4):
            snap.log({"b": i})
        snap.capture({"u": np.full(64, 2.0)}, step=3).result()
        snap.wait(remote=True, timeout=WAIT_SECONDS)  # seq 3 is uploaded, and then:
        snap.log({"after": 3})  # after the last capture: wait(remote=True) sends it too
        snap.wait(remote=True, timeout=WAIT_SECONDS)
        with arraysnap.open(url, "r", storage_options=options) as reader:  # before close()
            assert list(reader.restore(seq=3).events) == [{"after": 3}]
    with arraysnap.open(url, "r", storage_options=options) as reader:
        assert list(reader.restore(seq=1).events) == [
            {"a": 0}, {"a": 1}, {"a": 2}, {"b": 0}, {"b": 1}, {"b": 2}, {"b": 3}, {"after": 3}]
        assert list(reader.restore(seq=3).events) == [{"after": 3}]


def test_a_dropped_history_leaves_no_baseline_believed(s3_server, proxy, tmp_path):
    url, direct, u = _parted(s3_server, proxy, tmp_path, 9)
    with _open(url, direct, tmp_path / "node-a") as snap:
        assert_bit_exact(snap.restore(verify=False).arrays["u"], u + 1)
        # Compared with the true baselines (u + 1), u + 100 changes every chunk.
        info = snap.capture({"u": u + 100}, step=3).result()
        assert info.chunks_changed == info.chunks_scanned > 0
        snap.wait(remote=True, timeout=WAIT_SECONDS)
    with arraysnap.open(url, "r", storage_options=direct) as reader:
        assert_bit_exact(reader.restore(verify=True).arrays["u"], u + 100)


def test_a_local_tier_of_another_store_is_refused(s3_server, tmp_path):
    options = _options(s3_server)
    first, second = s3_url(s3_server), s3_url(s3_server)
    with _open(first, options, tmp_path / "tier") as snap:
        snap.capture({"u": np.zeros(8)}, step=1)
    with _open(second, options, tmp_path / "other") as snap:
        snap.capture({"u": np.ones(8)}, step=1)
    with pytest.raises(ValueError, match="snapshots of another store"):
        _open(second, options, tmp_path / "tier")
    with arraysnap.open(tmp_path / "tier", "r") as reader:  # untouched
        assert [i.step for i in reader.list()] == [1]


def test_an_uploader_that_breaks_is_an_error_not_a_hang(tmp_path):
    from obstore.store import MemoryStore

    from arraysnap._store.catalog import Catalog
    from arraysnap._store.tiers import Uploader
    from arraysnap.storage import LocalStorage, ObjectStorage

    with arraysnap.open(tmp_path / "local.snap") as snap:
        snap.capture({"u": np.zeros(8)}, step=1)
        snap.capture({"u": np.ones(8)}, step=2)
    local = LocalStorage(tmp_path / "local.snap")

    def broken(seq):
        raise RuntimeError("a bug in what runs after an upload")

    uploader = Uploader(local, Catalog(local), ObjectStorage(MemoryStore()), (), [1], FAST,
                        broken)
    uploader.enqueue(2)
    with pytest.raises(arraysnap.ArraysnapError, match="stopped.*a bug"):
        uploader.wait(timeout=WAIT_SECONDS)  # raised, where a dead thread would hang it
    assert uploader.close() == [1, 2]


def test_a_forked_process_is_not_its_parent_for_the_lease():
    import multiprocessing

    from arraysnap.storage import _object

    parent = _object._this_process()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_object._this_process)
    assert parent is not None and child is not None
    assert child["pid"] != parent["pid"]


def test_a_full_disk_that_only_unuploaded_snapshots_could_relieve_is_said(tmp_path, caplog):
    from arraysnap._store.catalog import Catalog
    from arraysnap._store.maintenance import Maintenance
    from arraysnap.baselines import Baselines
    from arraysnap.objects import ChunkObjects
    from arraysnap.retention import Retention
    from arraysnap.storage import LocalStorage

    with arraysnap.open(tmp_path / "tier.snap") as snap:
        for step in range(3):
            snap.capture({"u": np.full(8, float(step))}, step=step)
        codec = snap.codec
    storage = LocalStorage(tmp_path / "tier.snap")
    maintenance = Maintenance(Catalog(storage), ChunkObjects(storage), codec,
                              Baselines(tmp_path / "tier.snap"), withheld=lambda: [1, 2])
    report = maintenance.prune(Retention(keep_last=1), pressed=True)  # as on ENOSPC
    assert report.snapshots_removed == ()
    assert "is full" in caplog.text and "[1, 2]" in caplog.text and "not uploaded" in caplog.text
    assert Catalog(storage).seqs() == [1, 2, 3]


def test_uploads_through_the_storage_fault_wrapper(s3_server, tmp_path):
    from arraysnap.storage import ObjectStorage
    from arraysnap.testing import FaultPlan

    url, options = s3_url(s3_server), _options(s3_server)
    plan = FaultPlan(tmp_path / "unused")
    remote = plan.around(ObjectStorage(url, storage_options=options))
    rules = [plan.fail("put_if_absent", "chunks", skip=1, times=2),  # mid-upload
             plan.fail("put_if_absent", "snapshots", times=1),  # the commit point
             plan.fail("delete", "snapshots", times=1)]  # remote retention
    steps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with arraysnap.open(remote, local=tmp_path / "tier", chunk_bytes=1 << 13, keep_last=2,
                            _upload_delays=FAST) as snap:
            u = _field(12)
            for step in range(5):
                u[step * 9] += 1.0
                steps[step] = u.copy()
                snap.capture({"u": u}, step=step)
            snap.wait(remote=True, timeout=WAIT_SECONDS)
    assert all(rule.errors for rule in rules), [len(rule.errors) for rule in rules]
    with arraysnap.open(url, "r", storage_options=options) as reader:
        infos = reader.list()
        assert [info.step for info in infos][-2:] == [3, 4]
        for info in infos:
            assert_bit_exact(reader.restore(seq=info.seq, verify=True).arrays["u"],
                             steps[info.step])
        assert reader.verify().ok
