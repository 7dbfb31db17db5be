"""Shared fixtures and helpers for the arraysnap test suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import arraysnap
from arraysnap.objects import object_key

REPO = Path(__file__).resolve().parent.parent


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


def object_path(snap: arraysnap.Store, digest: bytes) -> Path:
    """Where a local store keeps the chunk object with `digest` (to damage it)."""
    return snap.path / object_key(digest)


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (same environment); return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store but the baselines, lock and capture history (which only informs),
    by relative path (to check 'unchanged')."""
    files = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).as_posix()
        if (file.is_file() and not relative.startswith(("mirror/", "tmp/"))
                and relative not in ("lock", "history.jsonl")):
            files[relative] = file.read_bytes()
    return files
