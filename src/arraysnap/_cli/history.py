"""The ``stats`` command's data: the history of captures as rows, and its plot.

>>> STATS_COLUMNS[:3]
('seq', 'step', 'time')
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..store import Store
from .output import ms_text, new_table, size_text, stdout, when_text

__all__ = ["STATS_COLUMNS", "capture_history", "plot_history", "print_history"]


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
            rows.append({column: plain(table[column][index]) for column in columns})
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


def plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def print_history(rows: list[dict[str, Any]]) -> None:
    """The ``stats`` table and its summary line, on standard output.

    >>> print_history([{"seq": 1, "step": 0, "time": None, "status": "committed",
    ...                 "pause_seconds": 0.002, "blocking_seconds": 0.003,
    ...                 "durable_seconds": 0.01, "chunks_scanned": 4, "chunks_changed": 1,
    ...                 "changed_fraction": 0.25, "bytes_written": 100}])  # doctest: +ELLIPSIS
    seq ...
    1 capture: median blocked 3.00 ms (pause 2.00 ms), max blocked 3.00 ms; 100 B written in all
    """
    # Store.stats() also times the wait for the previous capture ("blocked" = that
    # wait + the pause); the snapshot list, its fallback, does not.
    blocked = any("blocking_seconds" in row for row in rows)
    columns = ["seq", "step", "time", "status", *(["blocked"] if blocked else []), "pause",
               "durable", "changed", "fraction", "bytes written"]
    table = new_table(*columns)
    for row in rows:
        cells = [str(row.get("seq", "-")), "-" if row.get("step") is None else str(row["step"]),
                 when_text(row.get("time")), str(row.get("status", "committed"))]
        if blocked:
            cells.append(ms_text(row.get("blocking_seconds")))
        cells += [ms_text(row.get("pause_seconds")), ms_text(row.get("durable_seconds")),
                  f"{row.get('chunks_changed', 0)}/{row.get('chunks_scanned', 0)}",
                  f"{row['changed_fraction']:.1%}", size_text(row.get("bytes_written") or 0)]
        table.add_row(*cells)
    stdout().print(table)
    if rows:
        pauses = [row.get("pause_seconds") or 0.0 for row in rows]
        held = [row.get("blocking_seconds") or row.get("pause_seconds") or 0.0
                for row in rows]
        written = sum(row.get("bytes_written") or 0 for row in rows)
        plural = "" if len(rows) == 1 else "s"
        click.echo(f"{len(rows)} capture{plural}: median blocked "
                   f"{ms_text(statistics.median(held))} (pause "
                   f"{ms_text(statistics.median(pauses))}), max blocked "
                   f"{ms_text(max(held))}; {size_text(written)} written in all")


def plot_history(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    seqs = [row.get("seq") if row.get("seq") is not None else i for i, row in enumerate(rows)]
    failed = [i for i, row in enumerate(rows) if row.get("status", "committed") != "committed"]
    figure, (pause, written, changed) = plt.subplots(3, 1, sharex=True, figsize=(8, 6.4),
                                                     constrained_layout=True)
    pauses = [(row.get("pause_seconds") or 0) * 1e3 for row in rows]
    held = [(row.get("blocking_seconds") or row.get("pause_seconds") or 0) * 1e3 for row in rows]
    pause.plot(seqs, held, "o-", color="tab:blue", markersize=3, label="blocked")
    pause.plot(seqs, pauses, ".", color="tab:cyan", markersize=3, label="of which the pause")
    durable = [(row.get("durable_seconds") or 0) * 1e3 for row in rows]
    if any(durable):
        pause.plot(seqs, durable, "s-", color="tab:gray", markersize=2, linewidth=0.8,
                   label="durable after")
    pause.legend(loc="best", fontsize="small")
    pause.set_ylabel("ms")
    pause.set_title("blocked: how long capture() held the program (the pause, and the wait "
                    "before it)", loc="left", fontsize="medium")
    written_kib = [(row.get("bytes_written") or 0) / 1024 for row in rows]
    written.bar(seqs, written_kib, color="tab:orange", width=0.8)
    written.set_ylabel("KiB")
    written.set_title("bytes written (objects + manifest)", loc="left", fontsize="medium")
    # The first capture writes everything: on a linear axis it would flatten all others.
    for axes, values in ((pause, held + pauses + durable), (written, written_kib)):
        positive = [value for value in values if value > 0]
        if positive and max(positive) > 20 * min(positive):
            axes.set_yscale("log")
    changed.plot(seqs, [row["changed_fraction"] * 100 for row in rows], "o-", color="tab:green",
                 markersize=3)
    changed.set_ylabel("%")
    changed.set_ylim(bottom=0)
    changed.set_title("chunks changed", loc="left", fontsize="medium")
    changed.set_xlabel("snapshot (seq)")
    # Seqs are integers: no tick at 2.5.
    changed.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for axes in (pause, written, changed):
        axes.grid(True, alpha=0.3)
        for index in failed:
            axes.axvline(seqs[index], color="tab:red", alpha=0.4)
    figure.suptitle(title)
    figure.savefig(out, dpi=110)
    plt.close(figure)


