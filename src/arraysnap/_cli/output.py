"""How the command line prints and writes: tables, sizes, times, JSON, progress bars, option
types, and the .npz export.

>>> size_text(1536), ms_text(0.00328), ranges_text([(0, 8), (16, 24)])
('1.5 KiB', '3.28 ms', '0:8, 16:24')
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..dtypes import dtype_to_json
from ..results import SnapshotInfo

__all__ = ["ByteSize", "Duration", "dtype_text", "echo_json", "ms_text", "names_text",
           "new_table", "progress", "ranges_text", "rng_summary", "size_text", "snapshot_json",
           "status", "stderr", "stdout", "when_text", "write_npz"]


def stdout() -> Console:
    # Markup off: array names and paths may contain [brackets]. Piped output gets a fixed
    # width so that tables are not squeezed into 80 columns.
    console = Console(markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console = Console(markup=False, highlight=False, emoji=False, width=140)
    return console


def stderr() -> Console:
    return Console(stderr=True, markup=False, highlight=False, emoji=False)


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (a terminal only); yields ``update(done, total)``."""
    console = stderr()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console, transient=True,
                   disable=not console.is_terminal)
    with bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def status(text: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr (a terminal only) for steps without a count to show."""
    console = stderr()
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


def dtype_text(dtype: np.dtype) -> str:
    """A dtype as users read it (``float64``, ``>i4``, or the .npy description).

    >>> dtype_text(np.dtype(">i4")), dtype_text(np.dtype("f8"))
    ('>i4', 'float64')
    """
    if dtype.fields is not None:
        return str(dtype_to_json(dtype))
    return dtype.str if dtype.byteorder == ">" else str(dtype)


def size_text(count: float) -> str:
    """Bytes as people read them: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def ms_text(seconds: float | None) -> str:
    """A duration with two decimals always: ``0.08 ms``, ``3.28 ms``, ``1.25 s``.

    >>> ms_text(0.0000817), ms_text(0.001), ms_text(2.5), ms_text(None)
    ('0.08 ms', '1.00 ms', '2.50 s', '-')
    """
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def when_text(unix: float | None) -> str:
    if unix is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def new_table(*columns: str, title: str | None = None) -> Table:
    table = Table(*columns, box=box.SIMPLE_HEAD, title=title, title_justify="left",
                  show_edge=False, pad_edge=False)
    for column in table.columns:
        if column.header not in ("time", "array", "arrays", "status", "dtype", "rows",
                                 "shape", "order", "problem", "note"):
            column.justify = "right"
    return table


def rng_summary(rng: Any) -> str:
    """The generators a snapshot holds, in a few words.

    >>> rng_summary(None), rng_summary({"kind": "generator", "value": {"bit_generator": "PCG64"}})
    ('none', 'one Generator (PCG64)')
    """
    if rng is None:
        return "none"
    try:
        if rng["kind"] == "generator":
            return f"one Generator ({rng['value']['bit_generator']})"
        return "Generators " + ", ".join(f"{key} ({value['bit_generator']})"
                                         for key, value in rng["value"].items())
    except (KeyError, TypeError, AttributeError):
        return "present (not readable: restore reports why)"


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "seq": info.seq, "step": info.step, "time": info.time,
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str, "order": a.order,
                          "n_chunks": a.n_chunks, "nbytes": a.nbytes}
                   for name, a in info.arrays.items()},
        "pause_seconds": info.pause_seconds, "blocked_seconds": info.blocked_seconds,
        "chunks_scanned": info.chunks_scanned,
        "chunks_changed": info.chunks_changed, "chunks_deduplicated": info.chunks_deduplicated,
        "bytes_written": info.bytes_written, "durable_seconds": info.durable_seconds,
    }


def names_text(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, +{len(names) - limit}" if len(names) > limit else shown


def ranges_text(ranges: list[tuple[int, int]] | None, limit: int = 4) -> str:
    if ranges is None:
        return "-"
    text = [f"{start}:{stop}" for start, stop in ranges[:limit]]
    if len(ranges) > limit:
        text.append(f"... ({len(ranges)} ranges)")
    return ", ".join(text) or "-"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


class Duration(click.ParamType):
    """A duration: ``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds.

    >>> Duration().convert("12h", None, None)
    43200.0
    """

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration; write e.g. 90s, 30m, 12h or 7d", param, ctx)
        scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return float(match.group(1)) * scale


class ByteSize(click.ParamType):
    """A size: ``500000``, ``500k``, ``20M``, ``20MiB``, ``1.5G`` (powers of 1024) -> bytes.

    >>> ByteSize().convert("20MiB", None, None)
    20971520
    """

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        match = _SIZE.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a size; write e.g. 500M or 20GiB", param, ctx)
        unit = match.group(2).lower().rstrip("b").rstrip("i")
        scale = 1024 ** " kmgt".index(unit or " ")
        return int(float(match.group(1)) * scale)


def write_npz(out: Path, arrays: dict[str, np.ndarray],
               update: Callable[[int, int], None]) -> None:
    # np.savez would take an array named like one of its own arguments ("file") for that
    # argument: the archive is written here, in the same layout (one uncompressed name.npy
    # per array). Snapshots never hold object dtypes, so every array is written as raw bytes.
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(staging, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for done, (name, array) in enumerate(arrays.items(), 1):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array))
                update(done, len(arrays))
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
