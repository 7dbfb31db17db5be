"""A fault-injecting HTTP proxy between arraysnap and an object store's server, for tests.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every request to its upstream (an
:class:`~arraysnap.testing.s3server.S3Server`, say) as it came. A rule made with
:meth:`FaultProxy.fail` changes what happens to the requests it matches (a method and a
regular expression searched in the path):

- ``"error"``: answer 503 (Slow Down) without forwarding;
- ``"drop"``: close the connection without forwarding or answering;
- ``"lose_reply"``: forward, let the upstream apply the request, then close the
  connection without answering: the write landed, its reply was lost (icechunk#2099);
- ``"slow"``: wait ``delay`` seconds, then forward.

A rule applies to its next ``times`` matches (None: all of them), after the first
``skip``, and counts them in ``hits``. The proxy counts every request it forwards and the
bytes of their bodies (:meth:`FaultProxy.tally`): what a benchmark charges a client for.
The client's own retries then meet what the fault left behind, as they would against a
real store.

>>> from arraysnap.storage import ObjectStorage
>>> from arraysnap.testing.s3server import S3Server
>>> with S3Server() as server, FaultProxy(server.endpoint) as proxy:
...     url = server.url("bucket", "run.snap")
...     storage = ObjectStorage(url, storage_options={**server.storage_options,
...                                                   "endpoint": proxy.endpoint})
...     rule = proxy.fail("PUT", "/chunks/", "lose_reply")
...     storage.put_if_absent("chunks/ab/cd", b"x"), rule.hits, storage.get("chunks/ab/cd")
(False, 1, b'x')
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["FAULT_KINDS", "FaultProxy", "ProxyRule"]

FAULT_KINDS = ("error", "drop", "lose_reply", "slow")
# Headers that belong to one hop of a connection, not to the request or the response.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                          "te", "trailer", "upgrade"})


@dataclass
class ProxyRule:
    """What happens to the requests a :class:`FaultProxy` rule matches."""

    method: str
    pattern: re.Pattern[str]
    kind: str
    times: int | None
    delay: float
    skip: int = 0
    hits: int = 0
    skipped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, method: str, path: str) -> bool:
        """Whether this request is one of the rule's (and count it)."""
        if method != self.method or not self.pattern.search(path):
            return False
        with self._lock:
            if self.skipped < self.skip:
                self.skipped += 1
                return False
            if self.times is not None and self.hits >= self.times:
                return False
            self.hits += 1
            return True


class FaultProxy:
    """An HTTP proxy with faults to `upstream` (``http://host:port``); see the module doc."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.rules: list[ProxyRule] = []
        self._lock = threading.Lock()
        self._requests = self._bytes = 0  # see tally()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("start the proxy first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def tally(self) -> tuple[int, int]:
        """Requests received so far, and the bytes of their bodies (uploads)."""
        with self._lock:
            return self._requests, self._bytes

    def fail(self, method: str, path: str, kind: str, *, times: int | None = 1,
             delay: float = 1.0, skip: int = 0) -> ProxyRule:
        """Apply `kind` to the next `times` requests of `method` whose path matches `path`,
        after letting the first `skip` of them pass."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}: one of {', '.join(FAULT_KINDS)}")
        rule = ProxyRule(method.upper(), re.compile(path), kind, times, delay, skip)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: requests pass unchanged again."""
        with self._lock:
            self.rules.clear()

    def _rule_for(self, method: str, path: str) -> ProxyRule | None:
        with self._lock:
            rules = list(self.rules)
        for rule in rules:
            if rule.take(method, path):
                return rule
        return None

    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # quiet: the tests' output is their own

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy._requests += 1
                    proxy._bytes += len(body)
                rule = proxy._rule_for(self.command, self.path)
                kind = rule.kind if rule is not None else None
                if kind == "error":
                    self._answer(503, [("Content-Length", "0")], b"")
                    return
                if kind == "drop":
                    self.close_connection = True
                    return
                if kind == "slow" and rule is not None:
                    time.sleep(rule.delay)
                status, headers, reply = proxy._forward(self.command, self.path,
                                                        self.headers.items(), body)
                if kind == "lose_reply":
                    self.close_connection = True  # applied upstream; the reply never comes
                    return
                self._answer(status, headers, reply)

            def _answer(self, status: int, headers: list[tuple[str, str]],
                        body: bytes) -> None:
                self.send_response_only(status)
                # A HEAD's length is the object's, not that of its (empty) body.
                length = None if self.command == "HEAD" else str(len(body))
                for name, value in headers:
                    lowered = name.lower()
                    if lowered not in _HOP_HEADERS and (lowered != "content-length"
                                                        or length is None):
                        self.send_header(name, value)
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="arraysnap-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
