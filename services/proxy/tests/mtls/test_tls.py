"""Mutual TLS between two sidecars in-process over loopback, on asyncio's loop and uvloop's:
sidecar A (the caller's) originates mTLS on its clusters, sidecar B (the callee's) terminates it
on its inbound listeners in front of an app. HTTP/1.1 and TCP carry the caller's identity
(source.user, connection.mtls, x-forwarded-client-cert); every refusal the issue names is
proven from the outside and counted: plaintext on a strict port, a certificate from another
CA, one from this CA for another trust domain, an expired one, none at all, and TLS garbage.
Permissive ports take both. Rotated certificate files are used for new handshakes while an
open keep-alive connection carries on, and reconnections resume their TLS sessions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from istio.pilot.xds import generate
from istio.proxy import compile
from istio.proxy.config import (
    Cluster,
    ClusterType,
    DownstreamTls,
    Endpoint,
    HttpManager,
    Listener,
    MatchKind,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    SanMatcher,
    Snapshot,
    TcpProxy,
    UpstreamTls,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.http import HttpConnection
from istio.proxy.listeners import ListenerManager
from istio.proxy.tcp import TcpConnection
from istio.proxy.tls import TlsManager
from istio.proxy.xds import from_protobuf
from istio.testing.net import free_port

assert generate  # registers the descriptors of every type Pilot packs in an Any (json_format)
A_IP, B_IP, APP_IP = "127.0.3.1", "127.0.3.2", "127.0.3.3"
A_ID = "spiffe://cluster.local/ns/default/sa/a"
B_ID = "spiffe://cluster.local/ns/default/sa/b"
NOW = datetime.datetime.now(datetime.UTC)
TLS_LOG = "istio.proxy.tls"


def http_manager(prefix: str, cluster: str) -> HttpManager:
    route = Route("all", RouteMatch(PathKind.PREFIX, "/"), RouteAction(((cluster, 1),), 1))
    host = VirtualHost("all", ("*",), (route,))
    return HttpManager(prefix, routes=RouteTable.build(prefix, (host,)))


@dataclass
class App:
    """The callee's app: echoes the headers it got; /slow waits until `release` is set."""

    http_port: int = 0
    tcp_port: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    tcp: asyncio.Server | None = None

    async def start(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append(headers)
            if request.path == "/slow":
                self.slow_started.set()
                await self.release.wait()
            return web.json_response(headers)

        app = web.Application()
        app.router.add_get("/{tail:.*}", echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.http_port = free_port(APP_IP)
        await web.TCPSite(self.runner, APP_IP, self.http_port).start()

        async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.tcp = await asyncio.start_server(tcp_echo, APP_IP, 0)
        self.tcp_port = self.tcp.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        if self.tcp is not None:
            self.tcp.close()
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Sidecar:
    context: Context
    tls: TlsManager
    listeners: ListenerManager

    def ssl(self, prefix: str) -> dict[str, int]:
        return dict(self.context.stats.protocol_stats("ssl", prefix).counters)

    def connections(self, name: str) -> list[Any]:
        return list(self.listeners.bound[name].connections)

    async def close(self) -> None:
        await self.listeners.close()


async def sidecar(ip: str, cert_dir: Path, snapshot: Snapshot) -> Sidecar:
    # check_interval 0: every new connection looks at the files (rotation without waiting)
    tls = TlsManager(cert_dir, "cluster.local", check_interval=0.0)
    context = Context()
    context.clusters.tls = tls
    context.apply(snapshot)
    listeners = ListenerManager(context, ip, tls=tls)
    await listeners.apply(snapshot)
    assert not listeners.errors, listeners.errors
    return Sidecar(context, tls, listeners)


@dataclass
class Pair:
    """Sidecar A (outbound HTTP and TCP to B over mTLS) and sidecar B (inbound, in front of
    the app), with the certificate directories each reads."""

    tmp: Path
    app: App
    a_certs: Path
    b_certs: Path
    sides: dict[str, Sidecar] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def a(self) -> Sidecar:
        return self.sides["a"]

    @property
    def b(self) -> Sidecar:
        return self.sides["b"]

    async def start(
        self,
        *,
        permissive: bool = False,
        upstream: UpstreamTls | None = None,
        http2: bool = False,
    ) -> None:
        ports = self.ports
        for name, ip in (("b_http", B_IP), ("b_tcp", B_IP), ("a_http", A_IP), ("a_tcp", A_IP)):
            ports[name] = free_port(ip)
        inbound = DownstreamTls(permissive=permissive)
        self.sides["b"] = await sidecar(
            B_IP,
            self.b_certs,
            Snapshot(
                listeners={
                    "in_http": Listener(
                        "in_http",
                        B_IP,
                        ports["b_http"],
                        True,
                        False,
                        http_manager("inbound_http", "app"),
                        inbound=True,
                        tls=inbound,
                    ),
                    "in_tcp": Listener(
                        "in_tcp",
                        B_IP,
                        ports["b_tcp"],
                        True,
                        False,
                        TcpProxy("inbound_tcp", "app_tcp"),
                        inbound=True,
                        tls=inbound,
                    ),
                },
                clusters={
                    "app": Cluster(
                        "app", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, self.app.http_port),)
                    ),
                    "app_tcp": Cluster(
                        "app_tcp",
                        ClusterType.STATIC,
                        endpoints=(Endpoint(APP_IP, self.app.tcp_port),),
                    ),
                },
            ),
        )
        mtls = upstream or UpstreamTls()
        self.sides["a"] = await sidecar(
            A_IP,
            self.a_certs,
            Snapshot(
                listeners={
                    "out_http": Listener(
                        "out_http", A_IP, ports["a_http"], True, False, http_manager("out", "b")
                    ),
                    "out_tcp": Listener(
                        "out_tcp", A_IP, ports["a_tcp"], True, False, TcpProxy("out_tcp", "b_tcp")
                    ),
                },
                clusters={
                    "b": Cluster(
                        "b",
                        ClusterType.STATIC,
                        endpoints=(Endpoint(B_IP, ports["b_http"]),),
                        mtls=mtls,
                        http2=http2,
                    ),
                    "b_tcp": Cluster(
                        "b_tcp",
                        ClusterType.STATIC,
                        endpoints=(Endpoint(B_IP, ports["b_tcp"]),),
                        mtls=mtls,
                    ),
                },
            ),
        )

    @property
    def inbound_http(self) -> str:
        return f"listener.{B_IP}_{self.ports['b_http']}"

    @property
    def inbound_tcp(self) -> str:
        return f"listener.{B_IP}_{self.ports['b_tcp']}"

    async def get(
        self, session: aiohttp.ClientSession, path: str = "/", **headers: str
    ) -> tuple[int, Any]:
        """GET through sidecar A (its outbound listener), as B's app answered."""
        url = f"http://{A_IP}:{self.ports['a_http']}{path}"
        async with session.get(url, headers=headers) as response:
            text = await response.text()
            return response.status, json.loads(text) if response.status == 200 else text

    async def close(self) -> None:
        for side in self.sides.values():
            await side.close()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    served = App()
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


@pytest.fixture
async def pair(tmp_path: Path, app: App, mesh_ca: Any) -> AsyncIterator[Pair]:
    made = Pair(
        tmp_path,
        app,
        mesh_ca.write(tmp_path / "a", A_ID),
        mesh_ca.write(tmp_path / "b", B_ID),
    )
    try:
        yield made
    finally:
        await made.close()


async def raw_exchange(
    port: int,
    payload: bytes,
    *,
    tls: ssl.SSLContext | None = None,
    ip: str = B_IP,
    eof: bool = False,
) -> bytes:
    """Connect (with TLS when given), send `payload` (then a FIN with `eof`), read until the
    server closes; what it sent back (b"" when refused). A failed TLS handshake or a reset is
    a refusal too."""
    try:
        async with asyncio.timeout(15):
            reader, writer = await asyncio.open_connection(
                ip, port, ssl=tls, server_hostname=ip if tls else None
            )
            try:
                writer.write(payload)
                if eof:
                    writer.write_eof()
                return await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (OSError, ssl.SSLError):
        return b""


def client_context(cert_dir: Path | None = None) -> ssl.SSLContext:
    """A client that does not check the server (the server's checks are under test), with
    the client certificate in `cert_dir` if any."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        context.load_cert_chain(str(cert_dir / "cert-chain.pem"), str(cert_dir / "key.pem"))
    return context


REQUEST = b"GET /sneaky HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"


async def test_http_between_sidecars_carries_the_callers_identity(pair: Pair) -> None:
    await pair.start()
    async with aiohttp.ClientSession() as session:
        # A forged x-forwarded-client-cert from the calling app is replaced, never passed on.
        status, seen = await pair.get(session, "/hello", **{"x-forwarded-client-cert": "URI=evil"})
        assert status == 200, seen
        xfcc = seen["x-forwarded-client-cert"]
        by, hash_, uri = xfcc.split(";")
        assert (by, uri) == (f"By={B_ID}", f"URI={A_ID}")
        assert len(hash_.removeprefix("Hash=")) == 64
        # Keep-alive: the next request reuses the mTLS connection.
        for _ in range(3):
            assert (await pair.get(session))[0] == 200
        # What Mixer will read on B's side: the open connection's peer.
        [connection] = [c for c in pair.b.connections("in_http") if isinstance(c, HttpConnection)]
        assert connection.peer_identity is not None
        assert connection.peer_identity.attributes() == {
            "source.user": A_ID,
            "connection.mtls": True,
        }
        assert connection.peer_identity.alpn == "http/1.1"
    assert pair.b.ssl(pair.inbound_http) == {"handshake": 1}
    assert pair.a.ssl("cluster.b") == {"handshake": 1}


async def test_http2_between_sidecars_over_mtls_by_alpn(pair: Pair) -> None:
    """An http2 cluster to another sidecar: h2 chosen by ALPN inside mutual TLS, every request
    a stream on one connection, B translating to its HTTP/1.1 app; the identity still flows."""
    await pair.start(http2=True)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(pair.get(session, f"/{i}") for i in range(20)))
        assert [status for status, _ in results] == [200] * 20
        seen = results[0][1]
        assert seen["x-forwarded-client-cert"].endswith(f"URI={A_ID}")
    [connection] = pair.b.connections("in_http")
    assert type(connection).__name__ == "H2Downstream"
    assert connection.peer_identity is not None
    assert connection.peer_identity.alpn == "h2"
    assert connection.peer_identity.spiffe_id == A_ID
    assert pair.b.ssl(pair.inbound_http) == {"handshake": 1}
    assert pair.a.ssl("cluster.b") == {"handshake": 1}


async def test_tcp_between_sidecars_over_mtls(pair: Pair) -> None:
    await pair.start()
    reader, writer = await asyncio.open_connection(A_IP, pair.ports["a_tcp"])
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB both ways through two TLS hops
        writer.write(payload)
        echoed = await reader.readexactly(len(payload))
        assert echoed == payload
        [connection] = [c for c in pair.b.connections("in_tcp") if isinstance(c, TcpConnection)]
        assert connection.peer_identity is not None
        assert connection.peer_identity.spiffe_id == A_ID
        assert connection.peer_identity.alpn == "istio"
    finally:
        writer.close()
        await writer.wait_closed()
    assert pair.b.ssl(pair.inbound_tcp)["handshake"] == 1


async def test_a_connect_tunnel_to_a_sidecar_runs_inside_mtls(pair: Pair) -> None:
    await pair.start()
    reader, writer = await asyncio.open_connection(A_IP, pair.ports["a_http"])
    try:
        writer.write(b"CONNECT b:9080 HTTP/1.1\r\nhost: b:9080\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"GET /tunnelled HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert pair.app.requests[-1]["x-forwarded-client-cert"].endswith(f"URI={A_ID}")
    assert pair.b.ssl(pair.inbound_http) == {"handshake": 1}


async def test_plaintext_to_a_strict_port_is_refused_counted_and_logged_once(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    await pair.start()
    caplog.set_level(logging.WARNING, TLS_LOG)
    for _ in range(3):
        assert await raw_exchange(pair.ports["b_http"], REQUEST) == b""
    assert await raw_exchange(pair.ports["b_tcp"], b"plain bytes") == b""
    assert pair.app.requests == []
    assert pair.b.ssl(pair.inbound_http) == {"plaintext_refused": 3}
    assert pair.b.ssl(pair.inbound_tcp) == {"plaintext_refused": 1}
    refusals = [r for r in caplog.records if "plaintext" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # once per peer a minute
    assert "127.0.0.1" in refusals[0].getMessage()


async def test_permissive_port_serves_plaintext_and_mtls_side_by_side(pair: Pair) -> None:
    await pair.start(permissive=True)
    plain = await raw_exchange(
        pair.ports["b_http"],
        b"GET /plain HTTP/1.1\r\nhost: b\r\nx-forwarded-client-cert: URI=forged\r\n"
        b"connection: close\r\n\r\n",
    )
    assert plain.startswith(b"HTTP/1.1 200"), plain[:200]
    assert pair.app.requests[-1].get("x-forwarded-client-cert") is None  # dropped, none set
    async with aiohttp.ClientSession() as session:
        status, seen = await pair.get(session, "/mtls")
    assert status == 200
    assert seen["x-forwarded-client-cert"].endswith(f"URI={A_ID}")
    assert await raw_exchange(pair.ports["b_tcp"], b"hello", eof=True) == b"hello"
    assert pair.b.ssl(pair.inbound_http) == {"plaintext": 1, "handshake": 1}


async def test_a_certificate_from_another_ca_is_refused(
    pair: Pair, other_ca: Any, mesh_ca: Any, tmp_path: Path
) -> None:
    await pair.start()
    # A client with a certificate another CA signed (for an identity in the trust domain).
    stranger = other_ca.write(tmp_path / "stranger", A_ID, root=mesh_ca.root_pem)
    assert await raw_exchange(pair.ports["b_http"], REQUEST, tls=client_context(stranger)) == b""
    await pair.b.tls.quiet()
    assert pair.b.ssl(pair.inbound_http) == {"fail_verify_error": 1}
    # And a server with one: sidecar A refuses it (503), B's app never hears of it.
    other_ca.write(pair.b_certs, B_ID, root=mesh_ca.root_pem)
    async with aiohttp.ClientSession() as session:
        status, text = await pair.get(session)
    assert status == 503, text
    assert "TLS handshake: unable to get local issuer certificate" in text, text
    assert pair.a.ssl("cluster.b")["fail_verify_error"] >= 1
    assert pair.app.requests == []


async def test_a_certificate_for_another_trust_domain_is_refused(
    pair: Pair, mesh_ca: Any, tmp_path: Path
) -> None:
    await pair.start()
    foreign = mesh_ca.write(tmp_path / "foreign", "spiffe://evil.example/ns/default/sa/a")
    assert await raw_exchange(pair.ports["b_http"], REQUEST, tls=client_context(foreign)) == b""
    await pair.b.tls.quiet()
    assert pair.b.ssl(pair.inbound_http) == {"fail_verify_san": 1}
    # The caller's side checks the server the same way.
    mesh_ca.write(pair.b_certs, "spiffe://evil.example/ns/default/sa/b")
    async with aiohttp.ClientSession() as session:
        status, text = await pair.get(session)
    assert status == 503
    assert "outside the trust domain cluster.local" in text
    assert pair.a.ssl("cluster.b") == {"fail_verify_san": 1}
    assert pair.app.requests == []


async def test_an_expired_certificate_is_refused(pair: Pair, mesh_ca: Any, tmp_path: Path) -> None:
    await pair.start()
    expired = mesh_ca.write(
        tmp_path / "expired",
        A_ID,
        now=NOW - datetime.timedelta(hours=2),
        ttl=datetime.timedelta(hours=1),
    )
    assert await raw_exchange(pair.ports["b_http"], REQUEST, tls=client_context(expired)) == b""
    await pair.b.tls.quiet()
    assert pair.b.ssl(pair.inbound_http) == {"fail_verify_error": 1}
    assert pair.app.requests == []


async def test_tls_without_a_client_certificate_is_refused(pair: Pair) -> None:
    await pair.start()
    assert await raw_exchange(pair.ports["b_http"], REQUEST, tls=client_context()) == b""
    await pair.b.tls.quiet()
    assert pair.b.ssl(pair.inbound_http) == {"fail_verify_no_cert": 1}
    assert pair.app.requests == []


async def test_tls_garbage_is_closed_logged_and_counted(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    await pair.start(permissive=True)
    caplog.set_level(logging.WARNING, TLS_LOG)
    # A TLS record header, then nonsense: neither a handshake nor plaintext to serve.
    garbage = b"\x16\x03\x01\x00\x40" + bytes(range(64)) + b"\x00" * 512
    assert await raw_exchange(pair.ports["b_http"], garbage) == b""
    await pair.b.tls.quiet()
    assert pair.b.ssl(pair.inbound_http) == {"connection_error": 1}
    assert any("TLS handshake from" in r.getMessage() for r in caplog.records)
    assert pair.app.requests == []


async def test_only_the_expected_names_are_accepted(pair: Pair) -> None:
    expect_c = SanMatcher("URI", MatchKind.EXACT, "spiffe://cluster.local/ns/default/sa/c")
    await pair.start(upstream=UpstreamTls(subject_alt_names=(expect_c,)))
    async with aiohttp.ClientSession() as session:
        status, text = await pair.get(session)
    assert status == 503
    assert "not one of the names expected" in text
    assert pair.a.ssl("cluster.b") == {"fail_verify_san": 1}


async def test_expected_name_matches(pair: Pair) -> None:
    expect_b = SanMatcher("URI", MatchKind.PREFIX, "spiffe://cluster.local/ns/default/sa/")
    await pair.start(upstream=UpstreamTls(subject_alt_names=(expect_b,)))
    async with aiohttp.ClientSession() as session:
        assert (await pair.get(session))[0] == 200


async def test_rotation_serves_new_handshakes_and_keeps_open_connections(
    pair: Pair, mesh_ca: Any
) -> None:
    await pair.start()
    async with aiohttp.ClientSession() as session:
        _, seen = await pair.get(session)
        before = seen["x-forwarded-client-cert"]
        # The node agent rewrites A's files (key, then chain) and B's: a new key each.
        mesh_ca.write(pair.a_certs, A_ID)
        mesh_ca.write(pair.b_certs, B_ID)
        # The open keep-alive connection between the sidecars carries on, with its old
        # certificates: the same client certificate hash reaches the app.
        _, seen = await pair.get(session)
        assert seen["x-forwarded-client-cert"] == before
        # While it is busy (a slow request), another request needs a new connection: a new
        # handshake, with the new certificates.
        slow = asyncio.ensure_future(pair.get(session, "/slow"))
        await pair.app.slow_started.wait()
        _, seen = await pair.get(session, "/fresh")
        after = seen["x-forwarded-client-cert"]
        assert after != before
        assert after.split(";")[0] == f"By={B_ID}"
        assert after.endswith(f"URI={A_ID}")
        pair.app.release.set()
        status, _ = await slow
        assert status == 200
    assert pair.a.ssl("cluster.b")["handshake"] == 2


async def test_reconnections_resume_their_tls_sessions(pair: Pair) -> None:
    await pair.start()
    # One request per connection (HTTP/1.0 upstream semantics: max_requests_per_connection 1)
    b_cluster = pair.a.context.snapshot.clusters["b"]
    limited = Snapshot(
        listeners=pair.a.context.snapshot.listeners,
        clusters={
            **pair.a.context.snapshot.clusters,
            "b": Cluster(
                "b",
                ClusterType.STATIC,
                endpoints=b_cluster.endpoints,
                mtls=b_cluster.mtls,
                max_requests_per_connection=1,
            ),
        },
    )
    pair.a.context.apply(limited)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            assert (await pair.get(session))[0] == 200
    stats = pair.a.ssl("cluster.b")
    assert stats["handshake"] == 5
    assert stats["session_reused"] == 4, stats
    assert pair.b.ssl(pair.inbound_http)["session_reused"] == 4


async def test_half_written_files_keep_the_certificate_in_use(
    pair: Pair, mesh_ca: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await pair.start()
    caplog.set_level(logging.WARNING, TLS_LOG)
    async with aiohttp.ClientSession() as session:
        assert (await pair.get(session))[0] == 200
        # A new key without its certificate yet (the node agent caught between two writes).
        key, _ = mesh_ca.issue(A_ID)
        (pair.a_certs / "key.pem").write_bytes(key)
        slow = asyncio.ensure_future(pair.get(session, "/slow"))
        await pair.app.slow_started.wait()
        status, seen = await pair.get(session, "/new-connection")
        assert status == 200, seen  # a new handshake, with the certificate loaded before
        pair.app.release.set()
        await slow
    assert any("keeping the certificate in use" in r.getMessage() for r in caplog.records)
    assert pair.a.ssl("cluster.b")["handshake"] == 2


def _tls_files(directory: Path) -> dict[str, Any]:
    return {
        "tlsCertificates": [
            {
                "certificateChain": {"filename": str(directory / "cert-chain.pem")},
                "privateKey": {"filename": str(directory / "key.pem")},
            }
        ],
        "validationContext": {"trustedCa": {"filename": str(directory / "root-cert.pem")}},
    }


async def test_envoy_shaped_tls_config_works_without_a_cert_dir(
    tmp_path: Path, app: App, mesh_ca: Any
) -> None:
    """Files named by Envoy TLS contexts (compiled from protos), a proxy without --cert-dir."""
    a_dir, b_dir = mesh_ca.write(tmp_path / "a", A_ID), mesh_ca.write(tmp_path / "b", B_ID)
    tls_types = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
    b_port, a_port = free_port(B_IP), free_port(A_IP)
    inbound = json_format.ParseDict(
        {
            "name": "inbound_tcp",
            "address": {"socketAddress": {"address": B_IP, "portValue": b_port}},
            "trafficDirection": "INBOUND",
            "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector"}],
            "filterChains": [
                {
                    "filterChainMatch": {"transportProtocol": "tls"},
                    "transportSocket": {
                        "name": "envoy.transport_sockets.tls",
                        "typedConfig": {
                            "@type": f"{tls_types}.DownstreamTlsContext",
                            "commonTlsContext": _tls_files(b_dir),
                            "requireClientCertificate": True,
                        },
                    },
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typedConfig": {
                                "@type": "type.googleapis.com/"
                                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "statPrefix": "inbound_tcp",
                                "cluster": "app_tcp",
                            },
                        }
                    ],
                }
            ],
        },
        listener_pb2.Listener(),
    )
    upstream_context = _tls_files(a_dir)
    upstream_context["validationContext"]["matchTypedSubjectAltNames"] = [
        {"sanType": "URI", "matcher": {"exact": B_ID}}
    ]
    outbound_cluster = json_format.ParseDict(
        {
            "name": "b_tcp",
            "type": "STATIC",
            "loadAssignment": {
                "clusterName": "b_tcp",
                "endpoints": [
                    {
                        "lbEndpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socketAddress": {"address": B_IP, "portValue": b_port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
            "transportSocket": {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {
                    "@type": f"{tls_types}.UpstreamTlsContext",
                    "commonTlsContext": upstream_context,
                },
            },
        },
        cluster_pb2.Cluster(),
    )
    b = await sidecar_without_cert_dir(
        B_IP,
        Snapshot(
            listeners={"inbound_tcp": compile.listener(from_protobuf(inbound))},
            clusters={
                "app_tcp": Cluster(
                    "app_tcp", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, app.tcp_port),)
                )
            },
        ),
    )
    a = await sidecar_without_cert_dir(
        A_IP,
        Snapshot(
            listeners={"out": Listener("out", A_IP, a_port, True, False, TcpProxy("out", "b_tcp"))},
            clusters={"b_tcp": compile.cluster(from_protobuf(outbound_cluster))},
        ),
    )
    try:
        reader, writer = await asyncio.open_connection(A_IP, a_port)
        writer.write(b"envoy-shaped")
        assert await reader.readexactly(12) == b"envoy-shaped"
        writer.close()
        await writer.wait_closed()
        assert a.ssl("cluster.b_tcp") == {"handshake": 1}
        assert b.ssl(f"listener.{B_IP}_{b_port}") == {"handshake": 1}
    finally:
        await a.close()
        await b.close()


async def sidecar_without_cert_dir(ip: str, snapshot: Snapshot) -> Sidecar:
    tls = TlsManager(None)
    context = Context()
    context.clusters.tls = tls
    context.apply(snapshot)
    listeners = ListenerManager(context, ip, tls=tls)
    await listeners.apply(snapshot)
    return Sidecar(context, tls, listeners)
