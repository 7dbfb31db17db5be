"""Command line: ``python -m arraysnap COMMAND`` (or the ``arraysnap`` entry point).

The commands live in :mod:`arraysnap.cli`; ``python -m arraysnap --help`` lists them.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``arraysnap`` command line; return its exit code (see ``--help``)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
