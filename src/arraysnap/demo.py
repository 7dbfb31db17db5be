"""``python -m arraysnap demo``: a simulation captured, killed with SIGKILL, and resumed.

The simulation updates a 512x512 field in a moving band of rows plus a few random cells per
step (so most chunks do not change between captures) beside a static lookup table. A child
process runs it and is killed mid-run; a second process resumes from the latest snapshot,
finishes, and the result is compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import arraysnap

__all__ = ["main", "simulate"]

SHAPE = (512, 512)
STEPS = 400
EVERY = 20
KILL_AFTER = 4


def initial_state() -> tuple[dict[str, np.ndarray], np.random.Generator]:
    y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]] / SHAPE[0]
    u = np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) * 20)
    table = np.sin(np.linspace(0, 100, 1 << 19)).astype(np.float64)  # 4 MiB, never changes
    return {"u": u, "table": table}, np.random.default_rng(2026)


def advance(arrays: dict[str, np.ndarray], rng: np.random.Generator, step: int) -> None:
    """One step: diffuse a 16-row band, then kick four random cells."""
    u = arrays["u"]
    start = (step * 8) % (SHAPE[0] - 16)
    band = u[start : start + 16]
    band[:, 1:-1] += 0.1 * (band[:, 2:] - 2 * band[:, 1:-1] + band[:, :-2])
    cells = rng.integers(0, u.size, 4)
    u.flat[cells] += 0.01 * rng.standard_normal(4) * arrays["table"][cells % arrays["table"].size]


def simulate(store_path: str | None, steps: int = STEPS) -> dict[str, np.ndarray]:
    """Run (or resume) the simulation, capturing every EVERY steps when a store is given."""
    arrays, rng = initial_state()
    step = 0
    if store_path is None:
        for step in range(steps):
            advance(arrays, rng, step)
        return arrays
    with arraysnap.open(store_path, chunk_bytes=64 << 10) as snap:
        if snap.latest() is not None:
            began = time.perf_counter()
            restored = snap.restore()
            took = time.perf_counter() - began
            arrays = {name: np.array(a) for name, a in restored.arrays.items()}
            rng, step = restored.rng, restored.step + 1
            print(f"  resumed at step {step} from snapshot {restored.seq} in {took * 1e3:.1f} ms "
                  f"(state t={restored.state['t']:.2f}, rng restored)", flush=True)
        while step < steps:
            advance(arrays, rng, step)
            if (step + 1) % EVERY == 0 or step + 1 == steps:
                info = snap.capture(arrays, step=step, state={"t": step * 0.01}, rng=rng)
                done = info.result()
                print(f"  step {step + 1:3d}: {done.chunks_changed:3d} of {done.chunks_scanned} "
                      f"chunks changed, blocked {info.blocked_seconds * 1e3:5.2f} ms (pause "
                      f"{info.pause_seconds * 1e3:5.2f} ms), wrote "
                      f"{done.bytes_written / 1024:7.1f} KiB", flush=True)
            step += 1
    return arrays


def main(argv: list[str]) -> int:
    """Run the demo in folder ``argv[0]`` (created; its parent must exist), or in a
    temporary folder that is removed at the end; return the exit code."""
    if argv[:1] == ["--child"]:
        simulate(argv[1])
        return 0
    temporary = not argv
    workdir = Path(tempfile.mkdtemp(prefix="arraysnap-demo-")) if temporary else Path(argv[0])
    store = workdir / "run.snap"
    if not temporary:
        if not workdir.parent.is_dir():
            print(f"arraysnap demo: {workdir.parent} does not exist; give a folder whose parent "
                  "exists (the demo creates only the folder itself)", file=sys.stderr)
            return 2
        if store.exists():
            print(f"arraysnap demo: {store} exists from an earlier run; give a new folder (or "
                  "delete that one) so that this run starts from step 0", file=sys.stderr)
            return 2
        workdir.mkdir(exist_ok=True)
    try:
        return _run(store)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"(the demo's store in {workdir} was removed; `arraysnap demo DIR` keeps it)")


def _run(store: Path) -> int:
    state_mib = (SHAPE[0] * SHAPE[1] * 8 + (1 << 19) * 8) / 2**20
    print(f"arraysnap demo: store {store}")
    print(f"run 1: {STEPS} steps of a {SHAPE[0]}x{SHAPE[1]} field plus a static table "
          f"({state_mib:.0f} MiB of state), capturing every {EVERY} steps")
    child = subprocess.Popen([sys.executable, "-m", "arraysnap", "demo", "--child", str(store)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    captures = 0
    killed = False
    for line in child.stdout:
        print(line, end="")
        captures += line.lstrip().startswith("step")
        if captures == KILL_AFTER:
            time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            killed = True
            break
    child.wait()
    if killed and child.returncode == -signal.SIGKILL:
        print("  killed the run with SIGKILL")
    else:
        print(f"  the run ended by itself (exit code {child.returncode}) before it was killed")
        return 1
    print("run 2: a new process resumes from the latest snapshot (its first act: rolling the "
          "baselines back from the interrupted capture)")
    resumed = subprocess.run([sys.executable, "-m", "arraysnap", "demo", "--child", str(store)],
                             check=False)
    if resumed.returncode:
        return resumed.returncode
    reference = simulate(None)
    with arraysnap.open(store, mode="r") as snap:
        final = snap.restore()
        report = snap.verify()
        snapshots = snap.list()
    same = all(np.array_equal(final.arrays[k], reference[k]) and
               final.arrays[k].tobytes() == reference[k].tobytes() for k in reference)
    on_disk = sum(f.stat().st_size for f in (store / "chunks").rglob("*") if f.is_file())
    written = sum(s.bytes_written for s in snapshots)
    print(f"finished at step {final.step + 1}: bit-identical to an uninterrupted run: {same}")
    print(f"store: {len(snapshots)} snapshots, {report}; chunk objects use "
          f"{on_disk / 2**20:.1f} MiB, {written / 2**20:.1f} MiB written in all, against "
          f"{len(snapshots) * state_mib:.0f} MiB for full copies")
    return 0 if same and report.ok else 1
