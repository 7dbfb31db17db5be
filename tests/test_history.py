"""The capture history behind Store.stats(): appending, reading, damage, shrinking."""

from __future__ import annotations

import json

import numpy as np

from arraysnap import history as history_module
from arraysnap.history import History
from arraysnap.results import CaptureStat, CaptureStats
from arraysnap.storage import LocalStorage


def test_rows_round_trip_and_form_a_table(tmp_path):
    history = History(LocalStorage(tmp_path))
    history.append(CaptureStat(1, 0, 10.0, "committed", pause_seconds=0.5, chunks_scanned=4,
                               chunks_changed=1, bytes_written=100))
    history.append(CaptureStat(2, 5, 11.0, "failed", error="OSError(28)"))
    stats = history.read()
    assert [row.status for row in stats] == ["committed", "failed"]
    assert stats.column("bytes_written").tolist() == [100, 0]
    assert stats.column("changed_fraction").tolist() == [0.25, 0.0]
    assert stats.to_dict()["error"] == [None, "OSError(28)"]
    assert "2 captures" in repr(stats) and "failed" in repr(stats)


def test_lines_from_before_write_tracking_read_as_all_compared(tmp_path):
    history = History(LocalStorage(tmp_path))
    with open((tmp_path / history_module.KEY), "w") as handle:
        handle.write(json.dumps({"seq": 1, "status": "committed", "chunks_scanned": 8}) + "\n")
    history.append(CaptureStat(2, 0, 0.0, "committed", chunks_scanned=8, chunks_compared=3))
    assert history.read().column("chunks_compared").tolist() == [8, 3]


def test_damaged_lines_are_skipped_not_fatal(tmp_path):
    history = History(LocalStorage(tmp_path))
    history.append(CaptureStat(1, 0, 0.0, "committed"))
    with open((tmp_path / history_module.KEY), "a") as handle:
        handle.write("not json\n" + json.dumps({"seq": "1"}) + "\n"
                     + json.dumps({"seq": 3, "status": "committed", "pause_seconds": "x",
                                   "bytes_written": 1e400}) + "\n")
    stats = history.read()
    assert [row.seq for row in stats] == [1, 3]
    assert stats[1].pause_seconds == 0.0 and stats[1].bytes_written == 0


def test_history_drops_its_older_half_when_large(tmp_path, monkeypatch):
    monkeypatch.setattr(history_module, "_MAX_BYTES", 2000)
    history = History(LocalStorage(tmp_path))
    for seq in range(1, 60):
        history.append(CaptureStat(seq, seq, 0.0, "committed"))
    seqs = [row.seq for row in history.read()]
    assert seqs[-1] == 59 and seqs[0] > 1
    assert seqs == list(range(seqs[0], 60))  # whole lines, no gap
    assert (tmp_path / history_module.KEY).stat().st_size < 4000


def test_empty_or_missing_history_is_an_empty_table(tmp_path):
    stats = History(LocalStorage(tmp_path)).read()
    assert len(stats) == 0 and isinstance(stats, CaptureStats)
    assert stats.column("pause_seconds").dtype == np.float64
