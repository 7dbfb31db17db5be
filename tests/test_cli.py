"""The ``arraysnap`` command line: every command, its JSON, its errors and exit codes."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import REPO, assert_bit_exact, object_files

import arraysnap
from arraysnap.cli import cli
from arraysnap.testing import chunk_ranges, chunk_references

COMMANDS = ["ls", "show", "diff", "verify", "prune", "gc", "du", "export", "restore", "stats",
            "copy", "upgrade"]


def run(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Invoke the CLI in-process; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def make_history(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """Three snapshots (steps 0, 10, 20) with known changes; returns what each step held.

    u: 64 x 64 float64 at 4 KiB chunks = 8 rows per chunk, 8 chunks.
    """
    u = np.arange(64 * 64, dtype=np.float64).reshape(64, 64)  # every chunk distinct
    v = np.arange(1000, dtype=np.int32)
    f = np.asfortranarray(np.arange(24, dtype=">i4").reshape(4, 6))
    held = {}
    rng = np.random.default_rng(5)
    with arraysnap.open(path, chunk_bytes=4096) as snap:
        for step in (0, 10, 20):
            if step == 10:
                u[17, 3] += 2.5          # chunk 2 (rows 16:24)
            if step == 20:
                u[40:56] -= 1.0          # chunks 5 and 6 (rows 40:56)
                u[63, 0] += 0.25         # chunk 7
            held[step] = {"u": u.copy(), "v": v.copy(), "f": f.copy(order="F")}
            snap.capture({"u": u, "v": v, "f": f}, step=step, state={"t": step / 10}, rng=rng)
    return held


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    path = tmp_path / "run.snap"
    return path, make_history(path)


def flip_a_byte_of(store: Path, seq: int, name: str, chunk: int) -> Path:
    """Flip a byte in the middle of the stored bytes of one chunk (in its pack, or its own
    object); return the file."""
    relative, offset, length = chunk_ranges(store)[(seq, name, chunk)]
    victim = store / relative
    data = bytearray(victim.read_bytes())
    data[offset + (len(data) - offset if length < 0 else length) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    return victim


# -- ls, show --------------------------------------------------------------------------------
def test_ls_lists_every_snapshot_as_table_and_json(history):
    path, _ = history
    code, out, _ = run("ls", path, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["seq"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [0, 10, 20]
    assert rows[0]["chunks_changed"] == rows[0]["chunks_scanned"]  # the first writes all
    assert rows[1]["chunks_changed"] == 1 and rows[2]["chunks_changed"] == 3
    assert rows[1]["arrays"]["u"] == {"shape": [64, 64], "dtype": "<f8", "order": "C",
                                      "n_chunks": 8, "nbytes": 32768}
    assert all(r["bytes_written"] > 0 and r["pause_seconds"] >= 0 for r in rows)
    code, out, _ = run("ls", path)
    assert code == 0
    assert re.search(r"seq\s+step\s+time\s+arrays\s+changed/total\s+bytes written\s+blocked"
                     r"\s+pause", out)
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(line[0], line[1]) for line in lines] == [("1", "0"), ("2", "10"), ("3", "20")]
    assert re.search(r"^\s*2\s+10\s+.*\su, v, f\s+1/10\s", out, re.MULTILINE)


def test_ls_names_a_damaged_snapshot_on_stderr(history):
    path, _ = history
    manifest = path / "snapshots" / "000000000002.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":10', b'"step":11'))
    code, out, err = run("ls", path, "--json")
    assert code == 0 and [r["seq"] for r in json.loads(out)] == [1, 3]
    assert "damaged snapshots not listed: 2" in err


def test_show_reports_arrays_state_rng_and_provenance(history):
    path, _ = history
    code, out, _ = run("show", path, "step:10", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["seq"] == 2 and shown["step"] == 10 and shown["state"] == {"t": 1.0}
    assert shown["arrays"]["u"]["chunk_shape"] == [8, 64]
    assert shown["arrays"]["f"] == {"shape": [4, 6], "dtype": ">i4", "order": "F",
                                    "n_chunks": 1, "chunk_shape": [4, 6], "nbytes": 96}
    assert shown["rng"]["value"]["bit_generator"] == "PCG64"
    assert shown["provenance"]["arraysnap"] == arraysnap.__version__
    code, out, _ = run("show", path)
    assert code == 0
    assert "snapshot 3 of" in out and "step 20" in out
    assert "one Generator (PCG64)" in out and 'state: {"t": 2.0}' in out
    assert re.search(r"u\s+\(64, 64\)\s+float64\s+C\s+8\s+\(8, 64\)", out)


@pytest.mark.parametrize("spec, seq", [("1", 1), ("latest", 3), ("~0", 3), ("~2", 1),
                                       ("latest~1", 2), ("step:20", 3)])
def test_snapshot_specs(history, spec, seq):
    path, _ = history
    code, out, _ = run("show", path, spec, "--json")
    assert code == 0 and json.loads(out)["seq"] == seq


def test_negative_index_after_double_dash(history):
    path, _ = history
    code, out, _ = run("show", path, "--json", "--", "-2")
    assert code == 0 and json.loads(out)["seq"] == 2


# -- diff ------------------------------------------------------------------------------------
def test_diff_names_chunks_rows_and_largest_difference(history):
    path, _ = history
    code, out, _ = run("diff", path, "step:0", "step:20", "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["a"], result["b"]) == (1, 3)
    by_name = {item["name"]: item for item in result["arrays"]}
    u = by_name["u"]
    assert u["status"] == "changed" and u["chunks_differing"] == [2, 5, 6, 7]
    assert u["fraction"] == 0.5
    assert u["row_ranges"] == [[16, 24], [40, 64]]
    assert u["max_abs_difference"] == 2.5
    assert by_name["v"]["status"] == "same" and by_name["v"]["chunks_differing"] == []
    assert by_name["v"]["max_abs_difference"] is None
    code, out, _ = run("diff", path, "1", "2")
    assert code == 0
    assert re.search(r"u\s+changed\s+1/8\s+12\.5%\s+16:24\s+2\.5", out)


def test_diff_exit_code_and_digest_only(history):
    path, _ = history
    assert run("diff", path, "1", "2", "--exit-code")[0] == 1
    assert run("diff", path, "2", "2", "--exit-code")[0] == 0
    code, out, _ = run("diff", path, "1", "2", "--no-values", "--json")
    u = next(item for item in json.loads(out)["arrays"] if item["name"] == "u")
    assert u["chunks_differing"] == [2] and u["max_abs_difference"] is None


def test_diff_added_removed_replaced_and_relaid_arrays(store_path):
    big = np.iinfo(np.int64)
    with arraysnap.open(store_path, chunk_bytes=64) as snap:
        snap.capture({"keep": np.zeros((4, 4)), "gone": np.ones(3),
                      "reshaped": np.zeros(6), "ints": np.array([big.min, 0]),
                      "order": np.zeros((8, 8))}, step=1)
        snap.capture({"keep": np.zeros((4, 4)), "new": np.ones(2),
                      "reshaped": np.zeros((2, 3)), "ints": np.array([big.max, 0]),
                      "order": np.asfortranarray(np.eye(8))}, step=2)
    code, out, _ = run("diff", store_path, "1", "2", "--json")
    assert code == 0
    by_name = {item["name"]: item for item in json.loads(out)["arrays"]}
    assert by_name["gone"]["status"] == "removed" and by_name["new"]["status"] == "added"
    assert by_name["reshaped"]["status"] == "replaced"
    assert "(6,)" in by_name["reshaped"]["note"] and "(2, 3)" in by_name["reshaped"]["note"]
    assert by_name["keep"]["status"] == "same"
    assert by_name["ints"]["max_abs_difference"] == 2**64 - 1  # exact, no overflow
    relaid = by_name["order"]
    assert relaid["status"] == "changed" and relaid["max_abs_difference"] == 1.0
    assert relaid["row_ranges"] == [[0, 8]] and "layouts differ" in relaid["note"]


def test_diff_reports_nan_changes(store_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"x": np.array([1.0, 2.0])})
        snap.capture({"x": np.array([np.nan, 2.0])})
    code, out, _ = run("diff", store_path, "1", "2", "--json")
    assert code == 0 and json.loads(out)["arrays"][0]["max_abs_difference"] == "nan"


# -- verify ----------------------------------------------------------------------------------
def test_verify_ok(history):
    path, _ = history
    code, out, _ = run("verify", path)
    assert code == 0 and "checked 1 snapshot, " in out and out.strip().endswith("ok")
    code, out, _ = run("verify", path, "--all", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["snapshots_checked"] == 3
    assert report["chunks_checked"] == 3 * (8 + 1 + 1)


def test_verify_fails_with_exit_1_on_a_flipped_byte(history):
    path, _ = history
    flip_a_byte_of(path, 2, "u", 2)   # written at step 10, and used again at step 20
    code, out, err = run("verify", path, "--all")
    assert code == 1
    assert "snapshot 2, array 'u', chunk 2" in out and "recovery.md" in err
    code, out, _ = run("verify", path, "--all", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(p["seq"], p["array"], p["chunk"]) for p in report["problems"]] == \
        [(2, "u", 2), (3, "u", 2)]
    assert run("verify", path, "1")[0] == 0          # snapshot 1 does not use that object


def test_verify_with_progress_agrees_with_store_verify(history):
    path, _ = history
    flip_a_byte_of(path, 3, "u", 7)
    (path / "snapshots" / "000000000001.json").write_text("{}")
    seen = []
    with arraysnap.open(path, mode="r") as snap:
        ours = snap.verify(progress=lambda done, total: seen.append((done, total)))
        theirs = snap.verify()
    assert ours == theirs and not ours.ok
    assert seen[-1] == (ours.chunks_checked, ours.chunks_checked)


# -- prune, gc -------------------------------------------------------------------------------
def test_prune_keep_last(history):
    path, _ = history
    code, out, _ = run("prune", path, "--keep-last", "1", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["snapshots_removed"] == [1, 2]
    with arraysnap.open(path, mode="r") as snap:
        assert [s.seq for s in snap.list()] == [3] and snap.verify().ok
    # What is left is what snapshot 3 uses (here its packs: each holds some chunk of it).
    used = {obj for obj, users in chunk_references(path).items()}
    assert object_files(path) == used and report["chunks_removed"] == 0


def test_prune_needs_a_policy_and_the_lock(history):
    path, _ = history
    code, _, err = run("prune", path)
    assert code == 2 and "--keep-last" in err
    assert run("prune", path, "--keep-last", "0")[0] == 2
    assert run("prune", path, "--keep-within", "soon")[0] == 2
    with arraysnap.open(path):        # a running writer holds the lock
        code, _, err = run("prune", path, "--keep-last", "1")
        assert code == 2 and "another process" in err
        code, _, err = run("gc", path)
        assert code == 2 and "another process" in err
    with arraysnap.open(path, mode="r") as snap:
        assert len(snap.list()) == 3


def test_prune_retention_options(history):
    path, _ = history
    parameters = inspect.signature(arraysnap.Store.prune).parameters
    code, out, err = run("prune", path, "--keep-within", "1h", "--json")
    if "keep_within" in parameters:
        assert code == 0 and json.loads(out)["snapshots_removed"] == []  # all are recent
    else:   # Store.prune(keep_within=...) is not there yet: said plainly, nothing removed
        assert code == 2 and "does not support --keep-within" in err
        with arraysnap.open(path, mode="r") as snap:
            assert len(snap.list()) == 3


def test_gc_removes_unused_objects(history):
    path, _ = history
    stray = path / "chunks" / "ff" / ("ee" * 31)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"x" * 100)
    code, out, _ = run("du", path, "--json")
    usage = json.loads(out)
    assert usage["unreferenced_objects"] == 1 and usage["unreferenced_bytes"] == 100
    code, out, _ = run("gc", path, "--json")
    assert code == 0 and json.loads(out) == {"chunks_removed": 1, "bytes_freed": 100}
    assert not stray.exists()
    code, out, _ = run("gc", path)
    assert code == 0 and "removed 0 unused chunk objects and packs" in out


# -- du --------------------------------------------------------------------------------------
def test_du_unique_and_shared_bytes(history):
    path, _ = history
    code, out, _ = run("du", path, "--json")
    assert code == 0
    usage = json.loads(out)
    rows = usage["snapshots"]
    assert [row["seq"] for row in rows] == [1, 2, 3]
    on_disk = sum((path / f).stat().st_size for f in object_files(path))
    assert usage["object_bytes"] == usage["referenced_bytes"] == on_disk
    assert sum(row["new_bytes"] for row in rows) == on_disk
    for row in rows:
        assert row["unique_bytes"] + row["shared_bytes"] == row["referenced_bytes"]
    # Snapshot 3's pack (u's chunks 5, 6 and 7) is its alone; snapshot 1's pack holds chunks
    # that the later ones still use, so all of it is shared.
    assert rows[2]["unique_bytes"] > 0 and rows[0]["unique_bytes"] == 0
    # Snapshots 2 and 3 share everything but u's chunks 5, 6 and 7 (and, for 1 and 2, chunk 2).
    assert rows[1]["shared_bytes"] > rows[1]["unique_bytes"]
    code, out, _ = run("du", path)
    assert code == 0 and "unique" in out and "chunk objects and packs: " in out


# -- export, restore -------------------------------------------------------------------------
def test_export_zarr_and_npz_are_bit_exact(history, tmp_path):
    path, held = history
    code, out, _ = run("export", path, "step:10", tmp_path / "out.zarr")
    assert code == 0 and "exported snapshot 2" in out
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    for name, expected in held[10].items():
        assert np.asarray(group[name][...]).astype(expected.dtype).tobytes(order="A") == \
            np.ascontiguousarray(expected).tobytes()
    code, _, _ = run("export", path, "latest", tmp_path / "out.npz")
    assert code == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["f", "u", "v"]
        for name, expected in held[20].items():
            assert_bit_exact(loaded[name], expected)
    code, _, err = run("export", path, "latest", tmp_path / "out.npz")
    assert code == 2 and "already exists" in err


def test_export_npz_keeps_names_np_savez_would_swallow(store_path, tmp_path):
    with arraysnap.open(store_path) as snap:
        snap.capture({"file": np.arange(3), "allow_pickle": np.ones(2)})
    assert run("export", store_path, "latest", tmp_path / "x.npz")[0] == 0
    with zipfile.ZipFile(tmp_path / "x.npz") as archive:
        assert sorted(archive.namelist()) == ["allow_pickle.npy", "file.npy"]
    assert np.load(tmp_path / "x.npz", allow_pickle=False)["file"].tolist() == [0, 1, 2]


def test_restore_writes_one_npy_per_array(history, tmp_path):
    path, held = history
    out = tmp_path / "restored"
    code, out_text, _ = run("restore", path, "step:10", "--to", out)
    assert code == 0 and "restored snapshot 2" in out_text
    assert sorted(p.name for p in out.iterdir()) == ["f.npy", "snapshot.json", "u.npy", "v.npy"]
    for name, expected in held[10].items():
        assert_bit_exact(np.load(out / f"{name}.npy", allow_pickle=False), expected)
    document = json.loads((out / "snapshot.json").read_text())
    assert document["seq"] == 2 and document["step"] == 10 and document["state"] == {"t": 1.0}
    rng = arraysnap.rngstate.rng_from_json(document["rng"])
    assert isinstance(rng, np.random.Generator)
    code, _, err = run("restore", path, "--to", out)
    assert code == 2 and "--force" in err
    assert run("restore", path, "--to", out, "--force")[0] == 0
    assert_bit_exact(np.load(out / "u.npy"), held[20]["u"])


def test_restore_of_a_corrupt_chunk_fails_with_its_location(history, tmp_path):
    path, _ = history
    flip_a_byte_of(path, 1, "v", 0)
    code, _, err = run("restore", path, "1", "--to", tmp_path / "r")
    assert code == 2 and "array 'v', chunk 0" in err


# -- stats -----------------------------------------------------------------------------------
def test_stats_table_json_and_plot(history, tmp_path):
    path, _ = history
    code, out, _ = run("stats", path, "--json")
    assert code == 0
    rows = json.loads(out)
    committed = [row for row in rows if row.get("status", "committed") == "committed"]
    assert [row["step"] for row in committed] == [0, 10, 20]
    assert committed[1]["chunks_changed"] == 1 and committed[2]["chunks_changed"] == 3
    assert committed[1]["changed_fraction"] == pytest.approx(1 / 10)
    assert all(row["pause_seconds"] >= 0 and row["bytes_written"] > 0 for row in committed)
    code, out, _ = run("stats", path, "--last", "2")
    assert code == 0 and "captures: median blocked" in out and "(pause " in out
    assert len(re.findall(r"^\s*\d+\s+\d+\s+\d{4}-", out, re.MULTILINE)) == 2
    png = tmp_path / "stats.png"
    code, out, _ = run("stats", path, "--plot", png)
    assert code == 0 and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- errors, help ----------------------------------------------------------------------------
ARGS = {"ls": [], "show": [], "diff": ["1", "2"], "verify": [], "prune": ["--keep-last", "1"],
        "gc": [], "du": [], "export": ["1", "OUT"], "restore": ["--to", "OUT"], "stats": [],
        "copy": ["OUT"], "upgrade": []}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_path_that_is_not_a_store(command, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.txt").write_text("hello")
    for path in (plain, tmp_path / "missing"):
        args = [a.replace("OUT", str(tmp_path / "out")) for a in ARGS[command]]
        code, _, err = run(command, path, *args)
        assert code == 2, (command, path)
        assert str(path) in err and ("not an arraysnap store" in err or "does not exist" in err)
        assert err.count("\n") == 1   # one line, no traceback
    assert sorted(p.name for p in plain.iterdir()) == ["data.txt"]  # nothing was created
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["show", "diff", "verify", "export", "restore"])
def test_a_missing_snapshot_is_exit_code_2(history, command, tmp_path):
    path, _ = history
    args = {"show": ["9"], "diff": ["1", "step:99"], "verify": ["~7"],
            "export": ["9", str(tmp_path / "o.zarr")],
            "restore": ["9", "--to", str(tmp_path / "r")]}[command]
    code, _, err = run(command, path, *args)
    assert code == 2 and ("no snapshot" in err or "holds only 3" in err)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "r").exists()


def test_an_empty_store_has_no_snapshot(store_path):
    arraysnap.open(store_path).close()
    code, out, _ = run("ls", store_path)
    assert code == 0 and "holds no snapshot yet" in out
    code, _, err = run("show", store_path)
    assert code == 2 and "holds no snapshot yet" in err


@pytest.mark.parametrize("command", [*COMMANDS, "demo"])
def test_every_command_has_help_with_an_example(command):
    code, out, _ = run(command, "--help")
    assert code == 0 and "Example" in out and f"arraysnap {command}" in out


def test_main_help_documents_exit_codes_and_snapshot_forms():
    code, out, _ = run("--help")
    assert code == 0
    assert "Exit codes: 0 success; 1" in out and "step:N" in out and "~K" in out
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command


def help_examples() -> list[list[str]]:
    """Every 'arraysnap ...' line in the Example sections of the commands' help."""
    examples = []
    for command in COMMANDS:
        text = cli.commands[command].help or ""
        for line in text.split("Example:")[1].splitlines():
            if line.strip().startswith("arraysnap "):
                examples.append(shlex.split(line.strip())[1:])
    return examples


def documented_examples() -> list[list[str]]:
    """Every '$ arraysnap ...' line of the console blocks in docs/cli.md, in order."""
    text = (REPO / "docs" / "cli.md").read_text()
    blocks = re.findall(r"^```console\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [shlex.split(line[2:])[1:] for block in blocks for line in block.splitlines()
            if line.startswith("$ arraysnap ")]


@pytest.mark.parametrize("source", [help_examples, documented_examples])
def test_documented_examples_run(source, tmp_path, monkeypatch):
    """Each example runs, in order, against a store like the one the docs describe."""
    examples = source()
    assert len(examples) >= 10
    monkeypatch.chdir(tmp_path)
    make_example_store(tmp_path / "run.snap")
    accepted = inspect.signature(arraysnap.Store.prune).parameters
    for args in examples:
        if args[:1] == ["demo"]:
            continue  # a subprocess of its own: test_demo_runs
        if args[:1] == ["prune"] and "keep_within" not in accepted:
            continue  # retention rules beyond keep_last: test_prune_retention_options
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output, result.stderr)


def make_example_store(path: Path) -> None:
    """A run of 50 steps captured every 5 (steps 0..45), so step:20 and step:40 exist."""
    u = np.zeros((128, 128))
    rng = np.random.default_rng(0)
    with arraysnap.open(path, chunk_bytes=16 << 10) as snap:
        for step in range(50):
            u[(step * 3) % 128] += rng.standard_normal(128)
            if step % 5 == 0:
                snap.capture({"u": u, "static": np.ones(1000)}, step=step, state={"t": step},
                             rng=rng)


# -- real processes --------------------------------------------------------------------------
def test_python_dash_m_and_the_entry_point_script(history):
    path, _ = history
    module = subprocess.run([sys.executable, "-m", "arraysnap", "ls", str(path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert module.returncode == 0, module.stderr
    assert [r["step"] for r in json.loads(module.stdout)] == [0, 10, 20]
    script = Path(sys.executable).parent / "arraysnap"
    assert script.exists(), "the arraysnap entry point is not installed (pip install -e .)"
    entry = subprocess.run([str(script), "show", str(path), "step:10", "--json"],
                           capture_output=True, text=True, timeout=60)
    assert entry.returncode == 0, entry.stderr
    assert json.loads(entry.stdout)["seq"] == 2
    missing = subprocess.run([str(script), "verify", str(path.parent / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("Error: ")
    assert "Traceback" not in missing.stderr
    flip_a_byte_of(path, 3, "u", 5)
    broken = subprocess.run([str(script), "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 1 and "array 'u', chunk 5" in broken.stdout


def test_demo_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "arraysnap", "demo", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bit-identical to an uninterrupted run: True" in done.stdout
    assert "killed the run with SIGKILL" in done.stdout


def test_progress_is_drawn_on_a_terminal_only(history, monkeypatch):
    import io

    from rich.console import Console

    import arraysnap._cli.output as cli_module

    path, _ = history
    screen = io.StringIO()
    monkeypatch.setattr(cli_module, "stderr",
                        lambda: Console(file=screen, force_terminal=True, width=100))
    code, out, _ = run("verify", path, "--all")
    assert code == 0 and "verifying chunks" in screen.getvalue()
    assert "verifying" not in out                   # stdout keeps only the report
    screen.truncate(0)
    monkeypatch.setattr(cli_module, "stderr", lambda: Console(file=screen, width=100))
    assert run("verify", path, "--all")[0] == 0
    assert screen.getvalue() == ""                  # not a terminal: no bar
