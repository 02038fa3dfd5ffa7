"""The gRPC client on the codec against grpc.aio servers (grpcio's C core on the other side):
unary and bidirectional streaming, metadata and trailers, status to exception, deadlines,
cancellation, large messages, GOAWAY and lost connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import grpc
import pytest

from istio.http2 import ConnectionTerminated, ErrorCode, H2Connection, HeadersReceived
from istio.http2.grpc import Channel, RpcError, StatusCode
from istio.testing.net import free_port


class Service:
    def __init__(self) -> None:
        self.metadata: list[tuple[str, str]] = []
        self.timeout: float | None = None
        self.cancelled = asyncio.Event()
        self.streams_started = asyncio.Event()
        self.stream_ended = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata() or ()]
        self.timeout = context.time_remaining()
        if request == b"fail":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bad thing: 100% ünïcode")
        if request == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await context.send_initial_metadata((("x-initial", "i"),))
        context.set_trailing_metadata((("x-trailer", "t"), ("x-bin-bin", b"\x00\x01")))
        return request[::-1]

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.streams_started.set()
        # Watched from the RPC's end, not from an exception in this generator: a
        # RST_STREAM that arrives while the generator sits at a `yield` raises nothing here.
        context.add_done_callback(lambda _: self.stream_ended.set())
        async for message in requests:
            if message == b"fail":
                await context.abort(grpc.StatusCode.ABORTED, "asked to")
            if message.startswith(b"big:"):
                yield b"y" * int(message[4:])
            else:
                yield message.upper()


async def start_server(service: Service, port: int = 0) -> tuple[grpc.aio.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
            "Stream": grpc.stream_stream_rpc_method_handler(service.stream),
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 32 << 20),
            ("grpc.max_send_message_length", 32 << 20),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Service, int]]:
    service = Service()
    server, port = await start_server(service)
    try:
        yield service, port
    finally:
        await server.stop(None)


async def test_unary_with_metadata_and_trailers(echo: tuple[Service, int]) -> None:
    service, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream("/test.Echo/Unary", metadata=[("x-m", "v"), ("x-b-bin", b"\xff")])
        await call.send(b"hello")
        await call.done_writing()
        assert await call.recv() == b"olleh"
        assert await call.recv() is None
        assert call.code == StatusCode.OK
        assert ("x-initial", "i") in call.initial_metadata
        assert ("x-trailer", "t") in call.trailing_metadata
        assert ("x-m", "v") in service.metadata
        assert ("x-b-bin", b"\xff") in service.metadata
        assert await channel.unary("/test.Echo/Unary", b"abc") == b"cba"


async def test_status_becomes_rpc_error(echo: tuple[Service, int]) -> None:
    _, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(RpcError) as raised:
            await channel.unary("/test.Echo/Unary", b"fail")
        assert raised.value.code == StatusCode.FAILED_PRECONDITION
        assert raised.value.details == "bad thing: 100% ünïcode"
        with pytest.raises(RpcError) as raised:
            await channel.unary("/test.Echo/Missing", b"x")
        assert raised.value.code == StatusCode.UNIMPLEMENTED
        # The connection is fine afterwards.
        assert await channel.unary("/test.Echo/Unary", b"ok") == b"ko"


async def test_deadline(echo: tuple[Service, int]) -> None:
    service, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(RpcError) as raised:
            await channel.unary("/test.Echo/Unary", b"slow", timeout=0.3)
        assert raised.value.code == StatusCode.DEADLINE_EXCEEDED
        # The server learnt the deadline from grpc-timeout and gave up on the call too.
        assert service.timeout is not None
        assert 0 < service.timeout <= 0.3
        await asyncio.wait_for(service.cancelled.wait(), 10)
        assert await channel.unary("/test.Echo/Unary", b"ab", timeout=10) == b"ba"


async def test_bidirectional_stream(echo: tuple[Service, int]) -> None:
    _, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream("/test.Echo/Stream")
        for i in range(200):
            await call.send(b"m%d" % i)
            assert await call.recv() == b"M%d" % i
        await call.done_writing()
        assert [m async for m in call] == []
        assert call.code == StatusCode.OK
        call = channel.stream("/test.Echo/Stream")
        await call.send(b"one")
        await call.send(b"fail")
        assert await call.recv() == b"ONE"
        with pytest.raises(RpcError) as raised:
            await call.recv()
        assert raised.value.code == StatusCode.ABORTED
        assert raised.value.details == "asked to"


async def test_large_messages_cross_every_window(echo: tuple[Service, int]) -> None:
    _, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        big = bytes(range(256)) * 20_000  # 5 MB: beyond the connection and stream windows
        assert await channel.unary("/test.Echo/Unary", big) == big[::-1]
        call = channel.stream("/test.Echo/Stream")
        for size in (3 << 20, 10, 6 << 20):
            await call.send(b"big:%d" % size)
        received = [await call.recv() for _ in range(3)]
        assert [len(m or b"") for m in received] == [3 << 20, 10, 6 << 20]
        await call.done_writing()
        assert await call.recv() is None


async def test_message_above_the_limit_is_resource_exhausted(echo: tuple[Service, int]) -> None:
    _, port = echo
    async with Channel(f"127.0.0.1:{port}", max_message_length=1000) as channel:
        call = channel.stream("/test.Echo/Stream")
        await call.send(b"big:2000")
        with pytest.raises(RpcError) as raised:
            await call.recv()
        assert raised.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert await channel.unary("/test.Echo/Unary", b"xy") == b"yx"


async def test_cancel_resets_the_stream(echo: tuple[Service, int]) -> None:
    service, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream("/test.Echo/Stream")
        await call.send(b"a")
        assert await call.recv() == b"A"
        call.cancel()
        with pytest.raises(RpcError) as raised:
            await call.recv()
        assert raised.value.code == StatusCode.CANCELLED
        # The client never half-closed, so the server's side can only have ended by the reset.
        await asyncio.wait_for(service.stream_ended.wait(), 10)


async def test_lost_connection_and_reconnect() -> None:
    service = Service()
    server, port = await start_server(service)
    channel = Channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream("/test.Echo/Stream")
        await call.send(b"x")
        assert await call.recv() == b"X"
        await server.stop(None)
        with pytest.raises(RpcError) as raised:
            await call.recv()
        assert raised.value.code == StatusCode.UNAVAILABLE
        with pytest.raises(RpcError) as raised:
            await channel.unary("/test.Echo/Unary", b"x")
        assert raised.value.code == StatusCode.UNAVAILABLE
        assert "cannot connect" in raised.value.details
        server, _ = await start_server(service, port)
        assert await channel.unary("/test.Echo/Unary", b"back") == b"kcab"
    finally:
        await channel.close()
        await server.stop(None)


class GoawayServer(asyncio.Protocol):
    """Answers the first request OK, then sends GOAWAY with `code` for the second."""

    def __init__(self, code: ErrorCode) -> None:
        self.code = code
        self.conn = H2Connection(client=False)
        self.seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive(data):
            if type(event) is HeadersReceived:
                self.seen += 1
                if self.seen == 1:
                    self.conn.send_headers(
                        event.stream_id,
                        [(b":status", b"200"), (b"content-type", b"application/grpc")],
                    )
                    self.conn.send_data(event.stream_id, b"\0\0\0\0\2ok")
                    self.conn.send_headers(
                        event.stream_id, [(b"grpc-status", b"0")], end_stream=True
                    )
                elif self.code == ErrorCode.NO_ERROR:
                    # A graceful GOAWAY that excludes this stream: refused, safe to retry.
                    self.conn.highest_remote_id = event.stream_id - 2
                    self.conn.close()
                else:
                    self.conn.close(self.code, b"calm down")
            elif type(event) is ConnectionTerminated:
                pass
        self.transport.write(self.conn.data_to_send())


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.ENHANCE_YOUR_CALM, "GOAWAY ENHANCE_YOUR_CALM: calm down"),
        (ErrorCode.NO_ERROR, "REFUSED_STREAM"),
    ],
)
async def test_goaway_surfaces_as_unavailable(code: ErrorCode, expected: str) -> None:
    loop = asyncio.get_running_loop()
    protocols: list[GoawayServer] = []

    def factory() -> GoawayServer:
        protocols.append(GoawayServer(code))
        return protocols[-1]

    server = await loop.create_server(factory, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    try:
        async with Channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary("/x.Y/Z", b"") == b"ok"
            with pytest.raises(RpcError) as raised:
                await channel.unary("/x.Y/Z", b"")
            assert raised.value.code == StatusCode.UNAVAILABLE
            assert expected in raised.value.details
            # The channel does not reuse a connection after GOAWAY: a new one answers.
            assert await channel.unary("/x.Y/Z", b"") == b"ok"
            assert len(protocols) == 2
    finally:
        server.close()
        for protocol in protocols:
            protocol.transport.close()
        await server.wait_closed()


async def test_many_concurrent_calls_share_one_connection(echo: tuple[Service, int]) -> None:
    _, port = echo
    async with Channel(f"127.0.0.1:{port}") as channel:
        replies = await asyncio.gather(
            *(channel.unary("/test.Echo/Unary", b"%03d" % i) for i in range(300))
        )
        assert replies == [(b"%03d" % i)[::-1] for i in range(300)]
        connection = channel._connection
        assert connection is not None
        assert connection.h2.next_stream_id == 1 + 2 * 300


async def test_http_errors_map_to_grpc_codes() -> None:
    """A non-gRPC answer (an HTTP 503 from some proxy) maps as gRPC's spec says."""
    loop = asyncio.get_running_loop()

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.conn = H2Connection(client=False)
            self.conn.initiate()

        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive(data):
                if type(event) is HeadersReceived:
                    self.conn.send_headers(
                        event.stream_id, [(b":status", b"503")], end_stream=False
                    )
                    self.conn.send_data(event.stream_id, b"overloaded", end_stream=True)
            self.transport.write(self.conn.data_to_send())

    server = await loop.create_server(Plain, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    try:
        async with Channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(RpcError) as raised:
                await channel.unary("/x.Y/Z", b"")
            assert raised.value.code == StatusCode.UNAVAILABLE
            assert "HTTP status 503" in raised.value.details
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_the_channel_ends_its_calls() -> None:
    """close() ends a call whether it is still connecting or already open (a server that
    accepts but never answers): CANCELLED, never a CancelledError leaking to the caller."""
    loop = asyncio.get_running_loop()
    accepted = asyncio.Event()

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set()

    server = await loop.create_server(Silent, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    channel = Channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream("/x.Y/Z")
        sending = loop.create_task(call.send(b"x"))
        await accepted.wait()
        await channel.close()
        with pytest.raises(RpcError) as raised:
            await call.recv()
        assert raised.value.code == StatusCode.CANCELLED
        (sent,) = await asyncio.gather(sending, return_exceptions=True)
        assert sent is None or (isinstance(sent, RpcError) and sent.code == StatusCode.CANCELLED)
    finally:
        server.close()
        await server.wait_closed()
