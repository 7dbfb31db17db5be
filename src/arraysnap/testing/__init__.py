"""Tools to test arraysnap and what is built on it: deterministic workloads, one fault plan
for a whole store, child processes to kill, damage helpers and the torture.

Installed with the library (as ``zarr.testing`` is with zarr), never imported by it.

>>> import errno, tempfile, arraysnap
>>> from arraysnap.testing import SMALL_WORKLOAD, FaultPlan
>>> plan = FaultPlan(tempfile.mkdtemp() + "/run.snap")
>>> with arraysnap.open(plan.storage, chunk_bytes=4096, _baseline_ops=plan.baseline_ops,
...                     _retry_delays=()) as snap:
...     _ = SMALL_WORKLOAD.capture(snap, 0).result()
...     full = plan.fail("put_if_absent", "chunks", errno.ENOSPC, times=None)
...     _ = SMALL_WORKLOAD.capture(snap, 1)
...     try:
...         snap.wait()
...     except arraysnap.StoreWriteError as err:
...         print("failed:", err.errno == errno.ENOSPC, len(full.errors) > 0)
...     plan.remove(full)  # the disk has room again: the next capture stores every change
...     _ = SMALL_WORKLOAD.capture(snap, 1).result()
...     SMALL_WORKLOAD.difference(snap.restore(), 1) is None
failed: True True
True
"""

from arraysnap.testing._damage import (
    BASELINE_DAMAGE,
    CHUNK_DAMAGE,
    baseline_extent,
    baseline_files,
    baseline_leased,
    chunk_file,
    chunk_ranges,
    chunk_references,
    damage_baselines,
    damage_object,
    damaged_chunks,
    flip_bit,
    flip_bits,
    leftover_temporaries,
    manifest_files,
    object_intact,
    read_marker,
    store_codec,
    store_files,
    truncate,
    write_marker,
)
from arraysnap.testing._faults import (
    Call,
    FaultPlan,
    FaultyOps,
    FaultyStorage,
    Gate,
    Rule,
    key_area,
    path_area,
)
from arraysnap.testing._processes import child_command, committed_reports
from arraysnap.testing._tally import Failure, Tally
from arraysnap.testing._workload import (
    MANY_WORKLOAD,
    SMALL_WORKLOAD,
    TORTURE_WORKLOAD,
    Workload,
    array_difference,
    capture_step,
    restored_difference,
    workload_arrays,
    workload_rng,
    workload_state,
)

__all__ = [
    "BASELINE_DAMAGE", "CHUNK_DAMAGE", "MANY_WORKLOAD", "SMALL_WORKLOAD", "TORTURE_WORKLOAD",
    "Call", "Failure",
    "FaultPlan", "FaultyOps", "FaultyStorage", "Gate", "Rule", "Tally", "Workload",
    "array_difference", "capture_step", "child_command", "chunk_file", "chunk_ranges",
    "chunk_references",
    "committed_reports", "damage_baselines", "damage_object", "damaged_chunks", "flip_bit",
    "flip_bits",
    "key_area", "leftover_temporaries", "manifest_files", "baseline_extent", "baseline_files",
    "baseline_leased", "object_intact", "path_area", "read_marker", "restored_difference",
    "store_codec", "store_files",
    "truncate", "workload_arrays", "workload_rng", "workload_state", "write_marker",
]
