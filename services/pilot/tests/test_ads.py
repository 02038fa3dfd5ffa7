"""The ADS server against a real grpc.aio client over loopback, with a small test generator.

The generator makes, per service port: a cluster, its endpoints, a listener and a route, each
stamped with the snapshot's mesh `mixer_address` (so one field moves every type at once).
Services are visible only to proxies in their own namespace, so a change can concern one
proxy and not another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from istio.model import Labels, Port, Protocol, Proxy, Service, ServiceInstance
from istio.pilot.ads import AdsMetrics, AdsServer, Debounce
from istio.pilot.mesh import MeshSnapshot, default_mesh_config
from istio.pilot.registry import Change
from istio.pilot.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SHORT_NAMES,
    Resources,
)

SIDECAR_A = "sidecar~10.0.0.1~app-1.a~a.svc.cluster.local"
SIDECAR_A2 = "sidecar~10.0.0.2~app-2.a~a.svc.cluster.local"
SIDECAR_B = "sidecar~10.0.0.3~app-1.b~b.svc.cluster.local"


def generate(snapshot: MeshSnapshot, proxy: Proxy) -> Resources:
    stamp = snapshot.mesh.mixer_address or "none"
    by_type: dict[str, dict[str, Message]] = {t: {} for t in PUSH_ORDER}
    for hostname, service in snapshot.services.items():
        if service.namespace != proxy.namespace:
            continue
        for port in service.ports:
            name = f"outbound|{port.port}||{hostname}"
            by_type[CLUSTER][name] = cluster_pb2.Cluster(
                name=name, type=cluster_pb2.Cluster.EDS, alt_stat_name=stamp
            )
            endpoints = [
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(
                                address=instance.address, port_value=instance.port
                            )
                        ),
                        hostname=stamp,
                    )
                )
                for instance in snapshot.instances.get(hostname, ())
                if instance.service_port == port
            ]
            by_type[ENDPOINT][name] = endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)],
            )
            by_type[LISTENER][f"0.0.0.0_{port.port}"] = listener_pb2.Listener(
                name=f"0.0.0.0_{port.port}", stat_prefix=stamp
            )
            by_type[ROUTE][str(port.port)] = route_pb2.RouteConfiguration(
                name=str(port.port),
                virtual_hosts=[route_components_pb2.VirtualHost(name=stamp, domains=["*"])],
            )
    return Resources(MappingProxyType({t: MappingProxyType(r) for t, r in by_type.items()}))


HTTP = Port("http", 9080, Protocol.HTTP)


def service(name: str, namespace: str = "a") -> Service:
    return Service(f"{name}.{namespace}.svc.cluster.local", (HTTP,), namespace=namespace)


def mesh(
    services: Iterable[Service] = (),
    endpoints: dict[str, Iterable[str]] | None = None,
    stamp: str = "one",
) -> MeshSnapshot:
    """A snapshot; `endpoints` maps a service's hostname to its instances' addresses."""
    by_host = {s.hostname: s for s in services}
    instances = {
        host: tuple(
            ServiceInstance(by_host[host], HTTP, address, 9080, Labels()) for address in addresses
        )
        for host, addresses in (endpoints or {}).items()
    }
    config = default_mesh_config()
    config.mixer_address = stamp
    return MeshSnapshot(
        services=MappingProxyType(by_host), instances=MappingProxyType(instances), mesh=config
    )


REVIEWS = service("reviews")
RATINGS = service("ratings")
R, RT = REVIEWS.hostname, RATINGS.hostname
REVIEWS_CLUSTER = f"outbound|9080||{R}"
RATINGS_CLUSTER = f"outbound|9080||{RT}"


@dataclass
class Client:
    """An ADS client that remembers, per type, the last response it got."""

    call: Any
    node_id: str
    last: dict[str, Any] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    sent_node: bool = False

    async def request(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        nonce: str | None = None,
        version: str | None = None,
        error: str | None = None,
    ) -> None:
        """A request for `names` (by default the type's last subscription)."""
        last = self.last.get(type_url)
        if names is not None:
            self.names[type_url] = sorted(names)
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=self.names.get(type_url, []),
            response_nonce=nonce if nonce is not None else (last.nonce if last else ""),
            version_info=version if version is not None else (last.version_info if last else ""),
        )
        if not self.sent_node:
            request.node.id = self.node_id
            self.sent_node = True
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        await self.call.write(request)

    async def read(self) -> Any:
        response = await asyncio.wait_for(self.call.read(), timeout=10)
        assert response is not grpc.aio.EOF
        self.last[response.type_url] = response
        return response

    async def ack(self, response: Any, names: Iterable[str] | None = None) -> None:
        await self.request(
            response.type_url, names, nonce=response.nonce, version=response.version_info
        )

    async def subscribe_all(self) -> dict[str, Any]:
        """Ask for every type (as Envoy does: CDS and LDS, then EDS and RDS) and ACK each."""
        got = {}
        for type_url, names in (
            (CLUSTER, ()),
            (LISTENER, ()),
            (ENDPOINT, (REVIEWS_CLUSTER,)),
            (ROUTE, ("9080",)),
        ):
            await self.request(type_url, names)
            got[type_url] = await self.read()
            assert got[type_url].type_url == type_url
            await self.ack(got[type_url], names)
        return got

    async def barrier(self, ads: AdsServer) -> None:
        """Until the server has handled everything this client wrote: a changed RDS
        subscription is answered in order, after every earlier request."""
        last = self.last[ROUTE]
        await self.request(ROUTE, ["9080", f"barrier-{last.nonce}"])
        response = await self.read()
        assert response.type_url == ROUTE
        await ads.wait_idle()


MESSAGES = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}


def names_of(response: Any) -> list[str]:
    names = []
    for item in response.resources:
        message = MESSAGES[item.type_url]()
        item.Unpack(message)
        names.append(message.cluster_name if item.type_url == ENDPOINT else message.name)
    return names


@dataclass
class Harness:
    ads: AdsServer
    metrics: CollectorRegistry
    channel: grpc.aio.Channel

    async def connect(self, node_id: str) -> Client:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        return Client(stub.StreamAggregatedResources(), node_id)

    def sent(self, type_url: str) -> float:
        """How many responses of this type the server has written, over all streams."""
        return self.sample("pilot_xds_pushes_total", type=SHORT_NAMES[type_url])

    def nacks(self, short: str) -> float:
        return self.sample("pilot_xds_nacks_total", type=short)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def serving(
    debounce: Debounce, snapshot: MeshSnapshot | None = None
) -> AsyncIterator[Harness]:
    """An ADS server on a loopback port and a channel to it."""
    metrics = CollectorRegistry()
    ads = AdsServer(generate, debounce=debounce, metrics=AdsMetrics(metrics))
    if snapshot is not None:
        ads.push(snapshot, Change.SERVICES)
    server = grpc.aio.server()
    ads.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(ads, metrics, channel)
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    initial = mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]})
    async with serving(Debounce(quiet=0.02, max_delay=1.0), initial) as harness:
        yield harness


async def test_each_type_is_answered_and_acked(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    got = await client.subscribe_all()
    assert names_of(got[CLUSTER]) == [RATINGS_CLUSTER, REVIEWS_CLUSTER]
    assert names_of(got[LISTENER]) == ["0.0.0.0_9080"]
    await client.barrier(harness.ads)
    (stream,) = harness.ads.streams
    assert stream.node_id == SIDECAR_A
    for type_url in (CLUSTER, LISTENER, ENDPOINT):
        state = stream.types[type_url]
        assert state.acked_version == state.sent_version == got[type_url].version_info
        assert state.sent_nonce == got[type_url].nonce
        assert state.last_nack is None


async def test_versions_are_content_hashes(harness: Harness) -> None:
    first = await harness.connect(SIDECAR_A)
    second = await harness.connect(SIDECAR_A2)
    got_first = await first.subscribe_all()
    got_second = await second.subscribe_all()
    for type_url in PUSH_ORDER:
        assert got_first[type_url].version_info == got_second[type_url].version_info
        assert got_first[type_url].nonce  # every response has a nonce


async def test_push_sends_changed_types_in_order(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    await client.subscribe_all()
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]}, stamp="two"),
        Change.SERVICES,
    )
    order = [(await client.read()).type_url for _ in PUSH_ORDER]
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE]


async def test_no_op_change_pushes_nothing(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    await client.subscribe_all()
    await harness.ads.wait_idle()
    before = [harness.sent(t) for t in PUSH_ORDER]
    same = mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]})
    harness.ads.push(same, Change.SERVICES)
    await harness.ads.wait_idle()
    assert harness.ads.snapshot is same
    assert [harness.sent(t) for t in PUSH_ORDER] == before
    # The next thing on the stream is the next real change, not a copy of the old config.
    harness.ads.push(mesh([REVIEWS], {R: ["10.1.0.1"]}), Change.SERVICES)
    response = await client.read()
    assert response.type_url == CLUSTER


async def test_removed_clusters_stay_until_routes_move(harness: Harness) -> None:
    """Make before break: a push that drops a cluster first sends CDS with it still in,
    then EDS, LDS and RDS, and only then CDS without it."""
    client = await harness.connect(SIDECAR_A)
    await client.subscribe_all()
    harness.ads.push(mesh([REVIEWS], {R: ["10.1.0.1"]}, stamp="two"), Change.SERVICES)
    interim = await client.read()
    assert interim.type_url == CLUSTER
    assert names_of(interim) == [RATINGS_CLUSTER, REVIEWS_CLUSTER]
    rest = [await client.read()]
    while rest[-1].type_url != CLUSTER:
        rest.append(await client.read())
    assert [r.type_url for r in rest][-2:] == [ROUTE, CLUSTER]
    assert names_of(rest[-1]) == [REVIEWS_CLUSTER]
    assert rest[-1].version_info != interim.version_info


async def test_endpoint_change_pushes_eds_only(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    got = await client.subscribe_all()
    await harness.ads.wait_idle()
    before = {t: harness.sent(t) for t in PUSH_ORDER}
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1", "10.1.0.9"], RT: ["10.1.0.2"]}),
        Change.ENDPOINTS,
    )
    response = await client.read()
    assert response.type_url == ENDPOINT
    assert response.version_info != got[ENDPOINT].version_info
    assignment = endpoint_pb2.ClusterLoadAssignment()
    response.resources[0].Unpack(assignment)
    addresses = [
        e.endpoint.address.socket_address.address for e in assignment.endpoints[0].lb_endpoints
    ]
    assert addresses == ["10.1.0.1", "10.1.0.9"]
    await harness.ads.wait_idle()
    after = {t: harness.sent(t) for t in PUSH_ORDER}
    assert {t: after[t] - before[t] for t in PUSH_ORDER} == {
        CLUSTER: 0,
        ENDPOINT: 1,
        LISTENER: 0,
        ROUTE: 0,
    }


async def test_endpoints_only_window_never_pushes_other_types(harness: Harness) -> None:
    """Even when generation would move clusters too, a window of endpoint changes sends EDS."""
    client = await harness.connect(SIDECAR_A)
    await client.subscribe_all()
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.3"], RT: ["10.1.0.2"]}, stamp="moved"),
        Change.ENDPOINTS,
    )
    assert (await client.read()).type_url == ENDPOINT
    await harness.ads.wait_idle()
    (stream,) = harness.ads.streams
    assert stream.types[CLUSTER].sent_version == client.last[CLUSTER].version_info


async def test_only_proxies_whose_resources_changed_get_a_push(harness: Harness) -> None:
    in_a = await harness.connect(SIDECAR_A)
    in_b = await harness.connect(SIDECAR_B)
    await in_a.subscribe_all()
    await in_b.request(CLUSTER)
    b_clusters = await in_b.read()
    assert names_of(b_clusters) == []
    await in_b.ack(b_clusters)
    await harness.ads.wait_idle()
    stream_b = next(s for s in harness.ads.streams if s.node_id == SIDECAR_B)
    nonce_b = stream_b.types[CLUSTER].sent_nonce
    details = service("details")
    harness.ads.push(
        mesh([REVIEWS, RATINGS, details], {R: ["10.1.0.1"], RT: ["10.1.0.2"]}), Change.SERVICES
    )
    response = await in_a.read()
    assert f"outbound|9080||{details.hostname}" in names_of(response)
    await harness.ads.wait_idle()
    assert stream_b.types[CLUSTER].sent_nonce == nonce_b


async def test_nack_keeps_last_good_and_affects_no_other_proxy(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    bad = await harness.connect(SIDECAR_A)
    good = await harness.connect(SIDECAR_A2)
    good_initial = await good.subscribe_all()
    initial = await bad.subscribe_all()
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]}, stamp="two"),
        Change.SERVICES,
    )
    pushed = await bad.read()
    assert pushed.type_url == CLUSTER
    for _ in PUSH_ORDER:
        await good.ack(await good.read())
    caplog.set_level("WARNING", logger="istio.pilot.ads")
    await bad.request(
        CLUSTER, nonce=pushed.nonce, version=initial[CLUSTER].version_info, error="bad cluster"
    )
    for _ in PUSH_ORDER[1:]:
        await bad.ack(await bad.read())
    await bad.barrier(harness.ads)
    await good.barrier(harness.ads)

    assert harness.nacks("cds") == 1
    assert any(
        "NACK" in r.message and SIDECAR_A in r.message and "bad cluster" in r.message
        for r in caplog.records
    )
    streams = {s.node_id: s for s in harness.ads.streams}
    bad_state, good_state = streams[SIDECAR_A].types[CLUSTER], streams[SIDECAR_A2].types[CLUSTER]
    assert bad_state.acked_version == initial[CLUSTER].version_info  # the last good one
    assert bad_state.last_nack is not None
    assert bad_state.last_nack.reason == "bad cluster"
    assert bad_state.last_nack.version == pushed.version_info
    assert good_state.last_nack is None
    assert good_state.acked_version == pushed.version_info != good_initial[CLUSTER].version_info

    # Nothing is resent for the NACK; the next change is pushed as usual.
    sent_before = harness.sent(CLUSTER)
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]}, stamp="two"),
        Change.SERVICES,
    )
    await harness.ads.wait_idle()
    assert harness.sent(CLUSTER) == sent_before
    harness.ads.push(mesh([REVIEWS], {R: ["10.1.0.1"]}, stamp="three"), Change.SERVICES)
    fixed = {}
    for type_url in [*PUSH_ORDER, CLUSTER]:  # the removed cluster goes last (make before break)
        fixed[type_url] = await bad.read()
        assert fixed[type_url].type_url == type_url
        await bad.ack(fixed[type_url])
    await bad.barrier(harness.ads)
    assert streams[SIDECAR_A].types[CLUSTER].acked_version == fixed[CLUSTER].version_info


async def test_stale_nonce_is_ignored(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    first = await client.subscribe_all()
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]}, stamp="two"),
        Change.SERVICES,
    )
    second = {t: await client.read() for t in PUSH_ORDER}
    # A late reply to the first CDS response (a NACK, even) means nothing now.
    await client.request(
        CLUSTER, nonce=first[CLUSTER].nonce, version=first[CLUSTER].version_info, error="late"
    )
    await client.barrier(harness.ads)
    (stream,) = harness.ads.streams
    assert harness.nacks("cds") == 0
    assert stream.types[CLUSTER].last_nack is None
    assert stream.types[CLUSTER].acked_version == first[CLUSTER].version_info
    await client.ack(second[CLUSTER])
    await client.barrier(harness.ads)
    assert stream.types[CLUSTER].acked_version == second[CLUSTER].version_info


async def test_named_subscriptions_for_eds_and_rds(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    await client.request(ENDPOINT, [REVIEWS_CLUSTER])
    reviews_only = await client.read()
    assert names_of(reviews_only) == [REVIEWS_CLUSTER]
    await client.ack(reviews_only, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
    both = await client.read()
    assert both.type_url == ENDPOINT
    # Only what the proxy does not hold yet: it keeps reviews' (EDS is named, so a response
    # may carry a part of the subscription).
    assert names_of(both) == [RATINGS_CLUSTER]
    assert both.version_info != reviews_only.version_info

    await client.request(ROUTE, ["9080", "missing"])
    routes = await client.read()
    assert names_of(routes) == ["9080"]

    # Only a subscribed name's change moves the version a proxy sees. Dropping a name
    # is answered with nothing new.
    await client.ack(both, [REVIEWS_CLUSTER])
    assert names_of(await client.read()) == []
    sent = harness.sent(ENDPOINT)
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.7"]}), Change.ENDPOINTS
    )
    await harness.ads.wait_idle()
    assert harness.sent(ENDPOINT) == sent


async def test_an_endpoint_change_sends_only_the_changed_assignment(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    await client.request(ROUTE, ["9080"])
    await client.read()
    await client.request(ENDPOINT, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
    first = await client.read()
    assert names_of(first) == [RATINGS_CLUSTER, REVIEWS_CLUSTER]
    await client.ack(first, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
    await client.barrier(harness.ads)
    harness.ads.push(
        mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2", "10.1.0.9"]}),
        Change.ENDPOINTS,
    )
    update = await client.read()
    assert names_of(update) == [RATINGS_CLUSTER]
    assert update.version_info != first.version_info
    # A new stream of the same proxy (a reconnect) gets everything again.
    again = await harness.connect(SIDECAR_A)
    await again.request(ENDPOINT, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
    assert names_of(await again.read()) == [RATINGS_CLUSTER, REVIEWS_CLUSTER]


async def test_endpoint_only_pushes_use_the_generators_delta_without_generating() -> None:
    generated: list[str] = []

    def counting(snapshot: MeshSnapshot, proxy: Proxy) -> Resources:
        generated.append(proxy.node_id)
        return generate(snapshot, proxy)

    def changes(old: MeshSnapshot, new: MeshSnapshot) -> dict[str, tuple[Any, bytes]]:
        changed = {}
        for host in new.instances.keys() | old.instances.keys():
            if old.instances.get(host) != new.instances.get(host):
                name = f"outbound|9080||{host}"
                message = generate(new, Proxy.parse(SIDECAR_A)).of(ENDPOINT)[name]
                changed[name] = (message, message.SerializeToString(deterministic=True))
        return changed

    initial = mesh([REVIEWS, RATINGS], {R: ["10.1.0.1"], RT: ["10.1.0.2"]})
    ads = AdsServer(
        counting, debounce=Debounce(quiet=0.02, max_delay=1.0), endpoint_changes=changes
    )
    ads.push(initial, Change.SERVICES)
    server = grpc.aio.server()
    ads.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        harness = Harness(ads, CollectorRegistry(), channel)
        client = await harness.connect(SIDECAR_A)
        await client.request(ROUTE, ["9080"])
        await client.read()
        await client.request(ENDPOINT, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
        first = await client.read()
        await client.ack(first, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
        await client.barrier(ads)
        before = len(generated)
        ads.push(
            mesh([REVIEWS, RATINGS], {R: ["10.1.0.1", "10.1.0.5"], RT: ["10.1.0.2"]}),
            Change.ENDPOINTS,
        )
        update = await client.read()
        assert names_of(update) == [REVIEWS_CLUSTER]
        assert len(generated) == before  # the proxy's config was not generated again
        await client.ack(update, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
        await client.barrier(ads)
        (stream,) = ads.streams
        assert stream.types[ENDPOINT].acked_version == update.version_info
        # The same content again: nothing to send.
        ads.push(
            mesh([REVIEWS, RATINGS], {R: ["10.1.0.1", "10.1.0.5"], RT: ["10.1.0.2"]}),
            Change.ENDPOINTS,
        )
        await ads.wait_idle()
        assert stream.types[ENDPOINT].sent_version == update.version_info
    finally:
        await channel.close()
        await server.stop(None)


async def test_debounce_coalesces_a_burst_into_one_push() -> None:
    async with serving(Debounce(quiet=0.05, max_delay=5.0), mesh([REVIEWS])) as harness:
        ads = harness.ads
        client = await harness.connect(SIDECAR_A)
        await client.request(CLUSTER)
        await client.ack(await client.read())
        flushes, sent = ads.flushes, harness.sent(CLUSTER)
        for stamp in ("two", "three", "four"):
            ads.push(mesh([REVIEWS], stamp=stamp), Change.SERVICES)
        pushed = await client.read()
        await ads.wait_idle()
        assert ads.flushes == flushes + 1
        assert harness.sent(CLUSTER) == sent + 1
        expected = generate(mesh([REVIEWS], stamp="four"), Proxy.parse(SIDECAR_A))
        assert pushed.version_info == expected.version(CLUSTER)


async def test_debounce_pushes_by_max_delay_during_a_long_burst() -> None:
    async with serving(Debounce(quiet=60.0, max_delay=0.05), mesh([REVIEWS])) as harness:
        ads = harness.ads
        client = await harness.connect(SIDECAR_A)
        await client.request(CLUSTER)
        await client.ack(await client.read())
        ads.push(mesh([REVIEWS], stamp="two"), Change.SERVICES)
        ads.push(mesh([REVIEWS], stamp="three"), Change.SERVICES)
        pushed = await client.read()
        assert pushed.type_url == CLUSTER
        assert ads.flushes == 2


async def test_requests_before_the_first_snapshot_are_answered_by_it() -> None:
    async with serving(Debounce(quiet=0.01)) as harness:
        client = await harness.connect(SIDECAR_A)
        await client.request(LISTENER)
        await client.request(CLUSTER)
        harness.ads.push(mesh([REVIEWS]), Change.SERVICES)
        got = {(await client.read()).type_url for _ in range(2)}
        assert got == {CLUSTER, LISTENER}


async def test_bad_node_id_is_refused(harness: Harness) -> None:
    client = await harness.connect("sidecar~not-an-ip~app.a~a.svc.cluster.local")
    await client.request(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'not-an-ip' is not an IP address" in (refused.value.details() or "")
    assert harness.ads.streams == ()


async def test_missing_node_is_refused(harness: Harness) -> None:
    client = await harness.connect("")
    await client.request(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (refused.value.details() or "")


async def test_delta_xds_is_unimplemented(harness: Harness) -> None:
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(harness.channel)
    call = stub.DeltaAggregatedResources()
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_closed_stream_is_forgotten(harness: Harness) -> None:
    client = await harness.connect(SIDECAR_A)
    await client.request(CLUSTER)
    await client.read()
    assert harness.sample("pilot_xds_connected_proxies") == 1
    await client.call.done_writing()
    assert await client.call.read() is grpc.aio.EOF
    assert harness.ads.streams == ()
    assert harness.sample("pilot_xds_connected_proxies") == 0


def test_resources_are_packed_once_per_flush_and_shared() -> None:
    """A resource with a known digest is packed once and shared by every stream's response,
    whatever else those responses carry; unknown digests are packed each time."""
    ads = AdsServer(generate)
    one = cluster_pb2.Cluster(name="one")
    two = cluster_pb2.Cluster(name="two", alt_stat_name="x")
    digests = {"one": b"d1", "two": b"d2"}
    first = ads._pack(CLUSTER, {"one": one, "two": two}, None, digests)
    second = ads._pack(CLUSTER, {"one": one}, None, digests)
    assert second[0] is first[0]
    assert [item.type_url for item in first] == [CLUSTER, CLUSTER]
    assert ads._pack(CLUSTER, {"two": two}, frozenset({"two"}), digests)[0] is first[1]
    unknown = ads._pack(CLUSTER, {"one": one}, None, {})
    assert unknown[0] is not first[0]
    assert unknown[0] == first[0]
    assert ads._pack(CLUSTER, {"one": two}, None, {"one": b"d3"})[0] is not first[0]


async def test_equal_subscriptions_share_one_set(harness: Harness) -> None:
    first = await harness.connect(SIDECAR_A)
    second = await harness.connect(SIDECAR_A2)
    for client in (first, second):
        await client.request(ENDPOINT, [REVIEWS_CLUSTER, RATINGS_CLUSTER])
        await client.read()
    await harness.ads.wait_idle()
    one, two = harness.ads.streams
    assert one.types[ENDPOINT].names == {REVIEWS_CLUSTER, RATINGS_CLUSTER}
    assert one.types[ENDPOINT].names is two.types[ENDPOINT].names


async def test_a_flush_freezes_what_lives_and_idle_collects_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from istio.pilot import ads as ads_module

    monkeypatch.setattr(ads_module, "IDLE_COLLECT_SECONDS", 0.01)
    collected = asyncio.Event()
    real = ads_module._collect_all

    def collect() -> None:
        real()
        collected.set()

    monkeypatch.setattr(ads_module, "_collect_all", collect)
    gc.unfreeze()
    ads = AdsServer(generate)
    ads.push(mesh([REVIEWS]), Change.SERVICES)
    assert gc.get_freeze_count() > 0
    await asyncio.wait_for(collected.wait(), timeout=5)
    assert gc.get_freeze_count() > 0
