"""Kubernetes Services, Endpoints, Pods and Nodes to the mesh model: pure functions, no I/O.

After Istio 0.2's pilot/platform/kube/conversion.go:

- a Service is `<name>.<namespace>.svc.cluster.local` (the domain is configurable); its address
  is its clusterIP, empty for a headless service (clusterIP None), whose instances are still
  listed; an ExternalName service is mesh-external, resolved by DNS, its one endpoint the
  external name;
- a port's protocol comes from its name's prefix (`http`, `http-web`, `grpc`, `mongo`, ...;
  TCP otherwise), or is UDP when the port says so;
- the instances are the Endpoints' ready addresses (notReadyAddresses are not instances), each
  endpoint port matched to the service port of the same name; labels and service account
  (spec.serviceAccountName) come from the Pod the address names (targetRef) or, failing that,
  the Pod with that IP; locality (region/zone[/subzone]) from the labels of the Pod's node;
- the identities callers verify under mutual TLS (Service.service_accounts) are the SPIFFE
  identities of the instances' service accounts plus those the service's annotations name
  (`alpha.istio.io/kubernetes-serviceaccounts`, `alpha.istio.io/canonical-serviceaccounts`), as
  0.2's GetIstioServiceAccounts did;
- the annotation `auth.istio.io/<port number>: NONE | MUTUAL_TLS` overrides the mesh's
  authPolicy for that port (istio.pilot.registry.auth); `auth_annotation_problems` says what
  is wrong with such annotations, which are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from istio.model import (
    Labels,
    Port,
    Protocol,
    Resolution,
    Service,
    ServiceInstance,
    spiffe_identity,
)
from istio.model.service import DEFAULT_DOMAIN, service_hostname
from istio.pilot.registry.auth import port_auth_policies

JSON = Mapping[str, Any]
ObjectKey = tuple[str, str]  # (namespace, name)

KUBE_SERVICE_ACCOUNTS = "alpha.istio.io/kubernetes-serviceaccounts"
CANONICAL_SERVICE_ACCOUNTS = "alpha.istio.io/canonical-serviceaccounts"
REGION_LABELS = ("topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region")
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
SUBZONE_LABEL = "topology.istio.io/subzone"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the mesh needs of a Pod."""

    labels: Labels = field(default_factory=Labels)
    service_account: str = ""
    node_name: str = ""
    ips: tuple[str, ...] = ()


class PodIndex:
    """Pods by namespace/name and by IP, to find the Pod behind an endpoint address."""

    def __init__(self) -> None:
        self._by_key: dict[ObjectKey, PodInfo] = {}
        self._by_ip: dict[str, set[ObjectKey]] = {}

    def get(self, key: ObjectKey) -> PodInfo | None:
        return self._by_key.get(key)

    def put(self, key: ObjectKey, pod: PodInfo) -> None:
        self.remove(key)
        self._by_key[key] = pod
        for ip in pod.ips:
            self._by_ip.setdefault(ip, set()).add(key)

    def remove(self, key: ObjectKey) -> None:
        pod = self._by_key.pop(key, None)
        for ip in pod.ips if pod else ():
            keys = self._by_ip[ip]
            keys.discard(key)
            if not keys:
                del self._by_ip[ip]

    def for_address(self, address: JSON, namespace: str) -> PodInfo | None:
        """The Pod an endpoint address names by targetRef, else the Pod with its IP (the
        endpoint's namespace first, then the smallest key, so host-network pods that share an
        IP are resolved the same way every time)."""
        target = address.get("targetRef")
        if isinstance(target, Mapping) and target.get("kind") == "Pod":
            key = (str(target.get("namespace") or namespace), str(target.get("name") or ""))
            if key in self._by_key:
                return self._by_key[key]
        keys = self._by_ip.get(str(address.get("ip") or ""))
        if not keys:
            return None
        return self._by_key[min(keys, key=lambda k: (k[0] != namespace, k))]


def object_key(obj: JSON) -> ObjectKey:
    meta = _mapping(obj.get("metadata"))
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def pod_info(pod: JSON) -> PodInfo:
    meta, spec, status = (_mapping(pod.get(k)) for k in ("metadata", "spec", "status"))
    ips = [str(i.get("ip")) for i in status.get("podIPs") or () if isinstance(i, Mapping)]
    if status.get("podIP") and status["podIP"] not in ips:
        ips.insert(0, str(status["podIP"]))
    return PodInfo(
        labels=Labels(_strings(meta.get("labels"))),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or ""),
        node_name=str(spec.get("nodeName") or ""),
        ips=tuple(ip for ip in ips if ip),
    )


def node_locality(node: JSON) -> str:
    """region/zone[/subzone] from a Node's topology labels; empty when it has none."""
    labels = _strings(_mapping(node.get("metadata")).get("labels"))
    region = next((labels[k] for k in REGION_LABELS if labels.get(k)), "")
    zone = next((labels[k] for k in ZONE_LABELS if labels.get(k)), "")
    subzone = labels.get(SUBZONE_LABEL, "")
    if not (region or zone or subzone):
        return ""
    return "/".join((region, zone, subzone)) if subzone else f"{region}/{zone}"


def convert_service(
    service: JSON,
    endpoints: JSON | None,
    pods: PodIndex,
    localities: Mapping[str, str],
    domain: str = DEFAULT_DOMAIN,
) -> tuple[Service, tuple[ServiceInstance, ...]]:
    """A Service object and its Endpoints object (None when there is none yet) as the mesh's
    Service and its instances, sorted by service port, address and port."""
    meta, spec = _mapping(service.get("metadata")), _mapping(service.get("spec"))
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    annotations = _strings(meta.get("annotations"))
    ports, _ = _annotated_ports(service)
    external_name = (
        str(spec.get("externalName") or "") if spec.get("type") == "ExternalName" else ""
    )
    cluster_ip = str(spec.get("clusterIP") or "")
    base = Service(
        hostname=service_hostname(name, namespace, domain),
        ports=ports,
        namespace=namespace,
        address="" if cluster_ip == "None" or external_name else cluster_ip,
        mesh_external=bool(external_name),
        resolution=Resolution.DNS if external_name else Resolution.STATIC,
    )
    if external_name:
        endpoints_found = [_Endpoint(port, external_name, port.port) for port in ports]
    else:
        endpoints_found = list(_endpoints(base, endpoints, pods, localities))
    accounts = {
        spiffe_identity(namespace, e.service_account) for e in endpoints_found if e.service_account
    }
    accounts.update(
        spiffe_identity(namespace, account)
        for account in _listed(annotations.get(KUBE_SERVICE_ACCOUNTS, ""))
    )
    accounts.update(_listed(annotations.get(CANONICAL_SERVICE_ACCOUNTS, "")))
    converted = replace(base, service_accounts=tuple(sorted(accounts)))
    instances = (
        ServiceInstance(
            converted,
            e.service_port,
            e.address,
            e.port,
            e.labels,
            service_account=e.service_account,
            locality=e.locality,
        )
        for e in endpoints_found
    )
    return converted, tuple(
        sorted(instances, key=lambda i: (i.service_port.port, i.address, i.port))
    )


def auth_annotation_problems(service: JSON) -> tuple[str, ...]:
    """What is wrong with a Service's `auth.istio.io/<port>` annotations (each message names
    the Service and the annotation); convert_service ignores those annotations."""
    return _annotated_ports(service)[1]


def _annotated_ports(service: JSON) -> tuple[tuple[Port, ...], tuple[str, ...]]:
    meta, spec = _mapping(service.get("metadata")), _mapping(service.get("spec"))
    ports = tuple(_port(p) for p in spec.get("ports") or () if isinstance(p, Mapping))
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    return port_auth_policies(
        ports, _strings(meta.get("annotations")), f"Service {namespace}/{name}"
    )


def endpoint_ips(endpoints: JSON) -> set[str]:
    """Every address an Endpoints object lists, ready or not (to know which Pods matter)."""
    return {
        str(address.get("ip"))
        for subset in endpoints.get("subsets") or ()
        if isinstance(subset, Mapping)
        for kind in ("addresses", "notReadyAddresses")
        for address in subset.get(kind) or ()
        if isinstance(address, Mapping) and address.get("ip")
    }


@dataclass(frozen=True, slots=True)
class _Endpoint:
    service_port: Port
    address: str
    port: int
    labels: Labels = field(default_factory=Labels)
    service_account: str = ""
    locality: str = ""


def _endpoints(
    service: Service, endpoints: JSON | None, pods: PodIndex, localities: Mapping[str, str]
) -> Iterable[_Endpoint]:
    if endpoints is None:
        return
    for subset in endpoints.get("subsets") or ():
        if not isinstance(subset, Mapping):
            continue
        matched = [
            (service_port, int(port.get("port") or 0))
            for port in subset.get("ports") or ()
            if isinstance(port, Mapping)
            and (service_port := service.port_named(str(port.get("name") or ""))) is not None
        ]
        for address in subset.get("addresses") or ():
            if not isinstance(address, Mapping) or not address.get("ip"):
                continue
            pod = pods.for_address(address, service.namespace) or PodInfo()
            node = pod.node_name or str(address.get("nodeName") or "")
            for service_port, number in matched:
                yield _Endpoint(
                    service_port,
                    str(address["ip"]),
                    number,
                    pod.labels,
                    pod.service_account,
                    localities.get(node, ""),
                )


def _port(port: Mapping[str, Any]) -> Port:
    name = str(port.get("name") or "")
    udp = str(port.get("protocol") or "TCP").upper() == "UDP"
    return Port(
        name, int(port.get("port") or 0), Protocol.UDP if udp else Protocol.from_port_name(name)
    )


def _listed(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strings(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value).items()}
