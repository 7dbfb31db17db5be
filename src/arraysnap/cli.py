"""The ``arraysnap`` command line (also ``python -m arraysnap``): inspect, check, trim, export.

Built on click (commands, options, help) and rich (tables, progress bars). Read commands open
the store with ``mode="r"`` and never take the writer's lock, so they work while a job runs;
``prune`` and ``gc`` need the lock. Tables go to stdout, progress bars to stderr (only on a
terminal), so ``--json`` output can be piped.

>>> import arraysnap, json, numpy as np, tempfile
>>> from click.testing import CliRunner
>>> path = tempfile.mkdtemp() + "/run.snap"
>>> with arraysnap.open(path) as snap:
...     _ = snap.capture({"u": np.zeros(8)}, step=1)
>>> result = CliRunner().invoke(cli, ["ls", path, "--json"])
>>> result.exit_code, json.loads(result.output)[0]["step"]
(0, 1)
>>> CliRunner().invoke(cli, ["show", path, "7"]).exit_code   # no snapshot 7: exit code 2
2
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import statistics
import sys
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

from ._version import __version__
from .errors import ArraysnapError
from .manifest import dtype_to_json
from .results import SnapshotInfo
from .store import SNAPSHOT_SPEC_HELP, Store
from .store import open as arraysnap_open

__all__ = ["cli"]

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

MAIN_HELP = f"""Inspect, check, trim and export arraysnap stores.

\b
Exit codes: 0 success; 1 the command ran and found problems (verify, demo,
diff --exit-code); 2 the command could not run (bad usage, a path that is not a
store, a snapshot that does not exist, a store locked by a running writer, ...).

{SNAPSHOT_SPEC_HELP}

\b
Examples:
  arraysnap ls run.snap
  arraysnap show run.snap step:40
  arraysnap diff run.snap ~1 latest
  arraysnap verify run.snap --all
  arraysnap stats run.snap --plot stats.png
"""


class CommandError(click.ClickException):
    """A command that cannot run: a one-line message on stderr and exit code 2.

    >>> CommandError("no such store").exit_code
    2
    """

    exit_code = EXIT_USAGE


class _Group(click.Group):
    """Turns the library's errors into one-line messages with exit code 2.

    ``ARRAYSNAP_TRACEBACK=1`` in the environment shows the full traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ArraysnapError, OSError, ValueError) as err:
            if os.environ.get("ARRAYSNAP_TRACEBACK"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            raise CommandError(message) from err


# -- helpers -------------------------------------------------------------------------------
def _stdout() -> Console:
    # Markup off: array names and paths may contain [brackets]. Piped output gets a fixed
    # width so that tables are not squeezed into 80 columns.
    console = Console(markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console = Console(markup=False, highlight=False, emoji=False, width=140)
    return console


def _stderr() -> Console:
    return Console(stderr=True, markup=False, highlight=False, emoji=False)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (a terminal only); yields ``update(done, total)``."""
    console = _stderr()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console, transient=True,
                   disable=not console.is_terminal)
    with bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _status(text: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr (a terminal only) for steps without a count to show."""
    console = _stderr()
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


@contextlib.contextmanager
def _open(path: Path, mode: str = "r") -> Iterator[Store]:
    """Open an existing store; a path that is not one is an error, never a new store."""
    if not path.exists():
        raise CommandError(f"{path} does not exist; give the directory of an arraysnap store")
    if not (path / "arraysnap.json").is_file():
        raise CommandError(f"{path} is not an arraysnap store (no arraysnap.json in it); give "
                           "the directory that arraysnap.open() created")
    store = arraysnap_open(path, mode)
    try:
        yield store
    finally:
        store.close()


def _select(store: Store, spec: str | None) -> int:
    try:
        return store.snapshot(spec).seq
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="SNAP") from None


def dtype_text(dtype: np.dtype) -> str:
    """A dtype as users read it (``float64``, ``>i4``, or the .npy description).

    >>> dtype_text(np.dtype(">i4")), dtype_text(np.dtype("f8"))
    ('>i4', 'float64')
    """
    if dtype.fields is not None:
        return str(dtype_to_json(dtype))
    return dtype.str if dtype.byteorder == ">" else str(dtype)


def _size(count: float) -> str:
    """Bytes as people read them: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(*columns, box=box.SIMPLE_HEAD, title=title, title_justify="left",
                  show_edge=False, pad_edge=False)
    for column in table.columns:
        if column.header not in ("time", "array", "arrays", "status", "dtype", "rows",
                                 "shape", "order", "problem", "note"):
            column.justify = "right"
    return table


def _snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "seq": info.seq, "step": info.step, "time": info.time,
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str, "order": a.order,
                          "n_chunks": a.n_chunks, "nbytes": a.nbytes}
                   for name, a in info.arrays.items()},
        "pause_seconds": info.pause_seconds, "chunks_scanned": info.chunks_scanned,
        "chunks_changed": info.chunks_changed, "chunks_deduplicated": info.chunks_deduplicated,
        "bytes_written": info.bytes_written, "durable_seconds": info.durable_seconds,
    }


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, +{len(names) - limit}" if len(names) > limit else shown


def _ranges(ranges: list[tuple[int, int]] | None, limit: int = 4) -> str:
    if ranges is None:
        return "-"
    text = [f"{start}:{stop}" for start, stop in ranges[:limit]]
    if len(ranges) > limit:
        text.append(f"... ({len(ranges)} ranges)")
    return ", ".join(text) or "-"


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print JSON instead of a table.")
_store_argument = click.argument("store", type=click.Path(path_type=Path))


# -- the group -----------------------------------------------------------------------------
@click.group(cls=_Group, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arraysnap")
def cli() -> None:
    pass


@cli.command("demo", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo_command(args: tuple[str, ...]) -> None:
    """Run a small simulation, kill it with SIGKILL, resume it and check the result.

    The store goes in DIR (default: a new temporary folder). Exit code 1 if the resumed
    result is not bit-identical to an uninterrupted run.

    \b
    Usage: arraysnap demo [DIR]
    Example:
      arraysnap demo
    """
    from .demo import main as demo_main

    sys.stdout.flush()
    code = demo_main(list(args))
    if code:
        sys.exit(code)


@cli.command("ls")
@_store_argument
@_json_option
def ls_command(store: Path, as_json: bool) -> None:
    """List the snapshots of STORE, oldest first.

    Columns: seq, step, capture time, arrays, chunks changed / scanned, bytes written
    (chunk objects + manifest) and the pause (how long capture() held the program).
    Damaged snapshots are left out and named on stderr; run verify.

    \b
    Example:
      arraysnap ls run.snap
      arraysnap ls run.snap --json
    """
    with _open(store) as snap:
        infos = snap.list()
        damaged = snap.damaged()
    if as_json:
        _echo_json([_snapshot_json(info) for info in infos])
    else:
        table = _table("seq", "step", "time", "arrays", "changed/total", "bytes written",
                       "pause")
        for info in infos:
            table.add_row(str(info.seq), "-" if info.step is None else str(info.step),
                          _when(info.time), _names(list(info.arrays)),
                          f"{info.chunks_changed}/{info.chunks_scanned}",
                          _size(info.bytes_written), _ms(info.pause_seconds))
        _stdout().print(table)
        if not infos:
            click.echo(f"{store} holds no snapshot yet")
    if damaged:
        click.echo(f"damaged snapshots not listed: {', '.join(map(str, damaged))}; run "
                   f"'arraysnap verify {store} --all'", err=True)


@cli.command("show")
@_store_argument
@click.argument("snap", required=False)
@_json_option
def show_command(store: Path, snap: str | None, as_json: bool) -> None:
    """Show one snapshot of STORE: its arrays, state, random generators and provenance.

    SNAP defaults to the latest snapshot (see 'arraysnap --help' for its forms).

    \b
    Example:
      arraysnap show run.snap
      arraysnap show run.snap step:40 --json
    """
    with _open(store) as opened:
        seq = _select(opened, snap)
        info = opened.snapshot(seq)
    arrays = {name: {"shape": list(a.shape), "dtype": dtype_to_json(a.dtype), "order": a.order,
                     "n_chunks": a.n_chunks, "chunk_shape": list(a.chunk_shape),
                     "nbytes": a.nbytes}
              for name, a in info.arrays.items()}
    if as_json:
        _echo_json({"seq": info.seq, "step": info.step, "time": info.time,
                    "parent": info.parent, "codec": dict(info.codec), "arrays": arrays,
                    "state": info.state, "rng": info.rng_state,
                    "provenance": dict(info.provenance), "stats": dict(info.stats),
                    "manifest_bytes": info.manifest_bytes})
        return
    console = _stdout()
    console.print(f"snapshot {info.seq} of {store}: step "
                  f"{'-' if info.step is None else info.step}, captured "
                  f"{_when(info.time)}, parent {info.parent or '-'}, codec "
                  f"{info.codec.get('name')}:{info.codec.get('level')}")
    table = _table("array", "shape", "dtype", "order", "chunks", "chunk shape", "size")
    for name, entry in arrays.items():
        table.add_row(name, str(tuple(entry["shape"])), dtype_text(info.arrays[name].dtype),
                      entry["order"],
                      str(entry["n_chunks"]), str(tuple(entry["chunk_shape"])),
                      _size(entry["nbytes"]))
    console.print(table)
    console.print(f"capture: pause {_ms(info.pause_seconds)}, durable after "
                  f"{_ms(info.durable_seconds)}, {info.chunks_changed} of {info.chunks_scanned} "
                  f"chunks changed ({info.chunks_deduplicated} deduplicated), "
                  f"{_size(info.bytes_written)} written")
    console.print("state: " + json.dumps(info.state))
    console.print("rng: " + _rng_summary(info.rng_state))
    provenance = ", ".join(f"{key} {value}" for key, value in info.provenance.items())
    console.print(f"provenance: {provenance or '-'}")


def _rng_summary(rng: Any) -> str:
    if rng is None:
        return "none"
    try:
        if rng["kind"] == "generator":
            return f"one Generator ({rng['value']['bit_generator']})"
        return "Generators " + ", ".join(f"{key} ({value['bit_generator']})"
                                         for key, value in rng["value"].items())
    except (KeyError, TypeError, AttributeError):
        return "present (not readable: restore reports why)"


@cli.command("diff")
@_store_argument
@click.argument("a")
@click.argument("b")
@click.option("--no-values", is_flag=True,
              help="Compare chunk digests only; do not read chunks for the largest difference.")
@click.option("--exit-code", is_flag=True, help="Exit with 1 if the snapshots differ.")
@_json_option
def diff_command(store: Path, a: str, b: str, no_values: bool, exit_code: bool,
                 as_json: bool) -> None:
    """Show which chunks of each array differ between snapshots A and B of STORE.

    For each array: the chunks that differ (and their fraction), the index ranges along
    the leading axis that hold every difference, and for numeric arrays the largest
    absolute difference (read from the differing chunks only, each one verified).

    \b
    Example:
      arraysnap diff run.snap ~1 latest
      arraysnap diff run.snap step:20 step:40 --json
    """
    with _open(store) as opened:
        first, second = _select(opened, a), _select(opened, b)
        with _progress("reading changed chunks") as update:
            result = opened.diff(first, second, values=not no_values, progress=update)
    if as_json:
        _echo_json(result.to_json())
    else:
        table = _table("array", "status", "chunks differing", "fraction", "rows",
                       "max |B - A|", "note", title=f"snapshot {first} -> {second}")
        for item in result.arrays:
            differing = ("-" if item.chunks_differing is None
                         else f"{len(item.chunks_differing)}/{item.n_chunks}")
            largest = item.max_abs_difference
            table.add_row(item.name, item.status, differing, f"{item.fraction:.1%}",
                          _ranges(item.row_ranges),
                          "-" if largest is None else f"{largest:.6g}", item.note)
        _stdout().print(table)
    if exit_code and any(item.status != "same" for item in result.arrays):
        sys.exit(EXIT_PROBLEMS)


@cli.command("verify")
@_store_argument
@click.argument("snap", required=False)
@click.option("--all", "check_all", is_flag=True, help="Verify every snapshot.")
@_json_option
def verify_command(store: Path, snap: str | None, check_all: bool, as_json: bool) -> None:
    """Check a snapshot of STORE (default: the latest; --all: every one).

    Every manifest is checked against its checksum and every chunk object decoded and
    checked against its blake3 digest. Exit code 1 if anything is wrong; each problem
    names the snapshot, array and chunk.

    \b
    Example:
      arraysnap verify run.snap
      arraysnap verify run.snap --all
    """
    if check_all and snap is not None:
        raise click.UsageError("give SNAP or --all, not both")
    with _open(store) as opened:
        seq = None if check_all else _select(opened, snap)
        with _progress("verifying chunks") as update:
            report = opened.verify(seq, progress=update)
    if as_json:
        _echo_json({"ok": report.ok, "snapshots_checked": report.snapshots_checked,
                    "chunks_checked": report.chunks_checked,
                    "problems": [{"seq": p.seq, "array": p.array, "chunk": p.chunk,
                                  "message": p.message} for p in report.problems]})
    else:
        click.echo(str(report))
        if not report.ok:
            click.echo("see docs/recovery.md, 'verify failed'", err=True)
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


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


@cli.command("prune")
@_store_argument
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N",
              help="Keep the newest N snapshots.")
@click.option("--keep-every", type=click.IntRange(min=1), metavar="K",
              help="Also keep, for good, snapshots whose step is a multiple of K.")
@click.option("--keep-within", type=Duration(),
              help="Also keep snapshots younger than this (90s, 30m, 12h, 7d).")
@click.option("--max-bytes", type=ByteSize(),
              help="Remove the oldest snapshots not kept by another rule until the store's "
                   "data fits (500M, 20GiB).")
@_json_option
def prune_command(store: Path, keep_last: int | None, keep_every: int | None,
                  keep_within: float | None, max_bytes: int | None, as_json: bool) -> None:
    """Remove old snapshots of STORE by a retention policy, then unused chunk objects.

    A snapshot is kept if any rule keeps it; the newest is always kept. Needs the
    writer's lock: stop the job writing to STORE first (or prune from inside it with
    Store.prune, or open the store there with keep_last=... to prune after each commit).

    \b
    Example:
      arraysnap prune run.snap --keep-last 10
      arraysnap prune run.snap --keep-last 3 --keep-within 12h
    """
    options = {"keep_last": keep_last, "keep_every": keep_every, "keep_within": keep_within,
               "max_bytes": max_bytes}
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        raise click.UsageError("say what to keep: --keep-last, --keep-every, --keep-within "
                               "or --max-bytes")
    with _open(store, "a") as opened:
        accepted = inspect.signature(opened.prune).parameters
        missing = [key for key in given if key not in accepted]
        if missing:
            names = ", ".join("--" + key.replace("_", "-") for key in missing)
            raise CommandError(f"this arraysnap's Store.prune does not support {names} yet")
        with _status("pruning"):
            report = opened.prune(**given)
    if as_json:
        _echo_json({"snapshots_removed": list(report.snapshots_removed),
                    "chunks_removed": report.chunks_removed, "bytes_freed": report.bytes_freed})
    else:
        removed = ", ".join(map(str, report.snapshots_removed)) or "none"
        click.echo(f"removed snapshots: {removed}; {report.chunks_removed} chunk objects, "
                   f"{_size(report.bytes_freed)} freed")


@cli.command("gc")
@_store_argument
@_json_option
def gc_command(store: Path, as_json: bool) -> None:
    """Delete chunk objects of STORE that no snapshot uses.

    Such objects are left by a writer killed before its commit, or by a prune that was
    interrupted. Needs the writer's lock.

    \b
    Example:
      arraysnap gc run.snap
    """
    with _open(store, "a") as opened, _status("collecting unused chunk objects"):
        report = opened.gc()
    if as_json:
        _echo_json({"chunks_removed": report.chunks_removed, "bytes_freed": report.bytes_freed})
    else:
        click.echo(f"removed {report.chunks_removed} unused chunk objects, "
                   f"{_size(report.bytes_freed)} freed")


@cli.command("du")
@_store_argument
@_json_option
def du_command(store: Path, as_json: bool) -> None:
    """Show the disk use of STORE per snapshot: unique versus shared bytes.

    \b
    referenced  encoded bytes of every chunk object the snapshot uses
    unique      used by no other snapshot: what pruning this one alone frees
    shared      also used by another snapshot
    new         used by no older snapshot (about what its capture wrote)

    \b
    Example:
      arraysnap du run.snap
      arraysnap du run.snap --json
    """
    with _open(store) as opened, _progress("reading manifests") as update:
        usage = opened.disk_usage(progress=update)
    if as_json:
        _echo_json(usage.to_json())
        return
    table = _table("seq", "step", "chunks", "referenced", "unique", "shared", "new",
                   "manifest")
    for row in usage.snapshots:
        table.add_row(str(row.seq), "-" if row.step is None else str(row.step), str(row.chunks),
                      _size(row.referenced_bytes), _size(row.unique_bytes),
                      _size(row.shared_bytes), _size(row.new_bytes), _size(row.manifest_bytes))
    console = _stdout()
    console.print(table)
    console.print(f"chunk objects: {usage.objects}, {_size(usage.object_bytes)} "
                  f"({_size(usage.referenced_bytes)} in use, {usage.unreferenced_objects} unused "
                  f"objects of {_size(usage.unreferenced_bytes)}"
                  f"{': run arraysnap gc' if usage.unreferenced_objects else ''}); manifests "
                  f"{_size(usage.manifest_bytes)}; baselines (a cache) "
                  f"{_size(usage.baseline_bytes)}")
    for problem in usage.damaged:
        click.echo(f"not counted: {problem}", err=True)


@cli.command("export")
@_store_argument
@click.argument("snap")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "out_format", type=click.Choice(["zarr", "npz"]),
              help="Default: npz if OUT ends in .npz, else zarr.")
def export_command(store: Path, snap: str, out: Path, out_format: str | None) -> None:
    """Write snapshot SNAP of STORE to OUT: a plain zarr v3 store, or a NumPy .npz file.

    The zarr store opens with zarr-python, tensorstore (zarr3 driver) and xarray; every
    array has dimension_names. The .npz holds one .npy per array (raw bytes only). OUT must
    not exist.

    \b
    Example:
      arraysnap export run.snap latest out.zarr
      arraysnap export run.snap step:40 state.npz
    """
    out_format = out_format or ("npz" if out.suffix == ".npz" else "zarr")
    if out.exists() or out.is_symlink():
        raise CommandError(f"{out} already exists; export writes a new file or directory")
    with _open(store) as opened:
        seq = _select(opened, snap)
        if out_format == "zarr":
            with _status(f"exporting snapshot {seq}"):
                opened.export(out, seq=seq)
        else:
            with _status(f"reading snapshot {seq}"):
                restored = opened.restore(seq=seq)
            with _progress("writing arrays") as update:
                _write_npz(out, restored.arrays, update)
            del restored
    click.echo(f"exported snapshot {seq} of {store} to {out} ({out_format})")


def _write_npz(out: Path, arrays: dict[str, np.ndarray],
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


@cli.command("restore")
@_store_argument
@click.argument("snap", required=False)
@click.option("--to", "directory", type=click.Path(path_type=Path), required=True,
              help="Directory for the .npy files (created if missing).")
@click.option("--force", is_flag=True, help="Overwrite files that already exist in DIR.")
def restore_command(store: Path, snap: str | None, directory: Path, force: bool) -> None:
    """Write snapshot SNAP of STORE (default: latest) as one .npy file per array.

    Every chunk is verified on the way. DIR also gets snapshot.json: seq, step, time,
    state, the random generators' state and provenance. The files hold raw array bytes
    only (snapshots never hold Python objects).

    \b
    Example:
      arraysnap restore run.snap step:40 --to restored/
    """
    with _open(store) as opened:
        seq = _select(opened, snap)
        info = opened.snapshot(seq)
        targets = [directory / f"{name}.npy" for name in info.arrays]
        targets.append(directory / "snapshot.json")
        existing = [str(path) for path in targets if path.exists()]
        if existing and not force:
            raise CommandError(f"{', '.join(existing[:3])} already exist; choose another "
                               "--to directory or add --force")
        with _status(f"reading snapshot {seq}"):
            restored = opened.restore(seq=seq)
        directory.mkdir(parents=True, exist_ok=True)
        with _progress("writing arrays") as update:
            for done, (name, array) in enumerate(restored.arrays.items(), 1):
                np.save(directory / f"{name}.npy", array)
                update(done, len(restored.arrays))
        document = {"store": str(store), "seq": seq, "step": info.step,
                    "time": info.time, "state": info.state, "rng": info.rng_state,
                    "provenance": dict(info.provenance),
                    "arrays": {name: f"{name}.npy" for name in info.arrays}}
        (directory / "snapshot.json").write_text(json.dumps(document, indent=2) + "\n")
        del restored
    click.echo(f"restored snapshot {seq} (step {info.step}) of {store}: "
               f"{len(info.arrays)} arrays in {directory}")


STATS_COLUMNS = ("seq", "step", "time", "status", "pause_seconds", "durable_seconds",
                 "chunks_scanned", "chunks_changed", "changed_fraction", "bytes_written")


def capture_history(store: Store) -> list[dict[str, Any]]:
    """One dict per capture, oldest first: ``Store.stats()`` rows, else committed snapshots.

    Keys: ``STATS_COLUMNS`` plus whatever else ``Store.stats()`` records (stage timings).

    >>> import arraysnap, numpy as np, tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/s.snap") as snap:
    ...     _ = snap.capture({"u": np.zeros(4)}, step=3)
    ...     snap.wait()
    ...     [(row["step"], row["changed_fraction"]) for row in capture_history(snap)]
    [(3, 1.0)]
    """
    rows: list[dict[str, Any]] = []
    stats = getattr(store, "stats", None)
    if callable(stats):
        table = stats().to_dict()
        columns = list(table)
        count = len(table[columns[0]]) if columns else 0
        for index in range(count):
            rows.append({column: _plain(table[column][index]) for column in columns})
    else:
        for info in store.list():
            rows.append({"seq": info.seq, "step": info.step, "time": info.time,
                         "status": "committed", "pause_seconds": info.pause_seconds,
                         "durable_seconds": info.durable_seconds,
                         "chunks_scanned": info.chunks_scanned,
                         "chunks_changed": info.chunks_changed,
                         "bytes_written": info.bytes_written})
    for row in rows:
        scanned, changed = row.get("chunks_scanned"), row.get("chunks_changed")
        row["changed_fraction"] = (changed / scanned if isinstance(scanned, (int, float))
                                   and scanned and isinstance(changed, (int, float)) else 0.0)
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@cli.command("stats")
@_store_argument
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Also draw the history as a PNG (needs matplotlib: arraysnap[plot]).")
@click.option("--last", type=click.IntRange(min=1), help="Only the last N captures.")
@_json_option
def stats_command(store: Path, plot_path: Path | None, last: int | None, as_json: bool) -> None:
    """Show the history of captures of STORE: pause, bytes written, changed fraction.

    One row per capture: its pause (how long capture() held the program), how long until
    it was durable, the chunks it found changed, and the bytes it wrote.

    \b
    Example:
      arraysnap stats run.snap
      arraysnap stats run.snap --plot stats.png
    """
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install 'arraysnap[plot]'") from None
    with _open(store) as opened:
        rows = capture_history(opened)
    if last is not None:
        rows = rows[-last:]
    if as_json:
        _echo_json(rows)
    else:
        # Store.stats() also times the wait for the previous capture ("blocked" = that
        # wait + the pause); the snapshot list, its fallback, does not.
        blocked = any("blocking_seconds" in row for row in rows)
        columns = ["seq", "step", "time", "status", "pause", *(["blocked"] if blocked else []),
                   "durable", "changed", "fraction", "bytes written"]
        table = _table(*columns)
        for row in rows:
            cells = [str(row.get("seq", "-")), "-" if row.get("step") is None else str(row["step"]),
                     _when(row.get("time")), str(row.get("status", "committed")),
                     _ms(row.get("pause_seconds"))]
            if blocked:
                cells.append(_ms(row.get("blocking_seconds")))
            cells += [_ms(row.get("durable_seconds")),
                      f"{row.get('chunks_changed', 0)}/{row.get('chunks_scanned', 0)}",
                      f"{row['changed_fraction']:.1%}", _size(row.get("bytes_written") or 0)]
            table.add_row(*cells)
        _stdout().print(table)
        if rows:
            pauses = [row.get("pause_seconds") or 0.0 for row in rows]
            written = sum(row.get("bytes_written") or 0 for row in rows)
            click.echo(f"{len(rows)} captures: median pause {_ms(statistics.median(pauses))}, "
                       f"max {_ms(max(pauses))}; {_size(written)} written in all")
    if plot_path is not None:
        _plot(rows, plot_path, title=f"arraysnap stats: {store.name}")
        click.echo(f"wrote {plot_path}", err=as_json)


def _plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    seqs = [row.get("seq") if row.get("seq") is not None else i for i, row in enumerate(rows)]
    failed = [i for i, row in enumerate(rows) if row.get("status", "committed") != "committed"]
    figure, (pause, written, changed) = plt.subplots(3, 1, sharex=True, figsize=(8, 6.4),
                                                     constrained_layout=True)
    pauses = [(row.get("pause_seconds") or 0) * 1e3 for row in rows]
    pause.plot(seqs, pauses, "o-", color="tab:blue", markersize=3, label="pause")
    durable = [(row.get("durable_seconds") or 0) * 1e3 for row in rows]
    if any(durable):
        pause.plot(seqs, durable, "s-", color="tab:gray", markersize=2, linewidth=0.8,
                   label="durable after")
        pause.legend(loc="best", fontsize="small")
    pause.set_ylabel("ms")
    pause.set_title("pause: how long capture() held the program", loc="left", fontsize="medium")
    written_kib = [(row.get("bytes_written") or 0) / 1024 for row in rows]
    written.bar(seqs, written_kib, color="tab:orange", width=0.8)
    written.set_ylabel("KiB")
    written.set_title("bytes written (chunk objects + manifest)", loc="left", fontsize="medium")
    # The first capture writes everything: on a linear axis it would flatten all others.
    for axes, values in ((pause, pauses + durable), (written, written_kib)):
        positive = [value for value in values if value > 0]
        if positive and max(positive) > 20 * min(positive):
            axes.set_yscale("log")
    changed.plot(seqs, [row["changed_fraction"] * 100 for row in rows], "o-", color="tab:green",
                 markersize=3)
    changed.set_ylabel("%")
    changed.set_ylim(bottom=0)
    changed.set_title("chunks changed", loc="left", fontsize="medium")
    changed.set_xlabel("snapshot (seq)")
    for axes in (pause, written, changed):
        axes.grid(True, alpha=0.3)
        for index in failed:
            axes.axvline(seqs[index], color="tab:red", alpha=0.4)
    figure.suptitle(title)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default ``sys.argv[1:]``); return the exit code.

    >>> main(["--version"])
    arraysnap, version ...
    0
    """
    try:
        cli.main(args=argv, prog_name="arraysnap", standalone_mode=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
