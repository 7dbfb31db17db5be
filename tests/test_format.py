"""Format stability: stores written by every earlier format version keep opening."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_bit_exact

import arraysnap

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_store import fixture_snapshots  # noqa: E402

FIXTURES = sorted((REPO / "tests" / "fixtures").glob("v*-store"))


def test_there_is_a_fixture_for_the_current_version():
    assert REPO / "tests" / "fixtures" / f"v{arraysnap.FORMAT_VERSION}-store" in FIXTURES


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["r", "a"])
def test_fixture_store_restores_exactly(fixture: Path, mode: str, tmp_path):
    store = tmp_path / fixture.name
    shutil.copytree(fixture, store)  # a writer may repair or update the copy, never the fixture
    expected = fixture_snapshots(int(fixture.name[1:].split("-")[0]))
    with arraysnap.open(store, mode=mode) as snap:
        assert snap.verify().ok
        assert [s.step for s in snap.list()] == [e["step"] for e in expected]
        for snapshot in expected:
            restored = snap.restore(step=snapshot["step"])
            assert set(restored.arrays) == set(snapshot["arrays"])
            for name, array in snapshot["arrays"].items():
                assert_bit_exact(restored.arrays[name], array)
            assert restored.state == snapshot["state"]
            if snapshot["rng"] is not None:
                assert restored.rng.random() == snapshot["rng"].random()
        if mode == "a":
            snap.capture({"field": np.zeros(3)}, step=30)
            snap.wait()
            assert snap.restore().step == 30
