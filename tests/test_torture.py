"""The torture command: ``python -m arraysnap.torture`` runs, reports its counts, and passes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

COUNT_LINES = ["kills survived", "faults injected", "corruptions detected",
               "mirror damage repaired", "snapshots lost", "wrong data returned",
               "unexpected errors"]


def run_torture(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "arraysnap.torture", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONHASHSEED": "0"})


def test_help(tmp_path: Path):
    result = run_torture("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--minutes", "--seconds", "--dir", "--seed", "--json"):
        assert option in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help creates no store


def test_twenty_seconds_of_torture(tmp_path: Path):
    report_file = tmp_path / "report.json"
    result = run_torture("--seconds", "20", "--seed", "1", "--json", str(report_file),
                         cwd=tmp_path, timeout=120)
    output = result.stdout
    assert result.returncode == 0, output[-5000:] + result.stderr[-3000:]
    counts = {}
    for name in COUNT_LINES:
        found = re.search(rf"^{name}: (\d+)$", output, re.MULTILINE)
        assert found, f"no '{name}: N' line in:\n{output[-3000:]}"
        counts[name] = int(found.group(1))
    assert counts["kills survived"] > 0
    assert counts["faults injected"] > 0
    assert counts["corruptions detected"] > 0
    assert counts["snapshots lost"] == 0
    assert counts["wrong data returned"] == 0
    assert counts["unexpected errors"] == 0
    assert re.search(r"^elapsed: [\d.]+ s$", output, re.MULTILINE)
    last = output.strip().splitlines()[-1]
    passed = re.fullmatch(r"(\d+) passed, (\d+) failed", last)
    assert passed and int(passed.group(1)) > 0 and passed.group(2) == "0", last
    report = json.loads(report_file.read_text())
    assert report["kills_survived"] == counts["kills survived"]
    assert report["failed"] == 0 and report["failures"] == []
    # The temporary stores went under the current directory, and are gone after a pass.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
