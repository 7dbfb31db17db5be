"""Codec names to numcodecs encoders and zarr v3 codec metadata.

A chunk object is exactly what zarr v3 stores for a chunk encoded with the array's codec
pipeline (``bytes`` then an optional compressor), so a snapshot is readable by zarr.

>>> spec = parse_codec("zstd:3")
>>> spec.name, spec.level, spec.to_json()
('zstd', 3, {'name': 'zstd', 'level': 3})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numcodecs

__all__ = ["CODEC_NAMES", "CodecSpec", "parse_codec"]

CODEC_NAMES = ("zstd", "blosc", "none")
_DEFAULT_LEVELS = {"zstd": 1, "blosc": 5, "none": 0}
_LEVEL_RANGES = {"zstd": range(-7, 23), "blosc": range(0, 10), "none": range(0, 1)}


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How chunks are compressed: ``zstd`` (default, level 1), ``blosc`` (lz4 + shuffle), ``none``.

    >>> CodecSpec("none", 0).encode(b"abc", 1)
    b'abc'
    """

    name: str
    level: int

    def encoder(self, itemsize: int) -> numcodecs.abc.Codec | None:
        if self.name == "zstd":
            return numcodecs.Zstd(level=self.level)
        if self.name == "blosc":
            return numcodecs.Blosc(
                cname="lz4", clevel=self.level, shuffle=numcodecs.Blosc.SHUFFLE,
                typesize=max(1, itemsize),
            )
        return None

    def encode(self, raw: Any, itemsize: int) -> bytes:
        """Encode one chunk's raw bytes (padded to full chunk shape)."""
        codec = self.encoder(itemsize)
        return bytes(raw) if codec is None else bytes(codec.encode(raw))

    def decode(self, data: bytes) -> bytes:
        """Decode one chunk object back to raw bytes."""
        codec = self.encoder(1)
        return data if codec is None else bytes(codec.decode(data))

    def zarr_compressors(self, itemsize: int) -> list[dict[str, Any]]:
        """The zarr v3 ``bytes -> bytes`` codecs that follow the ``bytes`` codec."""
        if self.name == "zstd":
            return [{"name": "zstd", "configuration": {"level": self.level, "checksum": False}}]
        if self.name == "blosc":
            config = {"typesize": max(1, itemsize), "cname": "lz4", "clevel": self.level,
                      "shuffle": "shuffle", "blocksize": 0}
            return [{"name": "blosc", "configuration": config}]
        return []

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level}


def parse_codec(value: object) -> CodecSpec:
    """Parse ``"zstd"``, ``"zstd:5"``, ``"blosc"``, ``"none"`` or a stored ``{"name", "level"}``.

    >>> parse_codec({"name": "blosc", "level": 3})
    CodecSpec(name='blosc', level=3)
    """
    if isinstance(value, CodecSpec):
        return value
    if isinstance(value, str):
        name, _, level_text = value.partition(":")
        try:
            level = int(level_text) if level_text else _DEFAULT_LEVELS.get(name, 0)
        except ValueError:
            raise ValueError(f"codec level must be an integer, got {value!r}") from None
    elif isinstance(value, dict) and set(value) == {"name", "level"}:
        name, level = value["name"], value["level"]
    else:
        raise TypeError(f"codec must be a name such as 'zstd' or 'zstd:3', got {value!r}")
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    if type(level) is not int or level not in _LEVEL_RANGES[name]:
        allowed = _LEVEL_RANGES[name]
        raise ValueError(
            f"codec {name!r} level must be an integer in {allowed.start}..{allowed.stop - 1}, "
            f"got {level!r}"
        )
    return CodecSpec(name, level)
