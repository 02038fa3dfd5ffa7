"""A Zipkin collector stand-in for tests: Zipkin's v2 JSON API (POST /api/v2/spans), keeping
what it receives and waking waiters on every batch."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Spans = list[dict[str, Any]]


class Collector:
    def __init__(self) -> None:
        self.spans: Spans = []
        self.changed = threading.Condition()

    def add(self, spans: Spans) -> None:
        with self.changed:
            self.spans.extend(spans)
            self.changed.notify_all()

    def wait_for(self, done: Callable[[Spans], bool], timeout: float = 15.0) -> Spans:
        """The spans once `done(spans)` holds (checked again on each batch that arrives)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done(list(self.spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"spans never complete: {self.spans}")
                self.changed.wait(left)
            return list(self.spans)


class _Handler(BaseHTTPRequestHandler):
    collector: Collector

    def do_POST(self) -> None:
        if self.path != "/api/v2/spans":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            spans = json.loads(body)
        except ValueError:
            self.send_error(400)
            return
        if not isinstance(spans, list):
            self.send_error(400)
            return
        self.collector.add(spans)
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(host: str, port: int) -> Iterator[Collector]:
    """A collector on host:port, in a thread, for the `with` block."""
    collector = Collector()
    handler = type("ZipkinHandler", (_Handler,), {"collector": collector})
    server = ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
