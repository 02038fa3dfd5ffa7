"""Targeted generation behaviour beyond the golden files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.config import parse_documents
from istio.model import Proxy
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate

REVIEWS_V2 = "sidecar~127.0.0.5~reviews-v2.default~default.svc.cluster.local"
PRODUCTPAGE = "sidecar~127.0.0.2~productpage-v1.default~default.svc.cluster.local"


def cluster_metadata(found: resources.Resources, name: str) -> dict[str, object]:
    cluster = found.of(resources.CLUSTER)[name]
    found_metadata = cluster.metadata.filter_metadata.get("istio")  # type: ignore[attr-defined]
    return dict(found_metadata) if found_metadata is not None else {}


def test_mtls_metadata_follows_the_mesh(bookinfo: Callable[..., MeshSnapshot]) -> None:
    plain = bookinfo()
    mesh = proxy_mesh_pb2.MeshConfig()
    mesh.CopyFrom(plain.mesh)
    mesh.auth_policy = proxy_mesh_pb2.MeshConfig.AuthPolicy.MUTUAL_TLS
    secured = dataclasses.replace(plain, mesh=mesh)
    found = generate(secured, Proxy.parse(PRODUCTPAGE))
    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    assert cluster_metadata(found, reviews)["mtls"]
    # With the identities its workloads run as, the proxy is told to expect one of them.
    accounts = ("spiffe://cluster.local/ns/default/sa/bookinfo-reviews",)
    services = dict(secured.services)
    host = "reviews.default.svc.cluster.local"
    services[host] = dataclasses.replace(services[host], service_accounts=accounts)
    named = generate(dataclasses.replace(secured, services=services), Proxy.parse(PRODUCTPAGE))
    assert list(cluster_metadata(named, reviews)["subject_alt_names"]) == list(accounts)  # type: ignore[call-overload]
    # Absent means plaintext (every proxy decodes every cluster: nothing set needlessly).
    assert "mtls" not in cluster_metadata(found, "outbound|443||api.example.com")
    assert "mtls" not in cluster_metadata(
        generate(plain, Proxy.parse(PRODUCTPAGE)),
        "outbound|9080||reviews.default.svc.cluster.local",
    )


def test_source_rules_reach_only_their_source(bookinfo: Callable[..., MeshSnapshot]) -> None:
    rule, problems = parse_documents(
        """
kind: RouteRule
metadata: {name: reviews-v2-to-ratings-v2}
spec:
  destination: {name: ratings}
  precedence: 5
  match: {source: {name: reviews, labels: {version: v2}}}
  route: [{labels: {version: v2}}]
"""
    )
    assert not problems
    snapshot = bookinfo()
    configs = dict(snapshot.configs)
    configs["RouteRule"] = (*configs["RouteRule"], *rule)
    snapshot = dataclasses.replace(snapshot, configs=configs)

    def route_names(node: str) -> list[str]:
        found = generate(snapshot, Proxy.parse(node))
        ratings = next(
            v
            for v in found.of(resources.ROUTE)["9080"].virtual_hosts  # type: ignore[attr-defined]
            if v.name.startswith("ratings.")
        )
        return [r.name for r in ratings.routes]

    assert route_names(REVIEWS_V2)[0] == "default/reviews-v2-to-ratings-v2"
    assert "default/reviews-v2-to-ratings-v2" not in route_names(PRODUCTPAGE)


def test_proxies_alike_share_generated_messages(bookinfo: Callable[..., MeshSnapshot]) -> None:
    snapshot = bookinfo()
    one = generate(snapshot, Proxy.parse("sidecar~10.9.0.1~a.default~default.svc.cluster.local"))
    two = generate(snapshot, Proxy.parse("sidecar~10.9.0.2~b.default~default.svc.cluster.local"))
    name = "outbound|9080||reviews.default.svc.cluster.local"
    assert one.of(resources.CLUSTER)[name] is two.of(resources.CLUSTER)[name]
    assert one.version(resources.ROUTE) == two.version(resources.ROUTE)
    other = generate(snapshot, Proxy.parse("sidecar~10.9.0.3~c.books~books.svc.cluster.local"))
    # Short names differ by namespace: "reviews" resolves only from default.
    assert other.version(resources.ROUTE) != one.version(resources.ROUTE)


def test_endpoint_change_carries_over_all_but_the_changed_hosts(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    """An endpoints-only snapshot starts from the previous one's shared outputs: the changed
    host's assignments are new, everything else is the same objects, and the result equals
    what a generation from scratch gives."""
    from istio.pilot.xds import index as index_module

    node = Proxy.parse("sidecar~10.9.0.1~a.default~default.svc.cluster.local")
    reviews = "reviews.default.svc.cluster.local"
    before = bookinfo()
    old = generate(before, node)
    instances = dict(before.instances)
    added = dataclasses.replace(instances[reviews][0], address="10.9.9.9")
    instances[reviews] = (*instances[reviews], added)
    after = dataclasses.replace(before, instances=instances)
    new = generate(after, node)

    old_eds, new_eds = old.of(resources.ENDPOINT), new.of(resources.ENDPOINT)
    assert old_eds.keys() == new_eds.keys()
    for name in old_eds:
        if name.endswith("|" + reviews):
            assert new_eds[name] is not old_eds[name]
        else:
            assert new_eds[name] is old_eds[name], name
    assert "10.9.9.9" in str(new_eds[f"outbound|9080||{reviews}"])
    assert "10.9.9.9" not in str(old_eds[f"outbound|9080||{reviews}"])
    for type_url in (resources.CLUSTER, resources.LISTENER, resources.ROUTE):
        shared = set(old.of(type_url)) & set(new.of(type_url))
        assert any(new.of(type_url)[n] is old.of(type_url)[n] for n in shared)

    index_module._LAST.clear()
    fresh = generate(dataclasses.replace(after), node)
    for type_url in resources.PUSH_ORDER:
        assert fresh.version(type_url) == new.version(type_url)
        if type_url == resources.ENDPOINT:
            assert all(fresh.of(type_url)[n] is not new.of(type_url)[n] for n in new_eds)

    # A DNS service's endpoints are inline in its cluster: nothing is carried over.
    dns = "api.example.com"
    instances[dns] = (dataclasses.replace(added, address="api-2.example.com"),)
    again = generate(dataclasses.replace(after, instances=dict(instances)), node)
    assert all(
        again.of(resources.ENDPOINT)[n] is not new_eds[n] for n in again.of(resources.ENDPOINT)
    )


RATINGS_V1 = "sidecar~127.0.0.7~ratings-v1.default~default.svc.cluster.local"
QUOTA_BINDING = """
apiVersion: config.istio.io/v1alpha2
kind: QuotaSpec
metadata: {name: request-count, namespace: istio-system}
spec:
  rules:
  - quotas: [{charge: 1, quota: requestcount}]
---
apiVersion: config.istio.io/v1alpha2
kind: QuotaSpec
metadata: {name: unbound, namespace: istio-system}
spec:
  rules:
  - quotas: [{charge: 5, quota: other}]
---
apiVersion: config.istio.io/v1alpha2
kind: QuotaSpecBinding
metadata: {name: request-count, namespace: istio-system}
spec:
  quotaSpecs: [{name: request-count, namespace: istio-system}, {name: missing}]
  services:
  - {name: ratings, namespace: default}
  - {name: reviews, namespace: default, labels: {version: v3}}
"""


def inbound_mixer(node: str, snapshot: MeshSnapshot) -> dict[str, object]:
    """The `istio.mixer` metadata of `node`'s inbound listener on 9080."""
    from google.protobuf import json_format

    proxy = Proxy.parse(node)
    listener = generate(snapshot, proxy).of(resources.LISTENER)[f"{proxy.ip}_9080"]
    istio = listener.metadata.filter_metadata["istio"]  # type: ignore[attr-defined]
    mixer: dict[str, object] = json_format.MessageToDict(istio)["mixer"]
    return mixer


def test_quota_specs_reach_the_inbound_listeners_they_bind(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    before = bookinfo()
    assert "quota_specs" not in inbound_mixer(RATINGS_V1, before)
    quotas, problems = parse_documents(QUOTA_BINDING)
    assert not problems, problems
    configs = dict(before.configs)
    for kind in ("QuotaSpec", "QuotaSpecBinding"):
        configs[kind] = tuple(c for c in quotas if c.meta.kind == kind)
    after = dataclasses.replace(before, configs=configs)
    # The new binding is seen although only configs changed (inbound outputs are carried
    # across routing changes, never across quota changes).
    ratings = inbound_mixer(RATINGS_V1, after)
    charge_one = {"rules": [{"quotas": [{"quota": "requestcount", "charge": "1"}]}]}
    assert ratings["quota_specs"] == [charge_one]  # the missing spec binds nothing
    reviews_v3 = "sidecar~127.0.0.6~reviews-v3.default~default.svc.cluster.local"
    assert inbound_mixer(reviews_v3, after)["quota_specs"] == [charge_one]
    # A binding's labels select a version: reviews v2 is not charged; nor is productpage.
    assert "quota_specs" not in inbound_mixer(REVIEWS_V2, after)
    assert "quota_specs" not in inbound_mixer(PRODUCTPAGE, after)
    # And removing the binding takes the quotas away again.
    assert "quota_specs" not in inbound_mixer(RATINGS_V1, dataclasses.replace(before))
