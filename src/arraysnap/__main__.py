"""Command line: ``python -m arraysnap demo [DIR]`` (or the ``arraysnap`` entry point)."""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """usage: arraysnap demo [DIR]

  demo   run a small simulation, kill it with SIGKILL, resume it from its snapshots and
         check the result is bit-identical to an uninterrupted run (store in DIR or a
         temporary folder)

example: python -m arraysnap demo
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "demo":
        from .demo import main as demo_main

        return demo_main(args[1:])
    print(f"arraysnap: unknown command {args[0]!r}\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
