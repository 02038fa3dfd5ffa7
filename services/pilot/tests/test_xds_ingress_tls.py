"""The ingress gateway's TLS listeners: a chain per certificate chosen by SNI, the default
chain for any other name, the routes of the plaintext listener, golden-file compared
(UPDATE_GOLDEN=1 rewrites it)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from istio.config import parse_documents
from istio.model import Proxy
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate

GOLDEN = Path(__file__).parent / "golden" / "ingress-tls.json"
INGRESS_NODE = "ingress~127.0.0.100~istio-ingress.istio-system~istio-system.svc.cluster.local"

TLS_RULES = """
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: bookinfo-https}
spec:
  tlsSecret: bookinfo-certs
  destination: {name: productpage}
  destinationPort: 9080
  match:
    request: {headers: {authority: {exact: bookinfo.example.com}, uri: {prefix: /productpage}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: reviews-https}
spec:
  tlsSecret: reviews-certs
  destination: {name: reviews}
  destinationPort: 9080
  match: {request: {headers: {authority: {exact: "Reviews.example.com:443"}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: any-host-https}
spec:
  tlsSecret: istio-ingress-certs
  destination: {name: productpage}
  destinationPort: 9080
  match: {request: {headers: {uri: {prefix: /static}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: admin}
spec:
  port: 8443
  tlsSecret: admin-certs
  destination: {name: details}
  destinationPort: 9080
  match: {request: {headers: {authority: {exact: admin.example.com}}}}
"""


def with_tls_rules(base: MeshSnapshot, documents: str = TLS_RULES) -> MeshSnapshot:
    extra, problems = parse_documents(documents, "tls rules")
    assert not problems, problems
    rules = sorted(
        [*base.of_kind("IngressRule"), *extra], key=lambda c: (c.meta.namespace, c.meta.name)
    )
    configs = {**base.configs, "IngressRule": tuple(rules)}
    return dataclasses.replace(base, configs=MappingProxyType(configs))


def ingress(snapshot: MeshSnapshot, **options: str) -> resources.Resources:
    return generate(snapshot, Proxy.parse(INGRESS_NODE), **options)  # type: ignore[arg-type]


def chains(found: resources.Resources, name: str) -> list[tuple[list[str], str, str]]:
    """(server names, cert file, key file) of each chain of a listener."""
    listener = found.of(resources.LISTENER)[name]
    result = []
    for chain in listener.filter_chains:  # type: ignore[attr-defined]
        context = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(context)
        certificate = context.common_tls_context.tls_certificates[0]
        assert not context.require_client_certificate.value
        assert list(context.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
        result.append(
            (
                list(chain.filter_chain_match.server_names),
                certificate.certificate_chain.filename,
                certificate.private_key.filename,
            )
        )
    return result


def test_golden(bookinfo: Callable[..., MeshSnapshot]) -> None:
    found = ingress(with_tls_rules(bookinfo()))
    document = {
        resources.SHORT_NAMES[type_url]: {
            name: json_format.MessageToDict(message)
            for name, message in sorted(found.of(type_url).items())
        }
        for type_url in (resources.LISTENER, resources.ROUTE)
    }
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: run with UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text(), f"{GOLDEN.name} differs: review, then UPDATE_GOLDEN=1"


def test_each_host_gets_its_secret_by_sni_and_the_any_host_secret_is_the_default(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    found = ingress(with_tls_rules(bookinfo()))
    # Rules without a port: plaintext on 80 as before, and TLS on 443; a rule's own port
    # with a secret is TLS on that port alone; 8080 (no secret) stays plaintext.
    assert sorted(found.of(resources.LISTENER)) == [
        "ingress_443",
        "ingress_80",
        "ingress_8080",
        "ingress_8443",
    ]
    assert (
        not found.of(resources.LISTENER)["ingress_80"]
        .filter_chains[0]
        .HasField(  # type: ignore[attr-defined]
            "transport_socket"
        )
    )
    assert chains(found, "ingress_443") == [
        (
            ["bookinfo.example.com"],
            "/etc/istio/ingress-certs/bookinfo-certs/tls.crt",
            "/etc/istio/ingress-certs/bookinfo-certs/tls.key",
        ),
        (
            ["reviews.example.com"],  # the authority's port and case left out
            "/etc/istio/ingress-certs/reviews-certs/tls.crt",
            "/etc/istio/ingress-certs/reviews-certs/tls.key",
        ),
        # 0.2's secret: its files directly in the directory, as 0.2 mounted them
        ([], "/etc/istio/ingress-certs/tls.crt", "/etc/istio/ingress-certs/tls.key"),
    ]
    # Only one secret on 8443: it is the default too.
    assert chains(found, "ingress_8443") == [
        (
            ["admin.example.com"],
            "/etc/istio/ingress-certs/admin-certs/tls.crt",
            "/etc/istio/ingress-certs/admin-certs/tls.key",
        ),
        (
            [],
            "/etc/istio/ingress-certs/admin-certs/tls.crt",
            "/etc/istio/ingress-certs/admin-certs/tls.key",
        ),
    ]


def test_the_tls_listener_serves_the_plaintext_listeners_routes(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    routes = ingress(with_tls_rules(bookinfo())).of(resources.ROUTE)
    plain = json_format.MessageToDict(routes["ingress_80"])
    tls = json_format.MessageToDict(routes["ingress_443"])
    assert json.dumps(plain).replace("ingress_80", "ingress_443") == json.dumps(tls)
    assert {r["name"].split(":")[0] for r in tls["virtualHosts"][0]["routes"]} == {
        "default/any-host-https",
        "default/bookinfo-https",
        "default/reviews-https",
    }


def test_the_certs_directory_is_pilots_flag(bookinfo: Callable[..., MeshSnapshot]) -> None:
    snapshot = with_tls_rules(bookinfo())
    found = ingress(snapshot, ingress_certs_dir="/srv/certs")
    assert chains(found, "ingress_443")[0][1:] == (
        "/srv/certs/bookinfo-certs/tls.crt",
        "/srv/certs/bookinfo-certs/tls.key",
    )
    assert chains(found, "ingress_443")[-1][1:] == ("/srv/certs/tls.crt", "/srv/certs/tls.key")
    # The default directory's listeners, from the same snapshot, are not the ones cached.
    assert chains(ingress(snapshot), "ingress_443")[-1][1] == "/etc/istio/ingress-certs/tls.crt"


def test_without_a_secret_no_host_gets_tls_and_the_lowest_secret_is_the_default(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    assert sorted(ingress(bookinfo()).of(resources.LISTENER)) == ["ingress_8080"]
    two_for_one_host = """
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: b}
spec:
  tlsSecret: zz-certs
  destination: {name: productpage}
  destinationPort: 9080
  match: {request: {headers: {authority: {exact: shop.example.com}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: a}
spec:
  tlsSecret: shop-certs
  destination: {name: productpage}
  destinationPort: 9080
  match: {request: {headers: {authority: {exact: shop.example.com}, uri: {prefix: /cart}}}}
"""
    found = ingress(with_tls_rules(bookinfo(), two_for_one_host))
    assert [c[:2] for c in chains(found, "ingress_443")] == [
        (["shop.example.com"], "/etc/istio/ingress-certs/shop-certs/tls.crt"),
        ([], "/etc/istio/ingress-certs/shop-certs/tls.crt"),
    ]
