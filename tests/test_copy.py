"""``arraysnap.copy`` and ``arraysnap copy``: snapshots between stores (folders and a real S3
server), only what the destination lacks, manifests last, idempotent and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_bit_exact, child_env, s3_url

import arraysnap
from arraysnap.cli import cli
from arraysnap.errors import StoreLockedError

WAIT_SECONDS = 60.0  # a deadline for what must happen, never a duration a test relies on


def _steps(seed: int, count: int, shape=(64, 256)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    u = rng.random(shape)
    small = {f"p{i}": rng.random(16) for i in range(20)}
    steps = []
    for step in range(count):
        u[step % shape[0]] += 1.0
        small[f"p{step % 20}"] = small[f"p{step % 20}"] + 1.0
        steps.append({"u": u.copy(), **{name: a.copy() for name, a in small.items()}})
    return steps


def _write(store, steps, **kwargs) -> None:
    with arraysnap.open(store, chunk_bytes=1 << 13, **kwargs) as snap:
        for step, arrays in enumerate(steps):
            snap.capture(arrays, step=step, state={"step": step})
            snap.log({"after": step})


def _check(store, steps, **kwargs) -> list[int]:
    """Every listed snapshot of `store` restores exactly (verified); their steps."""
    with arraysnap.open(store, "r", **kwargs) as reader:
        listed = [info.step for info in reader.list()]
        for step in listed:
            restored = reader.restore(step=step, verify=True)
            assert restored.state == {"step": step}
            for name, expected in steps[step].items():
                assert_bit_exact(restored.arrays[name], expected)
        assert reader.verify().ok
    return listed


def test_copy_into_a_new_folder_then_only_what_it_lacks(tmp_path):
    steps = _steps(1, 4)
    _write(tmp_path / "a.snap", steps[:2])
    first = arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap")
    assert first.copied == (1, 2) and first.already_there == () and first.objects_copied > 0
    assert _check(tmp_path / "b.snap", steps) == [0, 1]
    again = arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap")
    assert (again.copied, again.already_there, again.objects_copied) == ((), (1, 2), 0)
    with arraysnap.open(tmp_path / "a.snap", chunk_bytes=1 << 13) as snap:
        for step in (2, 3):
            snap.capture(steps[step], step=step, state={"step": step})
    more = arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap")
    assert more.copied == (3, 4)
    # Two captures that changed one row and one small array each: a few objects, not all.
    assert 0 < more.objects_copied <= 8
    assert _check(tmp_path / "b.snap", steps) == [0, 1, 2, 3]
    with arraysnap.open(tmp_path / "b.snap", "r") as reader:  # the replay log came along
        assert list(reader.restore(step=0).events) == [{"after": 0}, {"after": 1}]


def test_a_selection_of_snapshots_by_spec(tmp_path):
    steps = _steps(2, 3)
    _write(tmp_path / "a.snap", steps)
    report = arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap", ["step:0", "latest"])
    assert report.copied == (1, 3)
    assert _check(tmp_path / "b.snap", steps) == [0, 2]
    assert arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap", 2).copied == (2,)


def test_local_to_s3_to_s3_to_local(s3_server, tmp_path):
    options = s3_server.storage_options
    steps = _steps(3, 3)
    _write(tmp_path / "a.snap", steps)
    up, across = s3_url(s3_server), s3_url(s3_server)
    assert arraysnap.copy(tmp_path / "a.snap", up, dst_options=options).copied == (1, 2, 3)
    assert _check(up, steps, storage_options=options) == [0, 1, 2]
    assert arraysnap.copy(up, across, src_options=options, dst_options=options).copied == \
        (1, 2, 3)
    assert arraysnap.copy(across, tmp_path / "c.snap", src_options=options).copied == (1, 2, 3)
    assert _check(tmp_path / "c.snap", steps) == [0, 1, 2]
    # A writer goes on in the copy, as in its source.
    with arraysnap.open(up, storage_options=options, baseline_dir=tmp_path / "base") as snap:
        assert snap.restore().step == 2
        info = snap.capture(steps[2], step=3, state={"step": 3}).result()
        assert info.seq == 4 and info.chunks_changed == 0


def test_a_destination_with_another_history_or_codec_is_refused_untouched(tmp_path):
    _write(tmp_path / "a.snap", _steps(4, 2))
    _write(tmp_path / "other.snap", _steps(5, 1))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "other.snap").rglob("*")
                    if p.is_file() and "mirror" not in p.parts)
    with pytest.raises(FileExistsError, match="snapshot 1 that differs.*not a copy"):
        arraysnap.copy(tmp_path / "a.snap", tmp_path / "other.snap")
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "other.snap").rglob("*")
                   if p.is_file() and "mirror" not in p.parts)
    assert before == after
    arraysnap.open(tmp_path / "raw.snap", codec="none").close()
    with pytest.raises(ValueError, match="same codec"):
        arraysnap.copy(tmp_path / "a.snap", tmp_path / "raw.snap")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        arraysnap.copy(tmp_path / "missing.snap", tmp_path / "d.snap")
    assert not (tmp_path / "d.snap").exists()
    with pytest.raises(TypeError, match="snapshots must be"):
        arraysnap.copy(tmp_path / "a.snap", tmp_path / "d.snap", {"latest": 1})
    with pytest.raises(arraysnap.SnapshotNotFoundError):
        arraysnap.copy(tmp_path / "a.snap", tmp_path / "d.snap", ["step:99"])
    assert not (tmp_path / "d.snap").exists()


def test_a_destination_being_written_is_locked(tmp_path):
    _write(tmp_path / "a.snap", _steps(6, 1))
    with arraysnap.open(tmp_path / "b.snap"):
        with pytest.raises(StoreLockedError):
            arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap")


_COPY_CHILD = """
import sys, arraysnap
src, dst, endpoint = sys.argv[1:4]
options = {"endpoint": endpoint, "region": "us-east-1", "access_key_id": "testing",
           "secret_access_key": "testing", "allow_http": True}
arraysnap.copy(src, dst, src_options=options)
print("done")
"""


def test_a_copy_killed_at_any_moment_lists_only_whole_snapshots_and_resumes(s3_server,
                                                                            tmp_path):
    options = s3_server.storage_options
    steps = _steps(7, 6, shape=(256, 512))
    src = s3_url(s3_server)
    _write(src, steps, storage_options=options, baseline_dir=tmp_path / "base")
    dst = tmp_path / "dst.snap"
    rng = np.random.default_rng(7)
    killed_mid_copy = 0
    for round_ in range(6):
        # Kill after a random number of objects has landed (a fresh copy each second round).
        if round_ % 2 == 0 and dst.exists():
            subprocess.run(["rm", "-rf", str(dst)], check=True)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_COPY_CHILD), src,
                                  str(dst), s3_server.endpoint], env=child_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        target = int(rng.integers(1, 120))
        deadline = time.monotonic() + WAIT_SECONDS
        while child.poll() is None and time.monotonic() < deadline:
            landed = sum(len(files) for _, _, files in os.walk(dst / "chunks")) \
                if (dst / "chunks").is_dir() else 0
            if landed >= target:
                break
            time.sleep(0.002)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed_mid_copy += 1
        child.communicate(timeout=WAIT_SECONDS)
        if (dst / "arraysnap.json").exists():
            listed = _check(dst, steps)
            assert listed == list(range(len(listed)))  # whole snapshots, in order
    assert killed_mid_copy > 0
    report = arraysnap.copy(src, dst, src_options=options)
    assert set(report.copied) | set(report.already_there) == set(range(1, 7))
    assert _check(dst, steps) == list(range(6))
    assert arraysnap.copy(src, dst, src_options=options).objects_copied == 0


def test_the_copy_command(s3_server, tmp_path):
    steps = _steps(8, 2)
    _write(tmp_path / "a.snap", steps)
    url = s3_url(s3_server)
    flags = [arg for key, value in s3_server.storage_options.items()
             for arg in ("--dst-option", f"{key}={value}")]
    runner = CliRunner()
    result = runner.invoke(cli, ["copy", str(tmp_path / "a.snap"), url, "--json", *flags])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["copied"] == [1, 2]
    shared = [arg for key, value in s3_server.storage_options.items()
              for arg in ("-o", f"{key}={value}")]
    back = runner.invoke(cli, ["copy", url, str(tmp_path / "b.snap"), "latest", *shared])
    assert back.exit_code == 0, back.output
    assert "copied 1 snapshots" in back.output
    assert _check(tmp_path / "b.snap", steps) == [1]
    missing = runner.invoke(cli, ["copy", str(tmp_path / "nope.snap"), str(tmp_path / "c")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert not Path(tmp_path / "c").exists()


def test_a_destination_with_its_own_history_and_no_seq_in_common_is_refused(tmp_path):
    _write(tmp_path / "a.snap", _steps(9, 2))
    with arraysnap.open(tmp_path / "other.snap") as snap:
        snap.capture({"u": np.zeros(3)}, step=100)  # seq 1, its own
    with pytest.raises(FileExistsError, match="none of them"):
        arraysnap.copy(tmp_path / "a.snap", tmp_path / "other.snap", ["latest"])  # seq 2
    with arraysnap.open(tmp_path / "other.snap", "r") as reader:
        assert [i.seq for i in reader.list()] == [1]
    # A copy that the source pruned since is still its copy (related by their ids).
    arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap", ["step:0"])
    with arraysnap.open(tmp_path / "a.snap") as snap:
        snap.prune(keep_last=1)
    assert arraysnap.copy(tmp_path / "a.snap", tmp_path / "b.snap").copied == (2,)
