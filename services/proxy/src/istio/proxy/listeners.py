"""Listeners from LDS bound to sockets, kept in step with each snapshot.

A listener whose address is 0.0.0.0 binds the proxy's --bind-address (the local platform gives
each workload its own 127.0.0.N); `bind_to_port: false` listeners are not bound: connections
reach them through the virtual listener (15001), by their original destination when iptables
redirected them, else by the port of each request's authority. A listener that changes keeps
its socket and serves new connections with the new config; one that goes away stops accepting
and its connections drain: each finishes the request in flight, then closes, and whatever is
left after the drain timeout is closed.
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

log = logging.getLogger(__name__)


class Drainable(Protocol):
    def drain(self) -> None: ...


def connection_for(
    context: Context,
    listener: Listener,
    original_dst: tuple[str, int] | None,
    registry: set[asyncio.Protocol],
) -> asyncio.Protocol | None:
    chain = listener.chain
    if isinstance(chain, HttpManager):
        return HttpConnection(
            context,
            listener,
            original_dst=original_dst,
            on_close=registry,  # type: ignore[arg-type]
        )
    if isinstance(chain, TcpProxy):
        return TcpConnection(context, chain, original_dst, registry)
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
                context, target or bound.listener, destination, bound.connections
            )
        if protocol is None:
            transport.close()
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class BoundListener:
    def __init__(self, context: Context, listener: Listener, address: str) -> None:
        self.context = context
        self.listener = listener
        self.address = address
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
        protocol = connection_for(self.context, listener, None, self.connections)
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
    def __init__(self, context: Context, bind_address: str, *, reuse_port: bool = False) -> None:
        self.context = context
        self.bind_address = bind_address
        self.reuse_port = reuse_port
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
            bound = BoundListener(self.context, listener, self.address_of(listener))
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
