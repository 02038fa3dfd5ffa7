"""The tcp_proxy data path in-process over loopback: bulk transfers both ways with slow readers
(backpressure: the proxy's buffers stay bounded), half-close, the idle timeout, garbage on a
MongoDB port spliced unchanged, no route, and the listeners Pilot sends compiled."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import json_format

from istio.proxy import compile
from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    Listener,
    Snapshot,
    Sniffer,
    TcpProxy,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.proxy.tcp import TcpConnection
from istio.proxy.xds import from_protobuf

PROXY_IP, UPSTREAM_IP = "127.0.0.62", "127.0.0.63"
GOLDEN = Path(__file__).resolve().parents[2] / "pilot" / "tests" / "golden"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Tcp:
    context: Context = field(default_factory=Context)
    manager: ListenerManager | None = None
    server: asyncio.Server | None = None
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self, handler: Handler, **proxy: object) -> None:
        self.server = await asyncio.start_server(handler, UPSTREAM_IP, 0)
        upstream_port = self.server.sockets[0].getsockname()[1]
        config = TcpProxy("tcp_test", "up", **proxy)  # type: ignore[arg-type]
        snapshot = Snapshot(
            listeners={"tcp": Listener("tcp", "0.0.0.0", 0, True, False, config)},
            clusters={
                "up": Cluster(
                    "up", ClusterType.STATIC, endpoints=(Endpoint(UPSTREAM_IP, upstream_port),)
                )
            },
        )
        self.context.apply(snapshot)
        self.manager = ListenerManager(self.context, PROXY_IP)
        await self.manager.apply(snapshot)
        server = self.manager.bound["tcp"].server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(PROXY_IP, self.port, limit=1 << 16)
        self.writers.append(writer)
        return reader, writer

    def connections(self) -> list[TcpConnection]:
        assert self.manager is not None
        return [c for c in self.manager.bound["tcp"].connections if isinstance(c, TcpConnection)]

    def buffered(self) -> int:
        """Bytes the proxy holds for its connections right now."""
        total = 0
        for connection in self.connections():
            for transport in (connection.transport, connection.upstream):
                if transport is not None and not transport.is_closing():
                    total += transport.get_write_buffer_size()
            total += sum(map(len, connection.pending))
        return total

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self.manager is not None:
            await self.manager.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def tcp() -> AsyncIterator[Tcp]:
    proxy = Tcp()
    try:
        yield proxy
    finally:
        await proxy.close()


SIZE = 8 * 1024 * 1024
BOUND = 1024 * 1024  # what the proxy may hold for one connection: a write buffer and a read


async def slow_read(reader: asyncio.StreamReader, tcp: Tcp, peak: list[int]) -> tuple[int, str]:
    """Reads to EOF, 64 KiB at a time with a pause between reads (a slow reader), noting the
    most the proxy held meanwhile; the byte count and digest."""
    digest = hashlib.sha256()
    size = 0
    while chunk := await reader.read(65536):
        digest.update(chunk)
        size += len(chunk)
        peak[0] = max(peak[0], tcp.buffered())
        await asyncio.sleep(0.001)  # the slowness under test, not a wait for an event
    return size, digest.hexdigest()


async def test_bulk_download_to_a_slow_reader_is_held_back(tcp: Tcp) -> None:
    payload = os.urandom(SIZE)

    async def sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for start in range(0, SIZE, 256 * 1024):
            writer.write(payload[start : start + 256 * 1024])
            await writer.drain()
        writer.close()

    await tcp.start(sender)
    reader, _ = await tcp.connect()
    peak = [0]
    assert await slow_read(reader, tcp, peak) == (SIZE, hashlib.sha256(payload).hexdigest())
    assert peak[0] <= BOUND, peak
    stats = tcp.context.stats
    assert stats.tcp["tcp_test"].upstream_paused_reading_total >= 1
    assert stats.tcp["tcp_test"].cx_tx_bytes_total == SIZE
    assert stats.clusters["up"].cx_rx_bytes_total == SIZE


async def test_bulk_upload_to_a_slow_server_is_held_back(tcp: Tcp) -> None:
    payload = os.urandom(SIZE)
    peak = [0]
    received: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def slow_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await slow_read(reader, tcp, peak))
        writer.write(b"done")
        writer.close()

    await tcp.start(slow_server)
    reader, writer = await tcp.connect()
    for start in range(0, SIZE, 256 * 1024):
        writer.write(payload[start : start + 256 * 1024])
        await writer.drain()
    writer.write_eof()  # half-close: the answer still comes back
    assert await received == (SIZE, hashlib.sha256(payload).hexdigest())
    assert await reader.read() == b"done"
    assert peak[0] <= BOUND, peak
    stats = tcp.context.stats
    assert stats.tcp["tcp_test"].downstream_paused_reading_total >= 1
    assert stats.tcp["tcp_test"].cx_rx_bytes_total == SIZE
    assert stats.clusters["up"].cx_tx_bytes_total == SIZE


async def test_half_close_each_way_and_connection_stats(tcp: Tcp) -> None:
    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        question = await reader.read()  # to the client's FIN
        writer.write(b"got " + question)
        await writer.drain()
        writer.write_eof()
        writer.close()

    await tcp.start(answer_after_eof)
    reader, writer = await tcp.connect()
    writer.write(b"hello")
    writer.write_eof()
    assert await reader.read() == b"got hello"
    stats = tcp.context.stats
    assert stats.tcp["tcp_test"].cx_total == 1
    cluster = stats.clusters["up"]
    assert (cluster.cx_total, cluster.cx_rx_bytes_total, cluster.cx_tx_bytes_total) == (1, 9, 5)
    writer.close()
    await tcp.manager.close()  # type: ignore[union-attr]
    assert stats.tcp["tcp_test"].cx_active == 0
    assert cluster.cx_active == 0
    metrics = stats.prometheus()
    assert 'envoy_tcp_downstream_cx_total{envoy_tcp_prefix="tcp_test"} 1' in metrics
    assert 'envoy_tcp_downstream_cx_active{envoy_tcp_prefix="tcp_test"} 0' in metrics
    assert 'envoy_tcp_downstream_cx_rx_bytes_total{envoy_tcp_prefix="tcp_test"} 5' in metrics
    assert 'envoy_cluster_upstream_cx_rx_bytes_total{envoy_cluster_name="up"} 9' in metrics
    assert "tcp.tcp_test.downstream_cx_tx_bytes_total: 9" in stats.text()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_idle_timeout_closes_an_idle_connection(tcp: Tcp) -> None:
    await tcp.start(echo, idle_timeout=0.3)
    reader, writer = await tcp.connect()
    loop = asyncio.get_running_loop()
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    last = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed it
    assert loop.time() - last >= 0.25
    assert tcp.context.stats.tcp["tcp_test"].idle_timeout == 1


async def test_garbage_on_a_mongo_port_is_spliced_unchanged(tcp: Tcp) -> None:
    await tcp.start(echo, sniffer=Sniffer.MONGO, sniffer_prefix="mongo_test")
    reader, writer = await tcp.connect()
    garbage = b"\x10\x00\x00\x00" + os.urandom(300_000)  # a plausible length, then noise
    writer.write(garbage)
    writer.write_eof()
    assert await reader.read() == garbage
    mongo = tcp.context.stats.protocols["mongo"]["mongo_test"]
    assert mongo.counters["decoding_error"] == 1
    assert 'envoy_mongo_decoding_error{envoy_mongo_prefix="mongo_test"} 1' in (
        tcp.context.stats.prometheus()
    )


async def test_no_route_closes_at_once(tcp: Tcp) -> None:
    await tcp.start(echo)
    tcp.context.apply(Snapshot(listeners=tcp.context.snapshot.listeners))  # the cluster is gone
    reader, _ = await tcp.connect()
    assert await reader.read() == b""
    assert tcp.context.stats.tcp["tcp_test"].cx_no_route == 1


def test_pilot_tcp_listeners_compile_with_their_sniffers() -> None:
    import json

    from envoy.config.listener.v3 import listener_pb2

    document = json.loads((GOLDEN / "sidecar-reviews-v2.json").read_text())
    resource = document["lds"]["10.0.0.14_27017"]
    listener = compile.listener(
        from_protobuf(json_format.ParseDict(resource, listener_pb2.Listener()))
    )
    chain = listener.chain
    assert isinstance(chain, TcpProxy)
    assert chain.sniffer is Sniffer.MONGO
    assert chain.sniffer_prefix == "outbound|27017||mongodb.default.svc.cluster.local"
    assert chain.idle_timeout == 3600.0
    redis = json.loads(json.dumps(resource))
    redis["filterChains"][0]["filters"].pop(0)
    redis["filterChains"][0]["metadata"] = {"filterMetadata": {"istio": {"protocol": "REDIS"}}}
    redis["filterChains"][0]["filters"][0]["typedConfig"]["idleTimeout"] = "0s"
    chain = compile.listener(
        from_protobuf(json_format.ParseDict(redis, listener_pb2.Listener()))
    ).chain
    assert isinstance(chain, TcpProxy)
    assert (chain.sniffer, chain.idle_timeout) == (Sniffer.REDIS, 0.0)
    delayed = json.loads(json.dumps(resource))
    delayed["filterChains"][0]["filters"][0]["typedConfig"]["delay"] = {
        "percentage": {"numerator": 1},
        "fixedDelay": "1s",
    }
    with pytest.raises(compile.CompileError, match="delay"):
        compile.listener(from_protobuf(json_format.ParseDict(delayed, listener_pb2.Listener())))
