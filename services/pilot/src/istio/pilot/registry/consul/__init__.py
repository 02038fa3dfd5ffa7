"""The Consul registry: Consul's catalog HTTP API, followed with blocking queries.

`controller` talks to Consul; `conversion` turns catalog entries into the mesh model (pure).
"""

from istio.pilot.registry.consul.controller import ConsulError, ConsulRegistry
from istio.pilot.registry.status import Backoff

__all__ = ["Backoff", "ConsulError", "ConsulRegistry"]
