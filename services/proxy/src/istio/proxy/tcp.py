"""The tcp_proxy filter: bytes spliced between a client and one upstream host, each side's
reading paused while the other's write buffer is full. Connections to a cluster without
endpoints (BlackHoleCluster) are closed at once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from istio.proxy.config import TcpProxy
from istio.proxy.context import Context
from istio.proxy.upstream import Address


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()


class TcpConnection(_Side):
    """The downstream side; it connects the upstream side once accepted."""

    def __init__(
        self,
        context: Context,
        config: TcpProxy,
        original_dst: Address | None,
        registry: set[asyncio.Protocol] | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.config = config
        self.original_dst = original_dst
        self.registry = registry
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.registry is not None:
            self.registry.add(self)
        cluster = self.context.clusters.clusters.get(self.config.cluster)
        host = cluster.pick(self.original_dst) if cluster is not None else None
        if cluster is None or host is None:
            transport.close()
            return
        cluster.stats.cx_total += 1
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.task = asyncio.get_running_loop().create_task(self._connect(host.address))

    async def _connect(self, address: Address) -> None:
        loop = asyncio.get_running_loop()
        cluster = self.context.clusters.clusters.get(self.config.cluster)
        timeout = cluster.config.connect_timeout if cluster is not None else 5.0
        try:
            async with asyncio.timeout(timeout or None):
                _, upstream = await loop.create_connection(
                    _Side, self.context.resolver.resolve(address[0]), address[1]
                )
        except (OSError, TimeoutError):
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None or self.transport.is_closing():
            upstream.transport.close()  # type: ignore[union-attr]
            return
        upstream.peer = self
        self.peer = upstream
        pending, self.pending = self.pending, []
        for data in pending:
            upstream.transport.write(data)  # type: ignore[union-attr]
        if self.eof and upstream.transport is not None and upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.registry is not None:
            self.registry.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def drain(self) -> None:
        """TCP connections carry on until either side closes."""
