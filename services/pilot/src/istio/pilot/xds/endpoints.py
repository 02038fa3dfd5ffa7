"""EDS: the endpoints of every EDS cluster, grouped by locality."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf.wrappers_pb2 import UInt32Value

from istio.model.service import parse_cluster_name
from istio.pilot.xds import common
from istio.pilot.xds.index import MeshIndex


def load_assignment(index: MeshIndex, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of cluster `name` (an outbound cluster: service port and label subset).

    Localities carry a weight, which gRPC's xDS client needs to use them at all.
    """
    _, port, hostname, labels = parse_cluster_name(name)
    by_locality: dict[str, list[endpoint_components_pb2.LbEndpoint]] = defaultdict(list)
    for instance in index.instances_of(hostname):
        if instance.service_port.port != port or not instance.labels.matches(labels):
            continue
        by_locality[instance.locality].append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=common.socket_address(instance.address, instance.port)
                ),
                health_status=health_check_pb2.HealthStatus.HEALTHY,
                load_balancing_weight=UInt32Value(value=max(instance.weight, 1)),
                metadata=common.istio_metadata(
                    {"labels": dict(instance.labels), "user": instance.service_account}
                ),
            )
        )
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for locality in sorted(by_locality):
        endpoints = sorted(
            by_locality[locality],
            key=lambda e: (
                e.endpoint.address.socket_address.address,
                e.endpoint.address.socket_address.port_value,
            ),
        )
        region, _, rest = locality.partition("/")
        zone, _, subzone = rest.partition("/")
        assignment.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=region, zone=zone, sub_zone=subzone),
                lb_endpoints=endpoints,
                load_balancing_weight=UInt32Value(
                    value=sum(e.load_balancing_weight.value for e in endpoints)
                ),
            )
        )
    return assignment


def load_assignments(
    index: MeshIndex, cluster_names: Iterable[str]
) -> list[endpoint_pb2.ClusterLoadAssignment]:
    return [load_assignment(index, name) for name in sorted(cluster_names)]
