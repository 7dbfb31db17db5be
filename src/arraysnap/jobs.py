"""The engine's interface (see ``pipeline.py``): what a capture hands it (``PersistJob``, one
``ArrayDelta`` an array), which its stages fill in as the job goes through them, and the
``Listener`` it tells what happened.

>>> import numpy as np
>>> from arraysnap.layout import plan_layout
>>> layout = plan_layout((4,), np.dtype("f8"), "C", 1 << 20)
>>> ArrayDelta("u", layout, np.zeros(32, np.uint8), np.arange(1), fresh=True).fresh
True
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import ChunkLayout
from .manifest import ArrayEntry, Manifest
from .packs import Location
from .results import CaptureInfo, CaptureStat

__all__ = ["ArrayDelta", "Listener", "PersistJob"]


@dataclass(slots=True)
class ArrayDelta:
    """One array of a capture: its layout, its baseline buffer and the chunks that changed."""

    name: str
    layout: ChunkLayout
    baseline: np.ndarray
    changed: np.ndarray
    fresh: bool
    dims: tuple[str, ...] | None = None


@dataclass(slots=True)
class PersistJob:
    """One capture on its way to a commit: the reader, the writers and the committer fill
    in the fields below ``chunks_read``."""

    seq: int
    step: int | None
    wall_time: float
    arrays: list[ArrayDelta]
    state: dict[str, Any] | None
    rng: Any
    provenance: dict[str, Any]
    pause_seconds: float
    queue_seconds: float
    started: float
    replay_position: int
    capture: CaptureInfo
    chunks_read: threading.Event = field(default_factory=threading.Event)
    # Filled in by the reader for the writer.
    entries: dict[str, ArrayEntry] = field(default_factory=dict)
    changed: dict[str, np.ndarray] = field(default_factory=dict)
    writes: list[Future[int]] = field(default_factory=list)
    pinned: list[bytes] = field(default_factory=list)
    # Format 3: where each chunk packed for this job is, by digest (None: an object of its
    # own, or not yet known while a pool thread packs it).
    located: dict[bytes, Location | None] = field(default_factory=dict)
    error: BaseException | None = None
    chunks_changed: int = 0
    chunks_deduplicated: int = 0
    encode_seconds: float = 0.0
    read_done: float = 0.0
    retries: int = 0


class Listener(ABC):
    """What the engine tells its store, and asks it; called on the committer's thread.

    >>> class Quiet(Listener):
    ...     def committed(self, job, manifest, manifest_bytes, stat): pass
    ...     def failed(self, job, error, stat): pass
    >>> Quiet().free_space(), Quiet().before_commit()
    (0, None)
    """

    @abstractmethod
    def committed(self, job: PersistJob, manifest: Manifest, manifest_bytes: int,
                  stat: CaptureStat) -> None:
        """Snapshot `job.seq` is durable: its manifest is written and synced."""

    @abstractmethod
    def failed(self, job: PersistJob, error: BaseException, stat: CaptureStat) -> None:
        """Snapshot `job.seq` will never commit; its changes go into the next job."""

    def before_commit(self) -> None:  # noqa: B027 - most stores have nothing to add
        """Write what the manifest will point to (the replay log's records); the barrier
        that follows makes it durable with the chunk objects."""

    def free_space(self) -> int:
        """The disk is full: free what the store's policy allows; return the bytes freed."""
        return 0
