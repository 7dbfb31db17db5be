"""Shared fixtures and helpers for the arraysnap test suite.

``ARRAYSNAP_TORTURE=1`` runs ten times more kill points and generated examples in the
invariant tests (tests/test_inv_*.py).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import arraysnap
from arraysnap.testing import (
    SMALL_WORKLOAD,
    Workload,
    child_command,
    committed_reports,
    leftover_temporaries,
)
from arraysnap.testing import store_files as store_files
from arraysnap.testing.s3server import S3Server

REPO = Path(__file__).resolve().parent.parent
TORTURE = os.environ.get("ARRAYSNAP_TORTURE") == "1"
SCALE = 10 if TORTURE else 1
CHUNK = 4096
# The invariant tests' workload: the arrays of step n are a pure function of n, so a test can
# check any snapshot of any crashed run by recomputing what was captured.
WORKLOAD = SMALL_WORKLOAD
workload_arrays = WORKLOAD.arrays
workload_state = WORKLOAD.state
workload_rng = WORKLOAD.rng
capture_step = WORKLOAD.capture


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real S3 server (moto's server mode on 127.0.0.1) for the whole run."""
    with S3Server() as running:
        yield running


def s3_url(server: S3Server) -> str:
    """A store URL under a fresh prefix of the test bucket."""
    return server.url("arraysnap-tests", f"{uuid.uuid4().hex}/run.snap")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A path where a new store can be created."""
    return tmp_path / "run.snap"


@pytest.fixture
def snap(store_path: Path) -> Iterator[arraysnap.Store]:
    """A writable store with small chunks (4 KiB) so tests exercise many chunks."""
    store = arraysnap.open(store_path, chunk_bytes=4096)
    try:
        yield store
    finally:
        try:
            store.close()
        except arraysnap.ArraysnapError:
            pass


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype (incl. byte order), shape, memory order and bytes."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.dtype.str == expected.dtype.str
    assert actual.shape == expected.shape
    expected_order = "F" if expected.flags.f_contiguous and not expected.flags.c_contiguous else "C"
    if expected_order == "F":
        assert actual.flags.f_contiguous
    else:
        assert actual.flags.c_contiguous
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (same environment); return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def child_env() -> dict[str, str]:
    """The environment of a child process (hash seed fixed, as for run_python)."""
    return {**os.environ, "PYTHONHASHSEED": "0"}


def run_child(kind: str, store: object, *args: object, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m arraysnap.testing.children KIND STORE ARGS``; return it finished."""
    return subprocess.run(child_command(kind, store, *args), capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def start_child(kind: str, store: object, *args: object, **popen: object
                ) -> subprocess.Popen[str]:
    """Start ``python -m arraysnap.testing.children KIND STORE ARGS`` with piped output."""
    return subprocess.Popen(child_command(kind, store, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(),
                            **popen)  # type: ignore[call-overload]


def kill_at_a_random_moment(kind: str, store: object, *args: object, latest: float,
                            timeout: float = 60.0) -> list[tuple[int, int]]:
    """Start child `kind`, SIGKILL it `latest` seconds or less after it said it is ready
    (a random moment, drawn by the caller's seeded `random`), and return the (step, seq)
    pairs it reported durable."""
    import random

    child = start_child(kind, store, *args)
    assert child.stdout is not None
    ready = child.stdout.readline()
    assert ready.startswith("ready"), ready + (child.stderr.read() if child.stderr else "")
    time.sleep(random.uniform(0.0, latest))  # a random moment, not a condition
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=timeout)
    return committed_reports(ready + out)


def object_files(path: Path) -> set[str]:
    """The files of a store's chunk objects and packs, relative to the store."""
    return {p.relative_to(path).as_posix() for folder in ("chunks", "packs")
            for p in (path / folder).rglob("*") if p.is_file()}


def assert_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The same names, each bit-exact."""
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert_bit_exact(actual[name], array)


def assert_workload_step(restored: arraysnap.Restored, step: int | None,
                         workload: Workload = WORKLOAD) -> None:
    """`restored` holds exactly what `workload` captured at `step`, state and rng included."""
    assert step is not None
    assert restored.step == step
    assert_arrays(restored.arrays, workload.arrays(step))
    assert restored.state == workload.state(step)
    expected_rng = workload.rng(step)
    assert sorted(restored.rng) == sorted(expected_rng)
    for key, generator in expected_rng.items():
        assert restored.rng[key].bit_generator.state == generator.bit_generator.state


def check_store_after_crash(path: Path, last_committed: int | None,
                            workload: Workload = WORKLOAD) -> int:
    """Everything invariant 2 promises after a writer died (`workload` was being captured);
    returns the step captured next."""
    with arraysnap.open(path, mode="r") as reader:  # before a writer's recovery touches it
        latest = reader.latest()
        if latest is not None:
            assert_workload_step(reader.restore(), latest.step, workload)
    with arraysnap.open(path, chunk_bytes=CHUNK) as snap:
        infos = snap.list()
        on_disk = sorted(p.name for p in (path / "snapshots").glob("*.json"))
        # A manifest file that list() leaves out would be a half-written snapshot.
        assert [f"{info.seq:012d}.json" for info in infos] == on_disk
        assert leftover_temporaries(path) == []
        report = snap.verify()
        assert report.ok, str(report)
        if last_committed is not None:
            assert infos, f"step {last_committed} was committed but no snapshot is listed"
            assert infos[-1].step >= last_committed
        events = []
        for info in infos:
            restored = snap.restore(seq=info.seq)
            assert_workload_step(restored, info.step, workload)
            events.append(list(restored.events))
            # The replay log: only records logged after the snapshot's capture...
            assert all(event["after"] >= info.step for event in restored.events), events[-1]
        for older, newer in zip(events, events[1:], strict=False):
            # ... and a newer snapshot's records are the tail of an older one's (no record
            # lost, reordered or trimmed away while a snapshot that needs it is kept).
            assert older[len(older) - len(newer):] == newer
        step = infos[-1].step + 1 if infos else 0
        # Capture before restoring the latest (a restore repairs the baseline by itself): the
        # recovery in open() alone must have made the baseline right.
        workload.capture(snap, step)
        snap.wait()
        assert_workload_step(snap.restore(), step, workload)
        for info in infos[-2:]:
            assert_workload_step(snap.restore(seq=info.seq), info.step, workload)
    return step


@pytest.fixture
def template_store(tmp_path: Path) -> Path:
    """A store with one snapshot (seq 1, step 7: "u", "s", state and rng) to make hostile."""
    path = tmp_path / "template.snap"
    with arraysnap.open(path, chunk_bytes=CHUNK) as snap:
        snap.capture({"u": np.arange(2000.0).reshape(4, 500), "s": np.array(1)}, step=7,
                     state={"t": [1, 2]}, rng=np.random.default_rng(1))
    return path


@pytest.fixture
def file_size_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Files of at most 256 MiB, and arraysnap's log quiet, while a hostile store is read."""
    # A hostile manifest may claim any size; with this limit an attempt to allocate a huge file
    # fails at once (EFBIG) instead of filling the disk, and shows up as a non-arraysnap error.
    # The many damaged-snapshot log records these tests provoke are expected: keep them quiet.
    monkeypatch.setattr(logging.getLogger("arraysnap"), "disabled", True)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small (8 MiB) file system that really fills up; skipped without root."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that really fills) needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
