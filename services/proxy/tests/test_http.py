"""The HTTP/1.1 data path in-process over loopback: raw-socket clients (well-behaved, pipelining,
slow and abusive) in front, aiohttp backends behind, config built by hand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import httptools
import pytest
from aiohttp import web

from istio.proxy.config import (
    CircuitBreakers,
    Cluster,
    ClusterType,
    Endpoint,
    Fault,
    HeaderMatcher,
    HttpManager,
    Listener,
    MatchKind,
    OutlierDetection,
    PathKind,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context, Limits
from istio.proxy.http import HttpConnection, request_id
from istio.proxy.listeners import ListenerManager


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw HTTP/1.1 client: writes whatever bytes it is given, parses what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.responses: list[Response] = []
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False

    def on_message_begin(self) -> None:
        self.responses.append(Response())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, count: int = 1) -> list[Response]:
        """Until `count` complete responses (100 Continue included) or the connection closes."""
        while sum(r.complete for r in self.responses) < count:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                self.closed = True
                break
            self.parser.feed_data(data)
        done, self.responses = self.responses[:count], self.responses[count:]
        return done

    async def wait_closed(self) -> bool:
        while data := await asyncio.wait_for(self.reader.read(65536), 10):
            self.parser.feed_data(data)
        self.closed = True
        return True

    async def get(self, path: str = "/echo", host: str = "svc", extra: str = "") -> Response:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        (response,) = await self.read()
        return response

    def close(self) -> None:
        self.writer.close()


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.peers: list[Any] = []
        self.fail_first = 0
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        path = request.path
        if path == "/flaky" and self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="try again")
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text=self.name)
        if path == "/slow":
            assert self.gate is not None
            self.arrived.set()
            await self.gate.wait()
        if path == "/cut":
            response = web.StreamResponse(headers={"content-length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return response
        if path == "/stream":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"y" * 16384)
            await response.write_eof()
            return response
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response(
            {
                "name": self.name,
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": size,
            }
        )

    async def start(self, host: str) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def route(path: str = "/", cluster: str = "a", **kwargs: Any) -> Route:
    action = kwargs.pop("action", None) or RouteAction(
        clusters=((cluster, 1),),
        total_weight=1,
        timeout=kwargs.pop("timeout", 15.0),
        retry=kwargs.pop("retry", None),
    )
    return Route(name=path, match=RouteMatch(PathKind.PREFIX, path), action=action, **kwargs)


@dataclass
class Proxy:
    context: Context
    manager: ListenerManager
    a: Backend
    b: Backend
    port: int = 0
    clients: list[Client] = field(default_factory=list)

    def snapshot(
        self, routes: list[Route], *, a: dict[str, Any] | None = None, b_too: bool = False
    ) -> Snapshot:
        endpoints = [Endpoint("127.0.0.31", self.a.port)]
        if b_too:
            endpoints.append(Endpoint("127.0.0.32", self.b.port))
        clusters = {
            "a": Cluster("a", ClusterType.STATIC, endpoints=tuple(endpoints), **(a or {})),
            "b": Cluster("b", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.32", self.b.port),)),
        }
        table = RouteTable.build("t", (VirtualHost("svc", ("svc", "svc:80"), tuple(routes)),))
        listener = Listener("http", "0.0.0.0", 0, True, False, HttpManager("test", routes=table))
        return Snapshot(listeners={"http": listener}, clusters=clusters)

    async def apply(self, snapshot: Snapshot) -> None:
        self.context.apply(snapshot)
        await self.manager.apply(snapshot)
        server = self.manager.bound["http"].server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    async def client(self) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.30", self.port)
        self.clients.append(Client(reader, writer))
        return self.clients[-1]

    async def close_clients(self) -> None:
        for client in self.clients:
            client.writer.close()
            with contextlib.suppress(OSError):
                await client.writer.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    a, b = Backend("a"), Backend("b")
    await a.start("127.0.0.31")
    await b.start("127.0.0.32")
    context = Context(limits=Limits(header_timeout=0.3, max_header_bytes=8192))
    manager = ListenerManager(context, "127.0.0.30")
    proxy = Proxy(context, manager, a, b)
    await proxy.apply(proxy.snapshot([route()]))
    try:
        yield proxy
    finally:
        await proxy.close_clients()
        await manager.close()
        await a.stop()
        await b.stop()


async def test_keep_alive_request_id_and_pipelining(proxy: Proxy) -> None:
    client = await proxy.client()
    first = await client.get("/echo?x=1")
    assert first.status == 200
    assert first.json()["path"] == "/echo?x=1"
    assert first.json()["headers"]["X-Request-ID"]
    given = await client.get("/echo", extra="x-request-id: abc\r\n")
    assert given.json()["headers"]["X-Request-ID"] == "abc"
    await client.send(
        b"".join(f"GET /p{i} HTTP/1.1\r\nHost: svc\r\n\r\n".encode() for i in range(5))
    )
    responses = await client.read(5)
    assert [r.json()["path"] for r in responses] == [f"/p{i}" for i in range(5)]
    assert len(set(proxy.a.peers)) == 1  # one upstream connection, reused
    client.close()


async def test_chunked_both_ways_and_100_continue(proxy: Proxy) -> None:
    client = await proxy.client()
    chunk = b"z" * 100_000
    await client.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(20):
        await client.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await client.send(b"0\r\n\r\n")
    (response,) = await client.read()
    assert response.json()["body"] == 2_000_000
    streamed = await client.get("/stream")
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert len(streamed.body) == 64 * 16384
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    (interim,) = await client.read()
    assert interim.status == 100
    await client.send(b"hello")
    (final,) = await client.read()
    assert final.status == 200
    assert final.json()["body"] == 5
    client.close()


@pytest.mark.parametrize(
    "attack",
    [
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: b\r\n c\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: svc\n\n",
        b"GET / HTTP/1.1\r\nHost: other\r\nHost: svc\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "obs-fold", "bad-chunk-size", "bare-lf", "two-hosts"],
)
async def test_smuggling_gets_400_and_close_others_unharmed(proxy: Proxy, attack: bytes) -> None:
    bystander = await proxy.client()
    assert (await bystander.get()).status == 200
    attacker = await proxy.client()
    await attacker.send(attack + b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n")
    responses = await attacker.read(2)
    assert [r.status for r in responses] == [400]
    assert attacker.closed
    assert all("/smuggled" not in str(peer) for peer in proxy.a.peers)
    assert (await bystander.get("/after")).json()["path"] == "/after"
    bystander.close()


async def test_oversized_and_slow_headers(proxy: Proxy) -> None:
    client = await proxy.client()
    await client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
    (response,) = await client.read()
    assert response.status == 431
    assert await client.wait_closed()
    slow = await proxy.client()
    await slow.send(b"GET / HTTP/1.1\r\nHost: s")  # and then nothing: 408 after 0.3 s
    (response,) = await slow.read()
    assert response.status == 408
    assert await slow.wait_closed()


async def test_upstream_closing_mid_body_resets_only_that_request(proxy: Proxy) -> None:
    client = await proxy.client()
    other = await proxy.client()
    await client.send(b"GET /cut HTTP/1.1\r\nHost: svc\r\n\r\n")
    await client.wait_closed()
    assert client.responses
    assert not client.responses[0].complete
    assert (await other.get()).status == 200


async def test_routes_faults_redirects_and_timeouts(proxy: Proxy) -> None:
    proxy.a.gate = asyncio.Event()
    await proxy.apply(
        proxy.snapshot(
            [
                route("/abort", fault=Fault(abort_status=418, abort_ppm=1_000_000)),
                route("/moved", action=Redirect(host="elsewhere", path="/new")),
                route("/slow", timeout=0.2),
                route("/b", cluster="b"),
                route("/none", cluster="missing"),
                route("/"),
            ]
        )
    )
    client = await proxy.client()
    assert (await client.get("/abort")).status == 418
    moved = await client.get("/moved")
    assert (moved.status, moved.headers["location"]) == (301, "http://elsewhere/new")
    assert (await client.get("/slow")).status == 504
    assert (await client.get("/b")).json()["name"] == "b"
    assert (await client.get("/none")).status == 503
    assert (await client.get("/", host="nobody")).status == 404
    proxy.a.gate.set()
    client.close()


async def test_retries_and_circuit_breakers(proxy: Proxy) -> None:
    retry = RetryPolicy(on_5xx=True, num_retries=2)
    await proxy.apply(
        proxy.snapshot(
            [route("/flaky", retry=retry), route("/")],
            a={"breakers": CircuitBreakers(max_requests=1)},
        )
    )
    proxy.a.fail_first = 2
    client = await proxy.client()
    assert (await client.get("/flaky")).status == 200
    assert proxy.a.hits == 3
    proxy.a.gate = asyncio.Event()
    await client.send(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    await proxy.a.arrived.wait()  # the first request holds the only request slot
    second = await proxy.client()
    overflow = await second.get()
    assert overflow.status == 503
    assert overflow.headers["x-envoy-overloaded"] == "true"
    proxy.a.gate.set()
    assert (await client.read())[0].status == 200
    client.close()
    second.close()


async def test_outlier_detection_ejects_a_failing_host(proxy: Proxy) -> None:
    outlier = OutlierDetection(consecutive_5xx=2, base_ejection_time=30, max_ejection_percent=50)
    await proxy.apply(proxy.snapshot([route()], a={"outlier": outlier}, b_too=True))
    client = await proxy.client()
    names = [(await client.get("/status/500")).body.decode() for _ in range(6)]
    # a answers 500 too: both fail; only one may be ejected (50%), then it gets no traffic
    runtime = proxy.context.clusters.clusters["a"]
    assert runtime.stats.ejections_active == 1
    assert len(set(names[-2:])) == 1
    client.close()


async def test_endpoint_update_keeps_healthy_connections(proxy: Proxy) -> None:
    client = await proxy.client()
    await client.get()
    pooled = proxy.context.clusters.clusters["a"].hosts[("127.0.0.31", proxy.a.port)]
    connection = pooled.idle[0]
    await proxy.apply(proxy.snapshot([route()], b_too=True))
    assert not connection.closed
    assert pooled.idle == [connection]
    assert proxy.context.clusters.clusters["a"].hosts[("127.0.0.31", proxy.a.port)] is pooled
    client.close()


def test_generated_request_ids_are_unique_uuid4s() -> None:
    ids = [request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:2000]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lowercase, 8-4-4-4-12
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


class Recorder:
    """A downstream transport that records each write call (writelines counts as one)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))
        self.inner.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RawBackend:
    """An upstream that answers each request with fixed byte pieces, written apart with a
    pause between them, so the test knows how the response reaches the proxy."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                for index, piece in enumerate(self.pieces):
                    if index:
                        await asyncio.sleep(0.05)
                    writer.write(piece)
                    await writer.drain()
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.33", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def recorded_client(
    proxy: Proxy, pieces: list[bytes]
) -> AsyncIterator[tuple[Client, Recorder]]:
    """A client whose downstream connection's writes are recorded, and a route /raw to a
    RawBackend answering `pieces`."""
    backend = RawBackend(pieces)
    await backend.start()
    snapshot = proxy.snapshot([route("/raw", cluster="raw"), route()])
    raw = Cluster("raw", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.33", backend.port),))
    await proxy.apply(replace(snapshot, clusters={**snapshot.clusters, "raw": raw}))
    client = await proxy.client()
    assert (await client.get()).status == 200  # the connection exists now
    (conn,) = proxy.manager.bound["http"].connections
    assert isinstance(conn, HttpConnection)
    recorder = Recorder(conn.transport)
    conn.transport = recorder  # type: ignore[assignment]
    try:
        yield client, recorder
    finally:
        client.close()
        proxy.context.clusters.clusters["raw"].shutdown()
        await backend.stop()


async def test_response_head_body_and_end_go_out_in_one_write(proxy: Proxy) -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello"
    async with recorded_client(proxy, [response]) as (client, recorder):
        reply = await client.get("/raw")
        assert (reply.status, reply.body, reply.headers["x-up"]) == (200, b"hello", "1")
        (written,) = recorder.writes
        assert written.startswith(b"HTTP/1.1 200 OK\r\n")
        assert written.endswith(b"\r\n\r\nhello")
        recorder.writes.clear()
        pipelined = (b"GET /raw/%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(3))
        await client.send(b"".join(pipelined))
        assert [r.body for r in await client.read(3)] == [b"hello"] * 3
        assert len(recorder.writes) == 3  # one per pipelined response
        recorder.writes.clear()
        assert (await client.get("/", host="nobody")).status == 404  # a local reply, too
        assert len(recorder.writes) == 1


async def test_chunked_response_chunks_and_terminator_are_coalesced(proxy: Proxy) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    async with recorded_client(proxy, [head + b"5\r\nhello\r\n0\r\n\r\n"]) as (
        client,
        recorder,
    ):
        reply = await client.get("/raw")
        assert (reply.status, reply.body, reply.complete) == (200, b"hello", True)
        (written,) = recorder.writes
        assert written.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


async def test_streamed_response_writes_once_per_upstream_read(proxy: Proxy) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    pieces = [head + b"3\r\none\r\n", b"3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"]
    async with recorded_client(proxy, pieces) as (client, recorder):
        reply = await client.get("/raw")
        assert (reply.status, reply.body, reply.complete) == (200, b"onetwothree", True)
        first, second = recorder.writes
        assert first.endswith(b"\r\n\r\n3\r\none\r\n")
        assert second == b"3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"


async def test_100_continue_then_coalesced_response(proxy: Proxy) -> None:
    response = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    async with recorded_client(proxy, [response]) as (client, recorder):
        await client.send(
            b"POST /raw HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        (interim,) = await client.read()
        assert interim.status == 100
        await client.send(b"hello")
        (final,) = await client.read()
        assert (final.status, final.body) == (201, b"ok")
        assert recorder.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert len(recorder.writes) == 2


async def test_header_matchers_route_and_tables_without_them_skip_headers(proxy: Proxy) -> None:
    jason = RouteMatch(
        PathKind.PREFIX, "/", headers=(HeaderMatcher("x-user", MatchKind.EXACT, "jason"),)
    )
    by_header = Route("jason", jason, RouteAction(clusters=(("b", 1),), total_weight=1))
    snapshot = proxy.snapshot([by_header, route()])
    table = snapshot.listeners["http"].chain.routes  # type: ignore[union-attr]
    assert table is not None
    assert table.header_matching
    assert not proxy.snapshot([route()]).listeners["http"].chain.routes.header_matching  # type: ignore[union-attr]
    await proxy.apply(snapshot)
    client = await proxy.client()
    assert (await client.get(extra="X-User: jason\r\n")).json()["name"] == "b"
    assert (await client.get(extra="X-User: bob\r\n")).json()["name"] == "a"
    assert (await client.get()).json()["name"] == "a"
    client.close()
