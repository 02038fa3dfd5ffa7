"""A fake Consul agent for tests: `async with FakeConsul() as consul:`.

No Consul can run on these machines, so this stands in for the part of its HTTP API a service
registry reads: the catalog. It speaks Consul's JSON field names and headers on 127.0.0.1:

- `GET /v1/catalog/services` and `GET /v1/catalog/service/<name>`, as blocking queries
  (`?index=N&wait=5m`, answered with `X-Consul-Index`), with `dc` and `tag` filters;
- `PUT /v1/catalog/register` and `PUT /v1/catalog/deregister`, and the same as methods
  (`register`, `deregister`) for tests;
- `GET /v1/status/leader`.

Theory of operation. State changes only in synchronous code on the event loop. Every write
takes the next Raft index and stamps it on what it touched: the service's own index (what
`/v1/catalog/service/<name>` reports) and the catalog's (what `/v1/catalog/services` reports).
A blocking query holds until the index it reads exceeds the one the client sent, its wait runs
out, or the index is rewound (`rewind`, as a snapshot restore does, which wakes every query).
A service that no longer exists reports the index at which a service last went extinct, as
Consul does. Stopping the fake drops open connections, as a dying agent would; it can be
started again on the same port.

Departures from Consul, kept small on purpose: one datacenter; no health checks, ACLs,
sessions, KV or consistency modes; no wait jitter; a node is registered only with a service
and forgotten with its last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from istio.testing.server import Listening, listen

JSON = dict[str, Any]

HOST = "127.0.0.1"
SHUTDOWN_TIMEOUT = 0.05  # open blocking queries are dropped, not awaited, when stopping
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """`5m`, `10s`, `1m30s`, `250ms` (Go's time.ParseDuration) as seconds; ValueError if not."""
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


@dataclass(slots=True)
class _Node:
    name: str
    address: str
    meta: dict[str, str]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(slots=True)
class _Instance:
    node: str
    id: str
    service: str
    port: int
    tags: list[str]
    address: str
    meta: dict[str, str]
    weights: dict[str, int]
    create_index: int
    modify_index: int


class FakeConsul:
    """A Consul agent of datacenter `datacenter` serving the catalog from memory."""

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node: str = "consul-server",
        include_consul_service: bool = True,
    ) -> None:
        self.datacenter = datacenter
        self.host = HOST
        self.port = 0
        self.requests: list[str] = []  # path and query of every request, in order
        self._nodes: dict[str, _Node] = {}
        self._instances: dict[tuple[str, str], _Instance] = {}  # (node, service id)
        self._raft_index = 0
        self._catalog_index = 0
        self._service_index: dict[str, int] = {}
        self._extinction_index = 0
        self._woken = asyncio.Event()
        self._generation = 0  # bumped by rewind: every open blocking query returns
        self._blocked = 0
        self._blocked_changed = asyncio.Event()
        self._server: Listening | None = None
        if include_consul_service:
            self.register("consul", 8300, node=node, address=HOST, service_id="consul")

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeConsul:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on a free port, or on the previous one when started again."""
        app = web.Application()
        app.router.add_get("/v1/catalog/services", self._services)
        app.router.add_get("/v1/catalog/service/{name}", self._service)
        app.router.add_put("/v1/catalog/register", self._register)
        app.router.add_put("/v1/catalog/deregister", self._deregister)
        app.router.add_get("/v1/status/leader", self._leader)
        self._server = await listen(
            app, self.host, self.port, shutdown_timeout=SHUTDOWN_TIMEOUT, handler_cancellation=True
        )
        self.port = self._server.port

    async def stop(self) -> None:
        """Stop listening and drop every connection, open blocking queries included."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()

    @property
    def url(self) -> str:
        """The agent's HTTP address, e.g. http://127.0.0.1:40123."""
        return f"http://{self.host}:{self.port}"

    # -- the catalog, for tests ------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The latest Raft index."""
        return self._raft_index

    @property
    def blocked(self) -> int:
        """How many blocking queries are waiting now."""
        return self._blocked

    async def until_blocked(self, count: int) -> None:
        """Wait until at least `count` blocking queries are waiting (for tests that must
        change the catalog while clients block, such as a rewind)."""
        while self._blocked < count:
            event = self._blocked_changed
            await event.wait()

    def register(
        self,
        service: str,
        port: int,
        *,
        node: str = "node-1",
        address: str = "10.0.0.1",
        service_id: str | None = None,
        tags: Iterable[str] = (),
        service_address: str = "",
        service_meta: Mapping[str, str] | None = None,
        node_meta: Mapping[str, str] | None = None,
        weight: int = 1,
    ) -> str:
        """Register (or update) an instance of `service` on `node`; returns its service ID."""
        service_id = service_id or service
        index = self._next_index()
        known = self._nodes.get(node)
        node_meta = dict(node_meta or {})
        if known is None or known.address != address or known.meta != node_meta:
            self._nodes[node] = (
                _Node(node, address, node_meta, known.id)
                if known
                else _Node(node, address, node_meta)
            )
            # A node's change shows in every service it runs.
            for instance in self._instances.values():
                if instance.node == node:
                    instance.modify_index = index
                    self._service_index[instance.service] = index
        previous = self._instances.get((node, service_id))
        if previous is not None and previous.service != service:
            self._drop(previous, index)
        self._instances[(node, service_id)] = _Instance(
            node=node,
            id=service_id,
            service=service,
            port=port,
            tags=list(tags),
            address=service_address,
            meta=dict(service_meta or {}),
            weights={"Passing": weight, "Warning": 1},
            create_index=previous.create_index if previous else index,
            modify_index=index,
        )
        self._service_index[service] = index
        self._wake()
        return service_id

    def deregister(self, service_id: str, *, node: str = "node-1") -> bool:
        """Remove one instance; False when there was none (Consul answers true either way)."""
        instance = self._instances.get((node, service_id))
        if instance is None:
            return False
        index = self._next_index()
        self._drop(instance, index)
        self._wake()
        return True

    def deregister_node(self, node: str) -> None:
        """Remove a node and every instance on it."""
        instances = [i for i in self._instances.values() if i.node == node]
        if not instances and node not in self._nodes:
            return
        index = self._next_index()
        for instance in instances:
            self._drop(instance, index)
        self._nodes.pop(node, None)
        self._wake()

    def rewind(self, index: int) -> None:
        """Set the Raft index back, as restoring an older snapshot does; wakes every query."""
        if not 0 < index <= self._raft_index:
            raise ValueError(f"can only rewind to an index in 1..{self._raft_index}")
        self._raft_index = index
        self._catalog_index = min(self._catalog_index, index)
        self._extinction_index = min(self._extinction_index, index)
        for name, service_index in self._service_index.items():
            self._service_index[name] = min(service_index, index)
        self._generation += 1
        self._wake()

    def catalog_services(self, tag: str | None = None) -> JSON:
        """What `GET /v1/catalog/services` answers: service name -> its distinct tags."""
        services: dict[str, list[str]] = {}
        for instance in self._sorted_instances():
            if tag is not None and tag not in instance.tags:
                continue
            tags = services.setdefault(instance.service, [])
            tags.extend(t for t in instance.tags if t not in tags)
        return services

    def catalog_service(self, name: str, tag: str | None = None) -> list[JSON]:
        """What `GET /v1/catalog/service/<name>` answers."""
        return [
            self._entry(instance)
            for instance in self._sorted_instances()
            if instance.service == name and (tag is None or tag in instance.tags)
        ]

    # -- internals -------------------------------------------------------------------------------

    def _next_index(self) -> int:
        self._raft_index += 1
        self._catalog_index = self._raft_index
        return self._raft_index

    def _drop(self, instance: _Instance, index: int) -> None:
        del self._instances[(instance.node, instance.id)]
        if any(i.service == instance.service for i in self._instances.values()):
            self._service_index[instance.service] = index
        else:
            self._service_index.pop(instance.service, None)
            self._extinction_index = index
        if not any(i.node == instance.node for i in self._instances.values()):
            self._nodes.pop(instance.node, None)

    def _wake(self) -> None:
        self._woken.set()
        self._woken = asyncio.Event()

    def _count_blocked(self, delta: int) -> None:
        self._blocked += delta
        self._blocked_changed.set()
        self._blocked_changed = asyncio.Event()

    def _index_of(self, service: str) -> int:
        return self._service_index.get(service, self._extinction_index) or self._catalog_index

    def _sorted_instances(self) -> list[_Instance]:
        return sorted(self._instances.values(), key=lambda i: (i.service, i.node, i.id))

    def _entry(self, instance: _Instance) -> JSON:
        node = self._nodes[instance.node]
        return {
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": node.address, "wan": node.address},
            "NodeMeta": dict(node.meta),
            "ServiceKind": "",
            "ServiceID": instance.id,
            "ServiceName": instance.service,
            "ServiceTags": list(instance.tags),
            "ServiceAddress": instance.address,
            "ServiceTaggedAddresses": {},
            "ServiceWeights": dict(instance.weights),
            "ServiceMeta": dict(instance.meta),
            "ServicePort": instance.port,
            "ServiceEnableTagOverride": False,
            "ServiceProxy": {"MeshGateway": {}, "Expose": {}},
            "ServiceConnect": {},
            "CreateIndex": instance.create_index,
            "ModifyIndex": instance.modify_index,
        }

    # -- HTTP ------------------------------------------------------------------------------------

    async def _services(self, request: web.Request) -> web.Response:
        return await self._blocking(
            request,
            lambda: self._catalog_index,
            lambda: self.catalog_services(request.query.get("tag")),
        )

    async def _service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await self._blocking(
            request,
            lambda: self._index_of(name),
            lambda: self.catalog_service(name, request.query.get("tag")),
        )

    async def _blocking(
        self, request: web.Request, index_of: Callable[[], int], body: Callable[[], Any]
    ) -> web.Response:
        self.requests.append(request.path_qs)
        if (error := self._check_datacenter(request)) is not None:
            return error
        try:
            wanted = int(request.query.get("index", "0"))
            wait = (
                parse_go_duration(request.query.get("wait", ""))
                if "wait" in request.query
                else DEFAULT_WAIT
            )
        except ValueError as exc:
            return web.Response(status=400, text=f"Invalid query: {exc}")
        if wanted > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(wait, MAX_WAIT)
            generation = self._generation
            self._count_blocked(+1)
            try:
                while index_of() <= wanted and generation == self._generation:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await self._woken.wait()
                    if loop.time() >= deadline:
                        break
            finally:
                self._count_blocked(-1)
        return self._json(body(), index_of())

    async def _register(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if (error := self._check_datacenter(request)) is not None:
            return error
        try:
            payload = await request.json()
            node, address, service = payload["Node"], payload["Address"], payload["Service"]
            if not isinstance(node, str) or not isinstance(address, str):
                raise TypeError("Node and Address must be strings")
            weights = service.get("Weights") or {}
            self.register(
                service["Service"],
                int(service.get("Port", 0)),
                node=node,
                address=address,
                service_id=service.get("ID") or service["Service"],
                tags=service.get("Tags") or (),
                service_address=service.get("Address", ""),
                service_meta=service.get("Meta"),
                node_meta=payload.get("NodeMeta"),
                weight=int(weights.get("Passing", 1)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc!r}")
        return self._json(True, self._raft_index)

    async def _deregister(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        try:
            payload = await request.json()
            node = payload["Node"]
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc}")
        if payload.get("ServiceID"):
            self.deregister(payload["ServiceID"], node=node)
        else:
            self.deregister_node(node)
        return self._json(True, self._raft_index)

    async def _leader(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        return web.json_response(f"{HOST}:8300")

    def _check_datacenter(self, request: web.Request) -> web.Response | None:
        datacenter = request.query.get("dc")
        if datacenter is not None and datacenter != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        return None

    def _json(self, body: Any, index: int) -> web.Response:
        return web.json_response(
            body,
            headers={
                "X-Consul-Index": str(index),
                "X-Consul-Knownleader": "true",
                "X-Consul-Lastcontact": "0",
            },
        )
