"""What every command shares: the error that ends a command, the group that turns the
library's errors into one-line messages, opening a store and selecting a snapshot.

>>> CommandError("no such store").exit_code
2
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import ArraysnapError
from ..store import Store
from ..store import open as arraysnap_open

__all__ = ["EXIT_PROBLEMS", "EXIT_USAGE", "CommandError", "Group", "json_option", "open_store",
           "select", "store_argument"]

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


class CommandError(click.ClickException):
    """A command that cannot run: a one-line message on stderr and exit code 2.

    >>> CommandError("no such store").exit_code
    2
    """

    exit_code = EXIT_USAGE


class Group(click.Group):
    """Turns the library's errors into one-line messages with exit code 2.

    ``ARRAYSNAP_TRACEBACK=1`` in the environment shows the full traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as err:
            if err.option_name[1:].isdigit():  # "-2": a snapshot counted from the end
                raise click.UsageError(
                    f"No such option: {err.option_name}. To name a snapshot counted from the "
                    f"end, put it after '--' (arraysnap show run.snap -- {err.option_name}) or "
                    f"write ~{int(err.option_name[1:]) - 1}", err.ctx) from None
            raise
        except (ArraysnapError, OSError, ValueError) as err:
            if os.environ.get("ARRAYSNAP_TRACEBACK"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            raise CommandError(message) from err


@contextlib.contextmanager
def open_store(path: Path, mode: str = "r") -> Iterator[Store]:
    """Open an existing store; a path that is not one is an error, never a new store."""
    try:
        if mode != "r":  # a reader first: it names what is wrong and never creates a store
            arraysnap_open(path, "r").close()
        store = arraysnap_open(path, mode)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise CommandError(str(err)) from None
    try:
        yield store
    finally:
        store.close()


def select(store: Store, spec: str | None) -> int:
    try:
        return store.snapshot(spec).seq
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="SNAP") from None


json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print JSON instead of a table.")
store_argument = click.argument("store", type=click.Path(path_type=Path))
