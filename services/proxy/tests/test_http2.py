"""HTTP/2 and gRPC through the proxy, with peers nobody here wrote: curl and nghttp2's h2load
and nghttp as clients, grpcio clients and a grpc.aio server behind an http2 cluster, aiohttp
behind an HTTP/1.1 one (translation both ways)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from aiohttp import web

from istio.http2 import (
    PREFACE,
    ConnectionTerminated,
    ErrorCode,
    H2Connection,
    PingAcked,
    SettingsAcked,
)
from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    Fault,
    HttpManager,
    Listener,
    PathKind,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.downstream_h2 import H2Downstream
from istio.proxy.listeners import ListenerManager
from istio.proxy.upstream_h2 import H2Upstream
from istio.testing.net import free_port

PROXY_HOST = "127.0.0.40"


class Greeter:
    """A grpc.aio service: unary and bidirectional streaming, failures on request."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_unavailable = 0
        self.cancelled = asyncio.Event()
        self.metadata: dict[str, str] = {}

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        self.metadata = {m.key: str(m.value) for m in context.invocation_metadata() or ()}
        if self.fail_unavailable > 0:
            self.fail_unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if request == b"fail":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bad thing")
        if request == b"slow":
            context.add_done_callback(lambda _: self.cancelled.set())
            await asyncio.sleep(30)
        if request.startswith(b"big:"):
            return b"z" * int(request[4:])
        context.set_trailing_metadata((("x-trailer", "t"),))
        return b"hello " + request

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message.upper()


async def start_grpc(service: Greeter, host: str) -> tuple[grpc.aio.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "test.Greeter",
        {
            "Hello": grpc.unary_unary_rpc_method_handler(service.unary),
            "Chat": grpc.stream_stream_rpc_method_handler(service.chat),
        },
    )
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port


async def echo(request: web.Request) -> web.Response:
    if request.path == "/big":
        return web.Response(body=b"b" * 3_000_000)
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": dict(request.headers),
            "body": len(body),
        },
        headers={"x-backend": "h1"},
    )


@dataclass
class Mesh:
    context: Context
    manager: ListenerManager
    greeter: Greeter
    grpc_port: int
    http_port: int
    nghttpd_port: int
    port: int = 0
    routes: list[Route] = field(default_factory=list)

    async def apply(self, grpc_routes: list[Route] | None = None) -> None:
        grpc_route = Route(
            name="grpc",
            match=RouteMatch(PathKind.PREFIX, "/test.Greeter/"),
            action=RouteAction(clusters=(("grpc", 1),), total_weight=1, timeout=15.0),
        )
        http_route = Route(
            name="http",
            match=RouteMatch(PathKind.PREFIX, "/"),
            action=RouteAction(clusters=(("http", 1),), total_weight=1, timeout=15.0),
        )
        h2_route = Route(
            name="h2",
            match=RouteMatch(PathKind.PREFIX, "/"),
            action=RouteAction(clusters=(("nghttpd", 1),), total_weight=1, timeout=15.0),
        )
        clusters = {
            "grpc": Cluster(
                "grpc",
                ClusterType.STATIC,
                endpoints=(Endpoint("127.0.0.41", self.grpc_port),),
                http2=True,
            ),
            "http": Cluster(
                "http", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.42", self.http_port),)
            ),
            "nghttpd": Cluster(
                "nghttpd",
                ClusterType.STATIC,
                endpoints=(Endpoint("127.0.0.43", self.nghttpd_port),),
                http2=True,
            ),
        }
        table = RouteTable.build(
            "t",
            (
                VirtualHost("h2only", ("h2only",), (h2_route,)),
                VirtualHost("svc", ("*",), (*(grpc_routes or [grpc_route]), http_route)),
            ),
        )
        listener = Listener("http", "0.0.0.0", 0, True, False, HttpManager("test", routes=table))
        snapshot = Snapshot(listeners={"http": listener}, clusters=clusters)
        self.context.apply(snapshot)
        await self.manager.apply(snapshot)
        server = self.manager.bound["http"].server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    @property
    def target(self) -> str:
        return f"{PROXY_HOST}:{self.port}"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    greeter = Greeter()
    grpc_server, grpc_port = await start_grpc(greeter, "127.0.0.41")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.42", 0)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    nghttpd, nghttpd_port = await start_nghttpd(tmp_path)
    context = Context()
    manager = ListenerManager(context, PROXY_HOST)
    mesh = Mesh(context, manager, greeter, grpc_port, http_port, nghttpd_port)
    await mesh.apply()
    try:
        yield mesh
    finally:
        await manager.close()
        await grpc_server.stop(None)
        await runner.cleanup()
        nghttpd.terminate()
        await nghttpd.wait()


async def start_nghttpd(root: Path) -> tuple[asyncio.subprocess.Process, int]:
    """nghttp2's own server (h2c only) with one file, on 127.0.0.43; ready once it accepts."""
    (root / "index.html").write_bytes(b"<p>nghttpd</p>" * 1000)
    port = free_port("127.0.0.43")
    process = await asyncio.create_subprocess_exec(
        need("nghttpd"), "--no-tls", "-a", "127.0.0.43", "-d", str(root), str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(500):  # it prints nothing when ready: its port accepting is the sign
        try:
            _, writer = await asyncio.open_connection("127.0.0.43", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return process, port
    process.kill()
    raise AssertionError("nghttpd did not start")


def stub(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    hello = channel.unary_unary("/test.Greeter/Hello")
    chat = channel.stream_stream("/test.Greeter/Chat")
    return hello, chat


async def run(*argv: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path is not None, f"{tool} is installed by make setup"
    return path


# gRPC end to end


async def test_grpc_unary_and_streaming_with_metadata_and_trailers(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, chat = stub(channel)
        call = hello(b"mesh", metadata=(("x-user", "jason"),))
        assert await call == b"hello mesh"
        assert ("x-trailer", "t") in tuple(await call.trailing_metadata())
        assert mesh.greeter.metadata["x-user"] == "jason"
        assert mesh.greeter.metadata["x-forwarded-proto"] == "http"
        assert "x-request-id" in mesh.greeter.metadata
        stream = chat()
        for word in (b"a", b"bc", b"def"):
            await stream.write(word)
            assert await stream.read() == word.upper()
        await stream.done_writing()
        assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
        # a response larger than every window: flow control both ways
        assert await hello(b"big:3000000") == b"z" * 3_000_000
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hello(b"fail")
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failed.value.details() == "bad thing"
        # many calls multiplexed on one client connection and one upstream connection
        replies = await asyncio.gather(*(hello(b"%d" % i) for i in range(200)))
        assert replies == [b"hello %d" % i for i in range(200)]
    assert len(mesh.context.clusters.clusters["grpc"].hosts) == 1
    host = next(iter(mesh.context.clusters.clusters["grpc"].hosts.values()))
    assert len(host.h2) == 1


async def test_grpc_fault_abort_maps_to_grpc_status(mesh: Mesh) -> None:
    aborting = Route(
        name="abort",
        match=RouteMatch(PathKind.PREFIX, "/test.Greeter/"),
        action=RouteAction(clusters=(("grpc", 1),), total_weight=1, timeout=15.0),
        fault=Fault(abort_status=503, abort_ppm=1_000_000),
    )
    await mesh.apply([aborting])
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, _ = stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hello(b"x")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "fault filter abort"
    assert mesh.greeter.calls == 0


async def test_grpc_timeout_is_a_deadline_and_cancels_upstream(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, _ = stub(channel)
        # the proxy answers at the caller's deadline; grpcio may report it first itself
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hello(b"slow", timeout=0.5)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(mesh.greeter.cancelled.wait(), 10)
        assert await hello(b"after") == b"hello after"


async def test_grpc_retry_on_unavailable(mesh: Mesh) -> None:
    retrying = Route(
        name="retry",
        match=RouteMatch(PathKind.PREFIX, "/test.Greeter/"),
        action=RouteAction(
            clusters=(("grpc", 1),),
            total_weight=1,
            timeout=15.0,
            retry=RetryPolicy(grpc_statuses=frozenset({14}), num_retries=2),
        ),
    )
    await mesh.apply([retrying])
    mesh.greeter.fail_unavailable = 2
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, _ = stub(channel)
        assert await hello(b"x") == b"hello x"
    assert mesh.greeter.calls == 3
    assert mesh.context.clusters.clusters["grpc"].stats.rq_retry == 2


async def test_grpc_no_route_and_missing_upstream(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        missing = channel.unary_unary("/other.Service/Call")  # routed to the HTTP/1.1 app
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await missing(b"x")
        # an HTTP/1.1 app answering a gRPC call: no grpc-status, gRPC says what it got
        assert failed.value.code() != grpc.StatusCode.OK
    mesh.context.clusters.clusters["grpc"].update(
        mesh.context.clusters.clusters["grpc"].config, (Endpoint("127.0.0.41", 1),)
    )
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, _ = stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hello(b"x")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream connect error" in (failed.value.details() or "")


# HTTP/2 with curl and nghttp2's clients


async def test_curl_h2c_to_http1_upstream_and_http1_to_h2_upstream(mesh: Mesh) -> None:
    curl = need("curl")
    code, out, err = await run(
        curl, "-sS", "--http2-prior-knowledge", "-H", "cookie: a=1", "-H", "cookie: b=2",
        "--data-binary", "x" * 100_000, "-D", "-", f"http://{mesh.target}/echo?q=1",
    )  # fmt: skip
    assert code == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert b"x-backend: h1" in head
    seen = json.loads(body)
    assert seen["version"] == "1.1"
    assert seen["method"] == "POST"
    assert seen["path"] == "/echo?q=1"
    assert seen["body"] == 100_000
    assert seen["headers"]["Cookie"] == "a=1; b=2"
    # an HTTP/1.1 client to an HTTP/2-only server (nghttpd speaks nothing else)
    code, out, err = await run(
        curl, "-sS", "-D", "-", "-H", "host: h2only", f"http://{mesh.target}/index.html",
    )  # fmt: skip
    assert code == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"<p>nghttpd</p>" * 1000
    code, out, err = await run(
        curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}",
        "-H", "host: h2only", f"http://{mesh.target}/missing",
    )  # fmt: skip
    assert out == b"404"


async def test_h2load_many_streams_all_succeed(mesh: Mesh) -> None:
    h2load = need("h2load")
    code, out, err = await run(
        h2load, "-n", "2000", "-c", "4", "-m", "20", f"http://{mesh.target}/load"
    )
    text = out.decode()
    assert code == 0, err
    assert "2000 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 2000 2xx" in text, text


async def test_nghttp_large_download_through_window(mesh: Mesh) -> None:
    nghttp = need("nghttp")
    # windows of 64 KiB: a 3 MB response goes out as the client returns credit
    code, out, err = await run(nghttp, "-w", "16", "-W", "16", f"http://{mesh.target}/big")
    assert code == 0, err
    assert out == b"b" * 3_000_000


# bad input: the connection that sent it ends, others do not notice


def raw_h2(port: int) -> socket.socket:
    return socket.create_connection((PROXY_HOST, port), timeout=10)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return struct.pack(">BHBBL", length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def read_goaway(sock: socket.socket) -> int:
    client = H2Connection(client=True)
    client.initiate()
    client.data_to_send()  # the preface went out already by hand
    while True:
        data = sock.recv(65536)
        if not data:
            raise AssertionError("closed without GOAWAY")
        for event in client.receive(data):
            if isinstance(event, ConnectionTerminated):
                return event.error_code


def drain(sock: socket.socket) -> bool:
    """True when the peer closed the connection."""
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            return True


async def test_bad_frames_get_goaway_and_others_keep_working(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        hello, _ = stub(channel)
        assert await hello(b"before") == b"hello before"

        def attack(payload: bytes) -> int:
            with raw_h2(mesh.port) as sock:
                sock.sendall(PREFACE + frame(0x4, 0, 0) + payload)
                code = read_goaway(sock)
                assert drain(sock)
                return code

        loop = asyncio.get_running_loop()
        # a frame over SETTINGS_MAX_FRAME_SIZE
        oversized = frame(0x0, 0, 1, b"x" * 20000)
        assert await loop.run_in_executor(None, attack, oversized) == ErrorCode.FRAME_SIZE_ERROR
        # garbage in place of a header block (HPACK decoding fails)
        bad_hpack = frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff\xff")
        code = await loop.run_in_executor(None, attack, bad_hpack)
        assert code == ErrorCode.COMPRESSION_ERROR
        # rapid reset (CVE-2023-44487): open and cancel streams as fast as possible
        encoder = H2Connection(client=True)
        encoder.initiate()
        encoder.data_to_send()
        burst = bytearray()
        for index in range(3000):
            stream_id = encoder.send_request(
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"svc"),
                    (b":path", b"/load"),
                ],
                end_stream=True,
            )
            burst += encoder.data_to_send()
            burst += frame(0x3, 0, stream_id, struct.pack(">L", ErrorCode.CANCEL))
            encoder.streams.pop(stream_id, None)
            encoder.local_open = 0
            del index
        code = await loop.run_in_executor(None, attack, bytes(burst))
        assert code == ErrorCode.ENHANCE_YOUR_CALM
        assert await hello(b"after") == b"hello after"


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def pings(peer: H2Connection, count: int) -> list[bytes]:
    """`count` reads from `peer`, each one PING."""
    reads = []
    for n in range(count):
        peer.ping(b"%08d" % n)
        reads.append(peer.data_to_send())
    return reads


async def test_frames_queued_in_one_loop_turn_leave_in_one_write() -> None:
    """What one turn of the event loop queues on an HTTP/2 connection, downstream or upstream
    (a batch of responses, of requests; here our SETTINGS, the acknowledgement of the peer's
    and the answers to three PINGs read separately) goes out in one write at the end of the
    turn, not one system call per event. Closing sends what is queued at once."""
    downstream = H2Downstream(
        Context(),
        None,
        original_dst=None,
        registry=None,
        peer_identity=None,
        xfcc=None,
        stats=None,
    )
    transport = RecordingTransport()
    downstream.connection_made(transport)
    client = H2Connection(client=True)
    client.initiate()
    for read in [client.data_to_send(), *pings(client, 3)]:
        downstream.data_received(read)
    assert transport.writes == []
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    events = client.receive(transport.writes[0])
    assert [e.data for e in events if isinstance(e, PingAcked)] == [b"%08d" % n for n in range(3)]
    assert any(isinstance(e, SettingsAcked) for e in events)
    downstream.drain()  # no streams: GOAWAY, sent before the transport closes
    assert transport.closed
    assert len(transport.writes) == 2
    assert any(isinstance(e, ConnectionTerminated) for e in client.receive(transport.writes[1]))
    downstream.connection_lost(None)

    # the upstream side: only the connection's own frames here (no cluster, no host needed)
    upstream = H2Upstream(cast(Any, None), cast(Any, None))
    transport = RecordingTransport()
    upstream.connection_made(transport)
    server = H2Connection(client=False)
    server.initiate()
    for read in [server.data_to_send(), *pings(server, 3)]:
        upstream.data_received(read)
    assert transport.writes == []
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    events = server.receive(transport.writes[0])
    assert [e.data for e in events if isinstance(e, PingAcked)] == [b"%08d" % n for n in range(3)]
