"""Benchmark of arraysnap against what a scientist would use instead, in one run on one machine.

    python benchmarks/bench_peers.py                   # 256 MiB and 1 GiB (about 40 minutes)
    python benchmarks/bench_peers.py --large           # adds 4 GiB (needs ~150 GiB of disk)
    python benchmarks/bench_peers.py --sizes 256M,1G,4G
    python benchmarks/bench_peers.py --quick --out DIR # tiny sizes, seconds: does it run?

Peers: np.save (+fsync, one file per checkpoint, atomic rename), h5py overwriting a chunked
dataset in place, zarr-python writing the whole array into a new store per checkpoint,
icechunk committing a new version of a zarr array, and arraysnap. All use 1 MiB chunks and,
where they compress, zstd level 1. Optional peers that are not installed are skipped with a
note (`pip install .[bench]`; h5py compresses only with hdf5plugin installed).

Every scenario makes 10 checkpoints of one evolving state: the first (a full write) and the
second (a warm-up) untimed, the other 8 timed; at every checkpoint the peers run in a shuffled
order after an os.sync(). Then the writers close, and the latest checkpoint and the one 5
back are restored with cold caches (posix_fadvise DONTNEED on the peer's files), to first
access and to a full read. Peak RSS is taken per peer in a fresh subprocess. The physical
limits (memcpy, memcmp, blake3, zstd, disk write + fsync) are measured in the same run.
Results: peers.json (raw and summary), peers.md (tables) and PNG plots in --out.

Exit status: 0 when the run completes (timings are reported, never asserted), 2 when a peer
restores something other than what it saved (a harness or peer correctness problem).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
import numcodecs
import numpy as np
from _common import (
    GIB,
    KIB,
    MIB,
    RssSampler,
    Spread,
    allocated_bytes,
    dir_bytes,
    evict_from_page_cache,
    filesystem_of,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    fsync_dir,
    fsync_file,
    machine_info,
    now,
    package_versions,
    process_write_bytes,
    quiesce,
    source_identity,
)

import arraysnap

SCHEMA = "arraysnap-bench-peers/1"
CHUNK_BYTES = 1 << 20  # arraysnap's default, used by every peer
ROW_ELEMS = 8192  # float64 rows of 64 KiB: a 1 MiB chunk is 16 whole rows
ROW_BYTES = ROW_ELEMS * 8
ELEMS_PER_CHUNK = CHUNK_BYTES // 8
ZSTD_LEVEL = 1
SMALL_ARRAY_BYTES = 64 * KIB
FRACTIONS = (0.0, 0.01, 0.10, 1.0)
CHECKPOINTS = 10
UNTIMED_CHECKPOINTS = 2  # the first, full write and one warm-up: lazily backed memory, caches
RESTORE_BACK = 5
SPARSE_ELEMENTS_PER_CHUNK = 4  # random elements per chunk on average: touches ~98 % of chunks
SEED = 20_261_127
PEER_NAMES = ("np.save", "h5py", "zarr", "icechunk", "arraysnap")
# A peer is "behind" arraysnap on a figure when its median is this much smaller.
SHORTFALL_MARGIN = 1.1


# -- scenarios and their state ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Scenario:
    field: str  # "smooth" (a simulation-like field, compresses a little) or "noisy" (not at all)
    size_bytes: int
    change: str  # "chunks": a fraction of the chunks; "sparse": few elements; "arrays"
    fraction: float
    n_arrays: int = 1
    limits: bool = False  # measure blake3, codec and disk here too
    rss: bool = False  # peak RSS per peer in a subprocess

    @property
    def key(self) -> str:
        layout = f"{self.n_arrays}x{fmt_size(self.size_bytes // self.n_arrays)}"
        return f"{self.field}-{self.change}-{self.fraction:g}-{layout}"

    @property
    def label(self) -> str:
        if self.change == "sparse":
            what = f"sparse: {SPARSE_ELEMENTS_PER_CHUNK} random elements per chunk"
        elif self.change == "arrays":
            what = f"{self.fraction:.0%} of the arrays"
        else:
            what = f"{self.fraction:.0%} of the chunks"
        if self.n_arrays > 1:
            layout = f"{self.n_arrays} arrays of {fmt_bytes(self.size_bytes // self.n_arrays)}"
        else:
            layout = f"1 array of {fmt_bytes(self.size_bytes)}"
        return f"{self.field}, {layout}, {what}"


def fmt_size(size: int) -> str:
    for unit, scale in (("G", GIB), ("M", MIB), ("K", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": KIB, "M": MIB, "G": GIB}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMG" else text
    size = int(float(number) * scale)
    if size < ROW_BYTES or size % ROW_BYTES:
        raise argparse.ArgumentTypeError(f"{text}: sizes are whole multiples of 64 KiB")
    return size


def make_scenarios(sizes: list[int], small_arrays: int) -> list[Scenario]:
    """Smallest size first, so that a run cut short still has whole sizes to report."""
    small_total = small_arrays * SMALL_ARRAY_BYTES
    many_small = [Scenario("smooth", small_total, "arrays", 0.10, n_arrays=small_arrays,
                           rss=True),
                  Scenario("smooth", small_total, "chunks", 0.10, rss=True)]
    # The field and sparse scenarios at 1 GiB (or the size closest below): enough to matter,
    # small enough to keep the run under an hour.
    detail = max((s for s in sizes if s <= GIB), default=min(sizes))
    scenarios = []
    for size in sizes:
        for fraction in FRACTIONS:
            scenarios.append(Scenario("smooth", size, "chunks", fraction,
                                      limits=fraction == 0.10, rss=fraction == 0.10))
        if size == detail:
            scenarios.append(Scenario("noisy", detail, "chunks", 0.10, limits=True))
            scenarios.append(Scenario("smooth", detail, "sparse", 0.0))
        if size == min(sizes):
            scenarios.extend(many_small)
    return scenarios


def fill_field(out: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Fill a (rows, ROW_ELEMS) float64 array in blocks, touching every page now."""
    rows = out.shape[0]
    columns = np.cos(np.linspace(0.0, 2.0 * np.pi, ROW_ELEMS, endpoint=False))
    block = 1024  # rows at a time, so that temporaries stay small
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        if kind == "noisy":
            out[start:stop] = rng.standard_normal((stop - start, ROW_ELEMS))
            continue
        phase = np.sin(2.0 * np.pi * np.arange(start, stop) / rows)[:, None]
        np.multiply(phase, columns, out=out[start:stop])
        out[start:stop] += 1e-3 * rng.standard_normal((stop - start, ROW_ELEMS))


def n_changed(total: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return total
    return max(1, round(fraction * total))  # at least one, so tiny --quick states change too


class Workload:
    """The state a scenario checkpoints, and the changes between checkpoints."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        rng = np.random.default_rng(seed)
        rows = scenario.size_bytes // ROW_BYTES
        if scenario.n_arrays == 1:
            state = np.empty((rows, ROW_ELEMS), dtype=np.float64)
            fill_field(state, scenario.field, rng)
            self.arrays: dict[str, np.ndarray] = {"u": state}
        else:
            block = np.empty((rows, ROW_ELEMS), dtype=np.float64)
            fill_field(block, scenario.field, rng)
            per_array = rows // scenario.n_arrays
            # Separate allocations, as a program's many small arrays would be.
            self.arrays = {f"a{i:04d}": block[i * per_array:(i + 1) * per_array].reshape(-1).copy()
                           for i in range(scenario.n_arrays)}
            del block
        self.names = list(self.arrays)
        self.change_rng = np.random.default_rng(seed + 1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def change(self) -> int:
        """Apply one step's change; return how many 1 MiB chunks (or small arrays) it touched."""
        rng, scenario = self.change_rng, self.scenario
        if scenario.change == "arrays":
            chosen = rng.choice(len(self.names), n_changed(len(self.names), scenario.fraction),
                                replace=False)
            for index in chosen:
                array = self.arrays[self.names[index]]
                array[rng.integers(array.size)] += 1.0
            return int(chosen.size)
        flat = self.arrays["u"].reshape(-1)
        n_chunks = -(-flat.size // ELEMS_PER_CHUNK)
        if scenario.change == "sparse":
            positions = rng.integers(0, flat.size, SPARSE_ELEMENTS_PER_CHUNK * n_chunks)
            flat[positions] += 1.0
            return int(np.unique(positions // ELEMS_PER_CHUNK).size)
        chunks = rng.choice(n_chunks, n_changed(n_chunks, scenario.fraction), replace=False)
        offsets = rng.integers(0, ELEMS_PER_CHUNK, size=chunks.size)
        flat[np.minimum(chunks * ELEMS_PER_CHUNK + offsets, flat.size - 1)] += 1.0
        return int(chunks.size)

    def sums(self) -> list[float]:
        """Per-array sums: what a restore's full read must reproduce exactly."""
        return [float(np.sum(self.arrays[name])) for name in self.names]


def chunk_shape(array: np.ndarray) -> tuple[int, ...]:
    """1 MiB chunks of whole rows (a 1-D array smaller than that is one chunk)."""
    if array.ndim == 1:
        return (min(array.size, ELEMS_PER_CHUNK),)
    row_bytes = array.itemsize * math.prod(array.shape[1:])
    return (min(array.shape[0], max(1, CHUNK_BYTES // row_bytes)), *array.shape[1:])


# -- peers ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Checkpointed:
    pause: float  # seconds the caller was blocked
    durable: float  # seconds from the call until the checkpoint is on disk (fsync'd)
    bytes_written: int  # what this checkpoint added or rewrote in the peer's files


@dataclass(slots=True)
class Opened:
    """A restored checkpoint: how to get one array, and how to let go of the files."""

    get: Callable[[str], Any]
    close: Callable[[], None] = lambda: None


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, deepest first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(directory, name))
        fsync_dir(directory)


class Peer:
    name = "?"
    blocking = True  # the caller waits until durable, so pause == durable
    keeps_history = True  # can restore a checkpoint 5 back

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.names = names
        root.mkdir(parents=True)
        self.deleted_bytes = 0  # allocated bytes of pruned checkpoints, still counted as used

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        raise NotImplementedError

    def finish(self) -> None:
        """Close the writer, as a job that ends (or dies) does before a restart."""

    def open(self, back: int) -> Opened:
        raise NotImplementedError

    def disk_used(self) -> int:
        return allocated_bytes(self.root) + self.deleted_bytes

    def prune(self, history: list[Path]) -> None:
        """Delete checkpoints older than RESTORE_BACK, counting their space as still used.

        np.save and zarr write independent full copies, so the space of 10 checkpoints is
        exactly the sum of theirs; deleting the old ones only spares this machine's disk.
        """
        while len(history) > RESTORE_BACK + 1:
            old = history.pop(0)
            if old.is_dir():
                self.deleted_bytes += allocated_bytes(old)
                shutil.rmtree(old)
            else:
                self.deleted_bytes += old.stat().st_blocks * 512
                old.unlink()


class NpSavePeer(Peer):
    """np.save (np.savez for many arrays) to a temp file, fsync, rename, fsync the folder."""

    name = "np.save"

    def __init__(self, root: Path, names: list[str]) -> None:
        super().__init__(root, names)
        self.history: list[Path] = []

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        single = len(arrays) == 1
        final = self.root / f"step-{step:04d}.{'npy' if single else 'npz'}"
        temp = final.with_name(final.name + ".tmp")
        start = now()
        with open(temp, "wb") as handle:
            if single:
                np.save(handle, next(iter(arrays.values())), allow_pickle=False)
            else:
                np.savez(handle, allow_pickle=False, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        fsync_dir(self.root)
        elapsed = now() - start
        self.history.append(final)
        size = final.stat().st_size
        self.prune(self.history)
        return Checkpointed(elapsed, elapsed, size)

    def open(self, back: int) -> Opened:
        path = self.history[-1 - back]
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return Opened(lambda name: array)
        archive = np.load(path, allow_pickle=False)
        return Opened(archive.__getitem__, archive.close)


class H5pyPeer(Peer):
    """One HDF5 file, chunked datasets overwritten in place; flush and fsync per checkpoint."""

    name = "h5py"
    keeps_history = False

    def __init__(self, root: Path, names: list[str]) -> None:
        import h5py

        super().__init__(root, names)
        self.path = root / "state.h5"
        # A chunk cache larger than one chunk, so a 1 MiB chunk is not written around it.
        self.file = h5py.File(self.path, "w", libver="latest", rdcc_nbytes=4 * CHUNK_BYTES)
        self.datasets: dict[str, Any] = {}

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        start = now()
        for name, array in arrays.items():
            dataset = self.datasets.get(name)
            if dataset is None:
                dataset = self.file.create_dataset(name, shape=array.shape, dtype=array.dtype,
                                                   chunks=chunk_shape(array), **h5py_filter())
                self.datasets[name] = dataset
            dataset[...] = array
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())
        elapsed = now() - start
        stored = sum(d.id.get_storage_size() for d in self.datasets.values())
        return Checkpointed(elapsed, elapsed, stored)

    def finish(self) -> None:
        self.file.close()

    def open(self, back: int) -> Opened:
        import h5py

        assert back == 0, "h5py overwrites in place: only the latest checkpoint exists"
        handle = h5py.File(self.path, "r")
        return Opened(handle.__getitem__, handle.close)


def h5py_filter() -> dict[str, Any]:
    """zstd level 1 through hdf5plugin when it is installed; otherwise no compression."""
    if importlib.util.find_spec("hdf5plugin") is None:
        return {}
    import hdf5plugin

    return dict(hdf5plugin.Zstd(clevel=ZSTD_LEVEL))


def zarr_zstd() -> Any:
    import zarr.codecs

    return zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=False)


class ZarrPeer(Peer):
    """A new zarr v3 store per checkpoint, written whole into a temp folder, then renamed.

    zarr-python does not fsync: the harness fsyncs every file and folder of the new store
    before the rename (and the parent after it), and counts that in the time.
    """

    name = "zarr"

    def __init__(self, root: Path, names: list[str]) -> None:
        super().__init__(root, names)
        self.history: list[Path] = []

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        import zarr
        from zarr.storage import LocalStore

        final = self.root / f"step-{step:04d}.zarr"
        temp = self.root / f"step-{step:04d}.zarr.tmp"
        start = now()
        group = zarr.open_group(LocalStore(temp), mode="w")
        for name, array in arrays.items():
            target = group.create_array(name, shape=array.shape, dtype=array.dtype,
                                        chunks=chunk_shape(array), compressors=zarr_zstd())
            target[...] = array
        fsync_tree(temp)
        os.rename(temp, final)
        fsync_dir(self.root)
        elapsed = now() - start
        self.history.append(final)
        size = dir_bytes(final)
        self.prune(self.history)
        return Checkpointed(elapsed, elapsed, size)

    def open(self, back: int) -> Opened:
        import zarr
        from zarr.storage import LocalStore

        group = zarr.open_group(LocalStore(self.history[-1 - back], read_only=True), mode="r")
        return Opened(group.__getitem__)


class IcechunkPeer(Peer):
    """An icechunk repository on the local file system; each checkpoint writes the whole array
    in a writable session and commits it as a new version of branch main.

    The harness does not rely on icechunk's local storage to fsync: after the commit it walks
    the repository and fsyncs every file that is new or changed (and its folder), in the time.
    """

    name = "icechunk"

    def __init__(self, root: Path, names: list[str]) -> None:
        import icechunk

        super().__init__(root, names)
        # It warns that local storage is unsafe for concurrent commits; here one thread commits.
        icechunk.set_logs_filter("error")
        self.repo_path = root / "repo"
        self.repo = icechunk.Repository.create(
            icechunk.local_filesystem_storage(str(self.repo_path)))
        self.snapshots: list[str] = []
        self.seen: dict[str, tuple[int, int, int]] = {}

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        import zarr

        start = now()
        session = self.repo.writable_session("main")
        if not self.snapshots:
            group = zarr.open_group(session.store, mode="w")
            for name, array in arrays.items():
                group.create_array(name, shape=array.shape, dtype=array.dtype,
                                   chunks=chunk_shape(array), compressors=zarr_zstd())
        group = zarr.open_group(session.store, mode="r+")
        for name, array in arrays.items():
            group[name][...] = array
        self.snapshots.append(session.commit(f"step {step}"))
        written = self._fsync_new_files()
        elapsed = now() - start
        return Checkpointed(elapsed, elapsed, written)

    def _fsync_new_files(self) -> int:
        """fsync files that appeared or changed since the last call, then their folders."""
        written = 0
        folders: set[str] = set()
        for directory, _, files in os.walk(self.repo_path):
            for name in files:
                path = os.path.join(directory, name)
                info = os.stat(path)
                signature = (info.st_ino, info.st_size, info.st_mtime_ns)
                if self.seen.get(path) != signature:
                    fsync_file(path)
                    self.seen[path] = signature
                    written += info.st_size
                    folders.add(directory)
        # A new folder's own entry lives in its parent: sync the parents up to the repository.
        for folder in sorted(folders, key=len, reverse=True):
            path = Path(folder)
            while True:
                fsync_dir(path)
                if path == self.repo_path or path.parent == path:
                    break
                path = path.parent
        return written

    def open(self, back: int) -> Opened:
        import icechunk
        import zarr

        repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(self.repo_path)))
        if back == 0:
            session = repo.readonly_session(branch="main")
        else:
            session = repo.readonly_session(snapshot_id=self.snapshots[-1 - back])
        group = zarr.open_group(session.store, mode="r")
        return Opened(group.__getitem__)


class ArraysnapPeer(Peer):
    """arraysnap: capture() returns after the pause; result() returns when durable."""

    name = "arraysnap"
    blocking = False

    def __init__(self, root: Path, names: list[str]) -> None:
        super().__init__(root, names)
        self.path = root / "run.snap"
        self.snap = arraysnap.open(self.path, chunk_bytes=CHUNK_BYTES, codec=f"zstd:{ZSTD_LEVEL}")
        self.seqs: list[int] = []

    def checkpoint(self, arrays: Mapping[str, np.ndarray], step: int) -> Checkpointed:
        start = now()
        pending = self.snap.capture(arrays, step=step)
        paused = now() - start
        info = pending.result()
        durable = now() - start
        self.seqs.append(info.seq)
        return Checkpointed(paused, durable, info.bytes_written)

    def finish(self) -> None:
        self.snap.close()

    def open(self, back: int) -> Opened:
        store = arraysnap.open(self.path, mode="r")
        restored = store.restore(seq=self.seqs[-1 - back], verify=False)
        arrays = restored.arrays
        return Opened(arrays.__getitem__, store.close)


PEER_CLASSES: dict[str, type[Peer]] = {
    cls.name: cls for cls in (NpSavePeer, H5pyPeer, ZarrPeer, IcechunkPeer, ArraysnapPeer)}
PEER_MODULES = {"h5py": "h5py", "zarr": "zarr", "icechunk": "icechunk"}


def available_peers(wanted: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The peers that can run here, and a note for each one that cannot."""
    names, notes = [], {}
    for name in wanted:
        module = PEER_MODULES.get(name)
        if module and importlib.util.find_spec(module) is None:
            notes[name] = f"skipped: {module} is not installed (pip install '.[bench]')"
            continue
        names.append(name)
    if "h5py" in names and importlib.util.find_spec("hdf5plugin") is None:
        notes["h5py"] = ("uncompressed: hdf5plugin is not installed, and h5py alone has no "
                         "zstd (gzip would be several times slower than zstd level 1)")
    elif "h5py" in names:
        notes["h5py"] = f"zstd level {ZSTD_LEVEL} through hdf5plugin"
    return names, notes


# -- restores ---------------------------------------------------------------------------------
def first_element(array: Any) -> float:
    return float(array[(0,) * len(array.shape)])


def time_restore(peer: Peer, back: int) -> tuple[float, float, list[float]]:
    """Seconds to first access (open + one element) and to a full read (every array summed)."""
    start = now()
    opened = peer.open(back)
    first_element(opened.get(peer.names[0]))
    to_first = now() - start
    sums = [float(np.sum(opened.get(name)[...])) for name in peer.names]
    to_full = now() - start
    opened.close()
    del opened
    gc.collect()
    return to_first, to_full, sums


# -- physical limits --------------------------------------------------------------------------
_libc = ctypes.CDLL(None)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


def measure_memory_limits(arrays: Mapping[str, np.ndarray], repeats: int) -> dict[str, Any]:
    """memcpy and memcmp of the whole state (what a capture's pause must at least cost)."""
    copies = {name: np.empty_like(a) for name, a in arrays.items()}
    for copy in copies.values():
        copy.fill(0.0)  # first touch now: this machine backs fresh memory lazily
    memcpy, memcmp = [], []
    for _ in range(repeats + 1):  # the first round is a warm-up
        start = now()
        for name, array in arrays.items():
            np.copyto(copies[name], array)
        memcpy.append(now() - start)
        start = now()
        for name, array in arrays.items():
            # ctypes drops the GIL; equal buffers make memcmp read both to the end.
            _libc.memcmp(array.ctypes.data, copies[name].ctypes.data, array.nbytes)
        memcmp.append(now() - start)
    return {"memcpy_seconds": Spread.of(memcpy[1:]).as_dict(),
            "memcmp_seconds": Spread.of(memcmp[1:]).as_dict()}


def chunk_views(arrays: Mapping[str, np.ndarray], limit_bytes: int) -> list[memoryview]:
    views = []
    for array in arrays.values():
        raw = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(raw), CHUNK_BYTES):
            views.append(raw[start:start + CHUNK_BYTES])
            if len(views) * CHUNK_BYTES >= limit_bytes:
                return views
    return views


def measure_cpu_limits(arrays: Mapping[str, np.ndarray], repeats: int) -> dict[str, Any]:
    """Single-thread blake3 and zstd level 1 throughput over the state's 1 MiB chunks."""
    views = chunk_views(arrays, 256 * MIB)  # a sample: the rates do not depend on the size
    sample = sum(len(v) for v in views)
    codec = numcodecs.Zstd(level=ZSTD_LEVEL)
    hash_rates, encode_rates, decode_rates = [], [], []
    encoded: list[bytes] = []
    for _ in range(repeats):
        start = now()
        for view in views:
            blake3.blake3(view).digest()
        hash_rates.append(sample / (now() - start))
        start = now()
        encoded = [codec.encode(view) for view in views]
        encode_rates.append(sample / (now() - start))
        start = now()
        for blob in encoded:
            codec.decode(blob)
        decode_rates.append(sample / (now() - start))
    return {"sample_bytes": sample,
            "blake3_bytes_per_s": Spread.of(hash_rates).as_dict(),
            "zstd_encode_bytes_per_s": Spread.of(encode_rates).as_dict(),
            "zstd_decode_bytes_per_s": Spread.of(decode_rates).as_dict(),
            "zstd_ratio": sum(len(b) for b in encoded) / sample}


def measure_disk(arrays: Mapping[str, np.ndarray], directory: Path, repeats: int,
                 settle: bool) -> dict[str, Any]:
    """Write the state to a new file and fsync it: the best a full checkpoint can do."""
    rates = []
    for index in range(repeats):
        path = directory / f"disk-probe-{index}.bin"
        if settle:
            quiesce()
        start = now()
        with open(path, "wb", buffering=0) as handle:
            for array in arrays.values():
                handle.write(memoryview(array.reshape(-1).view(np.uint8)))
            os.fsync(handle.fileno())
        rates.append(sum(a.nbytes for a in arrays.values()) / (now() - start))
        path.unlink()
    return {"write_fsync_bytes_per_s": Spread.of(rates).as_dict()}


# -- one scenario -----------------------------------------------------------------------------
@dataclass
class Settings:
    quick: bool
    checkpoints: int
    restore_repeats: int
    limit_repeats: int
    settle: bool  # os.sync() before every timed operation
    peers: list[str]
    store_dir: Path


def spread(values: list[float]) -> dict[str, float]:
    return Spread.of(values).as_dict()


def run_scenario(scenario: Scenario, settings: Settings, order_rng: np.random.Generator,
                 problems: list[str]) -> dict[str, Any]:
    print(f"\n== {scenario.label}", flush=True)
    started = now()
    workload = Workload(scenario, SEED)
    result: dict[str, Any] = {"key": scenario.key, "label": scenario.label,
                              **asdict(scenario), "state_bytes": workload.nbytes,
                              "n_chunks": sum(-(-a.nbytes // CHUNK_BYTES)
                                              for a in workload.arrays.values())}
    limits: dict[str, Any] = measure_memory_limits(workload.arrays, settings.limit_repeats)
    if scenario.limits:
        limits.update(measure_cpu_limits(workload.arrays, settings.limit_repeats))
        limits.update(measure_disk(workload.arrays, settings.store_dir,
                                   settings.limit_repeats, settings.settle))
    result["limits"] = limits

    root = Path(tempfile.mkdtemp(prefix=f"{scenario.key}-", dir=settings.store_dir))
    peers = [PEER_CLASSES[name](root / name.replace(".", "_"), workload.names)
             for name in settings.peers]
    records: dict[str, list[dict[str, Any]]] = {peer.name: [] for peer in peers}
    expected: dict[int, list[float]] = {}
    changed: list[int] = []
    try:
        for step in range(settings.checkpoints):
            changed.append(workload.change() if step else result["n_chunks"])
            if step in (settings.checkpoints - 1, settings.checkpoints - 1 - RESTORE_BACK):
                expected[settings.checkpoints - 1 - step] = workload.sums()
            timed = step >= UNTIMED_CHECKPOINTS
            order = [peers[i] for i in order_rng.permutation(len(peers))]
            for peer in order:
                if settings.settle:
                    quiesce()
                gc.collect()
                io_before = process_write_bytes()
                done = peer.checkpoint(workload.arrays, step)
                records[peer.name].append({
                    "step": step, "timed": timed, "pause": done.pause, "durable": done.durable,
                    "bytes_written": done.bytes_written, "chunks_changed": changed[-1],
                    "process_write_bytes": process_write_bytes() - io_before})
            line = ", ".join(f"{p.name} {fmt_seconds(records[p.name][-1]['durable'])}"
                             for p in peers)
            print(f"  checkpoint {step}{'' if timed else ' (untimed)'}: {line}", flush=True)
        for peer in peers:
            peer.finish()
        disk = {peer.name: peer.disk_used() for peer in peers}
        restores = measure_restores(peers, expected, settings, order_rng, problems,
                                    scenario.label)
    finally:
        del workload
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)

    result["peers"] = {}
    for peer in peers:
        timed = [r for r in records[peer.name] if r["timed"]]
        result["peers"][peer.name] = {
            "blocking": peer.blocking, "keeps_history": peer.keeps_history,
            "pause": spread([r["pause"] for r in timed]),
            "durable": spread([r["durable"] for r in timed]),
            "bytes_written": spread([r["bytes_written"] for r in timed]),
            "process_write_bytes": spread([r["process_write_bytes"] for r in timed]),
            "disk_used": disk[peer.name], "checkpoints": len(records[peer.name]),
            "restore": restores[peer.name], "rss": None, "records": records[peer.name]}
    result["seconds"] = now() - started
    return result


def measure_restores(peers: list[Peer], expected: dict[int, list[float]], settings: Settings,
                     order_rng: np.random.Generator, problems: list[str],
                     label: str) -> dict[str, Any]:
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        peer.name: {which: {"first_access": [], "full_read": []} for which in ("latest", "back")}
        for peer in peers}
    for repeat in range(settings.restore_repeats):
        for back, which in ((0, "latest"), (RESTORE_BACK, "back")):
            order = [peers[i] for i in order_rng.permutation(len(peers))]
            for peer in order:
                if back and not peer.keeps_history:
                    continue
                # Cold: a restart on a machine whose page cache no longer holds the files.
                quiesce()
                evict_from_page_cache(peer.root)
                to_first, to_full, sums = time_restore(peer, back)
                times[peer.name][which]["first_access"].append(to_first)
                times[peer.name][which]["full_read"].append(to_full)
                if repeat == 0 and sums != expected[back]:
                    problems.append(f"{label}: {peer.name} restored {which} with other "
                                    "contents than it checkpointed (sums differ)")
    return {name: {which: ({kind: spread(values) for kind, values in figures.items()}
                           if figures["first_access"] else None)
                   for which, figures in by_which.items()}
            for name, by_which in times.items()}


# -- peak RSS in a fresh process ----------------------------------------------------------------
def rss_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the state, checkpoint 3 times, restore the latest in full; report peak memory.

    A separate process per peer, so that one peer's allocations and caches do not count
    against another's. ru_maxrss would not do: Linux carries the parent's high-water mark
    across fork and exec. Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS:
    done once the state is built, and again before the restore.
    """
    scenario = Scenario(**spec["scenario"])
    workload = Workload(scenario, SEED)
    gc.collect()
    # After the state is built: its temporaries are not the peer's.
    Path("/proc/self/clear_refs").write_text("5")
    state_rss = status_bytes("VmRSS")
    root = Path(spec["dir"]) / "rss"
    with RssSampler(interval=0.002) as checkpointing:
        peer = PEER_CLASSES[spec["peer"]](root, workload.names)
        for step in range(3):
            if step:
                workload.change()
            peer.checkpoint(workload.arrays, step)
        peer.finish()
    checkpoint_peak = status_bytes("VmHWM")
    # The restore's full read holds a copy of the state in most peers: its own figures.
    gc.collect()
    before_restore = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with RssSampler(interval=0.002) as restoring:
        time_restore(peer, 0)
    restore_peak = status_bytes("VmHWM")
    peak = max(checkpoint_peak, restore_peak)
    # Anonymous memory is the program's own; file-backed pages (maps of files, such as
    # arraysnap's baseline) count in RSS too but are page cache the kernel can reclaim.
    return {"peak_rss_bytes": peak, "rss_with_state_bytes": state_rss,
            "growth_bytes": peak - state_rss, "state_bytes": workload.nbytes,
            "checkpoint_peak_bytes": checkpoint_peak,
            "checkpoint_growth_bytes": checkpoint_peak - state_rss,
            "checkpoint_anon_growth_bytes": checkpointing.peak.anon_growth,
            "checkpoint_file_growth_bytes": checkpointing.peak.file_growth,
            "restore_peak_bytes": restore_peak,
            "restore_growth_bytes": restore_peak - before_restore,
            "restore_anon_growth_bytes": restoring.peak.anon_growth,
            "restore_file_growth_bytes": restoring.peak.file_growth}


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * KIB
    return 0


def measure_rss(scenario: Scenario, settings: Settings) -> dict[str, Any]:
    out = {}
    for name in settings.peers:
        with tempfile.TemporaryDirectory(prefix="rss-", dir=settings.store_dir) as directory:
            spec = {"peer": name, "scenario": asdict(scenario), "dir": directory}
            done = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)],
                                  capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"RSS child for {name} failed ({done.returncode}):\n{done.stderr}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        figures = out[name]
        print(f"  peak RSS {name}: checkpointing {fmt_bytes(figures['checkpoint_peak_bytes'])} "
              f"(anon +{fmt_bytes(figures['checkpoint_anon_growth_bytes'])}, file-backed "
              f"+{fmt_bytes(figures['checkpoint_file_growth_bytes'])}); restore "
              f"+{fmt_bytes(figures['restore_growth_bytes'])}", flush=True)
    return out


# -- summary: ratios, fractions of limits, shortfalls ------------------------------------------
RATIO_METRICS = (
    ("pause", lambda p: p["pause"]["median"]),
    ("durable", lambda p: p["durable"]["median"]),
    ("bytes_written", lambda p: p["bytes_written"]["median"]),
    ("disk_used", lambda p: p["disk_used"]),
    ("restore_latest_first", lambda p: p["restore"]["latest"]["first_access"]["median"]),
    ("restore_latest_full", lambda p: p["restore"]["latest"]["full_read"]["median"]),
    ("restore_back_first", lambda p: (p["restore"]["back"] or {}).get(
        "first_access", {}).get("median", math.nan)),
    ("restore_back_full", lambda p: (p["restore"]["back"] or {}).get(
        "full_read", {}).get("median", math.nan)),
    ("peak_rss", lambda p: p["rss"].get("checkpoint_peak_bytes", p["rss"]["peak_rss_bytes"])
     if p["rss"] else math.nan),
    ("checkpoint_anon_growth", lambda p: p["rss"].get("checkpoint_anon_growth_bytes", math.nan)
     if p["rss"] else math.nan),
)


def add_ratios(scenario: dict[str, Any]) -> None:
    """peer / arraysnap for every figure (above 1: arraysnap is faster or smaller)."""
    peers = scenario["peers"]
    mine = peers.get("arraysnap")
    scenario["shortfalls"] = []
    for name, peer in peers.items():
        peer["ratios"] = {}
        for metric, getter in RATIO_METRICS:
            theirs = getter(peer)
            ours = getter(mine) if mine else math.nan
            ratio = theirs / ours if ours and ours == ours and theirs == theirs else None
            peer["ratios"][metric] = ratio  # None (JSON null) where a figure does not exist
            if name != "arraysnap" and ratio is not None and ratio * SHORTFALL_MARGIN < 1:
                scenario["shortfalls"].append({"peer": name, "metric": metric, "ratio": ratio,
                                               "peer_value": theirs, "arraysnap_value": ours})


def limit_fractions(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What fraction of each physical limit arraysnap reaches, per state size (1 array)."""
    out = []
    by_size: dict[int, dict[float, dict[str, Any]]] = {}
    limits_at: dict[int, dict[str, Any]] = {}
    for entry in scenarios:
        if entry["field"] == "smooth" and entry["change"] == "chunks" and entry["n_arrays"] == 1:
            by_size.setdefault(entry["size_bytes"], {})[entry["fraction"]] = entry
            if "zstd_encode_bytes_per_s" in entry["limits"]:
                limits_at[entry["size_bytes"]] = entry["limits"]
    for size, fractions in sorted(by_size.items()):
        limits = limits_at.get(size)
        if limits is None or "arraysnap" not in next(iter(fractions.values()))["peers"]:
            continue
        memcmp = limits["memcmp_seconds"]["median"]
        memcpy = limits["memcpy_seconds"]["median"]
        row: dict[str, Any] = {"size_bytes": size}
        if 0.0 in fractions:
            pause = fractions[0.0]["peers"]["arraysnap"]["pause"]["median"]
            row["pause_0_vs_memcmp"] = memcmp / pause
        if 1.0 in fractions:
            full = fractions[1.0]["peers"]["arraysnap"]
            row["pause_100_vs_memcmp_memcpy"] = (memcmp + memcpy) / full["pause"]["median"]
            background = full["durable"]["median"] - full["pause"]["median"]
            # Per byte the background job hashes, then encodes; two pool workers share it.
            per_byte = (1 / limits["blake3_bytes_per_s"]["median"]
                        + 1 / limits["zstd_encode_bytes_per_s"]["median"])
            cpu_bound = size * per_byte / 2
            disk_bound = full["bytes_written"]["median"] / (
                limits["write_fsync_bytes_per_s"]["median"])
            row["background_100_vs_cpu"] = cpu_bound / background
            row["durable_100_vs_disk"] = disk_bound / full["durable"]["median"]
            row["durable_100_vs_max_cpu_disk"] = max(cpu_bound, disk_bound) / background
            npsave = fractions[1.0]["peers"].get("np.save")
            if npsave:
                row["npsave_vs_disk"] = (size / limits["write_fsync_bytes_per_s"]["median"]
                                         / npsave["durable"]["median"])
        out.append(row)
    return out


# -- reports ----------------------------------------------------------------------------------
def fmt_cell_seconds(data: dict[str, float] | None) -> str:
    if not data or data.get("n", 0) == 0:
        return "n/a"
    if data["n"] == 1:
        return fmt_seconds(data["median"])
    return (f"{fmt_seconds(data['median'])} "
            f"({fmt_seconds(data['min'])}–{fmt_seconds(data['max'])})")


def fmt_cell_ratio(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    # Two significant digits below 0.01, where fmt_ratio's three decimals would show 0.000.
    text = f"{value:.2g}×" if value < 0.01 else f"{fmt_ratio(value)}×"
    # Bold where the peer beats arraysnap, so that a reader cannot miss it.
    return f"**{text}**" if value * SHORTFALL_MARGIN < 1 else text


def markdown_report(document: dict[str, Any]) -> str:
    lines = []
    scenarios = document["scenarios"]
    peers = document["peers_run"]
    others = [p for p in peers if p != "arraysnap"]
    lines.append(f"Peers run: {', '.join(peers)}; arraysnap at commit {document['commit'][:12]}."
                 + "".join(f" {name}: {note}." for name, note
                           in document["peer_notes"].items()) + "\n")
    for skipped in document["skipped"]:
        lines.append(f"Skipped: {skipped}\n")
    lines.append("### Ratios to arraysnap (peer median / arraysnap median; above 1×: arraysnap "
                 "is faster or smaller; **bold**: the peer is better by more than 10 %)\n")
    for metric, title in (("durable", "Time until durable"),
                          ("pause", "Pause (time the caller is blocked)"),
                          ("bytes_written", "Bytes written per checkpoint"),
                          ("disk_used", f"Disk used after {document['config']['checkpoints']}"
                                        " checkpoints"),
                          ("restore_latest_first", "Restore latest, to first access (cold)"),
                          ("restore_latest_full", "Restore latest, to full read (cold)"),
                          ("restore_back_first", f"Restore {RESTORE_BACK} back, to first "
                                                 "access (cold)"),
                          ("restore_back_full", f"Restore {RESTORE_BACK} back, to full read "
                                                "(cold)"),
                          ("peak_rss", "Peak RSS while checkpointing (fresh process, "
                                       "state included)"),
                          ("checkpoint_anon_growth", "Anonymous memory growth while "
                                                     "checkpointing (fresh process)")):
        rows = []
        for entry in scenarios:
            cells = [fmt_cell_ratio(entry["peers"][p]["ratios"][metric]) for p in others]
            if any(c != "n/a" for c in cells):
                rows.append([entry["label"], *cells])
        if not rows:
            continue
        lines.append(f"**{title}**\n")
        lines.append("| scenario | " + " | ".join(others) + " |")
        lines.append("|---|" + "---:|" * len(others))
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
        lines.append("")
    lines.append("### Absolute figures per scenario (median (min–max) over the timed "
                 "checkpoints or restores)\n")
    for entry in scenarios:
        lines.append(f"**{entry['label']}** ({fmt_bytes(entry['state_bytes'])}, "
                     f"{entry['n_chunks']} chunks; memcpy "
                     f"{fmt_seconds(entry['limits']['memcpy_seconds']['median'])}, memcmp "
                     f"{fmt_seconds(entry['limits']['memcmp_seconds']['median'])})\n")
        lines.append("| peer | pause | durable | bytes/checkpoint | disk after "
                     f"{document['config']['checkpoints']} | latest: first access | latest: "
                     f"full read | {RESTORE_BACK} back: first access | {RESTORE_BACK} back: full "
                     "read | peak RSS checkpointing (growth: anon, file-backed); restore's "
                     "growth |")
        lines.append("|---|" + "---:|" * 9)
        for name in peers:
            peer = entry["peers"][name]
            back = peer["restore"]["back"]
            rss = peer["rss"]
            rss_cell = "–"
            if rss and "checkpoint_anon_growth_bytes" in rss:
                rss_cell = (f"{fmt_bytes(rss['checkpoint_peak_bytes'])} "
                            f"(anon +{fmt_bytes(rss['checkpoint_anon_growth_bytes'])}, file "
                            f"+{fmt_bytes(rss['checkpoint_file_growth_bytes'])}); restore "
                            f"+{fmt_bytes(rss['restore_growth_bytes'])}")
            elif rss and "checkpoint_peak_bytes" in rss:
                rss_cell = (f"{fmt_bytes(rss['checkpoint_peak_bytes'])} "
                            f"(+{fmt_bytes(rss['checkpoint_growth_bytes'])}); restore "
                            f"+{fmt_bytes(rss['restore_growth_bytes'])}")
            elif rss:
                rss_cell = (f"{fmt_bytes(rss['peak_rss_bytes'])} (+{fmt_bytes(rss['growth_bytes'])}"
                            "; checkpoints and restore together)")
            lines.append("| " + " | ".join([
                name, fmt_cell_seconds(peer["pause"]), fmt_cell_seconds(peer["durable"]),
                fmt_bytes(peer["bytes_written"]["median"]), fmt_bytes(peer["disk_used"]),
                fmt_cell_seconds(peer["restore"]["latest"]["first_access"]),
                fmt_cell_seconds(peer["restore"]["latest"]["full_read"]),
                fmt_cell_seconds(back["first_access"] if back else None),
                fmt_cell_seconds(back["full_read"] if back else None), rss_cell]) + " |")
        lines.append("")
    lines.append("### Physical limits measured in the same run\n")
    lines.append("| scenario | memcpy | memcmp | blake3 (1 thread) | zstd-1 encode (1 thread) | "
                 "zstd-1 decode | zstd ratio | disk write+fsync |")
    lines.append("|---|" + "---:|" * 7)
    for entry in scenarios:
        limits = entry["limits"]
        if "blake3_bytes_per_s" not in limits:
            continue
        size = entry["state_bytes"]

        def rate(key: str, limits: dict[str, Any] = limits) -> str:
            return f"{limits[key]['median'] / GIB:.2f} GiB/s"

        lines.append("| " + " | ".join([
            entry["label"],
            f"{size / limits['memcpy_seconds']['median'] / GIB:.1f} GiB/s",
            f"{size / limits['memcmp_seconds']['median'] / GIB:.1f} GiB/s",
            rate("blake3_bytes_per_s"), rate("zstd_encode_bytes_per_s"),
            rate("zstd_decode_bytes_per_s"), f"{limits['zstd_ratio']:.3f}",
            rate("write_fsync_bytes_per_s")]) + " |")
    lines.append("")
    if document["limit_fractions"]:
        lines.append("### Fraction of each limit arraysnap reaches (1.0 = at the limit)\n")
        lines.append("| state | pause at 0 % vs memcmp | pause at 100 % vs memcmp+memcpy | "
                     "background at 100 % vs blake3+zstd on 2 threads | durable at 100 % vs "
                     "disk write+fsync | np.save at 100 % vs disk |")
        lines.append("|---|" + "---:|" * 5)
        for row in document["limit_fractions"]:
            lines.append("| " + " | ".join([fmt_bytes(row["size_bytes"])] + [
                f"{row[key]:.2f}" if key in row else "–"
                for key in ("pause_0_vs_memcmp", "pause_100_vs_memcmp_memcpy",
                            "background_100_vs_cpu", "durable_100_vs_disk",
                            "npsave_vs_disk")]) + " |")
        lines.append("")
    lines.append("### Where a peer beats arraysnap (its median more than 10 % better)\n")
    grouped: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for entry in scenarios:
        for short in entry["shortfalls"]:
            grouped.setdefault((short["metric"], short["peer"]), []).append(
                (entry["label"], short["ratio"]))
    if not grouped:
        lines.append("Nowhere in this run.")
    for (metric, peer), cases in sorted(grouped.items()):
        ratios = [ratio for _, ratio in cases]
        lines.append(f"- **{metric}**, {peer}: in {len(cases)} of {len(scenarios)} scenarios, "
                     f"{min(ratios):.3g}× to {max(ratios):.3g}× of arraysnap ("
                     + "; ".join(f"{label}: {ratio:.3g}×" for label, ratio in cases) + ")")
    lines.append("")
    return "\n".join(lines)


def shared_legend(figure: Any, axes: Any) -> None:
    """One legend under both panels, so that it never hides a line."""
    handles: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.tight_layout(rect=(0, 0.16, 1, 0.95))
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=4,
                  fontsize=8, frameon=False)


def make_plots(document: dict[str, Any], out: Path) -> list[str]:
    """Pause and durable against state size and against changed fraction; PNG names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    scenarios = [s for s in document["scenarios"] if s["field"] == "smooth"
                 and s["change"] == "chunks" and s["size_bytes"] in document["config"]["sizes"]]
    peers = document["peers_run"]
    colours = dict(zip(PEER_NAMES, ("tab:blue", "tab:orange", "tab:green", "tab:purple",
                                    "tab:red"), strict=True))
    written = []

    def errorbar(axis: Any, xs: list[float], data: list[dict[str, float]], **style: Any) -> None:
        medians = [d["median"] for d in data]
        low = [m - d["min"] for m, d in zip(medians, data, strict=True)]
        high = [d["max"] - m for m, d in zip(medians, data, strict=True)]
        axis.errorbar(xs, medians, yerr=[low, high], capsize=3, marker="o", **style)

    # 1. Against state size: every peer at 1 % changed; arraysnap at 100 % too.
    sizes = sorted({s["size_bytes"] for s in scenarios})
    if sizes:
        figure, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
        xs_all = [size / GIB for size in sizes]
        for axis, metric in zip(axes, ("pause", "durable"), strict=True):
            for name in peers:
                for fraction, line in ((0.01, "-"), (1.0, ":")):
                    if fraction == 1.0 and name != "arraysnap":
                        continue  # the others write everything at any fraction
                    rows = [next((s for s in scenarios if s["size_bytes"] == size
                                  and s["fraction"] == fraction), None) for size in sizes]
                    xs = [x for x, r in zip(xs_all, rows, strict=True) if r]
                    rows = [r for r in rows if r]
                    if rows:
                        errorbar(axis, xs, [r["peers"][name][metric] for r in rows],
                                 color=colours[name], linestyle=line,
                                 label=f"{name}, {fraction:.0%} changed")
            by_size = [next(s for s in scenarios if s["size_bytes"] == size) for size in sizes]
            if metric == "pause":
                axis.plot(xs_all, [r["limits"]["memcpy_seconds"]["median"] for r in by_size],
                          "k--", marker="x", label="memcpy of the state (memory bandwidth)")
                axis.plot(xs_all, [r["limits"]["memcmp_seconds"]["median"] for r in by_size],
                          "k-.", marker="+", label="memcmp of the state")
            else:
                with_disk = [(x, r["limits"]) for x, size in zip(xs_all, sizes, strict=True)
                             for r in scenarios if r["size_bytes"] == size
                             and "write_fsync_bytes_per_s" in r["limits"]]
                if with_disk:
                    axis.plot([x for x, _ in with_disk],
                              [x * GIB / lim["write_fsync_bytes_per_s"]["median"]
                               for x, lim in with_disk],
                              "k--", label="the state written + fsynced at disk rate")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("state size")
            axis.set_xticks(xs_all, [fmt_bytes(s) for s in sizes])
            axis.grid(True, which="both", alpha=0.3)
            axis.set_title({"pause": "pause (caller blocked)",
                            "durable": "time until durable"}[metric])
        axes[0].set_ylabel("seconds (median, bars: min–max)")
        shared_legend(figure, axes)
        figure.suptitle("Checkpoint cost against state size (smooth field, 1 MiB chunks, "
                        "zstd-1; blocking peers: pause = durable)")
        figure.savefig(out / "scaling_size.png", dpi=110)
        plt.close(figure)
        written.append("scaling_size.png")

    # 2. Against changed fraction, at the largest size with every fraction.
    complete = [size for size in sizes
                if {s["fraction"] for s in scenarios if s["size_bytes"] == size} >= set(FRACTIONS)]
    if complete:
        size = max(s for s in complete if s <= GIB) if min(complete) <= GIB else min(complete)
        rows = sorted((s for s in scenarios if s["size_bytes"] == size),
                      key=lambda s: s["fraction"])
        positions = list(range(len(rows)))
        figure, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
        for axis, metric in zip(axes, ("pause", "durable"), strict=True):
            for name in peers:
                errorbar(axis, positions, [r["peers"][name][metric] for r in rows],
                         color=colours[name], label=name)
            axis.plot(positions, [r["limits"]["memcmp_seconds"]["median"] for r in rows],
                      "k-.", marker="+", label="memcmp of the state")
            limits = next((r["limits"] for r in rows if "write_fsync_bytes_per_s"
                           in r["limits"]), None)
            if limits and metric == "durable":
                # The changed chunks alone, written at the disk's measured write+fsync rate.
                rate = limits["write_fsync_bytes_per_s"]["median"]
                changed = [(p, r["peers"]["arraysnap"]["bytes_written"]["median"] / rate)
                           for p, r in zip(positions, rows, strict=True)
                           if r["fraction"] > 0 and "arraysnap" in r["peers"]]
                axis.plot([p for p, _ in changed], [t for _, t in changed], "k:",
                          label="arraysnap's bytes written, at disk write+fsync rate")
            axis.set_xticks(positions, [f"{r['fraction']:.0%}" for r in rows])
            axis.set_yscale("log")
            axis.set_xlabel("fraction of chunks changed between checkpoints")
            axis.grid(True, which="both", alpha=0.3)
            axis.set_title({"pause": "pause (caller blocked)",
                            "durable": "time until durable"}[metric])
        axes[0].set_ylabel("seconds (median, bars: min–max)")
        shared_legend(figure, axes)
        figure.suptitle(f"Checkpoint cost against changed fraction ({fmt_bytes(size)} smooth "
                        "field)")
        figure.savefig(out / "scaling_fraction.png", dpi=110)
        plt.close(figure)
        written.append("scaling_fraction.png")
    return written


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 1 repeat, no os.sync(): checks the harness and its "
                             "outputs, asserts no timing")
    parser.add_argument("--sizes", type=lambda text: [parse_size(t) for t in text.split(",")],
                        default=None, help="state sizes, e.g. 256M,1G,4G (default 256M,1G)")
    parser.add_argument("--large", action="store_true", help="add 4 GiB to the sizes")
    parser.add_argument("--peers", default=",".join(PEER_NAMES),
                        help=f"comma-separated subset of {', '.join(PEER_NAMES)}")
    parser.add_argument("--only", default=None,
                        help="run only scenarios whose key contains this text (or one of "
                             "several, comma-separated)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where peers.json, peers.md and the PNGs go "
                             "(default benchmarks/results/)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the stores go (a temporary folder inside it; default --out)")
    parser.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                        help="re-make peers.md and the plots in --out from a peers.json")
    parser.add_argument("--remeasure-rss", type=Path, default=None, metavar="JSON",
                        help="measure peak RSS again for the scenarios of a peers.json that "
                             "have it (with --only: those matching), and rewrite it in --out")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [4 * MIB] if args.quick else [256 * MIB, GIB]
    if args.large and 4 * GIB not in args.sizes:
        args.sizes.append(4 * GIB)
    args.sizes = sorted(set(args.sizes))
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEER_NAMES)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return args


def disk_needed(scenario: Scenario, checkpoints: int) -> int:
    """Rough space a scenario holds at its peak: kept copies of every peer at once."""
    size = scenario.size_bytes
    kept_copies = 2 * (RESTORE_BACK + 1) + checkpoints  # np.save, zarr (pruned), icechunk
    mine = 2 + checkpoints * max(scenario.fraction, 0.01)  # baseline, base, changed chunks
    return int(size * (kept_copies + 1 + mine) * 1.1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return 0
    if args.report_only:
        return report_only(args.report_only, args.out)
    if args.remeasure_rss:
        return remeasure_rss(args.remeasure_rss, args.out, args.only, args.dir)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    store_parent = args.dir or out
    store_parent.mkdir(parents=True, exist_ok=True)
    filesystem = filesystem_of(store_parent)
    if filesystem.fstype in ("tmpfs", "ramfs") and not args.quick:
        raise SystemExit(f"{store_parent} is on {filesystem.fstype}: its fsync is free; "
                         "pass --dir on a real disk")
    store_dir = Path(tempfile.mkdtemp(prefix="bench-peers-", suffix=".tmp", dir=store_parent))
    names, notes = available_peers(args.peers)
    settings = Settings(quick=args.quick, checkpoints=CHECKPOINTS,
                        restore_repeats=1 if args.quick else 3,
                        limit_repeats=1 if args.quick else 3, settle=not args.quick,
                        peers=names, store_dir=store_dir)
    scenarios = make_scenarios(args.sizes, 20 if args.quick else 1000)
    if args.only:
        wanted = args.only.split(",")
        scenarios = [s for s in scenarios if any(text in s.key for text in wanted)]
    package_dir = Path(arraysnap.__file__).resolve().parent
    machine = machine_info(store_dir)
    machine["versions"].update(package_versions(["h5py", "hdf5plugin", "icechunk", "blake3",
                                                 "matplotlib", "psutil"]))
    machine["arraysnap_source"] = source_identity(package_dir)
    machine["arraysnap_path"] = str(package_dir)
    machine["memory_note"] = ("fresh memory is lazily backed here: buffers are touched and "
                              "the first two checkpoints of every scenario are untimed")
    commit = os.environ.get("ARRAYSNAP_BENCH_COMMIT") or _git_commit(package_dir)
    print(f"arraysnap peers benchmark: peers {', '.join(names)}; "
          f"{len(scenarios)} scenarios; arraysnap {machine['arraysnap_source']} "
          f"(commit {commit}); stores in {store_dir}", flush=True)
    for name, note in notes.items():
        print(f"  {name}: {note}", flush=True)
    order_rng = np.random.default_rng(SEED + 7)
    problems: list[str] = []
    skipped: list[str] = []
    results: list[dict[str, Any]] = []
    started = now()

    def make_document(partial: bool = False) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "partial": partial,
            "config": {"quick": args.quick, "sizes": args.sizes, "checkpoints": CHECKPOINTS,
                       "untimed_checkpoints": UNTIMED_CHECKPOINTS,
                       "restore_back": RESTORE_BACK,
                       "restore_repeats": settings.restore_repeats,
                       "limit_repeats": settings.limit_repeats, "chunk_bytes": CHUNK_BYTES,
                       "codec": f"zstd level {ZSTD_LEVEL}", "settle": settings.settle,
                       "seed": SEED, "argv": sys.argv[1:],
                       "scenarios_planned": [s.key for s in scenarios]},
            "machine": machine, "commit": commit,
            "peers_run": names, "peer_notes": notes,
            "scenarios": results, "limit_fractions": limit_fractions(results),
            "skipped": skipped, "problems": problems, "seconds": now() - started,
            "plots": [],
        }

    try:
        for scenario in scenarios:
            free = shutil.disk_usage(store_dir).free
            if not args.quick and free < disk_needed(scenario, settings.checkpoints):
                skipped.append(f"{scenario.label}: needs about "
                               f"{fmt_bytes(disk_needed(scenario, settings.checkpoints))} of "
                               f"disk, {fmt_bytes(free)} free")
                print(f"skipped: {skipped[-1]}", flush=True)
                continue
            entry = run_scenario(scenario, settings, order_rng, problems)
            if scenario.rss and not (args.quick and scenario.n_arrays > 1):
                rss = measure_rss(scenario, settings)
                for name, figures in rss.items():
                    entry["peers"][name]["rss"] = figures
            add_ratios(entry)
            results.append(entry)
            # Written after every scenario, so that a run cut short still leaves its results.
            write_outputs(make_document(partial=True), out)
            print(f"  ({entry['seconds']:.0f} s; {now() - started:.0f} s so far)", flush=True)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    source_after = source_identity(package_dir)
    if source_after != machine["arraysnap_source"]:
        problems.append(f"arraysnap's source changed during the run "
                        f"({machine['arraysnap_source']} -> {source_after})")
    document = make_document()
    document["plots"] = make_plots(document, out)
    write_outputs(document, out)
    print(f"\nwrote {out / 'peers.json'}, {out / 'peers.md'}"
          + "".join(f", {out / p}" for p in document["plots"]), flush=True)
    print(f"total {document['seconds']:.0f} s", flush=True)
    for problem in problems:
        print(f"PROBLEM: {problem}", flush=True)
    return 2 if problems else 0


def write_outputs(document: dict[str, Any], out: Path) -> None:
    # Strict JSON (no NaN): any JSON reader can load it, and no pickle is ever involved.
    text = json.dumps(document, indent=1, default=_json_default, allow_nan=False)
    json.loads(text)  # the CI run relies on this output parsing
    temp = out / "peers.json.tmp"
    temp.write_text(text)
    os.replace(temp, out / "peers.json")
    (out / "peers.md").write_text(markdown_report(document))


def report_only(path: Path, out: Path) -> int:
    """Re-make peers.md and the plots from a peers.json (no pickle: plain JSON)."""
    document = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if document.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a {SCHEMA} document")
    for entry in document["scenarios"]:
        add_ratios(entry)
    document["limit_fractions"] = limit_fractions(document["scenarios"])
    document["plots"] = make_plots(document, out)
    write_outputs(document, out)
    print(f"wrote {out / 'peers.md'}" + "".join(f", {out / p}" for p in document["plots"]))
    return 0


def remeasure_rss(path: Path, out: Path, only: str | None, parent: Path | None) -> int:
    """Peak RSS again, in fresh subprocesses, for some scenarios of an existing run.

    The RSS figures time nothing, so they can be taken apart from the timed run; the document
    lists which scenarios were re-measured.
    """
    document = json.loads(path.read_text())
    if document.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a {SCHEMA} document")
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(tempfile.mkdtemp(prefix="bench-rss-", suffix=".tmp", dir=parent or out))
    settings = Settings(quick=document["config"]["quick"], checkpoints=CHECKPOINTS,
                        restore_repeats=0, limit_repeats=0, settle=False,
                        peers=document["peers_run"], store_dir=store_dir)
    fields = Scenario.__dataclass_fields__
    try:
        for entry in document["scenarios"]:
            if not entry["rss"] or (only and not any(t in entry["key"] for t in only.split(","))):
                continue
            print(f"== peak RSS again: {entry['label']}", flush=True)
            rss = measure_rss(Scenario(**{k: entry[k] for k in fields}), settings)
            for name, figures in rss.items():
                entry["peers"][name]["rss"] = figures
            document.setdefault("rss_remeasured", []).append(entry["key"])
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    (out / "peers.json").write_text(json.dumps(document, default=_json_default))
    return report_only(out / "peers.json", out)


def _git_commit(package_dir: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


if __name__ == "__main__":
    if not sys.platform.startswith("linux"):
        sys.exit("bench_peers.py reads /proc and uses posix_fadvise: it runs on Linux only")
    sys.exit(main())
