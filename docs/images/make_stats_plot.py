"""Make docs/images/stats.png: a real run of 40 captures, plotted by ``arraysnap stats --plot``.

A 1024 x 1024 heat field diffuses from a hot spot; cells whose update is below a tolerance
stop changing, so the changed fraction grows with the front and falls as it converges; a
second hot spot at capture 25 wakes a region up again. Run from the repository root:

    python docs/images/make_stats_plot.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import arraysnap

SIZE, STEPS, EVERY = 1024, 400, 10


def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="arraysnap-stats-")) / "heat.snap"
    u = np.zeros((SIZE, SIZE))
    u[200:230, 300:330] = 100.0
    table = np.sin(np.linspace(0, 50, 1 << 20))               # 8 MiB that never changes
    with arraysnap.open(store, chunk_bytes=64 << 10) as snap:
        for step in range(STEPS):
            if step == 250:
                u[700:740, 600:640] = 100.0
            lap = np.zeros_like(u)
            lap[1:-1, 1:-1] = (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:] + u[1:-1, :-2]
                               - 4 * u[1:-1, 1:-1])
            active = np.abs(lap) > 1e-2                          # converged cells stay put
            u[active] += 0.2 * lap[active]
            if step % EVERY == EVERY - 1:
                snap.capture({"u": u, "table": table}, step=step, state={"t": step * 0.01})
    out = Path(__file__).resolve().parent / "stats.png"
    subprocess.run([sys.executable, "-m", "arraysnap", "stats", str(store), "--plot", str(out)],
                   check=True)


if __name__ == "__main__":
    main()
