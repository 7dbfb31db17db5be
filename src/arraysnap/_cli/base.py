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

from .._store.locating import is_url
from ..errors import ArraysnapError
from ..store import Store
from ..store import open as arraysnap_open

__all__ = ["EXIT_PROBLEMS", "EXIT_USAGE", "CommandError", "Group", "StoreLocation",
           "json_option", "open_store", "parse_storage_options", "select", "storage_option",
           "storage_options", "store_argument"]

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
def open_store(path: Path | str, mode: str = "r") -> Iterator[Store]:
    """Open an existing store; a path that is not one is an error, never a new store."""
    options = storage_options() if is_url(path) else None  # -o is for URLs only
    try:
        if mode != "r":  # a reader first: it names what is wrong and never creates a store
            arraysnap_open(path, "r", storage_options=options).close()
        store = arraysnap_open(path, mode, storage_options=options)
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


class StoreLocation(click.ParamType):
    """A store's folder (a :class:`~pathlib.Path`) or its URL in object storage (a str).

    >>> StoreLocation().convert("s3://bucket/run.snap", None, None), StoreLocation().convert(
    ...     "run.snap", None, None)
    ('s3://bucket/run.snap', PosixPath('run.snap'))
    """

    name = "store"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path) or (isinstance(value, str) and is_url(value)):
            return value
        return Path(value)


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as storage options; a pair without ``=`` is a usage error.

    >>> parse_storage_options(("endpoint=http://127.0.0.1:9000", "allow_http=true"))
    {'endpoint': 'http://127.0.0.1:9000', 'allow_http': 'true'}
    """
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE (for example "
                                     "endpoint=http://127.0.0.1:9000)",
                                     param_hint="'-o' / '--storage-option'")
        options[key.strip()] = value
    return options


_OPTIONS_KEY = "arraysnap.storage_options"


def _remember_options(ctx: click.Context, param: click.Parameter,
                      value: tuple[str, ...]) -> None:
    ctx.meta[_OPTIONS_KEY] = parse_storage_options(value or ())


def storage_options() -> dict[str, str] | None:
    """The ``-o KEY=VALUE`` options of the command being run (None if there are none)."""
    ctx = click.get_current_context(silent=True)
    options = None if ctx is None else ctx.meta.get(_OPTIONS_KEY)
    return options or None


storage_option = click.option(
    "-o", "--storage-option", multiple=True, metavar="KEY=VALUE", expose_value=False,
    callback=_remember_options, envvar="ARRAYSNAP_STORAGE_OPTIONS",
    help="A setting of a store in object storage (repeatable): endpoint=, region=, "
         "allow_http=true, access_key_id=, ... (obstore's names). Without them the "
         "usual AWS_*/GOOGLE_*/AZURE_* environment applies. Also from "
         "ARRAYSNAP_STORAGE_OPTIONS (space-separated).")


def store_argument(command: Any) -> Any:
    """STORE (a folder or a URL) and the ``-o`` storage options, for a command."""
    return storage_option(click.argument("store", type=StoreLocation())(command))
