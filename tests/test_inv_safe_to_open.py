"""Invariant 7, safe to open: reading a store never executes code (nothing unpickled, no
process started), and a malformed or hostile store gives an ArraysnapError, never another
exception, a hang, a huge allocation or a write outside the store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from conftest import CHUNK, REPO, SCALE, TORTURE, assert_arrays, run_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arraysnap
from arraysnap.testing import baseline_extent


def signed(body: dict[str, Any]) -> bytes:
    """A manifest whose checksum matches, so that the garbage reaches the validators."""
    body = {key: value for key, value in body.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = blake3.blake3(canonical.encode("utf-8")).hexdigest()
    return json.dumps(body).encode("utf-8")


def hostile_operations(path: Path) -> Iterator[tuple[str, Callable[[], object]]]:
    def reader(action: Callable[[arraysnap.Store], object]) -> Callable[[], object]:
        def run() -> object:
            with arraysnap.open(path, mode="r") as snap:
                return action(snap)
        return run

    def writer() -> object:
        with arraysnap.open(path) as snap:
            snap.list()
            try:
                snap.restore(seq=1)
            except arraysnap.ArraysnapError:
                pass
            # Writing on top of whatever open() made of it must work or fail cleanly too.
            arrays = {"u": np.ones((4, 500)), "s": np.array(2)}
            snap.capture(arrays, step=8)
            snap.wait()
            assert_arrays(snap.restore().arrays, arrays)
            return None

    yield "list", reader(lambda snap: snap.list())
    yield "latest", reader(lambda snap: snap.latest())
    yield "restore", reader(lambda snap: snap.restore())
    yield "restore(seq=1)", reader(lambda snap: snap.restore(seq=1))
    yield "verify", reader(lambda snap: snap.verify())
    yield "open(mode='a')", writer


def assert_only_arraysnap_errors(path: Path) -> None:
    for name, operation in hostile_operations(path):
        try:
            operation()
        except arraysnap.ArraysnapError:
            pass
        except BaseException as err:  # noqa: BLE001 - exactly what this test looks for
            raise AssertionError(f"{name} raised {type(err).__name__}: {err}") from err



_SPECIAL_INTS = [-1, 0, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, 10**300]
_SPECIAL_TEXT = ["", "..", ".", "/", "a/b", "../../etc/passwd", "\\", "\x00", "__x",
                 "zarr.json", "u", "!!!not base64", "AAAA", "=", "<f8", "|O", "O", "V0",
                 "<M8[xyz]", "U100000000", "zstd", "C", "F", "PCG64", "generator", "dict"]
_leaves = (st.none() | st.booleans() | st.sampled_from(_SPECIAL_INTS) | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_SPECIAL_TEXT)
           | st.text(max_size=12))
hostile_values = st.recursive(
    _leaves, lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(_SPECIAL_TEXT), children,
                      max_size=4),
    max_leaves=12)
hostile_dtypes = st.one_of(
    st.sampled_from(["<f8", "|O", "O", ">i2", "|V0", "<U0", "|S0", "<M8[D]", "f8,i4", "<c32"]),
    st.builds(lambda n: [["a", "<f8", [n]]], st.integers(-2, 2**40)),
    st.builds(lambda n: f"|V{n}", st.integers(0, 2**40)),
    st.builds(lambda n: [["a", [["b", "|O"]], [n]]], st.integers(0, 3)),
)
_DEEP = "__deep__"


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, (*prefix, index))


@st.composite
def hostile_manifests(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    body = json.loads(json.dumps(template))
    body.pop("checksum")
    deep = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(paths_of(body), key=repr)))
        if not path:
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["value", "value", "delete", "rename", "deep", "dtype"]))
        if action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_SPECIAL_TEXT) | st.text(max_size=8))] = parent.pop(key)
        elif action == "deep":
            depth = draw(st.integers(2, 3000))
            opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
            deep = opener * depth + "0" + closer * depth
            parent[key] = _DEEP
        elif action == "dtype" and "dtype" in str(path):
            parent[key] = draw(hostile_dtypes)
        else:
            parent[key] = draw(hostile_values)
    if deep is not None:
        # Too deep for json.dumps (as for arraysnap's checksum): written raw, checksum stale.
        body["checksum"] = template["checksum"]
        return json.dumps(body).replace(json.dumps(_DEEP), deep).encode()
    if draw(st.integers(0, 9)) == 0:
        body["checksum"] = draw(st.sampled_from([template["checksum"], "0" * 64, None]))
        return json.dumps(body).encode()
    return signed(body)


HOSTILE_SETTINGS = settings(max_examples=300 * SCALE, deadline=None, database=None,
                            derandomize=not TORTURE,
                            suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])


def test_hostile_manifests_give_only_arraysnap_errors(tmp_path: Path, template_store: Path,
                                                      file_size_limit: None):
    manifest = template_store / "snapshots" / "000000000001.json"
    template = json.loads(manifest.read_bytes())
    counter = iter(range(10**9))

    @HOSTILE_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        work = tmp_path / f"example-{next(counter)}"
        shutil.copytree(template_store, work)
        try:
            garbage = data.draw(hostile_manifests(template))
            (work / "snapshots" / "000000000001.json").write_bytes(garbage)
            assert_only_arraysnap_errors(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()


@st.composite
def hostile_settings(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    body = dict(template)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*body, "extra"]))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(hostile_values | st.sampled_from(
                [{"name": "zstd", "level": 99}, {"name": "evil", "level": 1}, "zstd:x", 2**70]))
    if draw(st.integers(0, 5)) == 0:
        cut = json.dumps(body).encode()
        return cut[: draw(st.integers(0, len(cut)))]
    return json.dumps(body).encode()


def test_hostile_store_settings_give_only_arraysnap_errors(tmp_path: Path, template_store: Path,
                                                           file_size_limit: None):
    template = json.loads((template_store / "arraysnap.json").read_bytes())
    counter = iter(range(10**9))

    @HOSTILE_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        work = tmp_path / f"example-{next(counter)}"
        shutil.copytree(template_store, work)
        try:
            (work / "arraysnap.json").write_bytes(data.draw(hostile_settings(template)))
            assert_only_arraysnap_errors(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()


def rewrite_manifest(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = store / "snapshots" / "000000000001.json"
    body = json.loads(manifest.read_bytes())
    change(body)
    manifest.write_bytes(signed(body))


def set_at(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


# Each one a hostile manifest that once got past arraysnap as a foreign exception.
@pytest.mark.parametrize("where, value", [
    (("time",), 10**400),
    (("stats", "pause_seconds"), 10**400),
    (("stats", "durable_seconds"), 10**400),
    (("rng", "value", "state"), nested(600)),
    (("rng", "value", "state", "state"), {"ndarray": "<u8", "data": [[[1]]]}),
    (("rng", "value", "state", "state"), {"ndarray": "<u8", "data": "x"}),
    (("arrays", "u", "dtype"), [["a", "<f8", [2**27]]]),
    (("arrays", "u", "dtype"), "|V1000000000"),
], ids=["time-huge-int", "stats-huge-int", "durable-huge-int", "rng-deep", "rng-state-shape",
        "rng-state-text", "huge-subarray-dtype", "huge-void-dtype"])
def test_hostile_manifest_regressions(template_store: Path, file_size_limit: None,
                                      where: tuple[Any, ...], value: Any):
    rewrite_manifest(template_store, set_at(where, value))
    assert_only_arraysnap_errors(template_store)



def test_hostile_rng_seed_sequence_cannot_hang_restore(template_store: Path):
    # numpy's SeedSequence work grows with pool_size squared: 10**6 would take an hour.
    rewrite_manifest(template_store,
                     set_at(("rng", "value", "seed_sequence", "pool_size"), 10**6))
    try:
        result = run_child("refuse-or-restore", template_store, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("restore() of a manifest with a huge rng pool_size hangs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:")



@pytest.mark.parametrize("what", ["manifest", "chunk-object", "pack", "settings",
                                  "journal-segment", "history"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_files_in_a_store_give_an_error_not_a_hang(template_store: Path, what: str,
                                                            kind: str):
    if what == "manifest":
        target = template_store / "snapshots" / "000000000002.json"
    elif what == "settings":
        target = template_store / "arraysnap.json"
    elif what == "journal-segment":
        target = template_store / "journal" / "0000000000000000.jsonl"
        target.parent.mkdir(exist_ok=True)
    elif what == "history":
        target = template_store / "history.jsonl"
    elif what == "pack":
        target = next(p for p in (template_store / "packs").glob("*/*"))
    else:  # a chunk object of its own: of an array too large for packs (70 chunks)
        with arraysnap.open(template_store, chunk_bytes=CHUNK) as snap:
            snap.capture({"big": np.arange(70 * CHUNK // 8, dtype=np.float64)}, step=8)
        target = next(p for p in (template_store / "chunks").glob("*/*"))
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    try:
        result = run_child("special-files", template_store, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {kind} in place of the {what} makes arraysnap hang")
    assert result.returncode == 0, result.stderr
    assert "FOREIGN" not in result.stdout, result.stdout


def test_newer_format_versions_are_refused_naming_both_versions(template_store: Path):
    rewrite_manifest(template_store, set_at(("version",), 7))
    with arraysnap.open(template_store, mode="r") as reader:
        assert reader.list() == []
        with pytest.raises(arraysnap.FormatVersionError) as caught:
            reader.restore(seq=1)
    message = str(caught.value)
    assert re.search(r"\b7\b", message) and re.search(r"\b1\b", message), message
    with pytest.raises(arraysnap.FormatVersionError):
        arraysnap.open(template_store)  # never write into a store from the future

    settings_file = template_store / "arraysnap.json"
    body = json.loads(settings_file.read_bytes())
    body["version"] = 7
    settings_file.write_text(json.dumps(body))
    with pytest.raises(arraysnap.FormatVersionError) as caught:
        arraysnap.open(template_store, mode="r")
    message = str(caught.value)
    assert re.search(r"\b7\b", message) and re.search(
        rf"\b{arraysnap.FORMAT_VERSION}\b", message), message


def test_hostile_mirror_links_never_make_the_writer_touch_files_outside_the_store(
        template_store: Path, tmp_path: Path):
    marker_path = template_store / "mirror" / "state.json"
    marker = json.loads(marker_path.read_bytes())
    victim = tmp_path / "victim.dat"
    baseline, _ = baseline_extent(template_store, "u")
    size = baseline.stat().st_size
    victim.write_bytes(b"V" * size)  # the same size: adoptable as the baseline
    baseline.unlink()
    baseline.symlink_to(victim)
    marker["clean"] = False  # so that recovery "repairs" it
    marker_path.write_text(json.dumps(marker))
    with arraysnap.open(template_store) as snap:
        snap.capture({"u": np.ones((4, 500)), "s": np.array(2)}, step=8)
        snap.wait()
    assert victim.read_bytes() == b"V" * size


def test_hostile_mirror_directory_link_never_deletes_files_outside_the_store(
        template_store: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "results.bin").write_bytes(b"a week of computing")
    shutil.rmtree(template_store / "mirror")
    (template_store / "mirror").symlink_to(precious, target_is_directory=True)
    try:
        with arraysnap.open(template_store) as snap:
            snap.restore()
    except arraysnap.ArraysnapError:
        pass  # refusing such a store is fine too
    assert (precious / "results.bin").read_bytes() == b"a week of computing"


def test_no_pickle_anywhere_in_the_package():
    sources = [p for p in (REPO / "src" / "arraysnap").rglob("*")
               if p.suffix in (".py", ".pyx", ".pyi")]
    assert sources
    forbidden = re.compile(r"pickle|allow_pickle\s*=\s*True|marshal|shelve|\b(eval|exec)\(")
    for source in sources:
        found = forbidden.search(source.read_text())
        assert found is None, f"{source.name} uses {found.group(0)!r}"  # type: ignore[union-attr]



def test_reading_a_hostile_store_runs_no_unpickler_and_no_process(template_store: Path):
    rewrite_manifest(template_store, set_at(("arrays", "u", "dtype"), "|O"))
    # Audit hooks see what happens, whatever module would do it.
    events = ["pickle.", "marshal.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
              "subprocess.", "ctypes.", "compile", "exec"]
    result = run_child("audit", template_store, *events)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

