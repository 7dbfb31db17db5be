"""Checkpoints into object storage: arraysnap against icechunk and zarr on the same S3 server.

A state of 256 MiB (one float64 array, 1 MiB chunks, zstd level 1) is checkpointed with
0 %, 1 % and 100 % of its chunks changed, into a real S3-compatible server on 127.0.0.1
(moto's server mode, ``arraysnap.testing.s3server``), every request through a counting
proxy (``arraysnap.testing.faultproxy``) that charges each tool for the requests it made
and the bytes it uploaded. Per checkpoint, medians over the checkpoints of a series:

- arraysnap, ``open(url)``: capture until durable in the store (``result()``);
- arraysnap, ``open(url, local=...)``: until durable locally (``result()``) and remotely
  (``wait(remote=True)``);
- icechunk: the whole array written in a writable session and committed (a new version);
- zarr: the whole array written through zarr's ``ObjectStore`` (obstore).

Each (tool, fraction) series gets a fresh server, so none pays for another's objects. The
targets (issue 14), at 1 %: bytes uploaded <= 1.1x the encoded changed chunks + 64 KiB
(the changed chunks encoded here, with numcodecs' zstd, independently of arraysnap);
requests <= the changed chunks + 4; time to durable remotely >= 10x faster than
icechunk's commit.

    python benchmarks/bench_remote.py [--size-mib 256] [--checkpoints 5] [--json out.json]

Needs the test extra (moto, obstore) and icechunk (``pip install icechunk``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import MIB, fmt_bytes, machine_info, render_table

import arraysnap
from arraysnap.testing.faultproxy import FaultProxy
from arraysnap.testing.s3server import S3Server

CHUNK = MIB
FRACTIONS = (0.0, 0.01, 1.0)
TOOLS = ("arraysnap", "arraysnap local=", "icechunk", "zarr")
BUCKET = "bench-remote"


def make_state(size_mib: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish floats (compressible, as simulation fields are), 8192 per row."""
    rows = size_mib * MIB // (8 * 8192)
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, 8192)[None, :] * np.arange(1, rows + 1)[:, None]
    return (base + rng.normal(0, 1e-3, (rows, 8192))).astype(np.float64)


def change(state: np.ndarray, fraction: float, round_: int) -> list[int]:
    """Change `fraction` of the chunks (1 MiB = 16 rows each) in place; their indices."""
    per_chunk = CHUNK // (8 * state.shape[1])
    chunks = state.shape[0] // per_chunk
    count = 0 if fraction == 0 else max(1, round(chunks * fraction))
    picked = np.random.default_rng(round_).choice(chunks, count, replace=False)
    for chunk in picked:
        state[chunk * per_chunk + round_ % per_chunk, :] += 1e-3 * (round_ + 1)
    return sorted(int(c) for c in picked)


def encoded_bytes(state: np.ndarray, chunks: list[int]) -> int:
    """The changed chunks encoded with zstd level 1 (numcodecs), as a store would hold them."""
    from numcodecs import Zstd

    codec = Zstd(level=1)
    per_chunk = CHUNK // (8 * state.shape[1])
    return sum(len(codec.encode(np.ascontiguousarray(
        state[c * per_chunk:(c + 1) * per_chunk]))) for c in chunks)


class Counted:
    """A fresh S3 server behind a counting proxy."""

    def __enter__(self) -> Counted:
        self.server = S3Server().start()
        self.proxy = FaultProxy(self.server.endpoint).start()
        self.options = {**self.server.storage_options, "endpoint": self.proxy.endpoint}
        self.prefix = uuid.uuid4().hex
        self.url = self.server.url(BUCKET, f"{self.prefix}/run.snap")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.stop()
        self.server.stop()


def run_arraysnap(state: np.ndarray, fraction: float, checkpoints: int, tiered: bool,
                  tmp: Path) -> list[dict[str, float]]:
    rows = []
    with Counted() as where:
        kwargs: dict[str, Any] = {"local": tmp / f"tier-{uuid.uuid4().hex}"} if tiered else {
            "baseline_dir": tmp / f"base-{uuid.uuid4().hex}"}
        with arraysnap.open(where.url, storage_options=where.options, chunk_bytes=CHUNK,
                            track_writes=False, **kwargs) as snap:
            snap.capture({"u": state}, step=0).result()
            snap.wait(remote=True)
            for round_ in range(1, checkpoints + 1):
                changed = change(state, fraction, round_)
                requests, sent = where.proxy.tally()
                start = time.perf_counter()
                snap.capture({"u": state}, step=round_).result()
                local = time.perf_counter() - start
                snap.wait(remote=True)
                remote = time.perf_counter() - start
                after_requests, after_sent = where.proxy.tally()
                rows.append({"local_s": local if tiered else float("nan"), "remote_s": remote,
                             "requests": after_requests - requests, "bytes": after_sent - sent,
                             "changed": len(changed),
                             "encoded": encoded_bytes(state, changed)})
    return rows


def whole_writes(where: Counted, state: np.ndarray, fraction: float, checkpoints: int,
                 checkpoint: Callable[[int], None]) -> list[dict[str, float]]:
    """A peer's series: change `fraction` of the state, `checkpoint(round)` it whole (durable
    when it returns), and count its time, requests and uploaded bytes."""
    rows = []
    for round_ in range(1, checkpoints + 1):
        changed = change(state, fraction, round_)
        requests, sent = where.proxy.tally()
        start = time.perf_counter()
        checkpoint(round_)
        elapsed = time.perf_counter() - start
        after_requests, after_sent = where.proxy.tally()
        rows.append({"local_s": float("nan"), "remote_s": elapsed,
                     "requests": after_requests - requests, "bytes": after_sent - sent,
                     "changed": len(changed), "encoded": float("nan")})
    return rows


def run_icechunk(state: np.ndarray, fraction: float, checkpoints: int) -> list[dict[str, float]]:
    import icechunk
    import zarr
    from zarr.codecs import ZstdCodec

    icechunk.set_logs_filter("error")
    with Counted() as where:
        storage = icechunk.s3_storage(
            bucket=BUCKET, prefix=f"{where.prefix}/icechunk", region="us-east-1",
            endpoint_url=where.proxy.endpoint, allow_http=True, access_key_id="testing",
            secret_access_key="testing", force_path_style=True)
        repo = icechunk.Repository.create(storage)
        session = repo.writable_session("main")
        group = zarr.open_group(session.store, mode="w")
        group.create_array("u", shape=state.shape, dtype=state.dtype,
                           chunks=(CHUNK // (8 * state.shape[1]), state.shape[1]),
                           compressors=ZstdCodec(level=1))
        group["u"][...] = state
        session.commit("step 0")

        def commit(round_: int) -> None:
            session = repo.writable_session("main")
            zarr.open_group(session.store, mode="r+")["u"][...] = state
            session.commit(f"step {round_}")

        return whole_writes(where, state, fraction, checkpoints, commit)


def run_zarr(state: np.ndarray, fraction: float, checkpoints: int) -> list[dict[str, float]]:
    import zarr
    from obstore.store import S3Store
    from zarr.codecs import ZstdCodec
    from zarr.storage import ObjectStore

    with Counted() as where:
        store = ObjectStore(S3Store(BUCKET, prefix=f"{where.prefix}/zarr",
                                    endpoint=where.proxy.endpoint, region="us-east-1",
                                    access_key_id="testing", secret_access_key="testing",
                                    client_options={"allow_http": True}))
        array = zarr.create_array(store, shape=state.shape, dtype=state.dtype,
                                  chunks=(CHUNK // (8 * state.shape[1]), state.shape[1]),
                                  compressors=ZstdCodec(level=1))
        array[...] = state

        def write(round_: int) -> None:
            array[...] = state

        return whole_writes(where, state, fraction, checkpoints, write)


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    tools = args.tools.split(",")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        machine = machine_info(Path(tmp))
        for fraction in fractions:
            for tool in tools:  # interleaved: every tool at one fraction, then the next
                state = make_state(args.size_mib)
                if tool == "arraysnap":
                    rows = run_arraysnap(state, fraction, args.checkpoints, False, Path(tmp))
                elif tool == "arraysnap local=":
                    rows = run_arraysnap(state, fraction, args.checkpoints, True, Path(tmp))
                elif tool == "icechunk":
                    rows = run_icechunk(state, fraction, args.checkpoints)
                elif tool == "zarr":
                    rows = run_zarr(state, fraction, args.checkpoints)
                else:
                    raise SystemExit(f"unknown tool {tool!r}")
                results.setdefault(f"{fraction:g}", {})[tool] = rows
                print(f"{fraction:>5.0%} {tool:<17} remote {median(rows, 'remote_s') * 1e3:9.1f} ms"
                      f"  requests {median(rows, 'requests'):7.0f}  "
                      f"bytes {fmt_bytes(median(rows, 'bytes'))}", file=sys.stderr)
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
          f"{machine['ram_bytes'] / 2**30:.1f} GiB, Linux {machine['kernel']}, "
          f"Python {machine['python']}; "
          f"state {args.size_mib} MiB, 1 MiB chunks, zstd 1; medians of {args.checkpoints} "
          "checkpoints")
    header = ["changed", "tool", "durable locally", "durable remotely", "requests",
              "uploaded", "vs icechunk"]
    table = []
    for fraction, by_tool in results.items():
        ice = by_tool.get("icechunk")
        for tool, rows in by_tool.items():
            remote = median(rows, "remote_s")
            local = median(rows, "local_s")
            ratio = (median(ice, "remote_s") / remote) if ice else float("nan")
            table.append([f"{float(fraction):.0%}", tool,
                          "-" if local != local else f"{local * 1e3:.1f} ms",
                          f"{remote * 1e3:.1f} ms", f"{median(rows, 'requests'):.0f}",
                          fmt_bytes(median(rows, "bytes")),
                          "-" if tool == "icechunk" or ratio != ratio else f"{ratio:.1f}x faster"])
    print(render_table(header, table))
    one = results.get("0.01", {})
    verdicts = []
    for tool in ("arraysnap", "arraysnap local="):
        rows = one.get(tool)
        if not rows:
            continue
        byte_limit = max(1.1 * row["encoded"] + 64 * 1024 - row["bytes"] for row in rows)
        request_limit = max(row["changed"] + 4 - row["requests"] for row in rows)
        worst_bytes = max(row["bytes"] / (1.1 * row["encoded"] + 64 * 1024) for row in rows)
        worst_requests = max(row["requests"] - row["changed"] for row in rows)
        verdicts.append(f"{tool} at 1 %: bytes uploaded <= 1.1x encoded changed + 64 KiB: "
                        f"{'met' if byte_limit >= 0 else 'NOT met'} (worst {worst_bytes:.2f} "
                        f"of the limit); requests <= changed + 4: "
                        f"{'met' if request_limit >= 0 else 'NOT met'} (worst changed + "
                        f"{worst_requests:.0f})")
        if one.get("icechunk"):
            speed = median(one["icechunk"], "remote_s") / median(rows, "remote_s")
            verdicts.append(f"{tool} at 1 %: durable remotely {speed:.1f}x faster than "
                            f"icechunk's commit (target >= 10x): "
                            f"{'met' if speed >= 10 else 'NOT met'}")
    print("\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
