"""The benchmark harnesses run in their quick modes and their outputs parse.

No timing is asserted: this machine's timings say nothing about correctness. What is asserted
is that every peer produced a row for every scenario, with finite positive figures, that the
JSON documents have the expected shape, and that the plots are PNG files. A peer that silently
produced nothing fails here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The quick mode's scenarios: 4 change fractions of a smooth field, a noisy field, sparse
# updates, many small arrays and one array of the same total size.
QUICK_SCENARIOS = 8
OPTIONAL_PEERS = {"h5py": "h5py", "zarr": "zarr", "icechunk": "icechunk"}
CAPTURE_FIGURES = ("pause", "durable", "bytes_written")


def expected_peers() -> list[str]:
    """np.save and arraysnap always; the others whenever their package is importable."""
    peers = ["np.save", "arraysnap"]
    peers += [name for name, module in OPTIONAL_PEERS.items()
              if importlib.util.find_spec(module) is not None]
    return peers


def run_harness(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (f"{script} exited with {done.returncode}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def strict_json(path: Path) -> Any:
    """Parse as strict JSON: NaN or Infinity would make other JSON readers choke."""
    def refuse(token: str) -> None:
        raise ValueError(f"{path.name}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_positive(value: Any, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    assert math.isfinite(value) and value > 0, f"{where}: {value!r}"


def assert_spread(data: Any, where: str, n: int | None = None) -> None:
    assert isinstance(data, dict) and set(data) >= {"median", "min", "max", "n"}, where
    for key in ("median", "min", "max"):
        assert_positive(data[key], f"{where}.{key}")
    assert data["min"] <= data["median"] <= data["max"], where
    if n is not None:
        assert data["n"] == n, f"{where}: {data['n']} values, expected {n}"
    else:
        assert data["n"] >= 1, where


@pytest.fixture(scope="module")
def peers_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-peers")
    run_harness("bench_peers.py", "--quick", "--out", str(out))
    return out, strict_json(out / "peers.json")


def test_peers_document_shape(peers_output: tuple[Path, dict[str, Any]]) -> None:
    _, document = peers_output
    assert document["schema"] == "arraysnap-bench-peers/1"
    assert document["partial"] is False
    assert document["problems"] == []
    assert document["skipped"] == []
    config = document["config"]
    assert config["quick"] is True
    assert config["chunk_bytes"] == 1 << 20
    assert config["codec"] == "zstd level 1"
    assert config["checkpoints"] > config["restore_back"]
    machine = document["machine"]
    for key in ("cpu_model", "cores", "ram_bytes", "kernel", "filesystem", "versions"):
        assert machine[key], key
    assert isinstance(document["commit"], str) and document["commit"]
    assert sorted(document["peers_run"]) == sorted(expected_peers())


def test_every_peer_has_every_scenario(peers_output: tuple[Path, dict[str, Any]]) -> None:
    _, document = peers_output
    config = document["config"]
    timed = config["checkpoints"] - config["untimed_checkpoints"]
    scenarios = document["scenarios"]
    assert len(scenarios) == QUICK_SCENARIOS
    assert [s["key"] for s in scenarios] == config["scenarios_planned"]
    kinds = {(s["field"], s["change"], s["n_arrays"] > 1) for s in scenarios}
    assert {("noisy", "chunks", False), ("smooth", "sparse", False),
            ("smooth", "arrays", True), ("smooth", "chunks", False)} <= kinds
    assert {s["fraction"] for s in scenarios if s["change"] == "chunks"} >= {0.0, 0.01, 0.1, 1.0}
    for scenario in scenarios:
        assert sorted(scenario["peers"]) == sorted(expected_peers()), scenario["key"]
        assert_positive(scenario["state_bytes"], scenario["key"])
        for name in ("memcpy_seconds", "memcmp_seconds"):
            assert_spread(scenario["limits"][name], f"{scenario['key']} {name}")
        for name, peer in scenario["peers"].items():
            where = f"{scenario['key']} / {name}"
            assert peer["checkpoints"] == config["checkpoints"], where
            assert len(peer["records"]) == config["checkpoints"], where
            for figure in CAPTURE_FIGURES:
                assert_spread(peer[figure], f"{where} {figure}", n=timed)
            if peer["blocking"]:
                assert peer["pause"] == peer["durable"], where
            else:
                assert peer["pause"]["median"] <= peer["durable"]["median"], where
            assert_positive(peer["disk_used"], f"{where} disk_used")
            latest = peer["restore"]["latest"]
            assert_spread(latest["first_access"], f"{where} restore latest first access")
            assert_spread(latest["full_read"], f"{where} restore latest full read")
            back = peer["restore"]["back"]
            if peer["keeps_history"]:
                assert_spread(back["first_access"], f"{where} restore back first access")
                assert_spread(back["full_read"], f"{where} restore back full read")
            else:
                assert back is None, where
            for metric, ratio in peer["ratios"].items():
                # 0 is possible (np.save allocates no anonymous memory to checkpoint).
                assert ratio is None or (math.isfinite(ratio) and ratio >= 0), (where, metric)
            assert peer["ratios"]["durable"] is not None, where


def test_limits_and_memory_are_measured(peers_output: tuple[Path, dict[str, Any]]) -> None:
    _, document = peers_output
    with_limits = [s for s in document["scenarios"] if s["limits"].get("blake3_bytes_per_s")]
    assert {s["field"] for s in with_limits} == {"smooth", "noisy"}
    for scenario in with_limits:
        for name in ("blake3_bytes_per_s", "zstd_encode_bytes_per_s", "zstd_decode_bytes_per_s",
                     "write_fsync_bytes_per_s"):
            assert_spread(scenario["limits"][name], f"{scenario['key']} {name}")
        assert_positive(scenario["limits"]["zstd_ratio"], scenario["key"])
    fractions = document["limit_fractions"]
    assert fractions, "no fraction of the physical limits was computed"
    for row in fractions:
        for key in ("pause_0_vs_memcmp", "pause_100_vs_memcmp_memcpy",
                    "background_100_vs_cpu", "durable_100_vs_disk"):
            assert_positive(row[key], key)
    with_rss = [s for s in document["scenarios"] if s["rss"]
                and any(p["rss"] for p in s["peers"].values())]
    assert with_rss, "no scenario measured peak RSS"
    for scenario in with_rss:
        for name, peer in scenario["peers"].items():
            for key in ("peak_rss_bytes", "checkpoint_peak_bytes", "restore_peak_bytes"):
                assert_positive(peer["rss"][key], f"{scenario['key']} / {name} {key}")


def test_report_and_plots(peers_output: tuple[Path, dict[str, Any]]) -> None:
    out, document = peers_output
    report = (out / "peers.md").read_text()
    assert "Time until durable" in report
    for scenario in document["scenarios"]:
        assert scenario["label"] in report
    for name in document["peers_run"]:
        assert f"| {name} |" in report
    if importlib.util.find_spec("matplotlib") is None:
        assert document["plots"] == []
        return
    assert sorted(document["plots"]) == ["scaling_fraction.png", "scaling_size.png"]
    for name in document["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 10_000, f"{name} is suspiciously small"


def test_report_only_remakes_outputs(peers_output: tuple[Path, dict[str, Any]],
                                     tmp_path: Path) -> None:
    out, document = peers_output
    run_harness("bench_peers.py", "--report-only", str(out / "peers.json"), "--out",
                str(tmp_path), timeout=120)
    assert (tmp_path / "peers.md").read_text() == (out / "peers.md").read_text()
    again = strict_json(tmp_path / "peers.json")
    assert again["scenarios"] == document["scenarios"]


def test_core_benchmark_quick(tmp_path: Path) -> None:
    output = tmp_path / "core.json"
    done = run_harness("bench_core.py", "--quick", "--dir", str(tmp_path), "--json", str(output))
    assert "arraysnap core benchmark" in done.stdout
    document = strict_json(output)
    assert document["config"]["quick"] is True
    assert document["problems"] == []
    repeats = document["config"]["repeats"]
    assert len(document["memcpy"]) == len(document["npsave"]) == repeats
    captures = document["summary"]["captures"]
    assert sorted(captures) == sorted(["0%", "1%", "10%", "100%"])
    for label, entry in captures.items():
        assert_spread(entry["pause"], f"core {label} pause", n=repeats)
        assert_spread(entry["durable"], f"core {label} durable", n=repeats)
        assert_positive(entry["bytes_written"]["median"], f"core {label} bytes")
    assert document["summary"]["restores"], "no restore was timed"
    for key, entry in document["summary"]["restores"].items():
        assert_spread(entry["seconds"], f"core restore {key}")


def test_loop_benchmark_quick(tmp_path: Path) -> None:
    output = tmp_path / "loop.json"
    done = run_harness("bench_loop.py", "--quick", "--dir", str(tmp_path), "--json", str(output))
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())["results"]
    # Both workloads at both cadences, each with its background (tracked and untracked)
    # and sync figures.
    assert {(r["workload"], r["cadence"]) for r in results} == {
        (workload, cadence) for workload in ("band", "full")
        for cadence in ("every 1 s", "Young/Daly 1 h")}
    for result in results:
        assert result["baseline_seconds"] > 0 and result["steps"] >= 10
        for mode in ("background", "untracked", "sync"):
            assert math.isfinite(result[mode]["overhead_median"])
            assert result[mode]["overhead_min"] <= result[mode]["overhead_max"]
    assert "overhead bg" in done.stdout


def test_many_arrays_benchmark_quick(tmp_path: Path) -> None:
    """bench_many's scenarios run under ``ulimit -n 1024`` in their child processes: every
    one must complete (before shared baseline files, 600 arrays failed with EMFILE), and a
    writer and a reader with restored arrays held keep few descriptors (not one per array)."""
    out = tmp_path / "many.json"
    done = run_harness("bench_many.py", "--quick", "--dir", str(tmp_path), "--json", str(out))
    document = strict_json(out)
    assert len(document["many"]) == 2, done.stdout
    for result in document["many"]:
        assert "error" not in result, result
        for key in ("first", "savez", "pause", "open", "restore_writer", "restore_reader"):
            assert_positive(result[key], f"{result['count']} arrays: {key}")
        assert result["bytes"] > 0
        assert result["fds"] <= 64, result  # whatever the number of arrays
    held = document["held"]
    assert "error" not in held, held
    assert_positive(held["pause_held"], "held")
    assert_positive(held["pause_plain"], "plain")
