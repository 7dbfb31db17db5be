"""Codec names to encoders and decoders, and zarr v3 codec metadata.

zstd chunks are compressed through ``zstandard`` (one context a thread), blosc ones and
every decode through numcodecs, as zarr reads them.

A chunk object is exactly what zarr v3 stores for a chunk encoded with the array's codec
pipeline (``bytes`` then an optional compressor), so a snapshot is readable by zarr.

Data that does not compress (noisy floating-point fields: zstd saves ~5 % on random float64)
would cost the background ~1.7 ms of CPU a MiB for next to nothing, CPU that the program's
own threads feel. So a zstd chunk of 256 KiB or more is first judged on a sample (4 slices,
1/16 of it): if zstd shrinks the sample by less than 10 %, the chunk is stored as *raw
blocks* of a zstd frame (RFC 8878, ``Raw_Block``), which every zstd decoder reads, zarr's
included, at the cost of a copy.

>>> spec = parse_codec("zstd:3")
>>> spec.name, spec.level, spec.to_json()
('zstd', 3, {'name': 'zstd', 'level': 3})
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numcodecs
import zstandard

__all__ = ["CODEC_NAMES", "RAW_FRAME_RATIO", "CodecSpec", "RawFrame", "parse_codec",
           "raw_frame_bytes", "write_raw_frame", "zstd_raw_frame"]

CODEC_NAMES = ("zstd", "blosc", "none")
_DEFAULT_LEVELS = {"zstd": 1, "blosc": 5, "none": 0}
_LEVEL_RANGES = {"zstd": range(-7, 23), "blosc": range(0, 10), "none": range(0, 1)}

# A sample that zstd shrinks to more than this fraction of its size marks its chunk as not
# worth compressing.
RAW_FRAME_RATIO = 0.9
_SAMPLE_SLICES = 4
_SAMPLE_SLICE_BYTES = 16 << 10
_MIN_SAMPLED_BYTES = 256 << 10  # smaller chunks are simply compressed
_ZSTD_MAGIC = (0xFD2FB528).to_bytes(4, "little")
_ZSTD_MAX_BLOCK = 128 << 10


def raw_frame_bytes(size: int) -> int:
    """The size of a zstd frame of raw blocks holding `size` bytes (see zstd_raw_frame).

    >>> raw_frame_bytes(3), raw_frame_bytes(1 << 20) - (1 << 20)
    (16, 34)
    """
    blocks = max(1, -(-size // _ZSTD_MAX_BLOCK))
    return len(_ZSTD_MAGIC) + len(_raw_frame_header(size)) + 3 * blocks + size


def _raw_frame_header(size: int) -> bytes:
    # Frame header descriptor: the content size in 4 bytes (flag 2) or 8 (flag 3); no
    # checksum, no dictionary, and not Single_Segment, whose window would be the whole
    # content: streaming decoders refuse windows over 128 MiB by default. The window is
    # 128 KiB instead (Window_Descriptor 0x38: 2**(10 + 7)), one block: raw blocks refer
    # to nothing before them.
    wide = size >= 1 << 32
    return bytes([(3 if wide else 2) << 6, 0x38]) + size.to_bytes(8 if wide else 4, "little")


def write_raw_frame(out: memoryview, data: Any) -> int:
    """Write `data` as one zstd frame of raw blocks into the start of `out` (at least
    ``raw_frame_bytes(len(data))`` bytes); return the frame's size. One copy of the data.

    >>> out = bytearray(32)
    >>> size = write_raw_frame(memoryview(out), b"abc")
    >>> size, numcodecs.Zstd().decode(bytes(out[:size]))
    (16, b'abc')
    """
    with memoryview(data) as given, given.cast("B") as view:
        size = view.nbytes
        head = _ZSTD_MAGIC + _raw_frame_header(size)
        out[: len(head)] = head
        at, position = len(head), 0
        while True:
            block = min(_ZSTD_MAX_BLOCK, size - position)
            last = position + block == size
            # Block header: Last_Block (bit 0), Block_Type 0 = Raw (bits 1-2), Block_Size.
            out[at : at + 3] = (block << 3 | last).to_bytes(3, "little")
            out[at + 3 : at + 3 + block] = view[position : position + block]
            at, position = at + 3 + block, position + block
            if last:
                return at


def zstd_raw_frame(data: Any) -> bytes:
    """`data` as one zstd frame of raw (uncompressed) blocks, with its content size.

    >>> frame = zstd_raw_frame(b"abc")
    >>> len(frame), numcodecs.Zstd().decode(frame)
    (16, b'abc')
    """
    with memoryview(data) as view:
        frame = bytearray(raw_frame_bytes(view.nbytes))
        write_raw_frame(memoryview(frame), view)
    return bytes(frame)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A chunk that is to be stored as a zstd frame of raw blocks, not yet copied: its
    destination (the pipeline's held buffer) receives it in one copy (`write_into`).

    >>> frame = RawFrame(memoryview(b"abc"))
    >>> frame.nbytes, bytes(frame) == zstd_raw_frame(b"abc")
    (16, True)
    """

    data: memoryview

    @property
    def nbytes(self) -> int:
        return raw_frame_bytes(self.data.nbytes)

    def write_into(self, out: memoryview) -> int:
        return write_raw_frame(out, self.data)

    def __bytes__(self) -> bytes:
        return zstd_raw_frame(self.data)


def _worth_compressing(codec: Encoder, view: memoryview) -> bool:
    """Whether zstd shrinks evenly spaced slices of `view` by at least 1 - RAW_FRAME_RATIO."""
    if view.nbytes < _MIN_SAMPLED_BYTES:
        return True
    stride = (view.nbytes - _SAMPLE_SLICE_BYTES) // (_SAMPLE_SLICES - 1)
    sample = b"".join(view[i * stride : i * stride + _SAMPLE_SLICE_BYTES]
                      for i in range(_SAMPLE_SLICES))
    return len(codec.encode(sample)) <= RAW_FRAME_RATIO * len(sample)


class Encoder(Protocol):
    def encode(self, buf: Any) -> Any: ...


class _Zstd:
    """zstd at `level` through one compression context per thread, made once. numcodecs'
    Zstd makes a context at every call (16 µs, twice the compression of an 8 KiB chunk of
    noise) and holds the GIL while it compresses; zstandard's reused context releases
    it, so the pool's threads compress at once. The frames are of the same kind (the
    content size in the header, no checksum; their bytes may differ between zstd
    versions, which digests of the raw bytes do not see): any zstd decoder, numcodecs'
    and zarr's included, reads them.

    >>> import numcodecs
    >>> bytes(numcodecs.Zstd().decode(_Zstd(1).encode(b"abc" * 100))) == b"abc" * 100
    True
    """

    def __init__(self, level: int) -> None:
        self._params = zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, write_checksum=False)
        self._local = threading.local()

    def encode(self, buf: Any) -> bytes:
        context = getattr(self._local, "context", None)
        if context is None:
            context = self._local.context = zstandard.ZstdCompressor(
                compression_params=self._params)
        return context.compress(buf)


@functools.lru_cache(maxsize=64)
def _encoder(name: str, level: int, typesize: int) -> Encoder | None:
    # One per setting, shared by every thread: made per chunk, the object and its checks
    # cost a fifth of encoding an 8 KiB chunk. (numcodecs' blosc keeps no state between
    # calls; _Zstd keeps one context per thread.)
    if name == "zstd":
        return _Zstd(level)
    if name == "blosc":
        return numcodecs.Blosc(cname="lz4", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE,
                               typesize=typesize)
    return None


@functools.lru_cache(maxsize=4)
def _decoder(name: str) -> numcodecs.abc.Codec | None:
    # numcodecs' own, as zarr decodes the chunks.
    if name == "zstd":
        return numcodecs.Zstd()
    if name == "blosc":
        return numcodecs.Blosc()
    return None


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How chunks are compressed: ``zstd`` (default, level 1), ``blosc`` (lz4 + shuffle), ``none``.

    >>> CodecSpec("none", 0).encode(b"abc", 1)
    b'abc'
    """

    name: str
    level: int

    def encoder(self, itemsize: int) -> Encoder | None:
        """The numcodecs codec for chunks of `itemsize`-byte items (None: stored raw)."""
        return _encoder(self.name, self.level, max(1, itemsize) if self.name == "blosc" else 1)

    def encode(self, raw: Any, itemsize: int) -> bytes:
        """Encode one chunk's raw bytes (padded to full chunk shape).

        A large zstd chunk that would hardly shrink is stored as raw blocks of a zstd frame
        (see the module's docstring): still zstd, read by any zstd decoder.
        """
        return bytes(self.encode_lazily(raw, itemsize))

    def encode_lazily(self, raw: Any, itemsize: int) -> Any:
        """Like `encode`, but a chunk stored as raw blocks comes back as a `RawFrame` over
        `raw` (valid while `raw` is), for its destination to copy in once; compressed data
        comes back as a bytes-like object, and with no codec `raw` itself."""
        codec = self.encoder(itemsize)
        if codec is None:
            return raw
        if self.name == "zstd":
            view = memoryview(raw).cast("B")
            if not _worth_compressing(codec, view):
                return RawFrame(view)
            view.release()
        return codec.encode(raw)

    def decode(self, data: bytes) -> bytes:
        """Decode one chunk object back to raw bytes."""
        decoder = _decoder(self.name)
        return data if decoder is None else bytes(decoder.decode(data))

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
