"""Coverage-guided fuzzing of the parsers of store contents (``arraysnap.testing.fuzz``): a
short run of every target here; a long one on demand (``--seconds``)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import blake3
import pytest

from arraysnap import CorruptSnapshotError
from arraysnap.manifest import MANIFEST_FORMAT, parse_manifest, seal_manifest
from arraysnap.tables import TableReader
from arraysnap.testing import fuzz

RUNS = 2000


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_a_short_fuzzing_run_finds_nothing(target, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "arraysnap.testing.fuzz", target, "--runs", str(RUNS),
         "--corpus", str(tmp_path / "corpus")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Done {RUNS} runs" in done.stderr
    assert not list(tmp_path.glob("crash-*"))


def _leaf_with_name(name: object) -> bytes:
    layout = {"shape": [1], "dtype": "<f8", "order": "C", "split_axis": 0, "rows_per_chunk": 1}
    row = [name, 0, base64.b64encode(bytes(32)).decode()]
    return json.dumps({"layouts": [layout], "arrays": [row]}).encode()


@pytest.mark.parametrize("name", [5, [], None, {"a": 1}, True])
def test_a_leaf_naming_an_array_by_a_non_string_is_damage_not_a_crash(name):
    """The fuzzer's first finding: a TypeError escaped the table reader (and so opening a
    store) for a leaf row whose name was not a string."""
    leaf = _leaf_with_name(name)
    digest = blake3.blake3(leaf).digest()
    reader = TableReader(lambda wanted, location: leaf)
    tables = {"arrays": 1, "depth": 1,
              "children": [["a", 1, base64.b64encode(digest).decode()]]}
    with pytest.raises(ValueError, match="array names must be strings"):
        reader.read(tables)
    body = {"format": MANIFEST_FORMAT, "version": 3, "seq": 1, "step": None,
            "parent": None, "time": 0.0, "arrays": {}, "tables": tables, "codec": {}}
    with pytest.raises(CorruptSnapshotError, match="array names must be strings"):
        parse_manifest(seal_manifest(body), 1, TableReader(lambda wanted, location: leaf))


def test_a_sealed_manifest_reaches_past_its_checksum(tmp_path, monkeypatch):
    """The fuzzer seals what it makes as a writer would: a seed sealed again parses whole,
    so what the fuzzer changes is read by the parser, not stopped at the checksum."""
    monkeypatch.setattr(fuzz, "_workdir", tmp_path)
    monkeypatch.setattr(fuzz, "_seeds", None)
    seeds = fuzz._state()
    for seed in seeds.manifests:
        manifest = parse_manifest(seal_manifest(json.loads(seed)), None,
                                  TableReader(seeds.fetch))
        assert manifest.arrays
