"""Proxyless gRPC (node metadata GENERATOR=grpc): what gRPC's built-in xDS client accepts.

gRPC asks for a listener by the name in its `xds:///name` target, so every name a client may
use for a service port gets an API listener; they share one route configuration per service
port, whose single virtual host matches any authority. Clusters are EDS, and every locality
carries a weight (gRPC ignores localities without one).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from istio.model import Proxy, ServiceInstance
from istio.pilot.xds import common
from istio.pilot.xds.index import MeshIndex
from istio.pilot.xds.listeners import connection_manager
from istio.pilot.xds.routes import domains, service_routes


def grpc_listeners_and_routes(
    index: MeshIndex, proxy: Proxy, instances: Sequence[ServiceInstance]
) -> tuple[list[listener_pb2.Listener], list[route_pb2.RouteConfiguration]]:
    listeners = []
    routes = []
    services = index.snapshot.services
    for hostname in sorted(services):
        service = services[hostname]
        for port in service.ports:
            if not port.protocol.is_http:
                continue
            route_name = f"{hostname}:{port.port}"
            routes.append(
                route_pb2.RouteConfiguration(
                    name=route_name,
                    virtual_hosts=[
                        rc.VirtualHost(
                            name=route_name,
                            domains=["*"],
                            routes=service_routes(index, service, port, instances, proxyless=True),
                        )
                    ],
                )
            )
            suffix = f":{port.port}"
            for name in domains(service, port.port, proxy.namespace):
                if not name.endswith(suffix) or name.startswith(service.address or "\0"):
                    continue
                manager = connection_manager(f"grpc_{route_name}", rds=route_name)
                listeners.append(
                    listener_pb2.Listener(
                        name=name,
                        api_listener=api_listener_pb2.ApiListener(
                            api_listener=common.packed(manager)
                        ),
                    )
                )
    return listeners, routes
