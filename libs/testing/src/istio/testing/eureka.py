"""A fake Eureka server for tests: `async with FakeEureka() as eureka:`.

It serves Eureka's documented REST API in JSON on 127.0.0.1, under both Netflix's
`/eureka/v2` and Spring Cloud's `/eureka` prefixes:

- `GET {prefix}/apps` and `GET {prefix}/apps/{APP}` (JSON only: a request that does not
  accept `application/json` gets 406, where real Eureka would answer XML);
- `POST {prefix}/apps/{APP}` (register, body `{"instance": {...}}`), `DELETE
  {prefix}/apps/{APP}/{id}`, `PUT {prefix}/apps/{APP}/{id}/status?value=OUT_OF_SERVICE`;
- and the same as methods (`register`, `deregister`, `set_status`) for tests.

It keeps the quirks of real servers' JSON: a port is `{"$": 9080, "@enabled": "true"}`,
an empty metadata map is `{"@class": "java.util.Collections$EmptyMap"}`, and when
`single_as_object` is set (the default) a list of exactly one application or instance is
written as the bare object, as Eureka's Jettison-style encoder does.

Departures from Eureka: no leases, renewals or eviction (instances stay until removed), no
delta endpoint, no peer replication, no XML.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from istio.testing.server import Listening, listen

JSON = dict[str, Any]

HOST = "127.0.0.1"
PREFIXES = ("/eureka/v2", "/eureka")
DEFAULT_PORT = 7001  # Eureka's InstanceInfo defaults for a disabled port
DEFAULT_SECURE_PORT = 7002
STATUSES = frozenset({"UP", "DOWN", "STARTING", "OUT_OF_SERVICE", "UNKNOWN"})
SHUTDOWN_TIMEOUT = 0.05


@dataclass(slots=True)
class _Instance:
    app: str
    instance_id: str
    host_name: str
    ip_addr: str
    status: str
    port: int | None
    secure_port: int | None
    metadata: dict[str, str]
    registered_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    updated_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class FakeEureka:
    """A Eureka server holding its registry in memory."""

    def __init__(self, *, single_as_object: bool = True) -> None:
        self.single_as_object = single_as_object
        self.host = HOST
        self.port = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Accept header)
        self._apps: dict[str, dict[str, _Instance]] = {}  # APP -> instance id -> instance
        self._ids = itertools.count(1)
        self._version = 1
        self._server: Listening | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeEureka:
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
        for prefix in PREFIXES:
            app.router.add_get(f"{prefix}/apps", self._get_apps)
            app.router.add_get(f"{prefix}/apps/{{app}}", self._get_app)
            app.router.add_post(f"{prefix}/apps/{{app}}", self._post_instance)
            app.router.add_delete(f"{prefix}/apps/{{app}}/{{id}}", self._delete_instance)
            app.router.add_put(f"{prefix}/apps/{{app}}/{{id}}/status", self._put_status)
        self._server = await listen(app, self.host, self.port, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self.port = self._server.port

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()

    @property
    def url(self) -> str:
        """The server's root, e.g. http://127.0.0.1:40123 (the API is under /eureka/v2)."""
        return f"http://{self.host}:{self.port}"

    # -- the registry, for tests -----------------------------------------------------------------

    def register(
        self,
        app: str,
        host_name: str,
        ip_addr: str,
        port: int | None = None,
        *,
        secure_port: int | None = None,
        status: str = "UP",
        metadata: Mapping[str, str] | None = None,
        instance_id: str | None = None,
    ) -> str:
        """Register (or replace) an instance of `app`; returns its instance id."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {sorted(STATUSES)}")
        app = app.upper()
        instance_id = instance_id or f"{host_name}:{app.lower()}:{next(self._ids)}"
        self._apps.setdefault(app, {})[instance_id] = _Instance(
            app=app,
            instance_id=instance_id,
            host_name=host_name,
            ip_addr=ip_addr,
            status=status,
            port=port,
            secure_port=secure_port,
            metadata=dict(metadata or {}),
        )
        self._version += 1
        return instance_id

    def deregister(self, app: str, instance_id: str) -> None:
        instances = self._apps.get(app.upper(), {})
        if instances.pop(instance_id, None) is None:
            raise KeyError(f"no instance {instance_id!r} of {app.upper()}")
        if not instances:
            del self._apps[app.upper()]
        self._version += 1

    def set_status(self, app: str, instance_id: str, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {sorted(STATUSES)}")
        instance = self._apps.get(app.upper(), {}).get(instance_id)
        if instance is None:
            raise KeyError(f"no instance {instance_id!r} of {app.upper()}")
        instance.status = status
        instance.updated_ms = int(time.time() * 1000)
        self._version += 1

    def applications(self) -> JSON:
        """What `GET /eureka/v2/apps` answers."""
        apps = [self._application(name) for name in sorted(self._apps)]
        counts: dict[str, int] = {}
        for instances in self._apps.values():
            for instance in instances.values():
                counts[instance.status] = counts.get(instance.status, 0) + 1
        return {
            "applications": {
                "versions__delta": str(self._version),
                "apps__hashcode": "".join(f"{s}_{n}_" for s, n in sorted(counts.items())),
                "application": self._list(apps),
            }
        }

    # -- JSON ------------------------------------------------------------------------------------

    def _list(self, items: list[JSON]) -> list[JSON] | JSON:
        return items[0] if self.single_as_object and len(items) == 1 else items

    def _application(self, name: str) -> JSON:
        instances = [self._instance(i) for _, i in sorted(self._apps[name].items())]
        return {"name": name, "instance": self._list(instances)}

    @staticmethod
    def _instance(instance: _Instance) -> JSON:
        port = instance.port or DEFAULT_PORT
        secure_port = instance.secure_port or DEFAULT_SECURE_PORT
        vip = instance.app.lower()
        return {
            "instanceId": instance.instance_id,
            "hostName": instance.host_name,
            "app": instance.app,
            "ipAddr": instance.ip_addr,
            "status": instance.status,
            "overriddenstatus": "UNKNOWN",
            "port": {"$": port, "@enabled": "true" if instance.port else "false"},
            "securePort": {
                "$": secure_port,
                "@enabled": "true" if instance.secure_port else "false",
            },
            "countryId": 1,
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "leaseInfo": {
                "renewalIntervalInSecs": 30,
                "durationInSecs": 90,
                "registrationTimestamp": instance.registered_ms,
                "lastRenewalTimestamp": instance.updated_ms,
                "evictionTimestamp": 0,
                "serviceUpTimestamp": instance.registered_ms,
            },
            "metadata": dict(instance.metadata) or {"@class": "java.util.Collections$EmptyMap"},
            "homePageUrl": f"http://{instance.host_name}:{port}/",
            "statusPageUrl": f"http://{instance.host_name}:{port}/info",
            "healthCheckUrl": f"http://{instance.host_name}:{port}/health",
            "vipAddress": vip,
            "secureVipAddress": vip,
            "isCoordinatingDiscoveryServer": "false",
            "lastUpdatedTimestamp": str(instance.updated_ms),
            "lastDirtyTimestamp": str(instance.updated_ms),
            "actionType": "ADDED",
        }

    # -- HTTP ------------------------------------------------------------------------------------

    def _record(self, request: web.Request) -> web.Response | None:
        accept = request.headers.get("Accept", "")
        self.requests.append((request.method, request.path_qs, accept))
        if request.method == "GET" and "application/json" not in accept:
            return web.Response(status=406, text="the fake Eureka speaks JSON only")
        return None

    async def _get_apps(self, request: web.Request) -> web.Response:
        if (refused := self._record(request)) is not None:
            return refused
        return web.json_response(self.applications())

    async def _get_app(self, request: web.Request) -> web.Response:
        if (refused := self._record(request)) is not None:
            return refused
        name = request.match_info["app"].upper()
        if name not in self._apps:
            return web.Response(status=404)
        return web.json_response({"application": self._application(name)})

    async def _post_instance(self, request: web.Request) -> web.Response:
        self._record(request)
        try:
            body = (await request.json())["instance"]
            host_name, ip_addr = body["hostName"], body["ipAddr"]
            metadata = {k: str(v) for k, v in (body.get("metadata") or {}).items() if k != "@class"}
            self.register(
                request.match_info["app"],
                host_name,
                ip_addr,
                _enabled_port(body.get("port")),
                secure_port=_enabled_port(body.get("securePort")),
                status=body.get("status", "UP"),
                metadata=metadata,
                instance_id=body.get("instanceId") or None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return web.Response(status=400, text=f"bad instance: {exc}")
        return web.Response(status=204)

    async def _delete_instance(self, request: web.Request) -> web.Response:
        self._record(request)
        try:
            self.deregister(request.match_info["app"], request.match_info["id"])
        except KeyError:
            return web.Response(status=404)
        return web.Response(status=200)

    async def _put_status(self, request: web.Request) -> web.Response:
        self._record(request)
        try:
            self.set_status(
                request.match_info["app"], request.match_info["id"], request.query["value"]
            )
        except KeyError:
            return web.Response(status=404)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(status=200)


def _enabled_port(value: Any) -> int | None:
    if not isinstance(value, dict):
        return None
    enabled = value.get("@enabled")
    if enabled is True or str(enabled).lower() == "true":
        return int(value["$"])
    return None
