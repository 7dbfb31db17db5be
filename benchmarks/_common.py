"""Helpers shared by the arraysnap benchmarks: machine facts, memory sampling, formatting."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


# -- machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_bytes() -> int:
    return meminfo_bytes("MemTotal")


def meminfo_bytes(key: str) -> int:
    """One field of /proc/meminfo, in bytes (0 when absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * KIB
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class Filesystem:
    mount_point: str
    device: str
    fstype: str
    options: str

    def __str__(self) -> str:
        return f"{self.fstype} on {self.device} (mounted at {self.mount_point}, {self.options})"


def filesystem_of(path: Path) -> Filesystem:
    """The mount holding `path`: the longest mount point that prefixes its real path."""
    target = os.path.realpath(path)
    best = Filesystem("/", "?", "?", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        device, mount_point, fstype, options, *_ = line.split()
        # /proc/mounts escapes spaces as \040.
        mount_point = mount_point.replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best.mount_point):
            best = Filesystem(mount_point, device, fstype, options)
    return best


def package_versions(names: list[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def source_identity(package_dir: Path) -> str:
    """The git revision of a package's checkout plus a digest of its files as they are now.

    Taken at the start and the end of a run: if they differ, someone edited the package while
    the benchmark ran, and processes started later measured other code than the first ones.
    """
    digest = hashlib.sha256()
    for path in sorted(package_dir.iterdir()):
        if path.is_file() and path.suffix in (".py", ".pyx", ".so"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        revision = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "no git"
    return f"{revision}, files {digest.hexdigest()[:12]}"


def machine_info(store_dir: Path) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "ram_bytes": total_ram_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "filesystem": str(filesystem_of(store_dir)),
        "store_dir": str(store_dir),
        "versions": package_versions(["arraysnap", "numpy", "zarr", "numcodecs", "blake3"]),
    }


# -- memory sampling -------------------------------------------------------------------------
_RSS_KEYS = (b"RssAnon:", b"RssFile:", b"RssShmem:")


def read_rss(fd: int) -> tuple[int, int, int]:
    """(RssAnon, RssFile, RssShmem) in bytes from an open /proc/self/status descriptor."""
    # pread at offset 0 regenerates the file; keeping the descriptor open makes a sample
    # cost a few microseconds, so the sampler barely competes with the capture for CPU.
    data = os.pread(fd, 8192, 0)
    values = [0, 0, 0]
    for line in data.split(b"\n"):
        for slot, key in enumerate(_RSS_KEYS):
            if line.startswith(key):
                values[slot] = int(line.split()[1]) * KIB
    return values[0], values[1], values[2]


@dataclass(slots=True)
class RssPeak:
    """Resident memory before a measured interval and its peak during it (bytes)."""

    anon_before: int = 0
    file_before: int = 0
    anon_peak: int = 0
    file_peak: int = 0
    samples: int = 0

    @property
    def anon_growth(self) -> int:
        return self.anon_peak - self.anon_before

    @property
    def file_growth(self) -> int:
        return self.file_peak - self.file_before

    def as_dict(self) -> dict[str, int]:
        return {"anon_before": self.anon_before, "anon_peak": self.anon_peak,
                "anon_growth": self.anon_growth, "file_before": self.file_before,
                "file_peak": self.file_peak, "file_growth": self.file_growth,
                "samples": self.samples}


@dataclass
class RssSampler:
    """Samples RssAnon/RssFile every `interval` seconds on a thread, between start and stop.

    >>> with RssSampler() as sampler:
    ...     pass
    >>> sampler.peak.samples >= 2
    True
    """

    interval: float = 0.001
    peak: RssPeak = field(default_factory=RssPeak)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _fd: int = -1

    def __enter__(self) -> RssSampler:
        self._fd = os.open("/proc/self/status", os.O_RDONLY)
        anon, file, _ = read_rss(self._fd)
        self.peak = RssPeak(anon, file, anon, file, 1)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        anon, file, _ = read_rss(self._fd)
        peak = self.peak
        peak.anon_peak = max(peak.anon_peak, anon)
        peak.file_peak = max(peak.file_peak, file)
        peak.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        # One last sample so that an interval shorter than `interval` is still covered.
        self._sample()
        os.close(self._fd)
        self._fd = -1


# -- statistics and formatting --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def fmt_seconds(seconds: float) -> str:
    """Milliseconds with three significant digits (or seconds from 10 s on)."""
    if seconds != seconds:  # NaN
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def fmt_spread(spread: Spread) -> str:
    if spread.n == 0:
        return "-"
    if spread.n == 1:
        return fmt_seconds(spread.median)
    low, high = fmt_seconds(spread.low), fmt_seconds(spread.high)
    return f"{fmt_seconds(spread.median)} ({low} - {high})"


def fmt_bytes(count: float) -> str:
    if count != count:
        return "-"
    if abs(count) >= GIB:
        return f"{count / GIB:.2f} GiB"
    if abs(count) >= MIB:
        return f"{count / MIB:.1f} MiB"
    if abs(count) >= KIB:
        return f"{count / KIB:.1f} KiB"
    return f"{count:.0f} B"


def fmt_ratio(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table whose columns are as wide as their widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under `path`."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def allocated_bytes(path: Path) -> int:
    """Disk space the files under `path` occupy (allocated blocks, so sparse files count less)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def fsync_file(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict_from_page_cache(path: Path) -> None:
    """Drop the (clean) cached pages of every file under `path`, so the next read hits the disk.

    posix_fadvise(DONTNEED) needs no privileges and touches only these files, unlike
    /proc/sys/vm/drop_caches; dirty pages stay, so call os.sync() first.
    """
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def process_write_bytes() -> int:
    """Bytes this process has caused to be written, page-cache writes and mmap dirtying included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def quiesce() -> tuple[int, float]:
    """Write back all dirty page cache; return (dirty bytes before, seconds it took).

    Every timed operation starts from here, so that none pays for the writeback another left
    behind (the baselines' changed pages stay dirty after a capture is durable).
    """
    dirty = meminfo_bytes("Dirty") + meminfo_bytes("Writeback")
    start = now()
    os.sync()
    return dirty, now() - start


def now() -> float:
    return time.perf_counter()
