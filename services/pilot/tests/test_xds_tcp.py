"""TCP ports' filter chains: mongo_proxy before tcp_proxy on MONGO ports, the REDIS marker in
the chain's metadata, the idle timeout from a DestinationPolicy's annotation, and the Mixer
metadata inbound TCP listeners carry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format

from istio.config import parse_documents
from istio.model import Labels, Port, Protocol, Proxy, Service, ServiceInstance
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate

PRODUCTPAGE = "sidecar~127.0.0.2~productpage-v1.default~default.svc.cluster.local"
REDIS_HOST = "redis.default.svc.cluster.local"
MONGO = "10.0.0.14_27017"

POLICIES = """
kind: DestinationPolicy
metadata:
  name: mongo-idle
  annotations: {networking.istio.io/tcpIdleTimeout: 1m30s}
spec:
  destination: {name: mongodb}
  loadBalancing: {name: RANDOM}
---
kind: DestinationPolicy
metadata:
  name: redis-idle
  annotations: {networking.istio.io/tcpIdleTimeout: soon}
spec:
  destination: {name: redis}
  loadBalancing: {name: RANDOM}
"""


def with_redis(snapshot: MeshSnapshot, policies: str = "") -> MeshSnapshot:
    redis = Service(REDIS_HOST, (Port("redis", 6379, Protocol.REDIS),), address="10.0.0.20")
    instance = ServiceInstance(redis, redis.ports[0], "127.0.0.20", 6379, Labels({"app": "redis"}))
    configs = dict(snapshot.configs)
    if policies:
        parsed, problems = parse_documents(policies)
        assert not problems, problems
        configs["DestinationPolicy"] = (*configs["DestinationPolicy"], *parsed)
    return dataclasses.replace(
        snapshot,
        services=MappingProxyType({**snapshot.services, REDIS_HOST: redis}),
        instances=MappingProxyType({**snapshot.instances, REDIS_HOST: (instance,)}),
        configs=MappingProxyType(configs),
    )


def tcp_listener(snapshot: MeshSnapshot, name: str) -> listener_pb2.Listener:
    found = generate(snapshot, Proxy.parse(PRODUCTPAGE)).of(resources.LISTENER)
    return found[name]


def tcp_proxy(listener: listener_pb2.Listener) -> tcp_proxy_pb2.TcpProxy:
    proxy = tcp_proxy_pb2.TcpProxy()
    listener.filter_chains[0].filters[-1].typed_config.Unpack(proxy)
    return proxy


def test_mongo_and_redis_chains(bookinfo: Callable[..., MeshSnapshot]) -> None:
    snapshot = with_redis(bookinfo())
    mongo = tcp_listener(snapshot, MONGO)
    assert [f.name for f in mongo.filter_chains[0].filters] == [
        "envoy.filters.network.mongo_proxy",
        "envoy.filters.network.tcp_proxy",
    ]
    assert not mongo.filter_chains[0].HasField("metadata")
    redis = tcp_listener(snapshot, "10.0.0.20_6379")
    chain = redis.filter_chains[0]
    assert [f.name for f in chain.filters] == ["envoy.filters.network.tcp_proxy"]
    assert dict(chain.metadata.filter_metadata["istio"]) == {"protocol": "REDIS"}
    assert tcp_proxy(redis).idle_timeout.seconds == 3600  # Envoy's default, written out


def test_idle_timeout_from_the_destination_policy(bookinfo: Callable[..., MeshSnapshot]) -> None:
    snapshot = with_redis(bookinfo(), POLICIES)
    assert tcp_proxy(tcp_listener(snapshot, MONGO)).idle_timeout.seconds == 90
    # Not a duration: the default stays (validation does not read annotations).
    assert tcp_proxy(tcp_listener(snapshot, "10.0.0.20_6379")).idle_timeout.seconds == 3600
    off = tcp_proxy(tcp_listener(with_redis(bookinfo(), POLICIES.replace("1m30s", "0s")), MONGO))
    assert off.HasField("idle_timeout")
    assert off.idle_timeout.seconds == 0  # Envoy: 0 turns the idle timeout off


def test_inbound_tcp_listeners_carry_mixer_and_sidecars_forward_attributes(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    """With Mixer in the mesh, an inbound TCP listener has the same `istio.mixer` metadata as
    an HTTP one (the proxy's TCP Mixer filter reads it), and the capture listener tells the
    sidecar to forward its source attributes; without Mixer, neither says Mixer is there."""
    plain = with_redis(bookinfo())
    mesh = type(plain.mesh)()
    mesh.CopyFrom(plain.mesh)
    mesh.mixer_address = "istio-mixer.istio-system:9091"
    snapshot = dataclasses.replace(plain, mesh=mesh)
    redis_proxy = Proxy.parse("sidecar~127.0.0.20~redis-1.default~default.svc.cluster.local")
    found = generate(snapshot, redis_proxy).of(resources.LISTENER)
    istio = json_format.MessageToDict(found["127.0.0.20_6379"].metadata.filter_metadata["istio"])
    assert istio["protocol"] == "REDIS"
    assert istio["mixer"] == {
        "address": "istio-mixer.istio-system:9091",
        "disable_policy_checks": False,
        "attributes": {
            "destination.service": REDIS_HOST,
            "destination.ip": "127.0.0.20",
            "destination.uid": "kubernetes://redis-1.default",
            "destination.port": 6379.0,
            "destination.labels": {"app": "redis"},
            "destination.user": "",
            "destination.namespace": "default",
        },
    }
    virtual = found["virtualOutbound"].metadata.filter_metadata["istio"]
    assert dict(virtual) == {"mixer_forward_attributes": True}
    without = generate(plain, redis_proxy).of(resources.LISTENER)
    assert not without["virtualOutbound"].HasField("metadata")
