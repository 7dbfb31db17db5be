"""Command line: ``python -m arraysnap COMMAND`` (or the ``arraysnap`` entry point).

The commands live in :mod:`arraysnap.cli`; ``python -m arraysnap --help`` lists them.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``arraysnap`` command line; return its exit code (see ``--help``).

    As a process of its own, it ends quietly when its output is a pipe that closed
    (``arraysnap stats run.snap | head -3``), as other Unix tools do: by SIGPIPE.
    """
    from .cli import main as cli_main

    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
