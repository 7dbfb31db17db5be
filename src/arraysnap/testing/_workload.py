"""Deterministic workloads: the arrays, state and generators of step n are a pure function of n.

So any snapshot of any crashed run can be checked by recomputing what was captured. Two
sizes: :data:`TORTURE_WORKLOAD` (about 4 MiB, for 64 KiB chunks) and :data:`SMALL_WORKLOAD`
(about 400 KiB, for the test suite's 4 KiB chunks). Both change a few rows of "u" every step,
the shape of "v" every 5 steps, the Fortran-ordered big-endian "f" every 3, and let "w"
come and go.

>>> sorted(SMALL_WORKLOAD.arrays(1))
['f', 'rec', 's', 'u', 'v', 'w']
>>> SMALL_WORKLOAD.state(3) == TORTURE_WORKLOAD.state(3)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import arraysnap

__all__ = ["MANY_WORKLOAD", "SMALL_WORKLOAD", "TORTURE_WORKLOAD", "Workload", "array_difference",
           "capture_step", "restored_difference", "workload_arrays", "workload_rng",
           "workload_state"]

U_PERIOD = 12


@dataclass(frozen=True, slots=True)
class Workload:
    """The shapes of one workload; its methods give step n's arrays, state and generators.

    `u_rows` rows of `u_cols` float64 each (one chunk per row when a row is a chunk); "v" has
    ``v_rows + v_growth * k`` rows of `v_cols`; "f" is `f_shape`; "rec" has `rec_length`
    records (field "b" filled when `rec_b`); "table" (`table_length` values, never changing)
    only if `table_length`; "w" has `w_length` values on steps 1 and 2 modulo 4; and `many`
    small arrays "m00000", ... of 8 values, a tenth of them changing at each step, one in
    nine of them present only on even steps (arrays that share baseline files, come and go).

    >>> w = Workload(u_rows=2, u_cols=8, v_rows=3, v_growth=1, v_cols=2, f_shape=(2, 2),
    ...              rec_length=2, rec_b=False, table_length=0, w_length=3)
    >>> {name: a.shape for name, a in sorted(w.arrays(5).items())}
    {'f': (2, 2), 'rec': (2,), 's': (), 'u': (2, 8), 'v': (4, 2), 'w': (3,)}
    """

    u_rows: int
    u_cols: int
    v_rows: int
    v_growth: int
    v_cols: int
    f_shape: tuple[int, int]
    rec_length: int
    rec_b: bool
    table_length: int
    w_length: int
    many: int = 0

    def arrays(self, step: int) -> dict[str, np.ndarray]:
        """The arrays captured at `step`.

        >>> a, b = TORTURE_WORKLOAD.arrays(7), TORTURE_WORKLOAD.arrays(8)
        >>> int(sum(not np.array_equal(x, y) for x, y in zip(a["u"], b["u"])))
        3
        """
        u = np.empty((self.u_rows, self.u_cols))
        for row in range(self.u_rows):
            version = max(step - (step + 7 * row) % U_PERIOD, -1)
            u[row] = np.random.default_rng([row, version + 1]).standard_normal(self.u_cols)
        rows = self.v_rows + self.v_growth * ((step // 5) % 3)
        v = np.random.default_rng([1000, step // 5]).random((rows, self.v_cols),
                                                             dtype=np.float32)
        f = np.asfortranarray(np.random.default_rng([2000, step // 3])
                              .integers(-9, 9, self.f_shape).astype(">i4"))
        rec = np.zeros(self.rec_length, dtype=[("a", "<i4"), ("b", "<f8")])
        rec["a"] = np.arange(self.rec_length)
        if self.rec_b:
            rec["b"] = np.sqrt(np.arange(self.rec_length))
        arrays = {"u": u, "v": v, "f": f, "rec": rec, "s": np.array(step, dtype=np.int64)}
        if self.table_length:
            arrays["table"] = np.linspace(0.0, 1.0, self.table_length)
        if step % 4 in (1, 2):
            arrays["w"] = np.random.default_rng([3000, step]).random(self.w_length)
        for k in range(self.many):
            if k % 9 == 4 and step % 2:
                continue
            version = (step + k) // 10
            arrays[f"m{k:05d}"] = np.full(8, float(version * 100_003 + k))
        return arrays

    def state(self, step: int) -> dict[str, Any]:
        """The JSON state captured at `step`.

        >>> SMALL_WORKLOAD.state(2)
        {'step': 2, 'tag': 'xx'}
        """
        return {"step": step, "tag": "x" * (step % 5)}

    def rng(self, step: int) -> dict[str, np.random.Generator]:
        """The random generators captured at `step`.

        >>> sorted(SMALL_WORKLOAD.rng(3))
        ['aux', 'main']
        """
        rngs = {"main": np.random.default_rng(step), "aux": np.random.default_rng([step, 99])}
        rngs["main"].random(step % 3)
        return rngs

    def capture(self, snap: arraysnap.Store, step: int) -> arraysnap.CaptureInfo:
        """Capture the workload of `step` (arrays, state and rng) into `snap`.

        >>> import tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/w.snap", chunk_bytes=4096) as snap:
        ...     SMALL_WORKLOAD.capture(snap, 4).result().step
        4
        """
        return snap.capture(self.arrays(step), step=step, state=self.state(step),
                            rng=self.rng(step))

    def difference(self, restored: arraysnap.Restored, step: int | None) -> str | None:
        """How a restored snapshot differs from the workload of `step` (None if it does not).

        >>> import tempfile
        >>> with arraysnap.open(tempfile.mkdtemp() + "/w.snap", chunk_bytes=4096) as snap:
        ...     _ = SMALL_WORKLOAD.capture(snap, 2).result()
        ...     SMALL_WORKLOAD.difference(snap.restore(), 2), SMALL_WORKLOAD.difference(
        ...         snap.restore(), 3)
        (None, 'step 2, expected 3')
        """
        if step is None or restored.step != step:
            return f"step {restored.step}, expected {step}"
        expected = self.arrays(step)
        if sorted(restored.arrays) != sorted(expected):
            return f"arrays {sorted(restored.arrays)}, expected {sorted(expected)}"
        for name, array in expected.items():
            problem = array_difference(restored.arrays[name], array)
            if problem is not None:
                return f"array {name!r} of step {step}: {problem}"
        if restored.state != self.state(step):
            return f"state {restored.state!r}, expected {self.state(step)!r}"
        rngs = self.rng(step)
        if not isinstance(restored.rng, dict) or sorted(restored.rng) != sorted(rngs):
            return f"rng {restored.rng!r}, expected generators {sorted(rngs)}"
        for key, generator in rngs.items():
            if restored.rng[key].bit_generator.state != generator.bit_generator.state:
                return f"rng {key!r} differs"
        return None


def array_difference(actual: np.ndarray, expected: np.ndarray) -> str | None:
    """How `actual` differs from `expected` (dtype with byte order, shape, order, bytes).

    >>> array_difference(np.zeros(2), np.zeros(2)) is None
    True
    >>> array_difference(np.zeros(2, ">f8"), np.zeros(2))
    'dtype >f8, expected <f8'
    """
    if actual.dtype.str != expected.dtype.str or actual.dtype != expected.dtype:
        return f"dtype {actual.dtype.str}, expected {expected.dtype.str}"
    if actual.shape != expected.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    fortran = expected.flags.f_contiguous and not expected.flags.c_contiguous
    if not (actual.flags.f_contiguous if fortran else actual.flags.c_contiguous):
        return f"memory order is not {'F' if fortran else 'C'}"
    if np.ascontiguousarray(actual).tobytes() != np.ascontiguousarray(expected).tobytes():
        return "content differs"
    return None


# "u" has one 64 KiB chunk per row; 2 MiB in all.
TORTURE_WORKLOAD = Workload(u_rows=32, u_cols=(64 << 10) // 8, v_rows=40, v_growth=24,
                            v_cols=4096, f_shape=(300, 256), rec_length=500, rec_b=True,
                            table_length=1 << 17, w_length=9000)
# "u" has one 4 KiB chunk per row: 72 chunks, more than a pack takes (format 3), so that
# its chunks are objects of their own and the other arrays' are packed.
SMALL_WORKLOAD = Workload(u_rows=72, u_cols=512, v_rows=30, v_growth=17, v_cols=100,
                          f_shape=(64, 40), rec_length=50, rec_b=False, table_length=0,
                          w_length=700)
# The small workload and 2,000 small arrays: a table tree, shared baseline files.
MANY_WORKLOAD = Workload(u_rows=72, u_cols=512, v_rows=30, v_growth=17, v_cols=100,
                         f_shape=(64, 40), rec_length=50, rec_b=False, table_length=0,
                         w_length=700, many=2000)


def workload_arrays(step: int, workload: Workload = TORTURE_WORKLOAD) -> dict[str, np.ndarray]:
    """The arrays of `workload` (the torture's by default) at `step`.

    >>> sorted(workload_arrays(1))
    ['f', 'rec', 's', 'table', 'u', 'v', 'w']
    """
    return workload.arrays(step)


def workload_state(step: int, workload: Workload = TORTURE_WORKLOAD) -> dict[str, Any]:
    """The state of `workload` (the torture's by default) at `step`.

    >>> workload_state(1)
    {'step': 1, 'tag': 'x'}
    """
    return workload.state(step)


def workload_rng(step: int, workload: Workload = TORTURE_WORKLOAD
                 ) -> dict[str, np.random.Generator]:
    """The generators of `workload` (the torture's by default) at `step`.

    >>> sorted(workload_rng(1))
    ['aux', 'main']
    """
    return workload.rng(step)


def capture_step(snap: arraysnap.Store, step: int,
                 workload: Workload = TORTURE_WORKLOAD) -> arraysnap.CaptureInfo:
    """Capture `workload` (the torture's by default) of `step` into `snap`.

    >>> import tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/w.snap", chunk_bytes=1 << 16) as snap:
    ...     capture_step(snap, 3).result().step
    3
    """
    return workload.capture(snap, step)


def restored_difference(restored: arraysnap.Restored, step: int | None,
                        workload: Workload = TORTURE_WORKLOAD) -> str | None:
    """How `restored` differs from `workload` (the torture's by default) of `step`.

    >>> import tempfile
    >>> with arraysnap.open(tempfile.mkdtemp() + "/w.snap", chunk_bytes=1 << 16) as snap:
    ...     _ = capture_step(snap, 3).result()
    ...     restored_difference(snap.restore(), 3) is None
    True
    """
    return workload.difference(restored, step)
