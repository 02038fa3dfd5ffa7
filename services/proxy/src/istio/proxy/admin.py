"""The admin endpoint (--admin-port): /config_dump, /stats, /clusters, /ready,
/quitquitquit; and the Prometheus endpoint (--stats-port): /stats/prometheus.

A small HTTP/1.1 server on httptools, off the hot path: one response per request, bodies of
requests ignored, keep-alive honoured.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools

from istio.proxy.http import status_line

Answer = tuple[int, str, str]  # (status, content type, body)
# (method, path) -> an answer, or an awaitable one (stats summed across worker processes).
Handler = Callable[[str, str], Answer | Awaitable[Answer]]


class AdminProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        # Answers still being computed, so pipelined requests are answered in order.
        self.pending: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(400, "text/plain", "bad request\n", keep_alive=False)

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        try:
            answer = self.handler(method, path)
        except Exception as error:  # the admin page must answer whatever happens
            answer = _failure(error)
        if self.pending is None and isinstance(answer, tuple):
            self._respond(*answer, keep_alive=keep_alive)
            return
        self.pending = asyncio.get_running_loop().create_task(
            self._answer_later(self.pending, answer, keep_alive)
        )

    async def _answer_later(
        self,
        before: asyncio.Task[None] | None,
        answer: Answer | Awaitable[Answer],
        keep_alive: bool,
    ) -> None:
        if before is not None:
            await before
        if inspect.isawaitable(answer):
            try:
                answer = await answer
            except Exception as error:
                answer = _failure(error)
        assert isinstance(answer, tuple)
        self._respond(*answer, keep_alive=keep_alive)
        if self.pending is asyncio.current_task():
            self.pending = None

    def _respond(self, status: int, content_type: str, body: str, *, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = body.encode()
        head = (
            status_line(status)
            + f"content-type: {content_type}\r\ncontent-length: {len(payload)}\r\n".encode()
            + (b"" if keep_alive else b"connection: close\r\n")
            + b"\r\n"
        )
        self.transport.write(head + payload)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int, handler: Handler) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminProtocol(handler), host, port, reuse_address=True)


def _failure(error: Exception) -> Answer:
    return 500, "text/plain", f"{type(error).__name__}: {error}\n"


def json_body(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True) + "\n"
