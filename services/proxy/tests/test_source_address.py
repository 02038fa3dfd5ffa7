"""--source-address: upstream connections leave from the workload's own address (Envoy's
upstream_bind_config), so the next sidecar, and Mixer through it, see which workload calls."""

from __future__ import annotations

import asyncio

from istio.proxy.config import Cluster, ClusterType, Endpoint
from istio.proxy.stats import Stats
from istio.proxy.upstream import ClusterManager, Resolver, local_address
from istio.testing.net import free_port

SOURCE, SERVER = "127.0.0.71", "127.0.0.72"


def test_where_connections_leave_from() -> None:
    assert local_address("", "127.0.0.5") is None  # no source: the kernel's choice
    assert local_address(SOURCE, "127.0.0.5") == (SOURCE, 0)
    assert local_address("10.0.0.7", "10.0.0.9") == ("10.0.0.7", 0)
    assert local_address("10.0.0.7", "127.0.0.1") == ("10.0.0.7", 0)
    # A loopback source cannot reach another host; a name or the other family: unbound.
    assert local_address(SOURCE, "10.0.0.9") is None
    assert local_address(SOURCE, "ratings.default.svc.cluster.local") is None
    assert local_address(SOURCE, "::1") is None


async def test_upstream_connections_come_from_the_source_address() -> None:
    peers: list[str] = []
    seen = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        seen.set()
        writer.close()

    port = free_port(SERVER)
    server = await asyncio.start_server(accept, SERVER, port)
    cluster = Cluster("app", ClusterType.STATIC, endpoints=(Endpoint(SERVER, port),))
    try:
        for source, expected in ((SOURCE, SOURCE), ("", "127.0.0.1")):
            peers.clear()
            seen.clear()
            manager = ClusterManager(Stats(), Resolver(), source_address=source)
            manager.apply({"app": cluster}, {})
            runtime = manager.clusters["app"]
            host = runtime.pick()
            assert host is not None
            connection = await runtime.acquire(host)
            await asyncio.wait_for(seen.wait(), 5)
            assert peers == [expected]
            connection.close()
            manager.apply({}, {})
    finally:
        server.close()
        await server.wait_closed()
