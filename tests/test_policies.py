"""Checkpoint policies: every N steps, every T seconds, Young/Daly, and their combinations."""

from __future__ import annotations

import math

import pytest

import arraysnap
from arraysnap.policies import AnyOf, Every, YoungDaly, parse_duration, parse_policy


def run(policy, steps, *, seconds_per_step=0.0, blocking=0.0):
    """The steps at which a loop captures, `seconds_per_step` of wall time per step."""
    captured = []
    for step in steps:
        now = step * seconds_per_step
        if policy.due(step, now):
            captured.append(step)
            policy.captured(step, now, blocking)
    return captured


def test_every_steps_lands_on_multiples():
    assert run(Every(steps=10), range(0, 45)) == [10, 20, 30, 40]
    assert run(Every(steps=10), range(1, 25)) == [10, 20]
    # A resumed run keeps the cadence: the first due step is the next multiple.
    assert run(Every(steps=10), range(1234, 1260)) == [1240, 1250]


def test_every_steps_handles_jumps_and_unknown_steps():
    assert run(Every(steps=10), [0, 3, 25, 26, 40]) == [25, 40]
    assert Every(steps=1).due(None, 0.0) is False  # no step, no step-based cadence


def test_every_seconds_counts_wall_time():
    assert run(Every(seconds=2.5), range(0, 11), seconds_per_step=1.0) == [3, 6, 9]


def test_combination_is_whichever_comes_first():
    policy = every(steps=4) | every(seconds=3)
    # 1 s per step: seconds fire at 3 and 7 (3 s after a capture), steps at multiples of 4.
    assert run(policy, range(0, 10), seconds_per_step=1.0) == [3, 4, 7, 8]
    slow = every(steps=4) | every(seconds=100)
    assert run(slow, range(0, 10), seconds_per_step=1.0) == [4, 8]


def every(**kwargs):
    return arraysnap.every(**kwargs)


def test_young_daly_interval_follows_the_measured_cost():
    policy = YoungDaly(mtbf="1h")
    assert policy.due(0, 0.0)  # nothing measured yet: capture to measure
    policy.captured(0, 0.0, 2.0)  # the first capture is costlier; used only until a second
    assert policy.interval() == pytest.approx(math.sqrt(2 * 2.0 * 3600))
    for t in (100.0, 200.0, 300.0):
        policy.captured(0, t, 0.02)
    assert policy.cost() == pytest.approx(0.02)
    assert policy.interval() == pytest.approx(math.sqrt(2 * 0.02 * 3600))  # 12 s
    assert not policy.due(1, 300.0 + 11.9)
    assert policy.due(1, 300.0 + 12.1)


def test_young_daly_uses_the_median_of_recent_costs():
    policy = YoungDaly(mtbf=3600, window=3)
    for cost in (9.0, 0.1, 0.1, 5.0, 0.1):  # the first is dropped; window keeps the last 3
        policy.captured(0, 0.0, cost)
    assert policy.cost() == pytest.approx(0.1)


def test_parse_duration_units_and_errors():
    assert parse_duration("90s") == 90 and parse_duration("2d") == 172800
    assert parse_duration("1.5h") == 5400 and parse_duration(3) == 3.0
    for bad in ("soon", "-1h", 0, float("inf"), "1 week", True):
        with pytest.raises((ValueError, TypeError)):
            parse_duration(bad)


def test_parse_policy_forms():
    assert parse_policy(None) is None
    assert isinstance(parse_policy(5), Every) and parse_policy(5).steps == 5
    combined = parse_policy([5, arraysnap.young_daly(mtbf="1h")])
    assert isinstance(combined, AnyOf) and len(combined.policies) == 2
    for bad in (True, "5", 2.5, object()):
        with pytest.raises(TypeError, match="every="):
            parse_policy(bad)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        parse_policy(0)
    with pytest.raises(ValueError, match="needs steps"):
        arraysnap.every()
