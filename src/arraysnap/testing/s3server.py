"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server mode.

:class:`S3Server` starts ``python -m moto.server`` in a process of its own on a free port
(moto answers conditional writes: ``If-None-Match: *`` and ``If-Match``), makes buckets,
and stops the process at ``stop()`` or at the end of a ``with`` block. Nothing is mocked
inside arraysnap: requests go over HTTP to the server, as to any S3 endpoint.

It needs ``moto[server]`` (in the ``test`` extra).

>>> from arraysnap.storage import ObjectStorage
>>> with S3Server() as server:
...     storage = ObjectStorage(server.url("bucket", "run.snap"),
...                             storage_options=server.storage_options)
...     storage.put_if_absent("chunks/ab/cd", b"x"), storage.get("chunks/ab/cd")
(True, b'x')
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

__all__ = ["S3Server"]

_START_SECONDS = 60.0  # a cold start imports flask, boto and moto's services


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """moto's S3 server in a child process; see the module doc.

    ``storage_options`` are the settings :class:`arraysnap.storage.ObjectStorage` (and
    obstore) need to reach it: its endpoint over plain HTTP, a region and moto's dummy
    credentials. A ``S3Server`` is started by ``start()`` or ``with``.
    """

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._buckets: set[str] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "region": "us-east-1", "access_key_id": "testing",
                "secret_access_key": "testing", "allow_http": True}

    def url(self, bucket: str, prefix: str = "") -> str:
        """``s3://bucket/prefix``, the bucket made first if this server has not yet."""
        if bucket not in self._buckets:
            self._request("PUT", f"/{bucket}")
            self._buckets.add(bucket)
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def start(self) -> S3Server:
        if self._process is not None:
            return self
        self.port = _free_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + _START_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto's server exited at start (code "
                                   f"{self._process.returncode}): is moto[server] installed?")
            try:
                self._request("GET", "/")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server did not answer on port {self.port} "
                                       f"within {_START_SECONDS:g} s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """End the server process (what it held is gone with it)."""
        process, self._process = self._process, None
        self._buckets.clear()
        if process is None:
            return
        process.kill()
        process.wait()

    def _request(self, method: str, path: str) -> None:
        request = urllib.request.Request(self.endpoint + path, method=method)
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
