"""Many arrays: what a capture, a resume and a restore cost when a state has thousands of arrays.

Each scenario runs in a child process with the descriptor limit of a default Linux login
(``ulimit -n 1024``), against ``np.savez`` + fsync of the same arrays in the same child:

- ``first``: the first capture to durable, against np.savez + fsync;
- ``pause``, ``bytes``: a capture in which one array of all of them changed (median of the
  repeats), and the bytes it added to the store (baselines excluded); the pause with write
  tracking as a user gets it (``track_writes="auto"``), and ``untracked`` with
  ``track_writes=False``, where every array is compared;
- ``open``: re-opening the store as a writer; ``restore``: the latest snapshot
  (``verify=False``) in the writer and in a fresh reader (medians of the repeats), and the
  time to look every array of the reader's restore up afterwards (views are made then);
- ``fds``: descriptors the process holds with a writer and a reader open and their restored
  arrays held;
- ``held``: the pause of a 1 %-changed capture of one large array while the arrays of an
  earlier ``restore()`` are still held, against the same capture without;
- ``zero``: the bytes a capture adds when nothing changed, for a 16 GiB state.

A scenario that fails prints its error (``EMFILE`` was the failure before format 2).
No timing is asserted anywhere: the targets are printed beside the figures.

    python benchmarks/bench_many.py            # 10,000 x 8 KiB, 100,000 x 1 KiB, held 1 GiB
    python benchmarks/bench_many.py --quick    # small, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KIB, MIB, fmt_bytes, fmt_seconds, machine_info, render_table  # noqa: E402

FD_LIMIT = 1024
TARGETS = {"pause": 5e-3, "bytes": 16 * KIB, "restore": 20e-3, "open": 50e-3,
           "first_ratio": 2.0, "fds": 64, "held_ratio": 2.0}


def _store_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        if Path(root).relative_to(path).parts[:1] == ("mirror",):
            continue
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _savez(arrays: dict[str, np.ndarray], path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    with zipfile.ZipFile(path) as archive:  # written whole: the baseline is honest
        assert len(archive.namelist()) == len(arrays)
    return elapsed


def run_many(count: int, nbytes: int, repeats: int, root: Path) -> dict[str, Any]:
    """One many-arrays scenario, in this process (the parent sets the descriptor limit)."""
    import arraysnap

    rng = np.random.default_rng(0)
    arrays = {f"a{i:06d}": rng.random(nbytes // 8) for i in range(count)}
    result: dict[str, Any] = {"count": count, "nbytes": nbytes}
    savez = [_savez(arrays, root / f"savez-{i}.npz") for i in range(2)]
    result["savez"] = statistics.median(savez)
    path = root / "many.snap"
    names = list(arrays)

    def one_changed(snap: Any, first_step: int) -> tuple[list[float], list[float], list[int]]:
        pauses, blocked, written = [], [], []
        for step in range(first_step, first_step + repeats):
            arrays[names[(step * 7919) % count]][0] += 1.0
            before = _store_bytes(path)
            info = snap.capture(arrays, step=step)
            snap.wait()
            pauses.append(info.pause_seconds)
            blocked.append(info.blocked_seconds)
            written.append(_store_bytes(path) - before)
        return pauses, blocked, written

    try:
        with arraysnap.open(path) as snap:  # write tracking as a user gets it: "auto"
            start = time.perf_counter()
            snap.capture(arrays, step=0)
            snap.wait()
            result["first"] = time.perf_counter() - start
            snap.capture(arrays, step=1)  # the first capture the roster vouches for
            snap.wait()
            pauses, blocked, written = one_changed(snap, 2)
            result["pause"] = statistics.median(pauses)
            result["blocked"] = statistics.median(blocked)
            result["bytes"] = statistics.median(written)
            start = time.perf_counter()
            restored = snap.restore(verify=False)
            result["restore_writer"] = time.perf_counter() - start
            assert len(restored.arrays) == count
            del restored
        with arraysnap.open(path, track_writes=False) as snap:  # every array compared
            snap.capture(arrays, step=repeats + 2)
            snap.wait()
            pauses, _, _ = one_changed(snap, repeats + 3)
            result["pause_untracked"] = statistics.median(pauses)
        opens = []
        for _ in range(repeats):  # a single open or reader was too noisy a figure here
            start = time.perf_counter()
            writer = arraysnap.open(path)
            opens.append(time.perf_counter() - start)
            writer.close()
        result["open"] = statistics.median(opens)
        writer = arraysnap.open(path)
        held = writer.restore(verify=False)
        readers = []
        for _ in range(repeats):
            start = time.perf_counter()
            reader = arraysnap.open(path, mode="r")
            read = reader.restore(verify=False)
            readers.append(time.perf_counter() - start)
            if len(readers) < repeats:
                del read
                reader.close()
        result["restore_reader"] = statistics.median(readers)
        start = time.perf_counter()  # restore() makes each view when first looked up
        assert sum(read.arrays[name].nbytes for name in names) == count * nbytes
        result["first_use"] = time.perf_counter() - start
        result["fds"] = _open_fds()
        assert all(np.array_equal(read.arrays[name], arrays[name]) for name in names[:50])
        del held, read
        reader.close()
        writer.close()
    except Exception as err:  # noqa: BLE001 - the failure is the figure
        result["error"] = f"{type(err).__name__}: {err}"[:200]
    return result


def run_held(nbytes: int, repeats: int, root: Path) -> dict[str, Any]:
    """The pause of a 1 %-changed capture with and without an earlier restore held."""
    import arraysnap

    u = np.random.default_rng(1).random(nbytes // 8)
    chunk = (1 << 20) // 8
    n_chunks = len(u) // chunk
    changed = max(1, n_chunks // 100)
    result: dict[str, Any] = {"nbytes": nbytes}
    try:
        with arraysnap.open(root / "held.snap", track_writes=False) as snap:
            snap.capture({"u": u}, step=0)
            snap.wait()
            plain, held = [], []
            for step in range(1, 2 * repeats + 1):
                keep = snap.restore(verify=False) if step % 2 else None
                for i in range(changed):
                    u[((step * changed + i) * 37 % n_chunks) * chunk] += 1.0
                info = snap.capture({"u": u}, step=step)
                snap.wait()
                (held if keep is not None else plain).append(info.pause_seconds)
                if keep is not None:
                    assert keep.arrays["u"][0] != u[0] or True
                del keep
        result["pause_plain"] = statistics.median(plain)
        result["pause_held"] = statistics.median(held)
    except Exception as err:  # noqa: BLE001 - the failure is the figure
        result["error"] = f"{type(err).__name__}: {err}"[:200]
    return result


def run_zero(nbytes: int, repeats: int, root: Path) -> dict[str, Any]:
    """Bytes a capture adds to the store when nothing changed, for a state of `nbytes`
    (zeros: lazily backed, so 16 GiB need not fit in memory; the comparison reads it all)."""
    import arraysnap

    u = np.zeros(nbytes // 8)
    result: dict[str, Any] = {"nbytes": nbytes}
    try:
        with arraysnap.open(root / "zero.snap", track_writes=False) as snap:
            snap.capture({"u": u}, step=0)
            snap.wait()
            written = []
            for step in range(1, repeats + 1):
                before = _store_bytes(root / "zero.snap")
                snap.capture({"u": u}, step=step)
                snap.wait()
                written.append(_store_bytes(root / "zero.snap") - before)
        result["bytes"] = statistics.median(written)
    except Exception as err:  # noqa: BLE001 - the failure is the figure
        result["error"] = f"{type(err).__name__}: {err}"[:200]
    return result


def child(argv: list[str]) -> int:
    kind, size, count, repeats, root = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    limit = int(argv[5]) if len(argv) > 5 else FD_LIMIT
    if limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    directory = Path(tempfile.mkdtemp(dir=root))
    try:
        if kind == "many":
            result = run_many(count, size, repeats, directory)
        elif kind == "zero":
            result = run_zero(size, repeats, directory)
        else:
            result = run_held(size, repeats, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))
    return 0


def _run_child(kind: str, size: int, count: int, repeats: int, root: Path,
               fd_limit: int = FD_LIMIT) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(size), str(count),
                           str(repeats), str(root), str(fd_limit)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(result: dict[str, Any], key: str, kind: str) -> str:
    if key not in result:
        return "-"
    value = result[key]
    return fmt_bytes(value) if kind == "bytes" else (
        str(value) if kind == "int" else fmt_seconds(value))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where stores are made")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--arrays", default=None, metavar="COUNTxBYTES,...",
                        help="other scenarios, e.g. 2000x8192 (then no held or zero run); "
                             "'none': only the held and zero runs")
    parser.add_argument("--zero-gib", type=float, default=16.0,
                        help="size of the zero-change state (default 16 GiB; 0: skip)")
    parser.add_argument("--fd-limit", type=int, default=FD_LIMIT,
                        help=f"descriptor limit of the children (default {FD_LIMIT}; 0: as is)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-many-", dir=args.dir))
    if args.quick:
        scenarios = [("many", 8 * KIB, 300), ("many", 1 * KIB, 1500)]
        held_bytes, repeats = 32 * MIB, 2
    else:
        scenarios = [("many", 8 * KIB, 10_000), ("many", 1 * KIB, 100_000)]
        held_bytes, repeats = 1 << 30, args.repeats
    only_held_zero = args.arrays == "none"
    if only_held_zero:
        scenarios, args.arrays = [], None
    elif args.arrays:
        scenarios = [("many", int(part.split("x")[1]), int(part.split("x")[0]))
                     for part in args.arrays.split(",")]
    try:
        results = [_run_child(kind, size, count, repeats, root, args.fd_limit)
                   for kind, size, count in scenarios]
        held = ({"error": "not run (--arrays)"} if args.arrays else
                _run_child("held", held_bytes, 0, repeats, root, args.fd_limit))
        zero_bytes = int((MIB if args.quick else args.zero_gib * (1 << 30)) // 8 * 8)
        zero = ({"error": "not run"} if args.arrays or not zero_bytes else
                _run_child("zero", zero_bytes, 0, 3, root, args.fd_limit))
        info = machine_info(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# bench_many: descriptor limit {args.fd_limit or 'unchanged'}; {info['cpu_model']}, "
          f"{info['cores_usable']} cores, kernel {info['kernel']}; store on "
          f"{info.get('filesystem')}")
    header = ["arrays", "first", "savez+fsync", "first/savez", "pause (1 changed)",
              "untracked", "bytes (1 changed)", "open", "restore writer", "restore reader",
              "fds", "error"]
    rows = []
    for result in results:
        ratio = (f"{result['first'] / result['savez']:.2f}x"
                 if "first" in result and result.get("savez") else "-")
        rows.append([f"{result.get('count', '?'):,} x {fmt_bytes(result.get('nbytes', 0))}",
                     _cell(result, "first", "s"), _cell(result, "savez", "s"), ratio,
                     _cell(result, "pause", "s"), _cell(result, "pause_untracked", "s"),
                     _cell(result, "bytes", "bytes"),
                     _cell(result, "open", "s"), _cell(result, "restore_writer", "s"),
                     _cell(result, "restore_reader", "s"), _cell(result, "fds", "int"),
                     str(result.get("error", ""))])
    print(render_table(header, rows))
    targets = (f"targets (10,000 arrays): pause <= {fmt_seconds(TARGETS['pause'])}, bytes <= "
               f"{fmt_bytes(TARGETS['bytes'])}, restore <= {fmt_seconds(TARGETS['restore'])}, "
               f"open <= {fmt_seconds(TARGETS['open'])}, first <= {TARGETS['first_ratio']}x "
               f"savez, fds <= {TARGETS['fds']}")
    print(targets)
    for result in results:
        if "first_use" in result:
            print(f"{result['count']:,} arrays: looking each up after the reader's restore "
                  f"(each view is made then): {fmt_seconds(result['first_use'])}")
    if "pause_held" in held:
        print(f"held restore, {fmt_bytes(held['nbytes'])} at 1 %: pause "
              f"{fmt_seconds(held['pause_held'])} held, {fmt_seconds(held['pause_plain'])} "
              f"without: {held['pause_held'] / held['pause_plain']:.2f}x "
              f"(target <= {TARGETS['held_ratio']}x)")
    else:
        print(f"held restore: {held.get('error')}")
    if "bytes" in zero:
        print(f"zero change, {fmt_bytes(zero['nbytes'])} state: {fmt_bytes(zero['bytes'])} "
              f"written per capture (target <= {fmt_bytes(TARGETS['bytes'])})")
    else:
        print(f"zero change: {zero.get('error')}")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "many": results, "held": held,
                                         "zero": zero}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
