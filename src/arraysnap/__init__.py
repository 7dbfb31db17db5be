"""arraysnap: incremental, crash-safe checkpoints for long-running NumPy computations.

>>> import arraysnap, numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/run.snap"
>>> with arraysnap.open(path) as snap:
...     _ = snap.capture({"u": np.arange(4.0)}, step=1, state={"t": 0.1})
>>> with arraysnap.open(path) as snap:
...     r = snap.restore()
>>> r.step, r.state["t"], r.arrays["u"].tolist()
(1, 0.1, [0.0, 1.0, 2.0, 3.0])
"""

from __future__ import annotations

from ._store.copying import copy
from ._version import __version__
from .errors import (
    ArraysnapError,
    CorruptSnapshotError,
    FormatVersionError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreLockedError,
    StoreWriteError,
)
from .policies import every, young_daly
from .restored import RestoredArrays
from .results import (
    ArrayInfo,
    CaptureInfo,
    CaptureStat,
    CaptureStats,
    CopyReport,
    Problem,
    PruneReport,
    Restored,
    SnapshotInfo,
    VerifyReport,
)
from .store import FORMAT_VERSION, ArraysnapWarning, Store, open, upgrade
from .zarr_view import open_zarr

__all__ = [
    "FORMAT_VERSION",
    "ArrayInfo",
    "ArraysnapError",
    "ArraysnapWarning",
    "CaptureInfo",
    "CaptureStat",
    "CaptureStats",
    "CopyReport",
    "CorruptSnapshotError",
    "FormatVersionError",
    "Problem",
    "PruneReport",
    "ReadOnlyStoreError",
    "Restored",
    "RestoredArrays",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "Store",
    "StoreLockedError",
    "StoreWriteError",
    "VerifyReport",
    "__version__",
    "copy",
    "every",
    "open",
    "upgrade",
    "open_zarr",
    "young_daly",
]
