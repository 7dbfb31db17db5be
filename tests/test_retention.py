"""The retention policy's choice of snapshots to remove (the store applies it)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arraysnap.retention import Candidate, Retention


def snaps(steps, times=None):
    times = times or [float(i) for i in range(len(steps))]
    pairs = zip(steps, times, strict=True)
    return [Candidate(seq, step, t) for seq, (step, t) in enumerate(pairs, 1)]


def kept(policy, candidates, now=100.0, size=None):
    gone = {c.seq for c in policy.doomed(candidates, now, size)}
    return [c.step for c in candidates if c.seq not in gone]


def test_keep_last():
    assert kept(Retention(keep_last=2), snaps([0, 1, 2, 3, 4])) == [3, 4]


def test_keep_every_is_a_tiered_history():
    policy = Retention(keep_last=1, keep_every=100)
    assert kept(policy, snaps([0, 50, 100, 150, 200, 250, 260])) == [0, 100, 200, 260]


def test_keep_within_seconds():
    candidates = snaps([0, 1, 2, 3], times=[0.0, 50.0, 90.0, 99.0])
    assert kept(Retention(keep_within=20), candidates) == [2, 3]
    assert kept(Retention(keep_within="1m"), candidates) == [1, 2, 3]


def test_rules_combine_a_snapshot_kept_by_any_rule_stays():
    candidates = snaps([0, 10, 20, 30, 40], times=[0.0, 10.0, 20.0, 95.0, 99.0])
    policy = Retention(keep_last=1, keep_every=20, keep_within=10)
    assert kept(policy, candidates) == [0, 20, 30, 40]


def test_max_bytes_removes_oldest_unprotected_first():
    candidates = snaps([0, 1, 2, 3, 4])
    sizes = {c.seq: 10 for c in candidates}

    def size_after(doomed):
        return sum(sizes.values()) - sum(sizes[c.seq] for c in doomed)

    assert kept(Retention(max_bytes=25), candidates, size=size_after) == [3, 4]
    # keep_every protects even under the quota; the newest is never removed.
    assert kept(Retention(max_bytes=25, keep_every=2), candidates, size=size_after) == [0, 2, 4]
    assert kept(Retention(max_bytes=1), candidates, size=size_after) == [4]


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=30),
       st.one_of(st.none(), st.integers(1, 5)), st.one_of(st.none(), st.integers(1, 50)))
def test_the_newest_is_never_removed_and_doomed_are_sorted(steps, keep_last, keep_every):
    policy = Retention(keep_last=keep_last, keep_every=keep_every, max_bytes=1)
    candidates = snaps(steps)
    doomed = policy.doomed(candidates, 0.0, lambda d: 10 * (len(candidates) - len(d)))
    seqs = [c.seq for c in doomed]
    assert candidates[-1].seq not in seqs
    assert seqs == sorted(set(seqs))
    for c in doomed:
        assert not policy.protected(c)


def test_bad_rules_are_refused_with_the_fix():
    for kwargs in ({"keep_last": 0}, {"keep_every": -1}, {"max_bytes": 1.5},
                   {"keep_last": True}):
        with pytest.raises(ValueError, match="positive integer"):
            Retention(**kwargs)
    with pytest.raises(ValueError, match="keep_within"):
        Retention(keep_within="a while")
    assert not Retention().active and Retention().doomed(snaps([1, 2]), 0.0) == []
