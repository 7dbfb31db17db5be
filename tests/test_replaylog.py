"""The replay log: numbering, batching, torn tails, damage, segments and trimming."""

from __future__ import annotations

import errno
import os

import pytest

import arraysnap
from arraysnap import replaylog as journal_module
from arraysnap.fsio import FileOps
from arraysnap.replaylog import ReplayLog
from arraysnap.storage import LocalStorage


def test_records_come_back_in_order_from_a_position(tmp_path):
    journal = ReplayLog(LocalStorage(tmp_path))
    numbers = [journal.log({"i": i}) for i in range(5)]
    assert numbers == [0, 1, 2, 3, 4]
    assert journal.read_from(3) == [{"i": 3}, {"i": 4}]  # buffered records are written first
    journal.flush(durable=True)
    journal.close()
    again = ReplayLog(LocalStorage(tmp_path))
    assert again.position == 5 and again.read_from(0) == [{"i": i} for i in range(5)]
    assert again.log("next") == 5


def test_a_torn_last_line_is_dropped_and_cut_off_on_reopen(tmp_path):
    journal = ReplayLog(LocalStorage(tmp_path))
    journal.log({"a": 1})
    journal.log({"b": 2})
    journal.flush(durable=True)
    journal.close()
    (segment,) = (tmp_path / "journal").iterdir()
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash in the middle of the second line
    assert ReplayLog(LocalStorage(tmp_path), writable=False).read_from(0) == [{"a": 1}]
    reopened = ReplayLog(LocalStorage(tmp_path))
    assert reopened.position == 1
    reopened.log({"c": 3})
    reopened.flush(durable=True)
    assert reopened.read_from(0) == [{"a": 1}, {"c": 3}]


@pytest.mark.parametrize("damage", ["flip", "renumber", "garbage"])
def test_a_damaged_line_is_named(tmp_path, damage):
    journal = ReplayLog(LocalStorage(tmp_path))
    for i in range(3):
        journal.log({"value": i * 11})
    journal.flush(durable=True)
    (segment,) = (tmp_path / "journal").iterdir()
    lines = segment.read_bytes().split(b"\n")
    if damage == "flip":
        lines[1] = lines[1].replace(b"11", b"12")
    elif damage == "renumber":
        lines[1] = lines[1].replace(b'"n":1', b'"n":7')
    else:
        lines[1] = b"\x00\xff not json"
    segment.write_bytes(b"\n".join(lines))
    with pytest.raises(arraysnap.CorruptSnapshotError, match=r"line 2 \(record 1\)"):
        ReplayLog(LocalStorage(tmp_path), writable=False).read_from(0)


def test_segments_rotate_and_trim_keeps_what_a_position_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "_SEGMENT_BYTES", 200)
    journal = ReplayLog(LocalStorage(tmp_path))
    for i in range(30):
        journal.log({"i": i, "pad": "x" * 20})
        journal.flush(durable=False)
    segments = journal.segments()
    assert len(segments) > 3
    journal.trim(17)
    assert journal.segments()[0][0] <= 17 < journal.segments()[1][0]
    assert [r["i"] for r in journal.read_from(17)] == list(range(17, 30))
    # A missing segment in the middle is a gap, reported as such.
    (tmp_path / journal.segments()[1][1]).unlink()
    with pytest.raises(arraysnap.CorruptSnapshotError, match="missing"):
        journal.read_from(0)


def test_records_must_be_json(tmp_path):
    journal = ReplayLog(LocalStorage(tmp_path))
    for bad in (object(), {"x": float("nan")}, {1j: 2}):
        with pytest.raises(ValueError, match="JSON"):
            journal.log(bad)
    with pytest.raises(ValueError, match="under"):
        journal.log("x" * (journal_module.MAX_RECORD_BYTES + 1))
    assert journal.position == 0  # nothing was numbered


def test_a_symlink_as_the_journal_folder_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "journal").symlink_to(elsewhere)
    journal = ReplayLog(LocalStorage(tmp_path / "store"))
    journal.log({"a": 1})
    journal.flush(durable=True)
    assert not any(elsewhere.iterdir())
    assert (tmp_path / "store" / "journal").is_dir()


def test_records_trimmed_away_from_under_a_position_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "_SEGMENT_BYTES", 100)
    journal = ReplayLog(LocalStorage(tmp_path))
    for i in range(20):
        journal.log({"i": i})
        journal.flush(durable=False)
    journal.trim(15)
    with pytest.raises(arraysnap.CorruptSnapshotError, match="missing"):
        journal.read_from(2)
    assert journal.read_from(20) == []


class PartialWrite(FileOps):
    """The first journal write puts half its bytes on disk, then fails."""

    def __init__(self) -> None:
        self.failed = False

    def write(self, fd, data):
        if not self.failed:
            self.failed = True
            view = memoryview(data).cast("B")
            os.write(fd, view[: len(view) // 2])
            raise OSError(errno.EIO, "injected after a partial write")
        super().write(fd, data)


def test_a_failed_write_leaves_no_partial_or_duplicate_line(tmp_path):
    journal = ReplayLog(LocalStorage(tmp_path, PartialWrite()))
    for i in range(4):
        journal.log({"i": i})
    with pytest.raises(OSError):
        journal.flush(durable=True)
    journal.flush(durable=True)  # the retry writes the whole batch once
    assert journal.read_from(0) == [{"i": i} for i in range(4)]
    reader = ReplayLog(LocalStorage(tmp_path), writable=False)
    assert reader.read_from(0) == [{"i": i} for i in range(4)]


class FailingDirSync(FileOps):
    fail = True

    def fsync_dir(self, path):
        if self.fail:
            self.fail = False
            raise OSError(errno.EIO, "injected on the journal folder")
        super().fsync_dir(path)


def test_a_failed_segment_start_keeps_the_records_buffered(tmp_path):
    journal = ReplayLog(LocalStorage(tmp_path, FailingDirSync()))
    journal.log({"i": 0})
    with pytest.raises(OSError):
        journal.flush(durable=True)
    journal.log({"i": 1})
    journal.flush(durable=True)
    assert journal.read_from(0) == [{"i": 0}, {"i": 1}]


def test_flushes_append_to_one_segment_until_it_is_full(tmp_path):
    from arraysnap.replaylog import ReplayLog
    from arraysnap.storage import LocalStorage

    storage = LocalStorage(tmp_path / "s")
    storage.create()
    replay_log = ReplayLog(storage)
    for batch in range(5):
        for i in range(10):
            replay_log.log({"batch": batch, "i": i})
        replay_log.flush(durable=False)
    assert sorted(storage.list_prefix("journal/")) == ["journal/0000000000000000.jsonl"]
    assert [r["i"] for r in replay_log.read_from(45)] == [5, 6, 7, 8, 9]
