"""Both shapes of mTLS config compile to the same records: Pilot's (cluster metadata istio.mtls,
inbound listener metadata istio.auth_policy and istio.mtls_permissive, on its golden output)
and Envoy's (a cluster's UpstreamTlsContext transport socket; listener filter chains with
DownstreamTlsContext chosen by transport_protocol behind the tls_inspector). What the proxy
cannot honour is refused with the resource's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from istio.pilot.xds import generate
from istio.proxy import compile
from istio.proxy.compile import CompileError
from istio.proxy.config import (
    DownstreamTls,
    HttpManager,
    MatchKind,
    SanMatcher,
    TcpProxy,
    TlsFiles,
    UpstreamTls,
)
from istio.proxy.xds import from_protobuf

assert generate  # registers the descriptors of every type Pilot packs in an Any (json_format)
GOLDEN = Path(__file__).resolve().parents[3] / "pilot" / "tests" / "golden"
FILES = TlsFiles("/etc/certs/cert-chain.pem", "/etc/certs/key.pem", "/etc/certs/root-cert.pem")
TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def golden(kind: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / "sidecar-reviews-v2.json").read_text())[kind]
    return data


def common_tls(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "tlsCertificates": [
            {
                "certificateChain": {"filename": FILES.cert_chain},
                "privateKey": {"filename": FILES.private_key},
            }
        ],
        "validationContext": {"trustedCa": {"filename": FILES.trusted_ca}},
    }
    context.update(extra)
    return context


def upstream_socket(**context: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": {"@type": f"{TLS_CONTEXT}.UpstreamTlsContext", **context},
    }


def downstream_socket(require: bool = True, **common: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": {
            "@type": f"{TLS_CONTEXT}.DownstreamTlsContext",
            "commonTlsContext": common_tls(**common),
            "requireClientCertificate": require,
        },
    }


def cluster(body: dict[str, Any]) -> cluster_pb2.Cluster:
    base = {"name": "outbound|9080||reviews.default.svc.cluster.local", "type": "EDS"}
    base["edsClusterConfig"] = {"edsConfig": {"ads": {}}}
    return json_format.ParseDict({**base, **body}, cluster_pb2.Cluster())


def tcp_chain(**extra: Any) -> dict[str, Any]:
    return {
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typedConfig": {"@type": TCP_PROXY, "statPrefix": "in", "cluster": "inbound|9080"},
            }
        ],
        **extra,
    }


def listener(chains: list[dict[str, Any]], **extra: Any) -> listener_pb2.Listener:
    body = {
        "name": "127.0.0.5_9080",
        "address": {"socketAddress": {"address": "127.0.0.5", "portValue": 9080}},
        "trafficDirection": "INBOUND",
        "filterChains": chains,
        **extra,
    }
    return json_format.ParseDict(body, listener_pb2.Listener())


# Pilot's shape.


def test_pilot_metadata_turns_mtls_on_for_mesh_clusters_and_inbound_listeners() -> None:
    clusters = golden("cds")
    name = "outbound|9080||ratings.default.svc.cluster.local"
    body = dict(clusters[name], metadata={"filterMetadata": {"istio": {"mtls": True}}})
    compiled = compile.cluster(from_protobuf(json_format.ParseDict(body, cluster_pb2.Cluster())))
    assert compiled.mtls == UpstreamTls()
    assert compiled.tls_sni is None
    plain = compile.cluster(
        from_protobuf(json_format.ParseDict(clusters[name], cluster_pb2.Cluster()))
    )
    assert plain.mtls is None

    inbound = golden("lds")["127.0.0.5_9080"]
    assert (
        compile.listener(from_protobuf(json_format.ParseDict(inbound, listener_pb2.Listener()))).tls
        is None
    )
    for permissive in (False, True):
        metadata = json.loads(json.dumps(inbound["metadata"]))
        metadata["filterMetadata"]["istio"].update(
            auth_policy="MUTUAL_TLS", mtls_permissive=permissive
        )
        body = dict(inbound, metadata=metadata)
        compiled_listener = compile.listener(
            from_protobuf(json_format.ParseDict(body, listener_pb2.Listener()))
        )
        assert compiled_listener.tls == DownstreamTls(permissive=permissive)
        assert isinstance(compiled_listener.chain, HttpManager)


def test_pilot_metadata_names_the_identities_a_cluster_may_have() -> None:
    ids = ["spiffe://cluster.local/ns/default/sa/bookinfo-ratings"]
    metadata = {"filterMetadata": {"istio": {"mtls": True, "subject_alt_names": ids}}}
    compiled = compile.cluster(from_protobuf(cluster({"metadata": metadata})))
    assert compiled.mtls == UpstreamTls(
        subject_alt_names=(SanMatcher("URI", MatchKind.EXACT, ids[0]),)
    )
    metadata["filterMetadata"]["istio"]["subject_alt_names"] = "not a list"
    with pytest.raises(CompileError, match="subject_alt_names must be a list"):
        compile.cluster(from_protobuf(cluster({"metadata": metadata})))


def test_unknown_auth_policy_is_refused() -> None:
    metadata = {"filterMetadata": {"istio": {"auth_policy": "KERBEROS"}}}
    with pytest.raises(CompileError, match="unknown auth_policy 'KERBEROS'"):
        compile.listener(from_protobuf(listener([tcp_chain()], metadata=metadata)))


# Envoy's shape.


def test_upstream_tls_context_with_a_client_certificate_is_mutual_tls() -> None:
    spiffe = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    context = common_tls(alpnProtocols=["istio", "http/1.1"])
    context["validationContext"]["matchTypedSubjectAltNames"] = [
        {"sanType": "URI", "matcher": {"exact": spiffe}}
    ]
    context["tlsParams"] = {"tlsMinimumProtocolVersion": "TLSv1_3"}
    compiled = compile.cluster(
        from_protobuf(
            cluster({"transportSocket": upstream_socket(commonTlsContext=context, sni="reviews")})
        )
    )
    assert compiled.mtls == UpstreamTls(
        files=FILES,
        sni="reviews",
        alpn=("istio", "http/1.1"),
        subject_alt_names=(SanMatcher("URI", MatchKind.EXACT, spiffe),),
        min_version="TLSv1_3",
    )
    assert compiled.tls_sni is None
    # Without a client certificate it stays TLS origination to an external host.
    egress = compile.cluster(
        from_protobuf(cluster({"transportSocket": upstream_socket(sni="example.com")}))
    )
    assert (egress.tls_sni, egress.mtls) == ("example.com", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"validationContext": {}}, "needs validation_context.trusted_ca"),
        (
            {"tlsCertificateSdsSecretConfigs": [{"name": "default"}], "tlsCertificates": []},
            "must be files",
        ),
        ({"tlsParams": {"tlsMinimumProtocolVersion": "TLSv1_1"}}, "below 1.2"),
        (
            {
                "tlsCertificates": [
                    {"certificateChain": {"inlineString": "x"}, "privateKey": {"filename": "k"}}
                ]
            },
            "certificate_chain must name a file",
        ),
    ],
)
def test_upstream_tls_contexts_the_proxy_cannot_honour(
    change: dict[str, Any], message: str
) -> None:
    context = common_tls(**change)
    if "tlsCertificateSdsSecretConfigs" in change:
        context["tlsCertificates"] = [
            {"certificateChain": {"filename": "c"}, "privateKey": {"filename": "k"}}
        ]
    with pytest.raises(CompileError, match=message) as refused:
        compile.cluster(
            from_protobuf(cluster({"transportSocket": upstream_socket(commonTlsContext=context)}))
        )
    assert "outbound|9080||reviews.default.svc.cluster.local" in str(refused.value)


def test_tls_and_raw_buffer_chains_behind_the_tls_inspector_are_a_permissive_port() -> None:
    inspector = {"listenerFilters": [{"name": "envoy.filters.listener.tls_inspector"}]}
    permissive = listener(
        [
            tcp_chain(
                filterChainMatch={"transportProtocol": "tls"},
                transportSocket=downstream_socket(alpnProtocols=["istio"]),
            ),
            tcp_chain(filterChainMatch={"transportProtocol": "raw_buffer"}),
        ],
        **inspector,
    )
    compiled = compile.listener(from_protobuf(permissive))
    assert compiled.tls == DownstreamTls(files=FILES, permissive=True, alpn=("istio",))
    assert isinstance(compiled.chain, TcpProxy)
    strict = compile.listener(
        from_protobuf(
            listener(
                [
                    tcp_chain(
                        filterChainMatch={"transportProtocol": "tls"},
                        transportSocket=downstream_socket(),
                    )
                ],
                **inspector,
            )
        )
    )
    assert strict.tls == DownstreamTls(files=FILES)
    # A chain without a match that terminates TLS takes every connection: strict too.
    catch_all = compile.listener(
        from_protobuf(listener([tcp_chain(transportSocket=downstream_socket())]))
    )
    assert catch_all.tls == DownstreamTls(files=FILES)
    # The default chain serves what no chain matches: plaintext here.
    with_default = compile.listener(
        from_protobuf(
            listener(
                [
                    tcp_chain(
                        filterChainMatch={"transportProtocol": "tls"},
                        transportSocket=downstream_socket(),
                    )
                ],
                defaultFilterChain=tcp_chain(),
            )
        )
    )
    assert with_default.tls == DownstreamTls(files=FILES, permissive=True)


@pytest.mark.parametrize(
    ("chains", "message"),
    [
        (
            [
                tcp_chain(
                    filterChainMatch={"transportProtocol": "tls"},
                    transportSocket=downstream_socket(),
                ),
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typedConfig": {"@type": TCP_PROXY, "statPrefix": "x", "cluster": "y"},
                        }
                    ],
                    "filterChainMatch": {"transportProtocol": "raw_buffer"},
                },
            ],
            "must carry the same network filters",
        ),
        ([tcp_chain(filterChainMatch={"transportProtocol": "tls"})], "passthrough"),
        ([tcp_chain(filterChainMatch={"destinationPort": 9080})], "transport_protocol only"),
        (
            [tcp_chain(transportSocket=downstream_socket(), filterChainMatch={})],
            None,
        ),
        (
            [tcp_chain(transportSocket=downstream_socket(validationContext={}))],
            "require_client_certificate needs validation_context.trusted_ca",
        ),
        ([tcp_chain(), tcp_chain()], "more than one filter chain without a match"),
    ],
)
def test_listener_tls_the_proxy_cannot_honour(
    chains: list[dict[str, Any]], message: str | None
) -> None:
    resource = listener(chains)
    if message is None:  # an empty match is no match: accepted
        assert compile.listener(from_protobuf(resource)).tls == DownstreamTls(files=FILES)
        return
    with pytest.raises(CompileError, match=message) as refused:
        compile.listener(from_protobuf(resource))
    assert "127.0.0.5_9080" in str(refused.value)
