"""Pilot: turns service registries and traffic rules into Envoy xDS v3 for every proxy.

registry/  each registry (ServiceEntry files, Kubernetes, Consul, Eureka) as a controller plus a
           pure conversion module, combined by registry.aggregate
mesh.py    the immutable snapshot xDS generation reads: services, instances, rules, mesh config
xds/       generation: pure functions of (snapshot, proxy) -> Envoy resources
ads.py     the ADS server (transport: nonces, ACK/NACK, versions, pushes)
"""
