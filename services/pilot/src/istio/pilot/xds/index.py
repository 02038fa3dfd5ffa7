"""What generation derives from a MeshSnapshot once, for every proxy to share.

A push generates config for every connected proxy from one snapshot; the lookups here (rules
by destination, label subsets, policies, instances by proxy IP) are built once per snapshot
and cached for as long as the snapshot lives.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf.message import Message

from istio.api.proxy.v1.config import dest_policy_pb2, egress_rule_pb2, route_rule_pb2
from istio.config import Config
from istio.model import Labels, Proxy, Resolution, Service, ServiceInstance
from istio.model.service import DEFAULT_DOMAIN, parse_cluster_name
from istio.pilot.mesh import MIXER_CLIENT_KINDS, MeshSnapshot


def destination_host(service: route_rule_pb2.IstioService, namespace: str) -> str:
    """The hostname an IstioService names: `service` when given (an FQDN), else
    name.namespace.domain with the rule's namespace and the cluster domain as defaults."""
    if service.service:
        return service.service
    return f"{service.name}.{service.namespace or namespace}.{service.domain or DEFAULT_DOMAIN}"


def route_rule(config: Config) -> route_rule_pb2.RouteRule:
    return cast(route_rule_pb2.RouteRule, config.spec)


def destination_policy(config: Config) -> dest_policy_pb2.DestinationPolicy:
    return cast(dest_policy_pb2.DestinationPolicy, config.spec)


def egress_rule(config: Config) -> egress_rule_pb2.EgressRule:
    return cast(egress_rule_pb2.EgressRule, config.spec)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class MeshIndex:
    snapshot: MeshSnapshot
    # Route rules by destination hostname, highest precedence first (then namespace, name).
    rules_by_host: dict[str, list[Config]]
    # Label subsets that rules and policies name for each hostname (each gets a cluster).
    subsets_by_host: dict[str, set[Labels]]
    policies_by_host: dict[str, list[Config]]
    instances_by_ip: dict[str, list[ServiceInstance]]
    # Every (service, port) by port number, for the per-port route configurations.
    services_by_port: dict[int, list[Service]]
    # True when some rule or policy selects by source: then outputs depend on the proxy's
    # own instances, not only on its namespace and kind.
    rules_use_source: bool = False
    policies_use_source: bool = False
    # Outputs shared by proxies that would get the same ones (see `cached`), and the content
    # digests of those shared messages, so a push to many proxies builds and hashes each once.
    shared: dict[Hashable, list[Message]] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=dict)
    # When this index started from the previous snapshot's (an endpoint-only change): that
    # snapshot, and the cluster names whose assignments were rebuilt (the only ones that may
    # differ). Filled by `_carry_over`; EDS pushes send just those.
    carried_from: list[tuple[MeshSnapshot, frozenset[str]]] = field(default_factory=list)
    # Shared parts (istio.pilot.xds.generate._part), one list of one Part per key.
    parts: dict[Hashable, list[Any]] = field(default_factory=dict)

    def instances_of(self, hostname: str) -> Sequence[ServiceInstance]:
        return self.snapshot.instances.get(hostname, ())

    def proxy_instances(self, proxy: Proxy) -> list[ServiceInstance]:
        """The instances the proxy fronts: those at its IP (0.2 told proxies apart by IP)."""
        return self.instances_by_ip.get(proxy.ip, [])

    def cached(self, key: Hashable, build: Callable[[], list[Message]]) -> list[Message]:
        """`build()`'s messages, built once per snapshot for everyone asking with `key`.

        Callers put into the key everything the output depends on. Shared messages are never
        modified after they are built.
        """
        found = self.shared.get(key)
        if found is None:
            found = build()
            self.shared[key] = found
            for message in found:
                self.digests[id(message)] = _digest(message)
        return found

    def cached_part(self, key: Hashable, build: Callable[[], list[Any]]) -> Any:
        """The part `build()` makes, once per snapshot for everyone asking with `key`."""
        found = self.parts.get(key)
        if found is None:
            found = self.parts[key] = build()
        return found[0]

    def digest(self, message: Message) -> bytes:
        """The content digest of a message; shared messages' digests are computed once (they
        stay alive with the snapshot, so their ids are never reused meanwhile)."""
        found = self.digests.get(id(message))
        return found if found is not None else _digest(message)


def _digest(message: Message) -> bytes:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def instances_key(instances: Sequence[ServiceInstance]) -> frozenset[tuple[str, Labels]]:
    """What source matching sees of a proxy: its services and labels."""
    return frozenset((i.service.hostname, i.labels) for i in instances)


_CACHE: weakref.WeakKeyDictionary[MeshSnapshot, MeshIndex] = weakref.WeakKeyDictionary()
# The index built last (weakly: it lives only as long as its snapshot).
_LAST: list[weakref.ref[MeshIndex]] = []


def index_of(snapshot: MeshSnapshot) -> MeshIndex:
    index = _CACHE.get(snapshot)
    if index is None:
        index = _build(snapshot)
        previous = _LAST[0]() if _LAST else None
        if previous is not None:
            _carry_over(previous, index)
        _CACHE[snapshot] = index
        _LAST[:] = [weakref.ref(index)]
    return index


_INBOUND_KEYS = (("inbound-cds",), ("inbound-lds",))


def _carry_over(previous: MeshIndex, index: MeshIndex) -> None:
    """Start `index` from what `previous` built that still holds.

    Assignments ("eds", cluster name) depend only on their host's instances: those of hosts
    whose instances did not change are carried whatever else changed. When the two snapshots
    differ only in instances, every other shared output is carried too, and the index
    records which assignments were rebuilt (what an endpoint-only push sends). Shared outputs
    read other services' instances only in assignments and in DNS clusters (endpoints
    inline): when a changed host is not STATIC, only assignments are carried. Outputs that
    depend on the proxy's own instances have them in their keys.
    """
    old, new = previous.snapshot, index.snapshot
    if old is new or not previous.shared:
        return
    same_services = old.services is new.services or dict(old.services) == dict(new.services)
    same_mesh = old.mesh is new.mesh or old.mesh == new.mesh
    everything = (
        same_services
        and (old.configs is new.configs or dict(old.configs) == dict(new.configs))
        and same_mesh
    )
    changed = {
        host
        for host in old.instances.keys() | new.instances.keys()
        if old.instances.get(host) is not new.instances.get(host)
        and old.instances.get(host) != new.instances.get(host)
    }
    for host in changed:
        service = new.services.get(host)
        if service is None or service.resolution is not Resolution.STATIC:
            everything = False
    # A proxy's own inbound outputs read only it, its instances, the mesh config and the
    # quota specs bound to its services (istio.pilot.mesh.MIXER_CLIENT_KINDS).
    same_quotas = all(old.of_kind(kind) == new.of_kind(kind) for kind in MIXER_CLIENT_KINDS)
    inbound = same_services and same_mesh and same_quotas and not changed
    rebuilt: set[str] = set()
    for key, messages in previous.shared.items():
        if isinstance(key, tuple) and key[:1] == ("eds",):
            try:
                hostname = parse_cluster_name(str(key[1]))[2]
            except (ValueError, IndexError):
                rebuilt.add(str(key[1]))
                continue
            if hostname in changed:
                rebuilt.add(str(key[1]))
                continue
        elif isinstance(key, tuple) and key[:1] in _INBOUND_KEYS:
            # Only for proxies that still front instances: a departed proxy's outputs are
            # not carried forever (one without instances has nothing to rebuild anyway).
            node_id = str(key[1][0])
            ip = node_id.split("~")[1] if node_id.count("~") >= 3 else ""
            if not (everything or inbound) or ip not in index.instances_by_ip:
                continue
        elif not everything:
            continue
        elif isinstance(key, tuple) and key[:1] == ("part-messages",):
            inner = key[1]
            if isinstance(inner, tuple) and inner[:1] == ("eds-of",):
                continue  # assignments: rebuilt from the per-cluster ones
        index.shared[key] = messages
        for message in messages:
            digest = previous.digests.get(id(message))
            if digest is not None:
                index.digests[id(message)] = digest
    if everything:
        index.carried_from.append((old, frozenset(rebuilt)))


def _build(snapshot: MeshSnapshot) -> MeshIndex:
    rules: dict[str, list[Config]] = defaultdict(list)
    subsets: dict[str, set[Labels]] = defaultdict(set)
    for config in snapshot.of_kind("RouteRule"):
        rule = route_rule(config)
        host = destination_host(rule.destination, config.meta.namespace)
        rules[host].append(config)
        for weight in rule.route:
            target = (
                destination_host(weight.destination, config.meta.namespace)
                if weight.HasField("destination")
                else host
            )
            if weight.labels:
                subsets[target].add(Labels(weight.labels))
        if rule.HasField("mirror") and rule.mirror.labels:
            subsets[destination_host(rule.mirror, config.meta.namespace)].add(
                Labels(rule.mirror.labels)
            )
    for host_rules in rules.values():
        host_rules.sort(key=lambda c: (-route_rule(c).precedence, c.meta.namespace, c.meta.name))

    policies: dict[str, list[Config]] = defaultdict(list)
    for config in snapshot.of_kind("DestinationPolicy"):
        policy = destination_policy(config)
        host = destination_host(policy.destination, config.meta.namespace)
        policies[host].append(config)
        if policy.destination.labels:
            subsets[host].add(Labels(policy.destination.labels))

    by_ip: dict[str, list[ServiceInstance]] = defaultdict(list)
    for instances in snapshot.instances.values():
        for instance in instances:
            by_ip[instance.address].append(instance)
    by_port: dict[int, list[Service]] = defaultdict(list)
    for hostname in sorted(snapshot.services):
        service = snapshot.services[hostname]
        for port in service.ports:
            by_port[port.port].append(service)
    return MeshIndex(
        snapshot,
        dict(rules),
        dict(subsets),
        dict(policies),
        dict(by_ip),
        dict(by_port),
        rules_use_source=any(
            route_rule(c).match.HasField("source") for c in snapshot.of_kind("RouteRule")
        ),
        policies_use_source=any(
            destination_policy(c).HasField("source") for c in snapshot.of_kind("DestinationPolicy")
        ),
    )


def source_matches(
    source: route_rule_pb2.IstioService, namespace: str, instances: Sequence[ServiceInstance]
) -> bool:
    """Does a rule's `match.source` describe the proxy (one of the instances it fronts)?"""
    if not source.name and not source.service and not source.labels:
        return True
    wanted = destination_host(source, namespace) if (source.name or source.service) else None
    return any(
        (wanted is None or instance.service.hostname == wanted)
        and instance.labels.matches(source.labels)
        for instance in instances
    )


def policy_for(
    index: MeshIndex, hostname: str, labels: Labels, instances: Sequence[ServiceInstance]
) -> dest_policy_pb2.DestinationPolicy | None:
    """The DestinationPolicy for a subset: the one naming the most of its labels, among those
    whose labels the subset has and whose source (if any) is this proxy."""
    best: tuple[int, dest_policy_pb2.DestinationPolicy] | None = None
    for config in index.policies_by_host.get(hostname, []):
        policy = destination_policy(config)
        selector = policy.destination.labels
        if not labels.matches(selector):
            continue
        if policy.HasField("source") and not source_matches(
            policy.source, config.meta.namespace, instances
        ):
            continue
        if best is None or len(selector) > best[0]:
            best = (len(selector), policy)
    return best[1] if best else None
