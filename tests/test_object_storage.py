"""ObjectStorage: the storage interface on an object store, against a real S3 server
(moto's server mode on 127.0.0.1) and obstore's in-memory store; the writer's lease."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import obstore
import pytest
from obstore.store import MemoryStore

from arraysnap.commit import put_manifest
from arraysnap.errors import StoreLockedError
from arraysnap.storage import ObjectStorage
from arraysnap.testing.faultproxy import FaultProxy
from arraysnap.testing.s3server import S3Server
from arraysnap.testing.storage_tests import StorageTests

WAIT_SECONDS = 30.0  # a deadline for what must happen, never a duration a test relies on


@pytest.fixture(scope="module")
def server(s3_server):
    return s3_server


def s3_storage(server: S3Server, **kwargs) -> ObjectStorage:
    """A fresh prefix of the test bucket."""
    return ObjectStorage(server.url("arraysnap-tests", f"{uuid.uuid4().hex}/run.snap"),
                         storage_options=server.storage_options, **kwargs)


class TestObjectStorageOnS3(StorageTests):
    @pytest.fixture(autouse=True)
    def _server(self, server):
        self.server = server

    def make(self, tmp_path: Path) -> ObjectStorage:
        return s3_storage(self.server)


class TestObjectStorageInMemory(StorageTests):
    def make(self, tmp_path: Path) -> ObjectStorage:
        return ObjectStorage(MemoryStore())


def test_a_url_names_the_store_and_a_store_object_needs_no_options(server):
    storage = s3_storage(server)
    assert storage.describe().startswith("s3://arraysnap-tests/") and storage.local_path is None
    with pytest.raises(ValueError, match="configured already"):
        ObjectStorage(MemoryStore(), storage_options={"region": "us-east-1"})
    with pytest.raises(ValueError, match="lease_seconds"):
        ObjectStorage(MemoryStore(), lease_seconds=0)


def test_create_refuses_a_prefix_that_holds_other_objects(server):
    storage = s3_storage(server)
    storage.create()
    storage.put_if_absent("notes.txt", b"someone else's")
    with pytest.raises(FileExistsError, match="1 objects .*'notes.txt'.*choose a new prefix"):
        storage.create()


def test_a_second_writer_is_refused_with_the_holder_named(server):
    first = s3_storage(server)
    first.create()
    lock = first.lock_writer("pid 1 on node-a")
    second = ObjectStorage(first.describe(), storage_options=server.storage_options)
    with pytest.raises(StoreLockedError, match=r"pid 1 on node-a.*lease runs until"):
        second.lock_writer("pid 2 on node-b")
    lock.release()
    assert json.loads(first.get("lock"))["expires"] == 0  # given up: marked expired
    second.lock_writer("pid 2 on node-b").release()


def test_the_lease_of_a_killed_writer_expires_and_is_taken_over(server):
    storage = s3_storage(server)
    storage.create()
    victim = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from arraysnap.storage import ObjectStorage, _object\n"
         # A writer on another node: its death is not seen from here, its lease must expire.
         "_object._identities[__import__('os').getpid()] = {"
         "**_object._this_process(), 'host': 'another-node'}\n"
         f"s = ObjectStorage({storage.describe()!r}, storage_options={server.storage_options!r},"
         " lease_seconds=1.0)\n"
         "s.lock_writer('the victim')\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE)
    try:
        assert victim.stdout.readline().strip() == b"locked"
        # While it lives it renews its lease: refused, and the holder is named.
        with pytest.raises(StoreLockedError, match="the victim"):
            storage.lock_writer("the successor")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        victim.kill()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            lock = storage.lock_writer("the successor")
            break
        except StoreLockedError:
            assert time.monotonic() < deadline, "the dead writer's lease never expired"
            time.sleep(0.2)
    assert b"the successor" in storage.get("lock")
    lock.release()


def test_a_killed_writer_of_this_machine_is_succeeded_at_once(server):
    storage = s3_storage(server)
    storage.create()
    script = ("import time\n"
              "from arraysnap.storage import ObjectStorage\n"
              f"s = ObjectStorage({storage.describe()!r}, "
              f"storage_options={server.storage_options!r}, lease_seconds=600)\n"
              "s.lock_writer('the victim')\n"
              "print('locked', flush=True)\n"
              "time.sleep(600)\n")
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert victim.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreLockedError, match="the victim"):  # alive: refused
            storage.lock_writer("the successor")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        victim.kill()
    # Dead, on this machine (same host, boot and pid namespace): no need to wait 600 s.
    lock = storage.lock_writer("the successor")
    assert b"the successor" in storage.get("lock")
    lock.release()


def test_a_writer_whose_lease_was_taken_over_writes_nothing_more(server):
    storage = s3_storage(server, lease_seconds=0.5)
    storage.create()
    storage.lock_writer("the first writer")
    storage.put_if_absent("chunks/ab/01", b"before")
    # Someone takes the lease behind its back (as a writer would that saw it expired).
    obstore.put(storage.store, "lock", b'{"holder": "an intruder", "token": "x", '
                                       b'"expires": 1e12}')
    deadline = time.monotonic() + WAIT_SECONDS
    while True:  # the renewal thread notices at its next tick
        try:
            storage.put_if_absent(f"chunks/ab/{uuid.uuid4().hex}", b"after")
        except StoreLockedError as err:
            assert "an intruder" in str(err) and "open the store again" in str(err)
            break
        assert time.monotonic() < deadline, "the lost lease was never noticed"
        time.sleep(0.05)
    for write in (lambda: storage.put_atomic("arraysnap.json", b"{}"),
                  lambda: storage.append("history.jsonl", b"x", at=0),
                  lambda: storage.delete("chunks/ab/01")):
        with pytest.raises(StoreLockedError):
            write()
    assert storage.get("chunks/ab/01") == b"before"  # reading goes on
    storage.close()
    assert b"an intruder" in storage.get("lock")  # not its lease to give up


def test_a_writer_cut_off_from_the_store_stops_once_its_lease_could_have_expired():
    with S3Server() as own:
        storage = ObjectStorage(own.url("cut-off", "run.snap"),
                                storage_options={**own.storage_options, "timeout": "2s",
                                                 "connect_timeout": "1s",
                                                 "retry_config": {"max_retries": 0}},
                                lease_seconds=1.0)
        storage.create()
        storage.lock_writer("the cut-off writer")
        storage.put_if_absent("chunks/ab/01", b"x")
        own.stop()  # the store goes away: no renewal can succeed from now on
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                storage.put_if_absent(f"chunks/ab/{uuid.uuid4().hex}", b"y")
            except StoreLockedError as err:
                assert "not renewed for half" in str(err)
                break
            except OSError as err:  # the store is down: a plain, retryable error
                assert err.errno == errno.EIO and "object store error" in str(err)
            assert time.monotonic() < deadline, "the writer never stopped"
            time.sleep(0.1)
        storage.close()


def test_failures_come_back_as_builtin_errors_naming_the_key(server):
    storage = s3_storage(server)
    storage.create()
    with pytest.raises(FileNotFoundError) as absent:
        storage.get("snapshots/000000000009.json")
    assert absent.value.filename == "snapshots/000000000009.json"
    down = ObjectStorage("s3://nowhere/run.snap",
                         storage_options={**server.storage_options,
                                          "endpoint": "http://127.0.0.1:9",
                                          "retry_config": {"max_retries": 0}})
    with pytest.raises(OSError) as failed:
        down.get("arraysnap.json")
    assert failed.value.errno == errno.EIO and failed.value.filename == "arraysnap.json"
    assert not isinstance(failed.value, obstore.exceptions.BaseError)


def test_a_live_writer_keeps_renewing_its_lease(server):
    storage = s3_storage(server, lease_seconds=0.5)
    storage.create()
    lock = storage.lock_writer("the living writer")
    first = json.loads(storage.get("lock"))
    deadline = time.monotonic() + WAIT_SECONDS
    while (current := json.loads(storage.get("lock")))["expires"] == first["expires"]:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    assert current["expires"] > first["expires"] and current["token"] == first["token"]
    storage.put_if_absent("chunks/ab/01", b"x")  # still the writer
    lock.release()


# -- faults between arraysnap and the server (a proxy that loses replies, fails, drops) -----
@pytest.fixture
def proxied(server):
    """A fresh prefix reached through a fault proxy, and the proxy."""
    with FaultProxy(server.endpoint) as proxy:
        storage = ObjectStorage(
            server.url("arraysnap-tests", f"{uuid.uuid4().hex}/run.snap"),
            storage_options={**server.storage_options, "endpoint": proxy.endpoint},
            lease_seconds=8.0)  # requests bounded by 2 s, renewals every 2 s
        storage.create()
        yield storage, proxy
        storage.close()


def _direct(server: S3Server, storage: ObjectStorage) -> ObjectStorage:
    """The same store as `storage`, reached without the proxy."""
    return ObjectStorage(storage.describe(), storage_options=server.storage_options)


def test_a_lost_reply_to_the_commit_point_is_settled_by_reading_back(proxied):
    storage, proxy = proxied
    landed = proxy.fail("PUT", r"/snapshots/000000000001\.json", "lose_reply")
    put_manifest(storage, 1, b'{"seq": 1}')  # the retry meets its own write: no error
    assert landed.hits == 1 and storage.get("snapshots/000000000001.json") == b'{"seq": 1}'
    # Not so for another writer's manifest under the same name.
    with pytest.raises(FileExistsError, match="another writer"):
        put_manifest(storage, 1, b'{"seq": 1, "other": true}')


def test_a_lost_reply_to_an_append_is_settled_by_reading_back(proxied):
    storage, proxy = proxied
    storage.append("history.jsonl", b"one\n", at=0)
    landed = proxy.fail("PUT", r"/history\.jsonl", "lose_reply")
    storage.append("history.jsonl", b"two\n", at=4)
    assert landed.hits == 1 and storage.get("history.jsonl") == b"one\ntwo\n"


def test_an_append_meeting_another_change_is_an_error_not_a_silent_overwrite(server, proxied):
    storage, proxy = proxied
    storage.append("history.jsonl", b"one\n", at=0)
    # The append's conditional put is held while someone else rewrites the value.
    held = proxy.fail("PUT", r"/history\.jsonl", "slow", delay=1.5)
    intruder = _direct(server, storage)

    def intrude() -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while held.hits == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        intruder.put_atomic("history.jsonl", b"theirs\n")

    thread = threading.Thread(target=intrude)
    thread.start()
    with pytest.raises(StoreLockedError, match="changed by another writer"):
        storage.append("history.jsonl", b"two\n", at=4)
    thread.join()
    assert storage.get("history.jsonl") == b"theirs\n"


def test_lost_replies_to_the_lease_keep_the_lease(proxied):
    storage, proxy = proxied
    storage.lease_seconds = 4.0  # renewals every second
    created = proxy.fail("PUT", r"/lock$", "lose_reply")
    lock = storage.lock_writer("the writer")  # its own create, met by the retry
    assert created.hits == 1
    renewals = proxy.fail("PUT", r"/lock$", "lose_reply", times=3)
    deadline = time.monotonic() + WAIT_SECONDS
    while renewals.hits < 3:
        assert time.monotonic() < deadline, "the lease was not renewed"
        time.sleep(0.05)
    proxy.clear()
    before = json.loads(storage.get("lock"))["expires"]
    while json.loads(storage.get("lock"))["expires"] == before:  # renewed since
        assert time.monotonic() < deadline, "the lease stopped being renewed"
        time.sleep(0.05)
    assert storage.put_if_absent("chunks/ab/01", b"x")  # still the writer
    lock.release()


def test_server_errors_and_dropped_connections_are_retried(proxied):
    storage, proxy = proxied
    errors = proxy.fail("PUT", r"/chunks/", "error", times=2)
    dropped = proxy.fail("GET", r"/chunks/", "drop")
    assert storage.put_if_absent("chunks/ab/01", b"payload")
    assert storage.get("chunks/ab/01") == b"payload"
    assert errors.hits == 2 and dropped.hits == 1


def test_a_store_that_keeps_failing_gives_a_plain_error_naming_the_key(server):
    with FaultProxy(server.endpoint) as proxy:
        storage = ObjectStorage(
            server.url("arraysnap-tests", f"{uuid.uuid4().hex}/run.snap"),
            storage_options={**server.storage_options, "endpoint": proxy.endpoint,
                             "retry_config": {"max_retries": 1}})
        proxy.fail("PUT", r"/chunks/", "error", times=None)
        with pytest.raises(OSError) as failed:
            storage.put_if_absent("chunks/ab/01", b"x")
        assert failed.value.errno == errno.EIO and failed.value.filename == "chunks/ab/01"
        assert "object store error" in str(failed.value)
        proxy.clear()
        assert storage.put_if_absent("chunks/ab/01", b"x")  # nothing half-written was left


def test_a_lost_reply_to_taking_over_an_expired_lease_keeps_it(server, proxied):
    storage, proxy = proxied
    _direct(server, storage).put_atomic("lock", b'{"holder": "a dead writer", "token": "d", '
                                                b'"expires": 1}')
    # The create-only put is refused (the lease exists); the takeover's reply is lost.
    landed = proxy.fail("PUT", r"/lock$", "lose_reply", skip=1)
    lock = storage.lock_writer("the successor")  # its own takeover, met by the retry
    assert landed.hits == 1 and b"the successor" in storage.get("lock")
    assert storage.put_if_absent("chunks/ab/01", b"x")
    lock.release()


def test_a_lease_not_renewed_for_half_its_time_stays_lost(proxied):
    storage, proxy = proxied
    storage.lease_seconds = 1.0
    storage.lock_writer("the writer")
    failing = proxy.fail("PUT", r"/lock$", "error", times=None)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            storage.put_if_absent(f"chunks/ab/{uuid.uuid4().hex}", b"x")
        except StoreLockedError:
            break
        assert time.monotonic() < deadline, "the writer never stopped"
        time.sleep(0.05)
    assert failing.hits > 0
    proxy.clear()  # the store answers again: the lease is not taken back
    time.sleep(1.0)  # several renewal periods
    with pytest.raises(StoreLockedError, match="not renewed for half"):
        storage.put_if_absent("chunks/ab/02", b"y")


def test_range_reads_past_the_end_and_of_absent_keys(proxied):
    storage, _ = proxied
    storage.put_if_absent("v", b"0123456789")
    assert storage.size("v") == 10  # through the proxy, a HEAD keeps its length
    assert storage.get_range("v", 10, 5) == b"" and storage.get_range("v", 12, 1) == b""
    assert storage.get_range("v", 9, 0) == b""
    for read in (lambda: storage.size("nope"), lambda: storage.get_range("nope", 0, 1),
                 lambda: storage.get_range("nope", 0, 0)):
        with pytest.raises(FileNotFoundError) as absent:
            read()
        assert absent.value.filename == "nope"
    with pytest.raises(ValueError, match="at least 0"):
        storage.get_range("v", -1, 2)
