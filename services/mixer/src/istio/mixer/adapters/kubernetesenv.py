"""kubernetes: an attribute producer filling in who the source and destination workloads are,
from the mesh's service registry (what 0.2's kubernetes adapter did from pods).

It reads the ServiceEntry files Pilot's file registry reads (`registry: file:DIR`) and indexes
every endpoint address: its labels, namespace, service account, and service (the host of its
entry, preferring the one whose first label is the workload's `app` label, as 0.2 named a
pod's service after that label). From `source.ip` and `destination.ip` it produces
source/destination .labels, .namespace, .service and .serviceAccount, when the request lacks
them. The index follows the files (a file that stops parsing keeps its last good entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from istio.api.networking.v1alpha3 import service_entry_pb2
from istio.config import Config, ConfigKey
from istio.configstore import EventType
from istio.configstore.file import FileStore
from istio.expr import Bag, ValueType
from istio.expr.types import Value
from istio.mixersdk import AdapterInfo, Env
from istio.mixersdk.builtin import KUBERNETES

KIND = "ServiceEntry"
_FIELDS = ("labels", "namespace", "service", "serviceAccount")
PRODUCES: Mapping[str, ValueType] = MappingProxyType(
    {
        f"{side}.{name}": ValueType.STRING_MAP if name == "labels" else ValueType.STRING
        for side in ("source", "destination")
        for name in _FIELDS
    }
)


@dataclass(frozen=True, slots=True)
class Workload:
    labels: Mapping[str, str]
    namespace: str
    service: str
    service_account: str

    def attribute(self, name: str) -> Value:
        if name == "labels":
            return self.labels
        if name == "namespace":
            return self.namespace
        if name == "service":
            return self.service
        return self.service_account


def _address_key(value: object) -> str | None:
    try:
        address = ipaddress.ip_address(value if isinstance(value, bytes) else str(value))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def index_workloads(configs: Iterable[Config], app_label: str = "app") -> dict[str, Workload]:
    """Endpoint address -> workload, from ServiceEntries (ordered by namespace and name: the
    first entry naming an address wins, unless a later host matches its app label)."""
    found: dict[str, Workload] = {}
    for config in sorted(configs, key=lambda c: (c.meta.namespace, c.meta.name)):
        entry = config.spec
        if not isinstance(entry, service_entry_pb2.ServiceEntry) or not entry.hosts:
            continue
        for endpoint in entry.endpoints:
            key = _address_key(endpoint.address)
            if key is None:
                continue
            app = endpoint.labels.get(app_label, "")
            host = next((h for h in entry.hosts if h.split(".", 1)[0] == app), entry.hosts[0])
            workload = Workload(
                MappingProxyType(dict(endpoint.labels)),
                config.meta.namespace,
                host,
                endpoint.service_account,
            )
            previous = found.get(key)
            if previous is None or (
                previous.service.split(".", 1)[0] != app and host.split(".", 1)[0] == app
            ):
                found[key] = workload
    return found


class KubernetesEnv:
    def __init__(self, params: dict[str, Any], env: Env) -> None:
        self.env = env
        self.inputs = {
            "source": params["source_ip_input_name"],
            "destination": params["destination_ip_input_name"],
        }
        self.app_label: str = params["pod_label_for_app"]
        self.workloads: dict[str, Workload] = {}
        registry: str = params["registry"]
        self.directory: Path | None = None
        if registry:
            kind, _, path = registry.partition(":")
            if kind != "file" or not path:
                raise ValueError(f"registry {registry!r}: only file:DIR is supported")
            self.directory = Path(path.removeprefix("//"))
        self.synced = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None

    def produce(self, name: str, bag: Bag) -> Value | None:
        side, _, field = name.partition(".")
        source = self.inputs.get(side)
        if source is None or field not in _FIELDS:
            return None
        address = bag.get(source)
        key = _address_key(address) if address is not None else None
        workload = self.workloads.get(key) if key is not None else None
        return workload.attribute(field) if workload is not None else None

    async def start(self) -> None:
        if self.directory is None:
            self.synced.set()
            return
        self._follower = asyncio.create_task(self._follow(self.directory), name=self.env.handler)

    async def _follow(self, directory: Path) -> None:
        configs: dict[ConfigKey, Config] = {}
        while True:
            store = FileStore(directory)
            try:
                async for event in store.watch([KIND]):
                    if event.type is EventType.SYNCED:
                        self.synced.set()
                    elif event.config is not None:
                        if event.type is EventType.DELETED:
                            configs.pop(event.config.key, None)
                        else:
                            configs[event.config.key] = event.config
                    if self.synced.is_set():
                        self.workloads = index_workloads(configs.values(), self.app_label)
            except Exception as error:  # keep the last index; try again
                self.env.logger.warning(
                    "%s: watching %s failed: %s", self.env.handler, directory, error
                )
            finally:
                await store.close()
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower


async def build(params: dict[str, Any], env: Env) -> KubernetesEnv:
    producer = KubernetesEnv(params, env)
    await producer.start()
    return producer


INFO = AdapterInfo(
    name="kubernetes",
    description="Produces source/destination labels, namespace, service and service account "
    "from the ServiceEntry registry",
    build=build,
    produces=PRODUCES,
    params=KUBERNETES,
)
