"""NumPy random generators to and from JSON, exactly (stream position and seed sequence).

Only NumPy's own bit generators are rebuilt, looked up by name in a fixed table: nothing
read from a store chooses code to run.

>>> rng = np.random.default_rng(7); _ = rng.random(3)
>>> twin = rng_from_json(rng_to_json(rng))
>>> bool(twin.random() == rng.random())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_rng", "rng_from_json", "rng_to_json"]

_MAX_POOL_SIZE = 1024
_BIT_GENERATORS: dict[str, type[np.random.BitGenerator]] = {
    cls.__name__: cls
    for cls in (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64,
                np.random.MT19937)
}


def check_rng(rng: object) -> None:
    """Raise TypeError unless `rng` is None, a Generator, or a dict of str to Generator."""
    if rng is None or isinstance(rng, np.random.Generator):
        if rng is not None:
            _bit_generator_name(rng)
        return
    if isinstance(rng, Mapping):
        for key, value in rng.items():
            if not isinstance(key, str) or not isinstance(value, np.random.Generator):
                raise TypeError("rng dict must map strings to numpy.random.Generator objects")
            _bit_generator_name(value)
        return
    raise TypeError(
        f"rng must be a numpy.random.Generator or a dict of them, got {type(rng).__name__}; "
        "use numpy.random.default_rng() instead of the legacy numpy.random functions"
    )


def _bit_generator_name(rng: np.random.Generator) -> str:
    name = type(rng.bit_generator).__name__
    if name not in _BIT_GENERATORS:
        raise TypeError(f"bit generator {name} is not supported; use one of NumPy's own")
    return name


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"ndarray": value.dtype.str, "data": value.tolist()}
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ndarray", "data"}:
            if value["ndarray"] not in ("<u4", "<u8", "<i4", "<i8", "|u1", "<u2"):
                raise ValueError(f"unexpected array dtype {value['ndarray']!r} in rng state")
            return np.array(value["data"], dtype=value["ndarray"])
        return {key: _decode(item) for key, item in value.items()}
    return value


def _one_to_json(rng: np.random.Generator) -> dict[str, Any]:
    bit_generator = rng.bit_generator
    seed_seq = bit_generator.seed_seq
    seed = None
    if isinstance(seed_seq, np.random.SeedSequence):
        entropy = seed_seq.entropy
        seed = {
            "entropy": [int(e) for e in entropy] if isinstance(entropy, (list, tuple, np.ndarray))
            else (None if entropy is None else int(entropy)),
            "spawn_key": [int(k) for k in seed_seq.spawn_key],
            "pool_size": int(seed_seq.pool_size),
            "n_children_spawned": int(seed_seq.n_children_spawned),
        }
    return {"bit_generator": _bit_generator_name(rng), "state": _encode(bit_generator.state),
            "seed_sequence": seed}


def _one_from_json(value: Any) -> np.random.Generator:
    if not isinstance(value, dict) or value.get("bit_generator") not in _BIT_GENERATORS:
        raise ValueError("rng entry must name one of NumPy's bit generators")
    cls = _BIT_GENERATORS[value["bit_generator"]]
    seed = value.get("seed_sequence")
    if seed is not None:
        # SeedSequence's work grows with pool_size squared: a stored 10**6 would hang.
        pool_size = seed["pool_size"]
        if type(pool_size) is not int or not 4 <= pool_size <= _MAX_POOL_SIZE:
            raise ValueError(f"seed_sequence pool_size {pool_size!r} is out of range")
        seed_seq = np.random.SeedSequence(
            seed["entropy"], spawn_key=tuple(seed["spawn_key"]), pool_size=seed["pool_size"],
            n_children_spawned=seed["n_children_spawned"],
        )
        bit_generator = cls(seed_seq)
    else:
        bit_generator = cls()
    bit_generator.state = _decode(value["state"])
    return np.random.Generator(bit_generator)


def rng_to_json(rng: Any) -> Any:
    """JSON form of None, a Generator, or a dict of Generators."""
    if rng is None:
        return None
    if isinstance(rng, np.random.Generator):
        return {"kind": "generator", "value": _one_to_json(rng)}
    return {"kind": "dict", "value": {key: _one_to_json(gen) for key, gen in rng.items()}}


def rng_from_json(value: Any) -> Any:
    """Rebuild what :func:`rng_to_json` stored; ValueError when it is malformed."""
    if value is None:
        return None
    try:
        if value["kind"] == "generator":
            return _one_from_json(value["value"])
        if value["kind"] == "dict" and isinstance(value["value"], dict):
            return {str(key): _one_from_json(item) for key, item in value["value"].items()}
    except (KeyError, TypeError, ValueError, OverflowError, IndexError, RecursionError) as err:
        raise ValueError(f"stored rng state is malformed: {err!r:.200}") from None
    raise ValueError("stored rng state is malformed")
