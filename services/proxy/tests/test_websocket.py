"""WebSocket through the proxy: upgrade per route, bytes both ways, clean close.

Real peers: aiohttp's WebSocket client and server, with the proxy between them as an
explicit listener; the route enables the upgrade as Pilot writes a RouteRule's
websocketUpgrade (`upgrade_configs: [{upgrade_type: websocket}]`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.testing.net import free_port

PROXY_IP, APP_IP = "127.0.0.51", "127.0.0.52"


@dataclass
class Setup:
    context: Context
    port: int
    app_closes: list[int]


async def _app() -> tuple[web.AppRunner, int, list[int]]:
    closes: list[int] = []

    async def ws(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                if message.data == "bye":
                    await socket.close(code=4000, message=b"server says bye")
                    break
                await socket.send_str(f"echo {message.data} {request.headers.get('x-b', '')}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        closes.append(socket.close_code or 0)
        return socket

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="no upgrade here", status=400)

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/plain", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(APP_IP)
    await web.TCPSite(runner, APP_IP, port).start()
    return runner, port, closes


def _route(prefix: str, *, websocket: bool) -> Route:
    return Route(
        prefix,
        RouteMatch(PathKind.PREFIX, prefix),
        RouteAction(clusters=(("app", 1),), total_weight=1, timeout=1.0, websocket=websocket),
    )


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    runner, app_port, closes = await _app()
    routes = (
        _route("/ws", websocket=True),
        _route("/plain", websocket=True),
        _route("/", websocket=False),
    )
    table = RouteTable.build("t", (VirtualHost("app", ("*",), routes),))
    port = free_port(PROXY_IP)
    snapshot = Snapshot(
        listeners={
            "http": Listener("http", PROXY_IP, port, True, False, HttpManager("ws", routes=table))
        },
        clusters={
            "app": Cluster("app", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, app_port),))
        },
    )
    context = Context()
    listeners = ListenerManager(context, PROXY_IP)
    context.apply(snapshot)
    await listeners.apply(snapshot)
    try:
        yield Setup(context, port, closes)
    finally:
        await listeners.close()
        await runner.cleanup()


async def test_messages_both_ways_outlive_the_route_timeout_and_close_cleanly(
    setup: Setup,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{PROXY_IP}:{setup.port}/ws", headers={"x-b": "hdr"}) as socket,
    ):
        await socket.send_str("hello")
        assert await socket.receive_str(timeout=5) == "echo hello hdr"
        big = bytes(range(256)) * 8192  # 2 MiB: both directions under backpressure
        await socket.send_bytes(big)
        assert await socket.receive_bytes(timeout=10) == big[::-1]
        # Longer than the route's 1 s timeout: it ended with the upgrade.
        idle = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(1.5, idle.set_result, None)
        await idle
        await socket.send_str("still")
        assert await socket.receive_str(timeout=5) == "echo still hdr"
        await socket.close()
        assert socket.close_code == 1000
    stats = setup.context.stats.text()
    assert "http.ws.downstream_rq_1xx: 1\n" in stats


async def test_the_server_closing_first_reaches_the_client(setup: Setup) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{PROXY_IP}:{setup.port}/ws") as socket,
    ):
        await socket.send_str("bye")
        message = await socket.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4000, "server says bye")


async def test_an_upgrade_the_route_does_not_enable_is_refused(setup: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"http://{PROXY_IP}:{setup.port}/other")
        assert refused.value.status == 403


async def test_an_upstream_that_declines_the_upgrade_answers_and_the_connection_closes(
    setup: Setup,
) -> None:
    reader, writer = await asyncio.open_connection(PROXY_IP, setup.port)
    writer.write(
        b"GET /plain HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: app\r\n\r\n"  # never parsed: after an upgrade, not HTTP
    )
    reply = await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
    assert reply.endswith(b"no upgrade here")
    assert reply.count(b"HTTP/1.1") == 1
