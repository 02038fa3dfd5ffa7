"""The local platform (DESIGN.md §5): the mesh and Bookinfo as processes on this machine.

    python -m istio.platform.local up [--mesh-dir .mesh] [--network 127.0.0] [--host NAME=IP]...
    python -m istio.platform.local down [--mesh-dir .mesh]

`make up` and `make down` run these. docs/local.md describes addresses, ports and state.
"""

from istio.platform.local.layout import BOOKINFO, Layout, Workload
from istio.platform.local.mesh import LocalMesh, StartError, down, up

__all__ = ["BOOKINFO", "Layout", "LocalMesh", "StartError", "Workload", "down", "up"]
