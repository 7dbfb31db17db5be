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

import inspect
import json
import sys
from pathlib import Path

import click
import numpy as np

from ._cli.base import (
    EXIT_PROBLEMS,
    CommandError,
    Group,
    json_option,
    open_store,
    select,
    storage_options,
    store_argument,
)
from ._cli.copying import copy_command
from ._cli.history import capture_history, plot_history, print_history
from ._cli.output import (
    ByteSize,
    Duration,
    dtype_text,
    echo_json,
    ms_text,
    names_text,
    new_table,
    progress,
    ranges_text,
    rng_summary,
    size_text,
    snapshot_json,
    status,
    stdout,
    when_text,
    write_npz,
)
from ._version import __version__
from .dtypes import dtype_to_json
from .store import FORMAT_VERSION, SNAPSHOT_SPEC_HELP, upgrade

__all__ = ["cli"]

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


# -- the group -----------------------------------------------------------------------------
@click.group(cls=Group, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
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
@store_argument
@json_option
def ls_command(store: Path | str, as_json: bool) -> None:
    """List the snapshots of STORE, oldest first.

    Columns: seq, step, capture time, arrays, chunks changed / scanned, bytes written
    (the objects + manifest), blocked (how long capture() held the program: waiting for
    the previous capture to read its chunks, then the pause) and the pause itself (the
    comparison and copy of changed chunks).
    Damaged snapshots are left out and named on stderr; run verify.

    \b
    Example:
      arraysnap ls run.snap
      arraysnap ls run.snap --json
    """
    with open_store(store) as snap:
        infos = snap.list()
        damaged = snap.damaged()
    if as_json:
        echo_json([snapshot_json(info) for info in infos])
    else:
        table = new_table("seq", "step", "time", "arrays", "changed/total", "bytes written",
                          "blocked", "pause")
        for info in infos:
            table.add_row(str(info.seq), "-" if info.step is None else str(info.step),
                          when_text(info.time), names_text(list(info.arrays)),
                          f"{info.chunks_changed}/{info.chunks_scanned}",
                          size_text(info.bytes_written), ms_text(info.blocked_seconds),
                          ms_text(info.pause_seconds))
        stdout().print(table)
        if not infos:
            click.echo(f"{store} holds no snapshot yet")
    if damaged:
        click.echo(f"damaged snapshots not listed: {', '.join(map(str, damaged))}; run "
                   f"'arraysnap verify {store} --all'", err=True)


@cli.command("show")
@store_argument
@click.argument("snap", required=False)
@json_option
def show_command(store: Path | str, snap: str | None, as_json: bool) -> None:
    """Show one snapshot of STORE: its arrays, state, random generators and provenance.

    SNAP defaults to the latest snapshot (see 'arraysnap --help' for its forms).

    \b
    Example:
      arraysnap show run.snap
      arraysnap show run.snap step:40 --json
    """
    with open_store(store) as opened:
        seq = select(opened, snap)
        info = opened.snapshot(seq)
    arrays = {name: {"shape": list(a.shape), "dtype": dtype_to_json(a.dtype), "order": a.order,
                     "n_chunks": a.n_chunks, "chunk_shape": list(a.chunk_shape),
                     "nbytes": a.nbytes}
              for name, a in info.arrays.items()}
    if as_json:
        echo_json({"seq": info.seq, "step": info.step, "time": info.time,
                    "parent": info.parent, "codec": dict(info.codec), "arrays": arrays,
                    "state": info.state, "rng": info.rng_state,
                    "provenance": dict(info.provenance), "stats": dict(info.stats),
                    "manifest_bytes": info.manifest_bytes})
        return
    console = stdout()
    console.print(f"snapshot {info.seq} of {store}: step "
                  f"{'-' if info.step is None else info.step}, captured "
                  f"{when_text(info.time)}, parent {info.parent or '-'}, codec "
                  f"{info.codec.get('name')}:{info.codec.get('level')}")
    table = new_table("array", "shape", "dtype", "order", "chunks", "chunk shape", "size")
    for name, entry in arrays.items():
        table.add_row(name, str(tuple(entry["shape"])), dtype_text(info.arrays[name].dtype),
                      entry["order"],
                      str(entry["n_chunks"]), str(tuple(entry["chunk_shape"])),
                      size_text(entry["nbytes"]))
    console.print(table)
    console.print(f"capture: blocked {ms_text(info.blocked_seconds)} (pause "
                  f"{ms_text(info.pause_seconds)}), durable after "
                  f"{ms_text(info.durable_seconds)}, {info.chunks_changed} of "
                  f"{info.chunks_scanned} "
                  f"chunks changed ({info.chunks_deduplicated} deduplicated), "
                  f"{size_text(info.bytes_written)} written")
    console.print("state: " + json.dumps(info.state))
    console.print("rng: " + rng_summary(info.rng_state))
    provenance = ", ".join(f"{key} {value}" for key, value in info.provenance.items())
    console.print(f"provenance: {provenance or '-'}")


@cli.command("diff")
@store_argument
@click.argument("a")
@click.argument("b")
@click.option("--no-values", is_flag=True,
              help="Compare chunk digests only; do not read chunks for the largest difference.")
@click.option("--exit-code", is_flag=True, help="Exit with 1 if the snapshots differ.")
@json_option
def diff_command(store: Path | str, a: str, b: str, no_values: bool, exit_code: bool,
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
    with open_store(store) as opened:
        first, second = select(opened, a), select(opened, b)
        with progress("reading changed chunks") as update:
            result = opened.diff(first, second, values=not no_values, progress=update)
    if as_json:
        echo_json(result.to_json())
    else:
        table = new_table("array", "status", "chunks differing", "fraction", "rows",
                       "max |B - A|", "note", title=f"snapshot {first} -> {second}")
        for item in result.arrays:
            differing = ("-" if item.chunks_differing is None
                         else f"{len(item.chunks_differing)}/{item.n_chunks}")
            largest = item.max_abs_difference
            table.add_row(item.name, item.status, differing, f"{item.fraction:.1%}",
                          ranges_text(item.row_ranges),
                          "-" if largest is None else f"{largest:.6g}", item.note)
        stdout().print(table)
    if exit_code and any(item.status != "same" for item in result.arrays):
        sys.exit(EXIT_PROBLEMS)


@cli.command("verify")
@store_argument
@click.argument("snap", required=False)
@click.option("--all", "check_all", is_flag=True, help="Verify every snapshot.")
@json_option
def verify_command(store: Path | str, snap: str | None, check_all: bool, as_json: bool) -> None:
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
    with open_store(store) as opened:
        seq = None if check_all else select(opened, snap)
        with progress("verifying chunks") as update:
            report = opened.verify(seq, progress=update)
    if as_json:
        echo_json({"ok": report.ok, "snapshots_checked": report.snapshots_checked,
                    "chunks_checked": report.chunks_checked,
                    "problems": [{"seq": p.seq, "array": p.array, "chunk": p.chunk,
                                  "message": p.message} for p in report.problems]})
    else:
        click.echo(str(report))
        if not report.ok:
            click.echo("see docs/recovery.md, 'verify failed'", err=True)
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


@cli.command("prune")
@store_argument
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N",
              help="Keep the newest N snapshots.")
@click.option("--keep-every", type=click.IntRange(min=1), metavar="K",
              help="Also keep, for good, snapshots whose step is a multiple of K.")
@click.option("--keep-within", type=Duration(),
              help="Also keep snapshots younger than this (90s, 30m, 12h, 7d).")
@click.option("--max-bytes", type=ByteSize(),
              help="Remove the oldest snapshots not kept by another rule until the store's "
                   "data fits (500M, 20GiB).")
@click.option("--dry-run", is_flag=True,
              help="Only say what would be removed (no lock needed: the job may run).")
@json_option
def prune_command(store: Path | str, keep_last: int | None, keep_every: int | None,
                  keep_within: float | None, max_bytes: int | None, dry_run: bool,
                  as_json: bool) -> None:
    """Remove old snapshots of STORE by a retention policy, then unused chunk objects and packs.

    A snapshot is kept if any rule keeps it; the newest is always kept. Needs the
    writer's lock: stop the job writing to STORE first (or prune from inside it with
    Store.prune, or open the store there with keep_last=... to prune after each commit).

    \b
    Example:
      arraysnap prune run.snap --keep-last 10
      arraysnap prune run.snap --keep-last 3 --keep-within 12h
      arraysnap prune run.snap --keep-last 10 --dry-run
    """
    options = {"keep_last": keep_last, "keep_every": keep_every, "keep_within": keep_within,
               "max_bytes": max_bytes}
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        raise click.UsageError("say what to keep: --keep-last, --keep-every, --keep-within "
                               "or --max-bytes")
    with open_store(store, "r" if dry_run else "a") as opened:
        accepted = inspect.signature(opened.prune).parameters
        missing = [key for key in given if key not in accepted]
        if missing:
            names = ", ".join("--" + key.replace("_", "-") for key in missing)
            raise CommandError(f"this arraysnap's Store.prune does not support {names} yet")
        with status("pruning"):
            report = opened.prune(**given, dry_run=dry_run)
    if as_json:
        echo_json({"snapshots_removed": list(report.snapshots_removed),
                    "chunks_removed": report.chunks_removed, "bytes_freed": report.bytes_freed,
                    "dry_run": dry_run})
    else:
        removed = ", ".join(map(str, report.snapshots_removed)) or "none"
        if dry_run:
            click.echo(f"would remove snapshots: {removed}; {report.chunks_removed} chunk "
                       f"objects and packs, {size_text(report.bytes_freed)} would be freed "
                       "(dry run: nothing was removed)")
        else:
            click.echo(f"removed snapshots: {removed}; {report.chunks_removed} chunk objects "
                       f"and packs, {size_text(report.bytes_freed)} freed")


@cli.command("gc")
@store_argument
@json_option
def gc_command(store: Path | str, as_json: bool) -> None:
    """Delete chunk objects and packs of STORE that no snapshot uses.

    Such objects are left by a writer killed before its commit, or by a prune that was
    interrupted. Needs the writer's lock.

    \b
    Example:
      arraysnap gc run.snap
    """
    with open_store(store, "a") as opened, status("collecting unused objects"):
        report = opened.gc()
    if as_json:
        echo_json({"chunks_removed": report.chunks_removed, "bytes_freed": report.bytes_freed})
    else:
        click.echo(f"removed {report.chunks_removed} unused chunk objects and packs, "
                   f"{size_text(report.bytes_freed)} freed")


@cli.command("du")
@store_argument
@json_option
def du_command(store: Path | str, as_json: bool) -> None:
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
    with open_store(store) as opened, progress("reading manifests") as update:
        usage = opened.disk_usage(progress=update)
    if as_json:
        echo_json(usage.to_json())
        return
    table = new_table("seq", "step", "chunks", "referenced", "unique", "shared", "new",
                   "manifest")
    for row in usage.snapshots:
        table.add_row(str(row.seq), "-" if row.step is None else str(row.step), str(row.chunks),
                      size_text(row.referenced_bytes), size_text(row.unique_bytes),
                      size_text(row.shared_bytes), size_text(row.new_bytes),
                      size_text(row.manifest_bytes))
    console = stdout()
    console.print(table)
    console.print(f"chunk objects and packs: {usage.objects}, {size_text(usage.object_bytes)} "
                  f"({size_text(usage.referenced_bytes)} in use, "
                  f"{usage.unreferenced_objects} unused "
                  f"objects of {size_text(usage.unreferenced_bytes)}"
                  f"{': run arraysnap gc' if usage.unreferenced_objects else ''}); manifests "
                  f"{size_text(usage.manifest_bytes)}; tables {size_text(usage.table_bytes)}; "
                  f"baselines (a cache) {size_text(usage.baseline_bytes)}")
    for problem in usage.damaged:
        click.echo(f"not counted: {problem}", err=True)


@cli.command("upgrade")
@store_argument
def upgrade_command(store: Path) -> None:
    """Make STORE a store of this arraysnap's format version (it takes the writer's lock).

    A writer continues an older store in its own format, so that older arraysnap releases
    can still read it; after upgrade, writers write the current format (format 2: tables
    whose costs follow what changed; format 3: small arrays' chunks in packs). Nothing
    written is rewritten; releases that read only
    the older format refuse the store from then on.

    \b
    Example:
      arraysnap upgrade run.snap
    """
    with open_store(store) as opened:  # a reader first: names what is wrong with STORE
        old = opened.format_version
    if old >= FORMAT_VERSION:
        click.echo(f"{store} is already format {old}")
        return
    upgrade(store, storage_options=storage_options())
    click.echo(f"upgraded {store} from format {old} to format {FORMAT_VERSION}")


@cli.command("export")
@store_argument
@click.argument("snap")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "out_format", type=click.Choice(["zarr", "npz"]),
              help="Default: npz if OUT ends in .npz, zarr if it ends in .zarr or has no suffix.")
def export_command(store: Path | str, snap: str, out: Path, out_format: str | None) -> None:
    """Write snapshot SNAP of STORE to OUT: a plain zarr v3 store, or a NumPy .npz file.

    The zarr store opens with zarr-python, tensorstore (zarr3 driver) and xarray; every
    array has dimension_names. The .npz holds one .npy per array (raw bytes only). OUT must
    not exist.

    \b
    Example:
      arraysnap export run.snap latest out.zarr
      arraysnap export run.snap step:40 state.npz
    """
    if out_format is None:
        if out.suffix not in ("", ".zarr", ".npz"):
            raise CommandError(f"{out} ends in {out.suffix}, but export writes a zarr store "
                               "or a .npz file: name it .zarr or .npz, or give --format")
        out_format = "npz" if out.suffix == ".npz" else "zarr"
    if out.exists() or out.is_symlink():
        raise CommandError(f"{out} already exists; export writes a new file or directory")
    with open_store(store) as opened:
        seq = select(opened, snap)
        if out_format == "zarr":
            with status(f"exporting snapshot {seq}"):
                opened.export(out, seq=seq)
        else:
            with status(f"reading snapshot {seq}"):
                restored = opened.restore(seq=seq)
            with progress("writing arrays") as update:
                write_npz(out, restored.arrays, update)
            del restored
    click.echo(f"exported snapshot {seq} of {store} to {out} ({out_format})")


@cli.command("restore")
@store_argument
@click.argument("snap", required=False)
@click.option("--to", "directory", type=click.Path(path_type=Path), required=True,
              help="Directory for the .npy files (created if missing).")
@click.option("--force", is_flag=True, help="Overwrite files that already exist in DIR.")
def restore_command(store: Path | str, snap: str | None, directory: Path, force: bool) -> None:
    """Write snapshot SNAP of STORE (default: latest) as one .npy file per array.

    Every chunk is verified on the way. DIR also gets snapshot.json: seq, step, time,
    state, the random generators' state and provenance. The files hold raw array bytes
    only (snapshots never hold Python objects).

    \b
    Example:
      arraysnap restore run.snap step:40 --to restored/
    """
    with open_store(store) as opened:
        seq = select(opened, snap)
        info = opened.snapshot(seq)
        targets = [directory / f"{name}.npy" for name in info.arrays]
        targets.append(directory / "snapshot.json")
        existing = [str(path) for path in targets if path.exists()]
        if existing and not force:
            raise CommandError(f"{', '.join(existing[:3])} already exist; choose another "
                               "--to directory or add --force")
        with status(f"reading snapshot {seq}"):
            restored = opened.restore(seq=seq)
        directory.mkdir(parents=True, exist_ok=True)
        with progress("writing arrays") as update:
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


@cli.command("stats")
@store_argument
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Also draw the history as a PNG (needs matplotlib: arraysnap[plot]).")
@click.option("--last", type=click.IntRange(min=1), help="Only the last N captures.")
@json_option
def stats_command(store: Path | str, plot_path: Path | None, last: int | None,
                  as_json: bool) -> None:
    """Show the history of captures of STORE: blocked, pause, bytes written, changed fraction.

    One row per capture: its pause (the comparison and copy of changed chunks), how long
    capture() held the program in all (blocked: the pause plus the wait for the previous
    capture to read its chunks), how long until it was durable, the chunks it found
    changed, and the bytes it wrote.

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
    with open_store(store) as opened:
        rows = capture_history(opened)
    if last is not None:
        rows = rows[-last:]
    if as_json:
        echo_json(rows)
    else:
        print_history(rows)
    if plot_path is not None:
        plot_history(rows, plot_path, title=f"arraysnap stats: {store.name}")
        click.echo(f"wrote {plot_path}", err=as_json)


cli.add_command(copy_command)


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
