"""Compiling what Pilot really sends (its golden xDS) and routing over it, as Envoy would."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from istio.pilot.xds import generate
from istio.proxy import compile
from istio.proxy.config import (
    ClusterType,
    HttpManager,
    LbPolicy,
    Redirect,
    RouteAction,
    RouteTable,
    TcpProxy,
)
from istio.proxy.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsState, from_protobuf

assert generate  # registers the descriptors of every type Pilot packs in an Any (json_format)
GOLDEN = Path(__file__).parents[2] / "pilot" / "tests" / "golden"
TYPES = {"cds": CLUSTER, "eds": ENDPOINT, "lds": LISTENER, "rds": ROUTE}


def golden(name: str) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


def packed(type_url: str, resources: Mapping[str, Any]) -> list[any_pb2.Any]:
    message_type = {
        CLUSTER: cluster_pb2.Cluster,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }
    out = []
    for body in resources.values():
        if type_url == ENDPOINT:
            from envoy.config.endpoint.v3 import endpoint_pb2

            message: Message = json_format.ParseDict(body, endpoint_pb2.ClusterLoadAssignment())
        else:
            message = json_format.ParseDict(body, message_type[type_url]())
        holder = any_pb2.Any()
        holder.Pack(message)
        out.append(holder)
    return out


def loaded(name: str) -> XdsState:
    state = XdsState()
    for short, resources in golden(name).items():
        assert state.accept(TYPES[short], "v1", packed(TYPES[short], resources)) is None
    return state


@pytest.mark.parametrize(
    "name", ["sidecar-reviews-v2", "sidecar-productpage-iptables", "ingress", "egress"]
)
def test_every_golden_config_compiles_and_is_complete(name: str) -> None:
    state = loaded(name)
    snapshot = state.snapshot()
    assert state.complete(snapshot), snapshot.missing()
    assert set(snapshot.clusters) == set(golden(name)["cds"])


def table(name: str, route_name: str) -> RouteTable:
    config = json_format.ParseDict(golden(name)["rds"][route_name], route_pb2.RouteConfiguration())
    return compile.route_table(from_protobuf(config))


def cluster_of(table: RouteTable, authority: str, path: str = "/", **headers: str) -> str:
    route = table.route(authority, path, {":path": path, ":method": "GET", **headers})
    assert route is not None
    assert isinstance(route.action, RouteAction)
    return route.action.pick_cluster(0)


def test_virtual_hosts_by_every_name_a_client_uses() -> None:
    routes = table("sidecar-reviews-v2", "9080")
    for authority in (
        "reviews",
        "reviews:9080",
        "reviews.default",
        "REVIEWS.default.svc.cluster.local:9080",
        "10.0.0.12",
    ):
        assert cluster_of(routes, authority).endswith("reviews.default.svc.cluster.local")
    assert routes.route("unknown:9080", "/", {}) is None


def test_header_regex_match_picks_the_rule_then_the_default_rule() -> None:
    routes = table("sidecar-reviews-v2", "9080")
    jason = "outbound|9080|version=v2|reviews.default.svc.cluster.local"
    assert cluster_of(routes, "reviews:9080", cookie="session=1;user=jason") == jason
    assert cluster_of(routes, "reviews:9080", cookie="user=jasonx").endswith(
        "version=v1|reviews.default.svc.cluster.local"
    )
    assert cluster_of(routes, "reviews:9080") == (
        "outbound|9080|version=v1|reviews.default.svc.cluster.local"
    )


def test_fault_rewrite_mirror_and_added_headers() -> None:
    routes = table("sidecar-reviews-v2", "9080")
    ratings = routes.route("ratings", "/", {"cookie": "user=jason"})
    assert ratings is not None
    assert ratings.fault is not None
    assert (ratings.fault.delay, ratings.fault.delay_ppm) == (7.0, 1_000_000)
    details = routes.route("details:9080", "/old/x", {":method": "GET"})
    assert details is not None
    assert isinstance(details.action, RouteAction)
    assert details.action.prefix_rewrite == "/new"
    assert details.action.host_rewrite == "details-v2"
    assert details.action.mirrors == ("outbound|9080|version=v1|details.default.svc.cluster.local",)
    assert [(h.name, h.value) for h in details.headers_to_add] == [("x-mesh", "yes")]
    post = routes.route("details:9080", "/old/x", {":method": "POST"})
    assert post is not None
    assert post.name == "default/details-default"


def test_gateways_route_by_prefix_and_wildcard_host() -> None:
    ingress = table("ingress", "ingress_8080")
    assert cluster_of(ingress, "anything", "/productpage?u=1").endswith(
        "productpage.default.svc.cluster.local"
    )
    assert ingress.route("anything", "/other", {}) is None
    egress = table("egress", "egress")
    assert cluster_of(egress, "www.googleapis.com:443") == "outbound|443||*.googleapis.com"
    assert cluster_of(egress, "www.googleapis.com") == "outbound|80||*.googleapis.com"
    assert egress.route("googleapis.com", "/", {}) is None


def test_listeners_clusters_and_endpoints() -> None:
    snapshot = loaded("sidecar-reviews-v2").snapshot()
    virtual = snapshot.listeners["virtualOutbound"]
    assert virtual.use_original_dst
    assert virtual.bind
    assert virtual.port == 15001
    assert isinstance(virtual.chain, TcpProxy)
    assert virtual.chain.cluster == "BlackHoleCluster"
    outbound = snapshot.listeners["0.0.0.0_9080"]
    assert not outbound.bind
    assert isinstance(outbound.chain, HttpManager)
    assert outbound.chain.rds == "9080"
    inbound = snapshot.listeners["127.0.0.5_9080"]
    assert inbound.bind
    assert inbound.inbound
    assert isinstance(inbound.chain, HttpManager)
    assert inbound.chain.routes is not None
    assert snapshot.listener_for_port(9080) is outbound
    assert snapshot.listener_for_port(9080, "127.0.0.5") is inbound
    app = snapshot.clusters["inbound|9080||reviews.default.svc.cluster.local"]
    assert app.type is ClusterType.STATIC
    assert [(e.host, e.port) for e in app.endpoints] == [("127.0.0.5", 19080)]
    wildcard = snapshot.clusters["outbound|443||*.googleapis.com"]
    assert wildcard.type is ClusterType.ORIGINAL_DST
    assert wildcard.tls_sni == ""
    assert wildcard.lb is LbPolicy.CLUSTER_PROVIDED
    grpc = snapshot.clusters["outbound|7070||grpc-echo.default.svc.cluster.local"]
    assert grpc.http2
    reviews = snapshot.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert snapshot.endpoints_of(reviews)


def listener_with(filter_name: str) -> dict[str, Any]:
    return {
        "name": "bad",
        "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 80}},
        "filterChains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typedConfig": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                            ".http_connection_manager.v3.HttpConnectionManager",
                            "rds": {"routeConfigName": "80"},
                            "httpFilters": [{"name": filter_name}],
                        },
                    }
                ]
            }
        ],
    }


def test_bad_resources_are_refused_and_the_last_good_ones_stay() -> None:
    state = loaded("sidecar-reviews-v2")
    before = state.snapshot()
    bad_route = {
        "name": "9080",
        "virtualHosts": [
            {
                "name": "x",
                "domains": ["*"],
                "routes": [{"match": {"safeRegex": {"regex": "("}}, "route": {"cluster": "c"}}],
            }
        ],
    }
    error = state.accept(ROUTE, "v2", packed(ROUTE, {"9080": bad_route}))
    assert error is not None
    assert "does not compile" in error
    assert "9080" in error
    error = state.accept(
        LISTENER, "v2", packed(LISTENER, {"bad": listener_with("envoy.filters.http.lua")})
    )
    assert error is not None
    assert "unsupported HTTP filter envoy.filters.http.lua" in error
    assert state.snapshot() == before
    assert state.types[ROUTE].version == "v1"


def test_snapshot_is_incomplete_until_referenced_routes_arrive() -> None:
    state = XdsState()
    resources = golden("sidecar-reviews-v2")
    assert state.accept(CLUSTER, "1", packed(CLUSTER, resources["cds"])) is None
    assert state.accept(LISTENER, "1", packed(LISTENER, resources["lds"])) is None
    assert not state.complete(state.snapshot())
    assert state.rds_names() == {"443", "7070", "80", "9080"}
    assert state.accept(ENDPOINT, "1", packed(ENDPOINT, resources["eds"])) is None
    assert state.accept(ROUTE, "1", packed(ROUTE, resources["rds"])) is None
    assert state.complete(state.snapshot())


def test_weighted_clusters_and_redirects() -> None:
    route = compile.route(
        "t",
        from_protobuf(
            json_format.ParseDict(
                {
                    "match": {"prefix": "/"},
                    "route": {
                        "weightedClusters": {
                            "clusters": [
                                {"name": "a", "weight": 75},
                                {"name": "b", "weight": 25},
                            ]
                        },
                        "timeout": "2.5s",
                        "retryPolicy": {"retryOn": "5xx,connect-failure", "numRetries": 3},
                    },
                },
                rc.Route(),
            )
        ),
    )
    action = route.action
    assert isinstance(action, RouteAction)
    assert action.total_weight == 100
    assert action.timeout == 2.5
    assert [action.pick_cluster(n) for n in (0, 74, 75, 99)] == ["a", "a", "b", "b"]
    assert action.retry is not None
    assert action.retry.num_retries == 3
    assert action.retry.on_5xx
    assert action.retry.on_connect_failure
    redirect = compile.route(
        "t",
        from_protobuf(
            json_format.ParseDict(
                {"match": {"path": "/a"}, "redirect": {"hostRedirect": "b", "pathRedirect": "/c"}},
                rc.Route(),
            )
        ),
    )
    assert redirect.action == Redirect(host="b", path="/c", status=301)
    assert redirect.match.matches("/a?x=1", {})
    assert not redirect.match.matches("/ab", {})


def test_accepted_resources_are_kept_as_wire_bytes_and_decode_again() -> None:
    state = loaded("sidecar-reviews-v2")
    for short, resources in golden("sidecar-reviews-v2").items():
        type_url = TYPES[short]
        kept = state.types[type_url]
        assert set(kept.raw) == set(resources)
        for name, body in resources.items():
            assert isinstance(kept.raw[name], bytes)
            again = json_format.MessageToDict(kept.message(type_url, name))
            original = packed(type_url, {name: body})[0]
            assert kept.raw[name] == original.value
            assert again["name" if type_url != ENDPOINT else "clusterName"] == name


def test_route_tables_know_whether_they_match_on_headers() -> None:
    assert table("sidecar-reviews-v2", "9080").header_matching  # the jason cookie rule
    assert not table("sidecar-reviews-v2", "80").header_matching
