"""Ingress and egress gateways: the proxy at the mesh's edge (`ingress~` and `egress~` nodes).

Ingress ports. An IngressRule is served on its `port`; without one, on 80, and, when it names
a `tls_secret`, on 443 over TLS as well (0.2's istio-ingress served every rule on 80 and the
rules with a secret on 443 too; Kubernetes Ingresses with a `tls:` block become such rules).
A port where any rule names a secret is a TLS port: every rule on it is served over TLS, with
the certificate the client's SNI picks: the secret of the rules matching that host (their
exact `authority`), else the default one (the secret of rules for any host, else the lowest
secret name, as 0.2 chose among several). A secret is read from files the ingress proxy has
mounted: `<ingress certs dir>/<secret>/tls.crt` and `tls.key`, except 0.2's one secret,
`istio-ingress-certs`, whose files sit in the directory itself (0.2 mounted it at
/etc/istio/ingress-certs).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from typing import cast

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import string_pb2

from istio.api.proxy.v1.config import ingress_rule_pb2, proxy_mesh_pb2
from istio.config import Config
from istio.model import Protocol, Proxy
from istio.model.service import Direction, cluster_name
from istio.pilot.xds import listeners, tracing
from istio.pilot.xds.index import MeshIndex, destination_host, egress_rule
from istio.pilot.xds.routes import route_match, service_routes

EGRESS_ROUTE_CONFIG = "egress"
DEFAULT_GATEWAY_PORT = 80
DEFAULT_TLS_PORT = 443
DEFAULT_INGRESS_CERTS_DIR = "/etc/istio/ingress-certs"
# 0.2's secret: its tls.crt and tls.key sit directly in the certs directory.
LEGACY_INGRESS_SECRET = "istio-ingress-certs"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# What the TLS listener accepts by ALPN: HTTP/2 first (browsers, gRPC clients), then 1.1.
INGRESS_ALPN = ("h2", "http/1.1")
# A Kubernetes secret name (a DNS-1123 subdomain): anything else could name a path elsewhere.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _ingress_rule(config: Config) -> ingress_rule_pb2.IngressRule:
    return cast(ingress_rule_pb2.IngressRule, config.spec)


def tls_secret(rule: ingress_rule_pb2.IngressRule) -> str:
    """The rule's secret, "" when it has none or one that is not a secret's name (the config
    check refuses those; this keeps them from naming files outside the certs directory)."""
    secret = rule.tls_secret
    return secret if len(secret) <= 253 and _SECRET_NAME.match(secret) else ""


def rule_ports(rule: ingress_rule_pb2.IngressRule) -> tuple[int, ...]:
    """The ports a rule is served on (see the module's docstring)."""
    if rule.port:
        return (rule.port,)
    if tls_secret(rule):
        return (DEFAULT_GATEWAY_PORT, DEFAULT_TLS_PORT)
    return (DEFAULT_GATEWAY_PORT,)


def ingress_ports(index: MeshIndex) -> list[int]:
    return sorted(
        {
            port
            for c in index.snapshot.of_kind("IngressRule")
            for port in rule_ports(_ingress_rule(c))
        }
    )


def ingress_tls_ports(index: MeshIndex) -> list[int]:
    """The ingress ports served over TLS: those where a rule names a secret."""
    return sorted(
        {
            rule.port or DEFAULT_TLS_PORT
            for rule in map(_ingress_rule, index.snapshot.of_kind("IngressRule"))
            if tls_secret(rule)
        }
    )


def secret_files(certs_dir: str, secret: str) -> tuple[str, str]:
    """The certificate chain and key files of a secret, as the ingress proxy mounts them."""
    base = certs_dir if secret == LEGACY_INGRESS_SECRET else posixpath.join(certs_dir, secret)
    return posixpath.join(base, CERT_FILE), posixpath.join(base, KEY_FILE)


def _sni_host(rule: ingress_rule_pb2.IngressRule) -> str:
    """The host a rule serves, as a TLS server name: its exact `authority` match without a
    port, lowercase; "" when it serves any host (or one SNI cannot name)."""
    if not rule.HasField("match"):
        return ""
    authority = rule.match.request.headers.get("authority")
    if authority is None or authority.WhichOneof("match_type") != "exact":
        return ""
    host = authority.exact.strip().lower()
    if host.startswith("["):
        return ""  # an IP literal: clients send no SNI for those
    return host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host


def ingress_certificates(index: MeshIndex, port: int) -> tuple[dict[str, str], str]:
    """For a TLS port: the secret by server name, and the default secret (see the module's
    docstring). Where rules for one host name different secrets, the lowest name wins."""
    by_host: dict[str, str] = {}
    for config in index.snapshot.of_kind("IngressRule"):
        rule = _ingress_rule(config)
        secret = tls_secret(rule)
        if not secret or port not in rule_ports(rule):
            continue
        host = _sni_host(rule) or "*"
        if host not in by_host or secret < by_host[host]:
            by_host[host] = secret
    default = by_host.pop("*", None) or min(by_host.values())
    return by_host, default


def ingress_tls_chains(
    index: MeshIndex, port: int, certs_dir: str
) -> list[tuple[Sequence[str], str, str]]:
    """(server names, cert file, key file) per secret, in name order, then the default."""
    by_host, default = ingress_certificates(index, port)
    hosts_of: dict[str, list[str]] = {}
    for host, secret in sorted(by_host.items()):
        hosts_of.setdefault(secret, []).append(host)
    chains: list[tuple[Sequence[str], str, str]] = [
        (hosts, *secret_files(certs_dir, secret)) for secret, hosts in sorted(hosts_of.items())
    ]
    chains.append(((), *secret_files(certs_dir, default)))
    return chains


def ingress_route_configuration(index: MeshIndex, port: int) -> route_pb2.RouteConfiguration:
    """IngressRules for a port, highest precedence first, each to its destination service
    port; requests no rule matches get 404. A TLS port's routes are made the same way."""
    rules = [
        c for c in index.snapshot.of_kind("IngressRule") if port in rule_ports(_ingress_rule(c))
    ]
    rules.sort(key=lambda c: (-_ingress_rule(c).precedence, c.meta.namespace, c.meta.name))
    routes: list[rc.Route] = []
    for config in rules:
        rule = _ingress_rule(config)
        host = destination_host(rule.destination, config.meta.namespace)
        service = index.snapshot.services.get(host)
        if service is None:
            continue  # not known yet: no route until it is
        target = (
            service.port_named(rule.destination_port_name)
            if rule.WhichOneof("destination_servicePort") == "destination_port_name"
            else service.port_numbered(rule.destination_port)
        )
        if target is None:
            continue
        ingress_match = route_match(rule.match)
        # As 0.2 did, the destination's route rules apply behind the ingress: each of its
        # routes, narrowed to what the IngressRule matches.
        for route in service_routes(index, service, target, ()):
            combined = rc.Route()
            combined.CopyFrom(route)
            combined.name = f"{config.meta.namespace}/{config.meta.name}:{route.name}"
            combined.match.CopyFrom(_narrowed(ingress_match, route.match))
            if combined.HasField("route"):
                combined.route.upgrade_configs.append(
                    rc.RouteAction.UpgradeConfig(upgrade_type="websocket")
                )
            routes.append(combined)
    return route_pb2.RouteConfiguration(
        name=f"ingress_{port}",
        virtual_hosts=[rc.VirtualHost(name=f"ingress_{port}", domains=["*"], routes=routes)],
        validate_clusters={"value": False},
    )


def _narrowed(outer: rc.RouteMatch, inner: rc.RouteMatch) -> rc.RouteMatch:
    """A match for requests both match: the outer path, both sets of headers, and the inner
    path condition (unless it is the catch-all `/`) as a `:path` header."""
    match = rc.RouteMatch()
    match.CopyFrom(outer)
    match.headers.extend(inner.headers)
    kind = inner.WhichOneof("path_specifier")
    if kind == "prefix" and inner.prefix != "/":
        match.headers.append(
            rc.HeaderMatcher(
                name=":path", string_match=string_pb2.StringMatcher(prefix=inner.prefix)
            )
        )
    elif kind == "path":
        match.headers.append(
            rc.HeaderMatcher(name=":path", string_match=string_pb2.StringMatcher(exact=inner.path))
        )
    elif kind == "safe_regex":
        match.headers.append(
            rc.HeaderMatcher(
                name=":path", string_match=string_pb2.StringMatcher(safe_regex=inner.safe_regex)
            )
        )
    return match


def ingress_listeners(
    index: MeshIndex, certs_dir: str = DEFAULT_INGRESS_CERTS_DIR
) -> list[listener_pb2.Listener]:
    """A listener per ingress port, named as its route configuration (`ingress_<port>`);
    on TLS ports with a chain per certificate, chosen by SNI."""
    trace = tracing.connection_manager_tracing(index.snapshot.mesh)
    tls_ports = set(ingress_tls_ports(index))
    found = []
    for port in ingress_ports(index):
        name = f"ingress_{port}"
        if port in tls_ports:
            chains = ingress_tls_chains(index, port, certs_dir)
            found.append(
                listeners.tls_gateway_listener(
                    name, port, name, chains, INGRESS_ALPN, tracing=trace
                )
            )
        else:
            found.append(listeners.gateway_listener(name, port, name, tracing=trace))
    return found


def egress_route_configuration(index: MeshIndex) -> route_pb2.RouteConfiguration:
    """Every external host EgressRules allow, on every port they name."""
    virtual_hosts: dict[str, rc.VirtualHost] = {}
    for config in index.snapshot.of_kind("EgressRule"):
        rule = egress_rule(config)
        host = rule.destination.service
        for port in rule.ports:
            if Protocol.parse(port.protocol) is Protocol.TCP:
                continue
            name = f"{host}:{port.port}"
            domains = [name] + ([host] if port.port == DEFAULT_GATEWAY_PORT else [])
            virtual_hosts.setdefault(
                name,
                rc.VirtualHost(
                    name=name,
                    domains=domains,
                    routes=[
                        rc.Route(
                            name="egress",
                            match=rc.RouteMatch(prefix="/"),
                            route=rc.RouteAction(
                                cluster=cluster_name(Direction.OUTBOUND, port.port, host)
                            ),
                        )
                    ],
                ),
            )
    return route_pb2.RouteConfiguration(
        name=EGRESS_ROUTE_CONFIG,
        virtual_hosts=[virtual_hosts[n] for n in sorted(virtual_hosts)],
        validate_clusters={"value": False},
    )


def egress_listeners(proxy: Proxy, mesh: proxy_mesh_pb2.MeshConfig) -> list[listener_pb2.Listener]:
    """The egress gateway listens on GATEWAY_PORTS from its node metadata (80 by default, as
    0.2's istio-egress; the local platform uses 15002)."""
    ports = [
        int(p)
        for p in proxy.metadata.get("GATEWAY_PORTS", str(DEFAULT_GATEWAY_PORT)).split(",")
        if p.strip().isdigit()
    ]
    return [
        listeners.gateway_listener(
            f"egress_{port}",
            port,
            EGRESS_ROUTE_CONFIG,
            tracing=tracing.connection_manager_tracing(mesh),
        )
        for port in sorted(set(ports))
    ]
