"""Running the children of :mod:`arraysnap.testing.children` and reading what they print.

(Apart from that module, so that importing :mod:`arraysnap.testing` never imports the one
``python -m`` is about to run.)

>>> committed_reports("ready 0\\ncommitted 3 4\\ncommitted 5")
[(3, 4)]
"""

from __future__ import annotations

import sys

__all__ = ["child_command", "committed_reports"]


def child_command(kind: str, store: object, *args: object) -> list[str]:
    """The command line that runs child `kind` on `store` in a fresh interpreter.

    >>> child_command("loop", "/s", "--workload", "small")[1:]
    ['-m', 'arraysnap.testing.children', 'loop', '/s', '--workload', 'small']
    """
    return [sys.executable, "-m", "arraysnap.testing.children", kind, str(store),
            *map(str, args)]


def committed_reports(output: str) -> list[tuple[int, int]]:
    """(step, seq) pairs a child reported durable; a line torn by a kill does not count.

    >>> committed_reports("committed 3 4\\ncommitted 5 6\\ncommitted 7")
    [(3, 4), (5, 6)]
    """
    reports = []
    for line in output.split("\n")[:-1]:
        parts = line.split()
        if (len(parts) == 3 and parts[0] == "committed" and parts[1].isdigit()
                and parts[2].isdigit()):
            reports.append((int(parts[1]), int(parts[2])))
    return reports
