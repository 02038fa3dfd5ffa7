"""Upstream clusters: HTTP/1.1 client connections, keep-alive pools, load balancing, circuit
breakers and outlier detection.

Theory of operation. A `ClusterRuntime` lives as long as its cluster is in the config; a new
snapshot swaps its config and endpoint list in place (`update`), so pools, counters and
ejections of hosts that stay survive an EDS push and their connections are never dropped.
Each host keeps a stack of idle keep-alive connections. `acquire` takes an idle one, opens a
new one while the cluster is under max_connections, or waits as a pending request (up to
max_pending_requests; beyond it the caller answers 503 with x-envoy-overloaded). A released
connection goes to a waiter for the same host, else back to the idle stack; it is closed when
its host left the cluster. An `UpstreamConnection` parses responses with httptools and hands
every event to the `UpstreamHandler` (the request being proxied) attached to it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from istio.proxy.config import Cluster, ClusterType, Endpoint, LbPolicy
from istio.proxy.stats import ClusterStats, ProtocolStats, Stats
from istio.proxy.tls import ALPN_H2, ALPN_HTTP1, TlsError, TlsManager, remember_session
from istio.proxy.writes import CorkedWrites

if TYPE_CHECKING:
    from istio.proxy.upstream_h2 import H2Upstream, UpstreamStream

Address = tuple[str, int]


class Overflow(Exception):
    """A circuit breaker tripped."""


class ConnectFailure(Exception):
    """The upstream could not be connected."""


class UpstreamHandler(Protocol):
    """What a request being proxied hears from its upstream connection."""

    def on_response_headers(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, chunked: bool
    ) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_upstream_reset(self, reason: str) -> None: ...

    def on_upstream_write_paused(self, paused: bool) -> None: ...

    def cork(self) -> bool:
        """Hold the writes to the client back while one read is handled (True: this call
        corked them, `uncork` sends them in one write)."""
        ...

    def uncork(self) -> None: ...


class TunnelEnd(Protocol):
    """Where an upgraded (101) connection's bytes go once its tunnel is open."""

    def tunnel_from_upstream(self, data: bytes) -> None: ...


class Resolver:
    """Names to addresses: a hosts file first (the local platform's override), then DNS."""

    def __init__(self, hosts: Mapping[str, str] | None = None) -> None:
        self.hosts = dict(hosts or {})

    @classmethod
    def from_file(cls, path: str | None) -> Resolver:
        hosts: dict[str, str] = {}
        if path:
            with open(path) as lines:
                for line in lines:
                    fields = line.split("#", 1)[0].split()
                    for name in fields[1:]:
                        hosts.setdefault(name.lower(), fields[0])
        return cls(hosts)

    def resolve(self, host: str) -> str:
        return self.hosts.get(host.lower(), host)


def local_address(source: str, destination: str) -> tuple[str, int] | None:
    """Where a connection to `destination` leaves from: `source` (any port), as Envoy's
    upstream_bind_config.source_address, so that the peer sees this workload's address (the
    local platform gives each workload its own 127.0.0.N, and Mixer tells callers apart by
    source.ip). None, the kernel's choice, without a source, for a destination that is a name
    or of the other family, and from a loopback source to a host it cannot reach (not
    loopback)."""
    if not source:
        return None
    try:
        ours = ipaddress.ip_address(source)
        theirs = ipaddress.ip_address(destination)
    except ValueError:
        return None
    if ours.version != theirs.version or (ours.is_loopback and not theirs.is_loopback):
        return None
    return source, 0


class UpstreamConnection(CorkedWrites, asyncio.Protocol):
    __slots__ = (
        "_chunked",
        "_headers",
        "_length",
        "_until_close",
        "closed",
        "cluster",
        "counted",
        "handler",
        "head_request",
        "host",
        "parser",
        "pending",
        "reading_paused",
        "requests",
        "response_started",
        "session_pending",
        "skip",
        "transport",
        "tunnel",
        "upgraded",
    )

    def __init__(self, cluster: ClusterRuntime, host: HostState) -> None:
        self.cluster = cluster
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pending: list[bytes] | None = None  # writes held back while corked
        self.reading_paused = False
        self.handler: UpstreamHandler | None = None
        self.requests = 0
        self.closed = False
        self.counted = False
        self.head_request = False
        self.response_started = False
        self.skip = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._chunked = False
        self._until_close = False
        self.upgraded: list[bytes] | None = None  # after a 101: raw bytes not yet tunnelled
        self.tunnel: TunnelEnd | None = None  # after the tunnel opened: all bytes go here
        self.session_pending = False  # mTLS: its session is kept once a response came back

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.handler is None:
            return
        self.closed = True
        self.cluster.connection_closed(self)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if self._until_close and self.response_started:
            handler.on_response_end()
        else:
            handler.on_upstream_reset("upstream connection closed")

    def data_received(self, data: bytes) -> None:
        if self.upgraded is not None:
            if self.tunnel is not None:
                self.tunnel.tunnel_from_upstream(data)
            else:  # the 101 is on its way to the client: hold these, and read no more
                self.upgraded.append(data)
                self.pause_reading(True)
            return
        handler = self.handler
        if handler is None:
            self.close()  # nothing was asked: a broken or hostile upstream
            return
        # what this read makes the handler write to its client goes out in one write
        corked = handler.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as error:
            # A 101: what follows is the upgraded protocol's, for the tunnel.
            self.upgraded = [data[error.args[0] :]] if len(error.args) else []
            self.pause_reading(True)
        except httptools.HttpParserError as error:
            current, self.handler = self.handler, None
            self.close()
            if current is not None:
                current.on_upstream_reset(f"upstream protocol error: {error}")
        finally:
            if corked:
                handler.uncork()

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.on_upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.on_upstream_write_paused(False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._length = None
        self._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            self._length = int(value)
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.skip = 100 <= status < 200 and status != 101
        if self.skip or self.handler is None:
            return  # an interim 100 Continue: this proxy answered the client's already
        self.response_started = True
        no_body = self.head_request or status in (204, 304)
        self._until_close = not no_body and self._length is None and not self._chunked
        self.handler.on_response_headers(status, self._headers, self._length, self._chunked)
        if self.head_request and self.handler is not None:
            # httptools cannot be told a response has no body: finish here, never reuse.
            handler, self.handler = self.handler, None
            self.close()
            handler.on_response_end()

    def on_body(self, body: bytes) -> None:
        if self.handler is not None and not self.skip:
            self.handler.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.skip:
            self.skip = False
            return
        if self.parser.get_status_code() == 101:
            return  # not the end: the connection becomes the tunnel (HttpParserUpgrade next)
        handler, self.handler = self.handler, None
        if not self.parser.should_keep_alive():
            self.close()
        if handler is not None:
            handler.on_response_end()

    # used by the request being proxied

    def attach(self, handler: UpstreamHandler, head: bytes, *, head_request: bool) -> None:
        assert self.transport is not None
        self.handler = handler
        self.requests += 1
        self.head_request = head_request
        self.response_started = False
        self._until_close = False
        self.write(head)

    def end_body(self, chunked: bool) -> None:
        """The request body ended: its last chunk when it was chunked."""
        if chunked:
            self.write(b"0\r\n\r\n")

    def tunnel_open(self, handler: TunnelEnd) -> list[bytes]:
        """From now on every byte read goes to `handler.tunnel_from_upstream`; returns what
        came after the 101 before the tunnel opened."""
        early, self.upgraded = self.upgraded or [], []
        self.tunnel = handler
        self.pause_reading(False)
        return early

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.closed or paused == self.reading_paused:
            return
        self.reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def detach(self) -> None:
        self.handler = None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.uncork()
            self.closed = True
            self.transport.close()
            self.cluster.connection_closed(self)


class HostState:
    """One upstream address: its idle connections and its outlier-detection state."""

    __slots__ = (
        "active",
        "address",
        "consecutive_5xx",
        "ejected_until",
        "ejections",
        "h2",
        "h2_connecting",
        "idle",
        "removed",
    )

    def __init__(self, address: Address) -> None:
        self.address = address
        self.idle: list[UpstreamConnection] = []
        # HTTP/2 clusters: the host's multiplexed connections, and the one being opened
        self.h2: list[H2Upstream] = []
        self.h2_connecting: asyncio.Future[H2Upstream] | None = None
        self.active = 0
        self.consecutive_5xx = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.removed = False


class ClusterRuntime:
    def __init__(
        self,
        config: Cluster,
        endpoints: tuple[Endpoint, ...],
        stats: ClusterStats,
        resolver: Resolver,
        *,
        tls: TlsManager | None = None,
        ssl_stats: Callable[[], ProtocolStats] | None = None,
        source_address: str = "",
    ) -> None:
        self.config = config
        self.stats = stats
        self.resolver = resolver
        self.tls = tls
        self.source_address = source_address
        self._ssl_stats = ssl_stats
        self.hosts: dict[Address, HostState] = {}
        self.order: list[HostState] = []
        self.connections = 0
        self.active_requests = 0
        self.active_retries = 0
        self.pending = 0
        self.waiters: deque[tuple[HostState, asyncio.Future[UpstreamConnection | None]]] = deque()
        self._next = 0
        self._ssl: ssl.SSLContext | None = None
        self.update(config, endpoints)

    def update(self, config: Cluster, endpoints: tuple[Endpoint, ...]) -> None:
        self.config = config
        hosts: dict[Address, HostState] = {}
        for endpoint in endpoints:
            address = (endpoint.host, endpoint.port)
            hosts[address] = self.hosts.get(address) or HostState(address)
        for address, host in self.hosts.items():
            if address not in hosts and config.type is not ClusterType.ORIGINAL_DST:
                self._retire(host)
        if config.type is not ClusterType.ORIGINAL_DST:
            self.hosts = hosts
        self.order = list(hosts.values())

    def _retire(self, host: HostState) -> None:
        host.removed = True
        if host.ejected_until:
            self.stats.ejections_active -= 1
            host.ejected_until = 0.0
        idle, host.idle = host.idle, []
        for connection in idle:
            connection.close()
        for multiplexed in list(host.h2):
            multiplexed.drain()  # its streams finish first

    def shutdown(self) -> None:
        for host in self.hosts.values():
            self._retire(host)
        for _, waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailure("cluster removed"))

    # load balancing and outlier detection

    def pick(self, original: Address | None = None) -> HostState | None:
        if self.config.type is ClusterType.ORIGINAL_DST:
            if original is None:
                return None
            host = self.hosts.get(original)
            if host is None:
                host = self.hosts[original] = HostState(original)
            return host
        hosts = self.order
        if not hosts:
            return None
        if self.config.outlier is not None and self.stats.ejections_active:
            now = time.monotonic()
            healthy = [h for h in hosts if not self._ejected(h, now)]
            if len(healthy) * 2 >= len(hosts) and healthy:  # else Envoy's panic mode: all
                hosts = healthy
        if len(hosts) == 1:
            return hosts[0]
        policy = self.config.lb
        if policy is LbPolicy.RANDOM:
            return random.choice(hosts)
        if policy is LbPolicy.LEAST_REQUEST:
            first, second = random.sample(hosts, 2)
            return first if first.active <= second.active else second
        self._next = (self._next + 1) % len(hosts)
        return hosts[self._next]

    def _ejected(self, host: HostState, now: float) -> bool:
        if not host.ejected_until:
            return False
        if now < host.ejected_until:
            return True
        host.ejected_until = 0.0
        self.stats.ejections_active -= 1
        return False

    def record(self, host: HostState, status: int) -> None:
        """Outlier detection: `status` is the response code, 503 for a connect failure."""
        outlier = self.config.outlier
        if outlier is None:
            return
        if status < 500:
            host.consecutive_5xx = 0
            return
        host.consecutive_5xx += 1
        if host.consecutive_5xx < outlier.consecutive_5xx or host.ejected_until:
            return
        allowed = max(1, len(self.order) * outlier.max_ejection_percent // 100)
        if self.stats.ejections_active >= allowed:
            return
        host.ejections += 1
        host.consecutive_5xx = 0
        host.ejected_until = time.monotonic() + outlier.base_ejection_time * host.ejections
        self.stats.ejections_active += 1
        self.stats.ejections_total += 1

    # connections

    async def acquire(self, host: HostState) -> UpstreamConnection:
        idle = host.idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        if self.connections >= self.config.breakers.max_connections:
            if self.pending >= self.config.breakers.max_pending_requests:
                self.stats.rq_pending_overflow += 1
                raise Overflow("pending requests")
            waiter: asyncio.Future[UpstreamConnection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self.waiters.append((host, waiter))
            self.pending += 1
            self.stats.rq_pending_active += 1
            try:
                handed = await waiter
            finally:
                self.pending -= 1
                self.stats.rq_pending_active -= 1
                if not waiter.done() or waiter.cancelled():
                    self.waiters = deque(w for w in self.waiters if w[1] is not waiter)
            if handed is not None:
                return handed
        return await self._connect(host)

    async def acquire_stream(self, host: HostState) -> UpstreamStream:
        """A stream for one request to `host` on an HTTP/2 connection with room for it; a
        new connection when none has, shared by every request that waits for it."""
        for connection in host.h2:
            if connection.available():
                return connection.stream()
        while True:
            connecting = host.h2_connecting
            if connecting is None:
                if self.connections >= self.config.breakers.max_connections:
                    self.stats.rq_pending_overflow += 1
                    raise Overflow("connections")
                connecting = host.h2_connecting = asyncio.get_running_loop().create_future()
                try:
                    connection = await self._connect_h2(host)
                except BaseException as error:
                    connecting.set_exception(
                        error if isinstance(error, ConnectFailure) else ConnectFailure(str(error))
                    )
                    connecting.exception()  # retrieved: waiters may be none
                    raise
                finally:
                    host.h2_connecting = None
                host.h2.append(connection)
                connecting.set_result(connection)
            else:
                connection = await asyncio.shield(connecting)
            if connection.available():
                return connection.stream()
            # full already (the peer allows few streams): look again, or open another
            for other in host.h2:
                if other.available():
                    return other.stream()

    async def _connect_h2(self, host: HostState) -> H2Upstream:
        from istio.proxy.upstream_h2 import H2Upstream  # only clusters that speak HTTP/2

        protocol = await self._counted_open(lambda: H2Upstream(self, host), host, ALPN_H2)
        return cast("H2Upstream", protocol)

    def h2_closed(self, connection: H2Upstream) -> None:
        if connection.counted:
            return
        connection.counted = True
        self.connections -= 1
        self.stats.cx_active -= 1
        if connection in connection.host.h2:
            connection.host.h2.remove(connection)

    async def connect_tunnel(self, host: HostState) -> UpstreamConnection:
        """A new connection for a CONNECT tunnel: counted like any, never pooled, and without
        the TLS to an external host a cluster may originate (the client speaks its own TLS
        through it). Mutual TLS to another sidecar stays: that sidecar takes nothing else."""
        return await self._connect(host, plain=True)

    async def _connect(self, host: HostState, *, plain: bool = False) -> UpstreamConnection:
        protocol = await self._counted_open(
            lambda: UpstreamConnection(self, host), host, ALPN_HTTP1, plain=plain
        )
        connection = cast(UpstreamConnection, protocol)
        connection.session_pending = self.config.mtls is not None
        return connection

    async def _counted_open(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: HostState,
        alpn: tuple[str, ...],
        *,
        plain: bool = False,
    ) -> asyncio.Protocol:
        """`open` within the connect timeout, counted against max_connections from the
        start; a failure (or the request giving up) gives the slot back."""
        self.connections += 1
        self.stats.cx_total += 1
        self.stats.cx_active += 1
        name, port = host.address
        try:
            async with asyncio.timeout(self.config.connect_timeout or None):
                _, protocol = await self.open(factory, host, alpn, plain=plain)
        except (ConnectFailure, TimeoutError, asyncio.CancelledError) as error:
            self.connections -= 1
            self.stats.cx_active -= 1
            self.stats.cx_connect_fail += not isinstance(error, asyncio.CancelledError)
            self._wake()
            if isinstance(error, TimeoutError):
                raise ConnectFailure(f"{name}:{port}: connect timeout") from None
            raise
        return protocol

    async def open(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: HostState,
        alpn: tuple[str, ...],
        *,
        plain: bool = False,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A connection to `host` for `factory()`'s protocol: mutual TLS when the cluster
        originates it (the server's identity checked first), TLS to an external host when it
        originates that and not `plain`, else TCP. ConnectFailure names the host and the
        reason; the caller bounds the time."""
        name, port = host.address
        address = self.resolver.resolve(name)
        loop = asyncio.get_running_loop()
        mtls = self.config.mtls
        local = local_address(self.source_address, address)
        try:
            if mtls is not None:
                return await (self.tls or TlsManager(None)).connect(
                    factory, address, port, mtls, alpn, self.ssl_stats(), local_addr=local
                )
            tls = None
            server_hostname = None
            if self.config.tls_sni is not None and not plain:
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                tls = self._ssl
                server_hostname = self.config.tls_sni or name
            transport, protocol = await loop.create_connection(
                factory,
                address,
                port,
                ssl=tls,
                server_hostname=server_hostname,
                local_addr=local,
            )
            return transport, protocol
        except (OSError, ssl.SSLError, TlsError) as error:
            raise ConnectFailure(f"{name}:{port}: {error or type(error).__name__}") from None

    def ssl_stats(self) -> ProtocolStats:
        """`ssl.cluster.<name>.*`: handshakes, resumptions and refusals of its mTLS."""
        if self._ssl_stats is None:
            return ProtocolStats()
        return self._ssl_stats()

    def release(self, connection: UpstreamConnection) -> None:
        """A connection whose exchange completed cleanly: reuse it or close it."""
        connection.detach()
        if connection.session_pending:
            connection.session_pending = False
            if connection.transport is not None:
                remember_session(connection.transport)
        connection.uncork()
        if connection.reading_paused:  # held back for its last client: the next must read
            connection.pause_reading(False)
        limit = self.config.max_requests_per_connection
        host = connection.host
        if connection.closed or host.removed or (limit and connection.requests >= limit):
            connection.close()
            return
        for index, (wanted, waiter) in enumerate(self.waiters):
            if wanted is host and not waiter.done():
                del self.waiters[index]
                waiter.set_result(connection)
                return
        if self.waiters:
            connection.close()  # frees a slot for a waiter of another host
            return
        host.idle.append(connection)

    def connection_closed(self, connection: UpstreamConnection) -> None:
        if connection.counted:
            return
        connection.counted = True
        self.connections -= 1
        self.stats.cx_active -= 1
        host = connection.host
        if connection in host.idle:
            host.idle.remove(connection)
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            _, waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class ClusterManager:
    """The live clusters, kept in step with each snapshot."""

    def __init__(
        self,
        stats: Stats,
        resolver: Resolver,
        tls: TlsManager | None = None,
        source_address: str = "",
    ) -> None:
        self.stats = stats
        self.resolver = resolver
        # the proxy's certificates for clusters that originate mTLS (set before the first
        # snapshot: main.py); without, those clusters fail to connect, saying why
        self.tls = tls
        # where upstream connections leave from (Envoy's upstream_bind_config; set before the
        # first snapshot: main.py); empty: the kernel's choice
        self.source_address = source_address
        self.clusters: dict[str, ClusterRuntime] = {}

    def apply(
        self, clusters: Mapping[str, Cluster], endpoints: Mapping[str, tuple[Endpoint, ...]]
    ) -> None:
        live = {}
        for name, config in clusters.items():
            members = (
                endpoints.get(config.eds_name or name, ())
                if config.type is ClusterType.EDS
                else config.endpoints
            )
            runtime = self.clusters.get(name)
            if runtime is None:
                runtime = ClusterRuntime(
                    config,
                    members,
                    self.stats.cluster_stats(name),
                    self.resolver,
                    tls=self.tls,
                    ssl_stats=functools.partial(
                        self.stats.protocol_stats, "ssl", f"cluster.{name}"
                    ),
                    source_address=self.source_address,
                )
            else:
                runtime.update(config, members)
            live[name] = runtime
        for name, runtime in self.clusters.items():
            if name not in live:
                runtime.shutdown()
        self.clusters = live
