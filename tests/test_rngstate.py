"""Generators survive a JSON round trip exactly, including their seed sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arraysnap.rngstate import check_rng, rng_from_json, rng_to_json

BIT_GENERATORS = [np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64,
                  np.random.MT19937]


@pytest.mark.parametrize("cls", BIT_GENERATORS)
def test_stream_and_spawn_continue_exactly(cls):
    rng = np.random.Generator(cls(np.random.SeedSequence(1234, spawn_key=(3,))))
    rng.standard_normal(17)
    twin = rng_from_json(json.loads(json.dumps(rng_to_json(rng))))
    assert np.array_equal(twin.integers(0, 1 << 62, 50), rng.integers(0, 1 << 62, 50))
    assert twin.spawn(2)[1].random() == rng.spawn(2)[1].random()


def test_dict_of_generators():
    rngs = {"a": np.random.default_rng(1), "b": np.random.default_rng(2)}
    back = rng_from_json(json.loads(json.dumps(rng_to_json(rngs))))
    assert set(back) == {"a", "b"} and back["b"].random() == rngs["b"].random()


@pytest.mark.parametrize("bad", [
    {"kind": "generator", "value": {"bit_generator": "os.system", "state": {}}},
    {"kind": "generator", "value": {"bit_generator": "PCG64", "state": "x"}},
    {"kind": "dict", "value": 3}, {"kind": "other"}, "x",
])
def test_malformed_state_is_a_value_error(bad):
    with pytest.raises(ValueError):
        rng_from_json(bad)


def test_check_rng():
    check_rng(None)
    check_rng(np.random.default_rng())
    with pytest.raises(TypeError, match="default_rng"):
        check_rng(np.random.RandomState(0))
