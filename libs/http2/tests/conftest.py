"""Fixtures: a tiny asyncio HTTP/2 server on the codec (for nghttp, curl and h2load to talk
to) and an asyncio client connection on it (to talk to nghttpd)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from istio.http2 import (
    ConnectionTerminated,
    Data,
    ErrorCode,
    H2Connection,
    Headers,
    HeadersReceived,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from istio.testing.net import free_port


@dataclass
class ServerStats:
    requests: int = 0
    connections: int = 0
    goaways: list[int] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)


class TestServerProtocol(asyncio.Protocol):
    """Answers GET /big/N with N bytes, POST /echo with the body (and its trailers echoed as
    response trailers), anything else with "hello <path>"."""

    __test__ = False

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats
        self.conn = H2Connection(client=False)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[Headers, bytearray]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.connections += 1
        self.stats.transports.append(transport)
        self.conn.initiate()
        self.flush()

    def flush(self) -> None:
        if self.conn.out and self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for event in conn.receive(data):
            if type(event) is HeadersReceived:
                self.requests[event.stream_id] = (event.headers, bytearray())
                if event.end_stream:
                    self.respond(event.stream_id, None)
            elif type(event) is Data:
                self.requests[event.stream_id][1].extend(event.data)
                conn.acknowledge(event.stream_id, event.flow_length)
                if event.end_stream:
                    self.respond(event.stream_id, None)
            elif type(event) is Trailers:
                self.respond(event.stream_id, event.headers)
            elif type(event) is StreamReset:
                self.requests.pop(event.stream_id, None)
            elif type(event) is ConnectionTerminated:
                if not event.remote:
                    self.stats.goaways.append(event.error_code)
            elif type(event) is WindowUpdated:
                pass
        self.flush()
        if conn.closed and self.transport is not None:
            self.transport.close()

    def respond(self, stream_id: int, trailers: Headers | None) -> None:
        headers, body = self.requests.pop(stream_id)
        self.stats.requests += 1
        fields = dict(headers)
        path = fields[b":path"]
        conn = self.conn
        if path.startswith(b"/big/"):
            size = int(path[5:])
            conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"%d" % size)])
            conn.send_data(stream_id, b"z" * size, end_stream=True)
        elif path == b"/echo":
            conn.send_headers(stream_id, [(b":status", b"200")])
            conn.send_data(stream_id, bytes(body), end_stream=trailers is None)
            if trailers is not None:
                conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            reply = b"hello " + path
            conn.send_headers(
                stream_id,
                [
                    (b":status", b"200"),
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"%d" % len(reply)),
                ],
            )
            conn.send_data(stream_id, reply, end_stream=True)


@dataclass
class RunningServer:
    host: str
    port: int
    stats: ServerStats

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture
async def h2_server() -> AsyncIterator[RunningServer]:
    stats = ServerStats()
    loop = asyncio.get_running_loop()
    port = free_port()
    server = await loop.create_server(lambda: TestServerProtocol(stats), "127.0.0.1", port)
    try:
        yield RunningServer("127.0.0.1", port, stats)
    finally:
        server.close()
        for transport in stats.transports:
            transport.close()
        await server.wait_closed()


class ClientConnection(asyncio.Protocol):
    """Requests over one h2c connection; each response as (headers, body, trailers)."""

    def __init__(self) -> None:
        self.conn = H2Connection(client=True)
        self.transport: asyncio.Transport | None = None
        self.responses: dict[int, asyncio.Future[tuple[Headers, bytes, Headers]]] = {}
        self.partial: dict[int, tuple[Headers, bytearray]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.terminated: ConnectionTerminated | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate()
        self.flush()

    def flush(self) -> None:
        if self.conn.out and self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def request(
        self, headers: Headers, body: bytes | None = None, trailers: Headers | None = None
    ) -> asyncio.Future[tuple[Headers, bytes, Headers]]:
        stream_id = self.conn.send_request(headers, end_stream=body is None and trailers is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=trailers is None)
        if trailers is not None:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        future = asyncio.get_running_loop().create_future()
        self.responses[stream_id] = future
        self.flush()
        return future

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive(data):
            if type(event) is HeadersReceived:
                self.partial[event.stream_id] = (event.headers, bytearray())
                if event.end_stream:
                    self.finish(event.stream_id, [])
            elif type(event) is Data:
                self.partial[event.stream_id][1].extend(event.data)
                self.conn.acknowledge(event.stream_id, event.flow_length)
                if event.end_stream:
                    self.finish(event.stream_id, [])
            elif type(event) is Trailers:
                self.finish(event.stream_id, event.headers)
            elif type(event) is StreamReset:
                future = self.responses.pop(event.stream_id)
                future.set_exception(ConnectionError(f"reset {ErrorCode(event.error_code)!r}"))
            elif type(event) is ConnectionTerminated:
                self.terminated = event
        self.flush()

    def finish(self, stream_id: int, trailers: Headers) -> None:
        headers, body = self.partial.pop(stream_id)
        self.responses.pop(stream_id).set_result((headers, bytes(body), trailers))

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.responses.values():
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)


Connect = Callable[[str, int], Awaitable[ClientConnection]]


@pytest.fixture
async def h2_connect() -> AsyncIterator[Connect]:
    """Open client connections on the codec; all closed after the test."""
    opened: list[ClientConnection] = []

    async def connect(host: str, port: int) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(ClientConnection, host, port)
        opened.append(protocol)
        return protocol

    yield connect
    for protocol in opened:
        if protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed
