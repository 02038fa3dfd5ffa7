"""The proxy's runtime configuration: immutable records compiled from xDS, and routing over them.

Theory of operation. `istio.proxy.compile` turns Envoy protos into these records once per xDS
update; the data path only ever reads them. A `Snapshot` holds one consistent set of
listeners, route tables, clusters and endpoints; the agent swaps the whole snapshot at once, so
a request sees either the old config or the new one, never a mix. Everything here is pure
(no I/O, no asyncio): routing is a function of (route table, request facts, a draw).
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from istio.proxy.tracing import TracingConfig

DEFAULT_ROUTE_TIMEOUT = 15.0
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "regex"
    PRESENT = "present"


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Envoy's HeaderMatcher: `name` is lowercase; pseudo-headers keep their colon."""

    name: str
    kind: MatchKind
    value: str = ""
    pattern: re.Pattern[str] | None = None
    ignore_case: bool = False
    invert: bool = False

    def matches(self, headers: Mapping[str, str]) -> bool:
        actual = headers.get(self.name)
        if self.kind is MatchKind.PRESENT:
            return (actual is not None) != self.invert
        if actual is None:
            return self.invert
        value = self.value
        if self.ignore_case:
            actual, value = actual.lower(), value.lower()
        if self.kind is MatchKind.EXACT:
            result = actual == value
        elif self.kind is MatchKind.PREFIX:
            result = actual.startswith(value)
        elif self.kind is MatchKind.SUFFIX:
            result = actual.endswith(value)
        elif self.kind is MatchKind.CONTAINS:
            result = value in actual
        else:
            assert self.pattern is not None
            result = self.pattern.fullmatch(actual) is not None
        return result != self.invert


class PathKind(enum.Enum):
    PREFIX = "prefix"
    EXACT = "path"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path_kind: PathKind
    path: str = ""
    pattern: re.Pattern[str] | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()

    def matches(self, path: str, headers: Mapping[str, str]) -> bool:
        """`path` is the request's :path; exact and regex matches ignore the query string,
        as Envoy's do."""
        kind = self.path_kind
        if kind is PathKind.PREFIX:
            if self.case_sensitive:
                if not path.startswith(self.path):
                    return False
            elif not path.lower().startswith(self.path.lower()):
                return False
        else:
            bare = path.partition("?")[0]
            if kind is PathKind.EXACT:
                if bare != self.path if self.case_sensitive else bare.lower() != self.path.lower():
                    return False
            else:
                assert self.pattern is not None
                if self.pattern.fullmatch(bare) is None:
                    return False
        return all(matcher.matches(headers) for matcher in self.headers)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    on_5xx: bool = False
    on_gateway_error: bool = False
    on_connect_failure: bool = False
    on_reset: bool = False
    on_refused_stream: bool = False
    retriable_status_codes: frozenset[int] = frozenset()
    # gRPC statuses of trailers-only responses that are retried (retry_on "unavailable", ...)
    grpc_statuses: frozenset[int] = frozenset()
    num_retries: int = 1
    per_try_timeout: float = 0.0  # 0: none, the route timeout alone

    def retries_status(self, status: int) -> bool:
        if self.on_5xx and status >= 500:
            return True
        if self.on_gateway_error and status in (502, 503, 504):
            return True
        return status in self.retriable_status_codes


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault filter's per-route config; percentages in parts per million."""

    delay: float = 0.0
    delay_ppm: int = 0
    abort_status: int = 0
    abort_ppm: int = 0


@dataclass(frozen=True, slots=True)
class HeaderToAdd:
    name: str
    value: str
    append: bool


@dataclass(frozen=True, slots=True)
class Redirect:
    host: str = ""
    path: str = ""
    prefix_rewrite: str = ""
    scheme: str = ""
    port: int = 0
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class RouteAction:
    clusters: tuple[tuple[str, int], ...]  # (cluster, weight); one entry: no split
    total_weight: int
    timeout: float = DEFAULT_ROUTE_TIMEOUT  # 0: none
    retry: RetryPolicy | None = None
    prefix_rewrite: str | None = None
    host_rewrite: str = ""
    mirrors: tuple[str, ...] = ()
    websocket: bool = False
    _draws: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)

    def next_draw(self) -> int:
        """The next draw in [0, total_weight): a Weyl sequence on the golden ratio, so any
        run of requests splits by the weights to within a request or two. Random draws, as
        Envoy's, wander: a 50/50 split lands outside 40..60 in one run of 100 in twenty."""
        return int(((next(self._draws) * _GOLDEN_RATIO_CONJUGATE) % 1.0) * self.total_weight)

    def pick_cluster(self, draw: int) -> str:
        """The cluster for a draw in [0, total_weight) (weighted clusters as Envoy's)."""
        if len(self.clusters) == 1:
            return self.clusters[0][0]
        for name, weight in self.clusters:
            if draw < weight:
                return name
            draw -= weight
        return self.clusters[-1][0]


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    action: RouteAction | Redirect | DirectResponse
    fault: Fault | None = None
    headers_to_add: tuple[HeaderToAdd, ...] = ()
    headers_to_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    headers_to_add: tuple[HeaderToAdd, ...] = ()

    def route_for(self, path: str, headers: Mapping[str, str]) -> Route | None:
        for route in self.routes:
            if route.match.matches(path, headers):
                return route
        return None


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A RouteConfiguration: virtual hosts found by authority as Envoy finds them: an exact
    domain first, then the longest `*.suffix` wildcard, then the longest `prefix*`, then `*`."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    exact: Mapping[str, VirtualHost]
    suffixes: tuple[tuple[str, VirtualHost], ...]  # longest first
    prefixes: tuple[tuple[str, VirtualHost], ...]  # longest first
    default: VirtualHost | None
    headers_to_add: tuple[HeaderToAdd, ...] = ()
    # whether any route matches on headers: without, a request's headers are not looked at
    header_matching: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        hosts = [*self.virtual_hosts, *self.exact.values(), self.default]
        hosts += [host for _, host in (*self.suffixes, *self.prefixes)]
        matching = any(
            route.match.headers for host in hosts if host is not None for route in host.routes
        )
        object.__setattr__(self, "header_matching", matching)

    @classmethod
    def build(
        cls,
        name: str,
        virtual_hosts: tuple[VirtualHost, ...],
        headers_to_add: tuple[HeaderToAdd, ...] = (),
    ) -> RouteTable:
        exact: dict[str, VirtualHost] = {}
        suffixes: list[tuple[str, VirtualHost]] = []
        prefixes: list[tuple[str, VirtualHost]] = []
        default = None
        for host in virtual_hosts:
            for domain in host.domains:
                domain = domain.lower()
                if domain == "*":
                    default = default or host
                elif domain.startswith("*"):
                    suffixes.append((domain[1:], host))
                elif domain.endswith("*"):
                    prefixes.append((domain[:-1], host))
                else:
                    exact.setdefault(domain, host)
        suffixes.sort(key=lambda item: -len(item[0]))
        prefixes.sort(key=lambda item: -len(item[0]))
        return cls(
            name,
            virtual_hosts,
            MappingProxyType(exact),
            tuple(suffixes),
            tuple(prefixes),
            default,
            headers_to_add,
        )

    def virtual_host(self, authority: str) -> VirtualHost | None:
        authority = authority.lower()
        host = self.exact.get(authority)
        if host is not None:
            return host
        for suffix, candidate in self.suffixes:
            if authority.endswith(suffix) and len(authority) > len(suffix):
                return candidate
        for prefix, candidate in self.prefixes:
            if authority.startswith(prefix) and len(authority) > len(prefix):
                return candidate
        return self.default

    def route(self, authority: str, path: str, headers: Mapping[str, str]) -> Route | None:
        selected = self.select(authority, path, headers)
        return None if selected is None else selected[1]

    def select(
        self, authority: str, path: str, headers: Mapping[str, str]
    ) -> tuple[VirtualHost, Route] | None:
        host = self.virtual_host(authority)
        if host is None:
            return None
        route = host.route_for(path, headers)
        return None if route is None else (host, route)


@dataclass(frozen=True, slots=True)
class HttpManager:
    """An HttpConnectionManager: routes from RDS (`rds`) or inline (`routes`)."""

    stat_prefix: str
    rds: str | None = None
    routes: RouteTable | None = None
    generate_request_id: bool = True
    use_remote_address: bool = False
    fault_filter: bool = True
    tracing: TracingConfig | None = None  # spans for this manager's requests (Zipkin)


DEFAULT_TCP_IDLE_TIMEOUT = 3600.0  # Envoy's tcp_proxy default


class Sniffer(enum.Enum):
    """A protocol the TCP proxy reads along the way for stats, never changing the bytes."""

    MONGO = "mongo"  # envoy.filters.network.mongo_proxy before the tcp_proxy
    REDIS = "redis"  # the filter chain's metadata istio.protocol: REDIS (docs/pilot.md)


@dataclass(frozen=True, slots=True)
class TcpProxy:
    stat_prefix: str
    cluster: str
    idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT  # 0: none
    sniffer: Sniffer | None = None
    sniffer_prefix: str = ""  # the sniffer's stat prefix (mongo.<prefix>.*, redis.<prefix>.*)
    # mongo_proxy's `commands`: per-command stats only for these (empty: every command).
    commands: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """Envoy's SubjectAltNameMatcher: a SAN of `san_type` (getpeercert()'s names: "URI",
    "DNS", "email", "IP Address"; "" for any) whose value matches."""

    san_type: str
    kind: MatchKind
    value: str = ""
    pattern: re.Pattern[str] | None = None
    ignore_case: bool = False

    def matches(self, sans: tuple[tuple[str, str], ...]) -> bool:
        for san_type, actual in sans:
            if self.san_type and san_type != self.san_type:
                continue
            value = self.value
            if self.ignore_case:
                actual, value = actual.lower(), value.lower()
            kind = self.kind
            if kind is MatchKind.EXACT:
                found = actual == value
            elif kind is MatchKind.PREFIX:
                found = actual.startswith(value)
            elif kind is MatchKind.SUFFIX:
                found = actual.endswith(value)
            elif kind is MatchKind.CONTAINS:
                found = value in actual
            else:
                assert self.pattern is not None
                found = self.pattern.fullmatch(actual) is not None
            if found:
                return True
        return False


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files, as an Envoy DataSource `filename` names them."""

    cert_chain: str
    private_key: str
    trusted_ca: str


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """Mutual TLS a cluster originates: this proxy's certificate (`files` None: the mesh's,
    from --cert-dir), the server checked against the root, its SPIFFE id against the trust
    domain and, when given, `subject_alt_names` (any one matching)."""

    files: TlsFiles | None = None
    sni: str = ""
    alpn: tuple[str, ...] = ()  # empty: by use (HTTP/1.1 or TCP), see istio.proxy.tls
    subject_alt_names: tuple[SanMatcher, ...] = ()
    min_version: str = ""  # "TLSv1_2", "TLSv1_3"; empty: TLS 1.2
    max_version: str = ""  # empty: TLS 1.3


@dataclass(frozen=True, slots=True)
class SniCertificate:
    """A certificate for clients whose TLS SNI is one of `server_names`: exact names
    (lowercase), or `*.suffix` wildcards for any name under the suffix (Envoy's
    FilterChainMatch.server_names)."""

    server_names: tuple[str, ...]
    files: TlsFiles


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    """TLS a listener terminates. With `require_client_certificate` the peer must
    present a certificate from the root whose SPIFFE id is in the trust domain (and matches
    `subject_alt_names` when given); `permissive` takes plaintext on the same port too, told
    apart by the first bytes (a TLS ClientHello or not).

    With `sni` (an ingress TLS port) the client's SNI picks the certificate among them;
    clients sending another name or none get `files` when `sni_default` (the listener's
    chain without server names), else the handshake is refused."""

    files: TlsFiles | None = None
    require_client_certificate: bool = True
    permissive: bool = False
    alpn: tuple[str, ...] = ()  # empty: by the chain (HTTP/1.1 or TCP), see istio.proxy.tls
    subject_alt_names: tuple[SanMatcher, ...] = ()
    min_version: str = ""
    max_version: str = ""
    sni: tuple[SniCertificate, ...] = ()
    sni_default: bool = True


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    bind: bool
    use_original_dst: bool
    chain: HttpManager | TcpProxy | None  # None: close every connection (no chain)
    inbound: bool = False
    tls: DownstreamTls | None = None  # set: TLS terminated here (mTLS, or an ingress TLS port)
    mixer: MixerFilter | None = None  # set: requests are checked and reported to Mixer
    # Pilot's `istio.mixer_forward_attributes` (on a sidecar's capture listener): Mixer is
    # there, so outbound requests carry this sidecar's source attributes (x-istio-attributes).
    forward_attributes: bool = False


@dataclass(frozen=True, slots=True)
class MixerFilter:
    """Pilot's inbound listener metadata `istio.mixer`: where Mixer is, whether to Check (0.2's
    disable_policy_checks turns Check off, Report stays), the destination's attributes, and
    the rules of the QuotaSpecs bound to it (what each request is charged in Check)."""

    address: str
    check: bool
    attributes: Mapping[str, Any]
    quotas: tuple[QuotaRule, ...] = ()


@dataclass(frozen=True, slots=True)
class AttributeMatch:
    """One string attribute's condition in a QuotaRule: exact, prefix, or regex (whole value)."""

    attribute: str
    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None

    def matches(self, value: object) -> bool:
        if not isinstance(value, str):
            return False  # absent, or not a string: no clause holds
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        return self.regex is not None and self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class QuotaRule:
    """A QuotaSpec rule: a request is charged `quotas` (name, amount) when one of `match`'s
    alternatives holds (each all of its clauses), or always when there is none."""

    match: tuple[tuple[AttributeMatch, ...], ...]
    quotas: tuple[tuple[str, int], ...]

    def applies(self, attributes: Mapping[str, Any]) -> bool:
        return not self.match or any(
            all(clause.matches(attributes.get(clause.attribute)) for clause in alternative)
            for alternative in self.match
        )


class ClusterType(enum.Enum):
    STATIC = "STATIC"
    STRICT_DNS = "STRICT_DNS"
    LOGICAL_DNS = "LOGICAL_DNS"
    EDS = "EDS"
    ORIGINAL_DST = "ORIGINAL_DST"


class LbPolicy(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    CLUSTER_PROVIDED = "CLUSTER_PROVIDED"


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Envoy's default thresholds."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    type: ClusterType
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    connect_timeout: float = 5.0
    eds_name: str = ""
    endpoints: tuple[Endpoint, ...] = ()  # inline load_assignment (STATIC and DNS types)
    breakers: CircuitBreakers = CircuitBreakers()
    outlier: OutlierDetection | None = None
    max_requests_per_connection: int = 0  # 0: unlimited
    http2: bool = False
    tls_sni: str | None = None  # set: originate TLS with this SNI ("" for the request host)
    mtls: UpstreamTls | None = None  # set: originate mutual TLS (sidecar to sidecar)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent configuration; `versions` by short type name (cds, eds, lds, rds)."""

    listeners: Mapping[str, Listener] = field(default_factory=lambda: _frozen({}))
    routes: Mapping[str, RouteTable] = field(default_factory=lambda: _frozen({}))
    clusters: Mapping[str, Cluster] = field(default_factory=lambda: _frozen({}))
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=lambda: _frozen({}))
    versions: Mapping[str, str] = field(default_factory=lambda: _frozen({}))

    def endpoints_of(self, cluster: Cluster) -> tuple[Endpoint, ...]:
        if cluster.type is ClusterType.EDS:
            return self.endpoints.get(cluster.eds_name or cluster.name, ())
        return cluster.endpoints

    def listener_for_port(self, port: int, host: str | None = None) -> Listener | None:
        """The listener that owns `host:port` (exact address first, then 0.0.0.0)."""
        wildcard = None
        for listener in self.listeners.values():
            if listener.port != port or listener.use_original_dst:
                continue
            if host is not None and listener.host == host:
                return listener
            if listener.host in ("0.0.0.0", "::"):
                wildcard = wildcard or listener
        return wildcard

    def missing(self) -> list[str]:
        """What the config references but lacks: route tables of listeners and endpoints of
        EDS clusters. A snapshot is complete (warm) when this is empty."""
        wanted = []
        for listener in self.listeners.values():
            chain = listener.chain
            if isinstance(chain, HttpManager) and chain.rds and chain.rds not in self.routes:
                wanted.append(f"route {chain.rds}")
        for cluster in self.clusters.values():
            if cluster.type is ClusterType.EDS and (cluster.eds_name or cluster.name) not in (
                self.endpoints
            ):
                wanted.append(f"endpoints {cluster.eds_name or cluster.name}")
        return wanted
