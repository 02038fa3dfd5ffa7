"""Mixer for TCP connections and the source attributes sidecars forward, against a real `mixs
server` running 0.2's default telemetry (install/mixer) plus deny rules.

- An inbound TCP listener with Mixer checks each connection before connecting upstream and
  reports it when it closes: mixs's tcp_bytes_received/tcp_bytes_sent count its bytes.
- A denied connection is closed with no upstream connection at all (not a byte goes on).
- A request through an outbound listener carries the sidecar's x-istio-attributes: the
  inbound Check sees the caller's source.uid, and the app never sees the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from istio.proxy import mixer as mixer_filter
from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    MixerFilter,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    TcpProxy,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.testing import mixer as mixer_server
from istio.testing.net import free_port

INSTALL = Path(__file__).resolve().parents[3] / "install" / "mixer"
PROXY_IP, APP_IP = "127.0.0.71", "127.0.0.72"
ECHO = "echo.default.svc.cluster.local"
BLOCKED = "blocked.default.svc.cluster.local"
REVIEWS = "reviews.default.svc.cluster.local"
PRODUCTPAGE_NODE = "sidecar~127.0.0.73~productpage-v1.default~default.svc.cluster.local"
PRODUCTPAGE_UID = "kubernetes://productpage-v1.default"
POLICY = f"""
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {{name: handler, namespace: istio-system}}
spec: {{status: {{code: 7, message: Not allowed}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: checknothing
metadata: {{name: denyrequest, namespace: istio-system}}
spec: {{}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: denyblocked, namespace: istio-system}}
spec:
  match: context.protocol == "tcp" && destination.service == "{BLOCKED}"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: reviewsfromproductpage, namespace: istio-system}}
spec:
  match: >-
    destination.service == "{REVIEWS}" && (source.uid | "") != "{PRODUCTPAGE_UID}"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
"""


@pytest.fixture
async def mixer(tmp_path: Path) -> AsyncIterator[mixer_server.MixerServer]:
    config = tmp_path / "config"
    config.mkdir()
    for name in ("attributes.yaml", "telemetry.yaml"):
        shutil.copy(INSTALL / name, config / name)
    (config / "policy.yaml").write_text(POLICY)
    async with mixer_server.serve(config) as server:
        yield server


@dataclass
class Proxy:
    """One proxy's listeners over loopback, its Mixer clients flushed and closed at the end."""

    context: Context
    listeners: ListenerManager | None = None
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    async def apply(self, snapshot: Snapshot) -> None:
        self.context.apply(snapshot)
        self.listeners = ListenerManager(self.context, PROXY_IP)
        await self.listeners.apply(snapshot)

    async def flush_reports(self) -> None:
        for client in self.context.mixers.clients.values():
            await client.flush()

    async def close(self) -> None:
        if self.listeners is not None:
            await self.listeners.close()
        if self.context.mixers is not None:
            await self.context.mixers.close()


async def tcp_bytes(metrics_url: str, metric: str, destination: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as answer:
        text = await answer.text()
    pattern = re.compile(rf'^{metric}(?:_total)?\{{[^}}]*destination_service="{destination}"')
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if pattern.match(line))


def header_value(node_id: str) -> str:
    """The x-istio-attributes value the sidecar of `node_id` sends."""
    return mixer_filter.forward_header(node_id).decode()


def tcp_listener(name: str, port: int, mixer: str, service: str) -> Listener:
    return Listener(
        name,
        PROXY_IP,
        port,
        True,
        False,
        TcpProxy(f"inbound_{name}", "echo"),
        inbound=True,
        mixer=MixerFilter(
            address=mixer,
            check=True,
            attributes={
                "destination.service": service,
                "destination.ip": ipaddress.ip_address(PROXY_IP).packed,
                "destination.port": port,
            },
        ),
    )


async def test_tcp_connections_are_checked_and_reported(
    mixer: mixer_server.MixerServer,
) -> None:
    accepted: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to the client's FIN
        accepted.append(data)
        writer.write(data.upper() + b" done")
        await writer.drain()
        writer.close()

    backend = await asyncio.start_server(echo, APP_IP, 0)
    backend_port = backend.sockets[0].getsockname()[1]
    echo_port, blocked_port = free_port(PROXY_IP), free_port(PROXY_IP)
    proxy = Proxy(Context())
    await proxy.apply(
        Snapshot(
            listeners={
                "echo": tcp_listener("echo", echo_port, mixer.address, ECHO),
                "blocked": tcp_listener("blocked", blocked_port, mixer.address, BLOCKED),
            },
            clusters={
                "echo": Cluster(
                    "echo", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, backend_port),)
                )
            },
        )
    )
    try:
        sent_before = await tcp_bytes(mixer.metrics_url, "tcp_bytes_sent", ECHO)
        received_before = await tcp_bytes(mixer.metrics_url, "tcp_bytes_received", ECHO)
        payload = b"hello mixer " * 1000
        reader, writer = await asyncio.open_connection(PROXY_IP, echo_port)
        writer.write(payload)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer == payload.upper() + b" done"
        # Denied: closed before any byte goes on; the backend never even sees a connection.
        reader, writer = await asyncio.open_connection(PROXY_IP, blocked_port)
        writer.write(b"let me in")
        # Closed with our bytes unread: the kernel may say so with a reset.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert accepted == [payload]
        await proxy.flush_reports()
        (client,) = proxy.context.mixers.clients.values()
        assert client.stats.check_calls == 2
        assert client.stats.report_records == 2  # the denied connection is reported too
        assert client.stats.report_failures == client.stats.transport_failures == 0
        # 0.2's default telemetry counted the allowed connection's bytes, each way.
        sent = await tcp_bytes(mixer.metrics_url, "tcp_bytes_sent", ECHO)
        received = await tcp_bytes(mixer.metrics_url, "tcp_bytes_received", ECHO)
        assert received - received_before == len(payload)
        assert sent - sent_before == len(payload) + len(b" done")
        assert await tcp_bytes(mixer.metrics_url, "tcp_bytes_received", BLOCKED) == 0
    finally:
        await proxy.close()
        backend.close()
        await backend.wait_closed()


async def test_the_server_sidecar_checks_the_calling_sidecars_source_uid(
    mixer: mixer_server.MixerServer,
) -> None:
    seen: list[dict[str, str]] = []

    async def app(request: web.Request) -> web.Response:
        seen.append({name.lower(): value for name, value in request.headers.items()})
        return web.Response(text="reviews")

    application = web.Application()
    application.router.add_get("/{tail:.*}", app)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    app_port = free_port(APP_IP)
    await web.TCPSite(runner, APP_IP, app_port).start()
    out_port, in_port = free_port(PROXY_IP), free_port(PROXY_IP)

    def table(cluster: str) -> RouteTable:
        action = RouteAction(clusters=((cluster, 1),), total_weight=1)
        route = Route("all", RouteMatch(PathKind.PREFIX, "/"), action)
        return RouteTable.build(cluster, (VirtualHost(cluster, ("*",), (route,)),))

    # One proxy plays both sidecars: productpage's outbound listener (the capture listener
    # says Mixer is there) calls reviews' inbound listener, which checks with Mixer.
    proxy = Proxy(Context(node_id=PRODUCTPAGE_NODE))
    await proxy.apply(
        Snapshot(
            listeners={
                "out": Listener(
                    "out",
                    PROXY_IP,
                    out_port,
                    True,
                    False,
                    HttpManager("outbound", routes=table("reviews")),
                    forward_attributes=True,
                ),
                "in": Listener(
                    "in",
                    PROXY_IP,
                    in_port,
                    True,
                    False,
                    HttpManager("inbound", routes=table("app")),
                    inbound=True,
                    mixer=MixerFilter(
                        address=mixer.address,
                        check=True,
                        attributes={"destination.service": REVIEWS},
                    ),
                ),
            },
            clusters={
                "reviews": Cluster(
                    "reviews", ClusterType.STATIC, endpoints=(Endpoint(PROXY_IP, in_port),)
                ),
                "app": Cluster("app", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, app_port),)),
            },
        )
    )
    forged_header = header_value(PRODUCTPAGE_NODE.replace("127.0.0.73", "10.9.9.9"))
    other_header = header_value("sidecar~127.0.0.76~ratings-v1.default~default.svc.cluster.local")
    try:
        async with aiohttp.ClientSession() as session:
            via_sidecar = f"http://{PROXY_IP}:{out_port}/reviews/1"
            async with session.get(via_sidecar) as allowed:
                assert allowed.status == 200, await allowed.text()
            # The app's own x-istio-attributes is replaced by the sidecar's.
            async with session.get(
                via_sidecar, headers={"x-istio-attributes": other_header}
            ) as replaced:
                assert replaced.status == 200
            # Straight to the inbound listener, no source.uid: denied.
            direct = f"http://{PROXY_IP}:{in_port}/reviews/1"
            async with session.get(direct) as anonymous:
                assert anonymous.status == 403
                assert "Not allowed" in await anonymous.text()
            # The inbound side reads the header whoever sent it (as 0.2 did: not
            # authenticated; source.user is what mTLS proves).
            async with session.get(
                direct, headers={"x-istio-attributes": forged_header}
            ) as claimed:
                assert claimed.status == 200
            async with session.get(direct, headers={"x-istio-attributes": "%%%"}) as garbage:
                assert garbage.status == 403  # a header that does not decode says nothing
        assert len(seen) == 3
        assert all("x-istio-attributes" not in headers for headers in seen)
    finally:
        await proxy.close()
        await runner.cleanup()
