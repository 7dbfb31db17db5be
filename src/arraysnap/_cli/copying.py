"""``arraysnap copy``: snapshots from one store into another (folders or URLs).

>>> copy_command.name
'copy'
"""

from __future__ import annotations

from pathlib import Path

import click

from .._store.copying import copy as arraysnap_copy
from .._store.locating import is_url
from .base import (
    CommandError,
    StoreLocation,
    json_option,
    parse_storage_options,
    storage_option,
    storage_options,
)
from .output import echo_json, progress, size_text

__all__ = ["copy_command"]


@click.command("copy")
@click.argument("src", type=StoreLocation())
@click.argument("dst", type=StoreLocation())
@click.argument("snaps", nargs=-1)
@storage_option
@click.option("--src-option", "src_pairs", multiple=True, metavar="KEY=VALUE",
              help="A storage option of SRC only (repeatable; overrides -o).")
@click.option("--dst-option", "dst_pairs", multiple=True, metavar="KEY=VALUE",
              help="A storage option of DST only (repeatable; overrides -o).")
@json_option
def copy_command(src: Path | str, dst: Path | str, snaps: tuple[str, ...],
                 src_pairs: tuple[str, ...], dst_pairs: tuple[str, ...], as_json: bool) -> None:
    """Copy snapshots SNAP... (default: all) of store SRC into store DST.

    Either may be a folder or a URL (s3://, gs://, az://). Only the objects DST lacks
    are sent, each snapshot's manifest after its objects: a copy that was interrupted
    goes on where it stopped when run again, and a snapshot DST holds already is left
    as it is. DST is created if it does not exist; its writer's lock is taken.

    Into object storage, say: copy /nvme/run42.snap s3://bucket/runs/run42.snap (-o
    KEY=VALUE applies to whichever of the two is a URL).

    \b
    Example:
      arraysnap copy run.snap backup.snap
      arraysnap copy run.snap backup.snap latest --json
    """
    shared = storage_options() or {}  # -o: for whichever of the two is a URL
    src_options = {**(shared if is_url(src) else {}), **parse_storage_options(src_pairs)}
    dst_options = {**(shared if is_url(dst) else {}), **parse_storage_options(dst_pairs)}
    with progress("copying objects") as update:
        try:
            report = arraysnap_copy(src, dst, list(snaps) or None, src_options=src_options or None,
                                    dst_options=dst_options or None, progress=update)
        except FileNotFoundError as err:
            raise CommandError(str(err)) from None
    if as_json:
        echo_json({"copied": list(report.copied), "already_there": list(report.already_there),
                   "objects_copied": report.objects_copied,
                   "bytes_copied": report.bytes_copied})
        return
    click.echo(f"copied {len(report.copied)} snapshots ({report.objects_copied} objects, "
               f"{size_text(report.bytes_copied)}) to {dst}"
               + (f"; {len(report.already_there)} were there already"
                  if report.already_there else ""))
