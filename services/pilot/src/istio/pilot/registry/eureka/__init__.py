"""The Eureka registry: Eureka's REST API (`GET /eureka/v2/apps`), polled.

`controller` talks to Eureka; `conversion` turns applications into the mesh model (pure).
"""

from istio.pilot.registry.eureka.controller import EurekaError, EurekaRegistry, apps_url
from istio.pilot.registry.status import Backoff

__all__ = ["Backoff", "EurekaError", "EurekaRegistry", "apps_url"]
