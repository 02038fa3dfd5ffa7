"""The ServiceEntry registry: a directory of ServiceEntry files, watched (mesh expansion: how VMs
join; also what the local platform writes).

`controller` follows the files through the config lib's FileStore; `conversion` turns
ServiceEntries into the mesh model (pure).
"""

from istio.pilot.registry.serviceentry.controller import ServiceEntryRegistry

__all__ = ["ServiceEntryRegistry"]
