"""Listeners from LDS bound to sockets, kept in step with each snapshot.

A listener whose address is 0.0.0.0 binds the proxy's --bind-address (the local platform gives
each workload its own 127.0.0.N); `bind_to_port: false` listeners are not bound: connections
reach them through the virtual listener (15001), by their original destination when iptables
redirected them, else by the port of each request's authority. A listener that changes keeps
its socket and serves new connections with the new config; one that goes away stops accepting
and its connections drain: each finishes the request in flight, then closes, and whatever is
left after the drain timeout is closed. A listener with TLS (mutual TLS from other sidecars)
starts each connection with `istio.proxy.tls.Acceptor`, which hands it to the chain's protocol
once the client's identity is checked, or at once when it is plaintext on a permissive port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Protocol, cast

from istio.proxy.config import HttpManager, Listener, Snapshot, TcpProxy
from istio.proxy.context import Context
from istio.proxy.http import HttpConnection, original_destination
from istio.proxy.tcp import TcpConnection
from istio.proxy.tls import ALPN_SERVER_HTTP, ALPN_SERVER_TCP, Acceptor, PeerIdentity, TlsManager

log = logging.getLogger(__name__)


class Drainable(Protocol):
    def drain(self) -> None: ...


def connection_for(
    context: Context,
    listener: Listener,
    original_dst: tuple[str, int] | None,
    registry: set[asyncio.Protocol],
    tls: TlsManager | None = None,
    stat_name: str = "",
) -> asyncio.Protocol | None:
    """The protocol a connection to `listener` starts with: its chain's, or, when the
    listener terminates TLS, the `Acceptor` that hands over to the chain's after the
    handshake (or at once for plaintext on a permissive port)."""
    settings = listener.tls
    if settings is None:
        return _chain_connection(context, listener, original_dst, registry, None)
    alpn = ALPN_SERVER_HTTP if isinstance(listener.chain, HttpManager) else ALPN_SERVER_TCP

    def serve(identity: PeerIdentity | None) -> asyncio.Protocol | None:
        return _chain_connection(context, listener, original_dst, registry, identity)

    stats = context.stats.protocol_stats("ssl", f"listener.{stat_name or listener.name}")
    return Acceptor(tls or TlsManager(None), settings, alpn, stats, serve)


def _chain_connection(
    context: Context,
    listener: Listener,
    original_dst: tuple[str, int] | None,
    registry: set[asyncio.Protocol],
    identity: PeerIdentity | None,
) -> asyncio.Protocol | None:
    chain = listener.chain
    if isinstance(chain, HttpManager):
        connection = HttpConnection(
            context,
            listener,
            original_dst=original_dst,
            on_close=registry,  # type: ignore[arg-type]
        )
        connection.peer_identity = identity
        return connection
    if isinstance(chain, TcpProxy):
        tcp = TcpConnection(context, chain, original_dst, registry)
        tcp.peer_identity = identity
        tcp.mixer = listener.mixer
        return tcp
    return None


class _Dispatch(asyncio.Protocol):
    """The virtual listener's first look at a connection: hand it to the listener of its
    original destination, or serve it as HTTP routed by authority."""

    def __init__(self, bound: BoundListener) -> None:
        self.bound = bound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        bound = self.bound
        context = bound.context
        bound.accepted()
        destination = original_destination(transport.get_extra_info("socket"))
        protocol: asyncio.Protocol | None
        if destination is None:
            protocol = HttpConnection(
                context,
                None,
                on_close=bound.connections,  # type: ignore[arg-type]
            )
        else:
            target = context.snapshot.listener_for_port(destination[1], destination[0])
            protocol = connection_for(
                context, target or bound.listener, destination, bound.connections, bound.tls
            )
        if protocol is None:
            transport.close()
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class BoundListener:
    def __init__(
        self, context: Context, listener: Listener, address: str, tls: TlsManager | None = None
    ) -> None:
        self.context = context
        self.listener = listener
        self.address = address
        self.tls = tls
        self.server: asyncio.Server | None = None
        self.connections = ConnectionSet()
        self.stat_name = f"{address}_{listener.port}"

    def accepted(self) -> None:
        self.context.stats.listener_accepted(self.stat_name)

    def _protocol(self) -> asyncio.Protocol:
        listener = self.listener
        if listener.use_original_dst:
            return _Dispatch(self)
        self.accepted()
        protocol = connection_for(
            self.context, listener, None, self.connections, self.tls, self.stat_name
        )
        return protocol if protocol is not None else _Closer()

    async def start(self, reuse_port: bool) -> None:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.address, self.listener.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, sock=sock, backlog=1024)

    async def drain(self, grace: float) -> None:
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.drain()  # type: ignore[attr-defined]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.connections.empty()
        for connection in list(self.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


class ConnectionSet(set[asyncio.Protocol]):
    """A listener's open connections; `empty()` waits until the last one is gone."""

    def __init__(self) -> None:
        super().__init__()
        self._empty: asyncio.Event | None = None

    def discard(self, connection: object) -> None:
        super().discard(connection)
        if not self and self._empty is not None:
            self._empty.set()

    async def empty(self) -> None:
        if self:
            self._empty = asyncio.Event()
            await self._empty.wait()


class _Closer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ListenerManager:
    def __init__(
        self,
        context: Context,
        bind_address: str,
        *,
        reuse_port: bool = False,
        tls: TlsManager | None = None,
    ) -> None:
        self.context = context
        self.bind_address = bind_address
        self.reuse_port = reuse_port
        # Without one, a listener that asks for TLS refuses TLS (no certificate to serve).
        self.tls = tls or TlsManager(None)
        self.bound: dict[str, BoundListener] = {}
        self.draining: set[asyncio.Task[None]] = set()
        self.errors: dict[str, str] = {}

    def address_of(self, listener: Listener) -> str:
        return self.bind_address if listener.host in ("0.0.0.0", "::", "") else listener.host

    async def apply(self, snapshot: Snapshot) -> None:
        wanted = {name: item for name, item in snapshot.listeners.items() if item.bind}
        for name, bound in list(self.bound.items()):
            listener = wanted.get(name)
            if (
                listener is None
                or self.address_of(listener) != bound.address
                or listener.port != bound.listener.port
            ):
                del self.bound[name]
                log.info("draining listener %s", name)
                self._drain(bound)
        self.errors = {}
        for name, listener in wanted.items():
            existing = self.bound.get(name)
            if existing is not None:
                existing.listener = listener
                continue
            bound = BoundListener(self.context, listener, self.address_of(listener), self.tls)
            try:
                await bound.start(self.reuse_port)
            except OSError as error:
                self.errors[name] = f"{bound.address}:{listener.port}: {error.strerror or error}"
                log.error("listener %s cannot bind %s", name, self.errors[name])
                continue
            log.info("listener %s on %s:%d", name, bound.address, listener.port)
            self.bound[name] = bound

    def _drain(self, bound: BoundListener) -> None:
        task = asyncio.get_running_loop().create_task(
            bound.drain(self.context.limits.drain_timeout)
        )
        self.draining.add(task)
        task.add_done_callback(self.draining.discard)

    async def close(self) -> None:
        bound, self.bound = self.bound, {}
        for listener in bound.values():
            self._drain(listener)
        if self.draining:
            await asyncio.gather(*self.draining, return_exceptions=True)
