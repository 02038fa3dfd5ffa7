"""The proxy agent: one ADS stream to Pilot, config applied as whole snapshots, admin and
stats endpoints.

Theory of operation. The stream subscribes to CDS and LDS (wildcard), then to EDS and RDS by
the names they reference. Each response is compiled by `XdsState`; a rejected one is NACKed
with the reason and changes nothing. After an accepted one the publisher builds a snapshot
and, once it is complete (or after the warming timeout), swaps it in: clusters, then the
current snapshot, then the bound listeners. When Pilot goes away the proxy keeps serving its
last snapshot and reconnects with capped, jittered backoff. The stream is gRPC on the proxy's
own HTTP/2 codec (istio.http2.grpc): the proxy imports no grpcio, which would cost it about
10 MB of its 30 MB idle budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from istio.http2.grpc import Call, Channel
from istio.proxy import envoy
from istio.proxy.admin import json_body, serve
from istio.proxy.compile import CompileError
from istio.proxy.config import Listener, Snapshot
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.proxy.tls import CredentialsError
from istio.proxy.wire import discovery_request
from istio.proxy.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SHORT_NAMES,
    WILDCARD_TYPES,
    XdsState,
)

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

_DUMP_TYPES = {
    CLUSTER: (
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "dynamic_active_clusters",
        "cluster",
    ),
    ENDPOINT: (
        "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
        "dynamic_endpoint_configs",
        "endpoint_config",
    ),
    LISTENER: (
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "dynamic_listeners",
        "active_state",
    ),
    ROUTE: (
        "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "dynamic_route_configs",
        "route_config",
    ),
}


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    metadata: dict[str, str] = field(default_factory=dict)


class Agent:
    def __init__(
        self,
        node: Node,
        discovery_address: str,
        context: Context,
        listeners: ListenerManager,
        *,
        warm_timeout: float = 5.0,
    ) -> None:
        self.node = node
        self.discovery_address = discovery_address
        self.context = context
        self.listeners = listeners
        self.state = XdsState({LISTENER: self._check_listener})
        self.warm_timeout = warm_timeout
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()
        self.connected = False
        self._changed = asyncio.Event()
        self._subscribed: dict[str, frozenset[str]] = {}
        self._nonces: dict[str, str] = {}
        self._outbox: asyncio.Queue[Any] | None = None

    def _check_listener(self, listener: Listener) -> None:
        """A listener whose TLS certificate files do not load is refused (NACK naming the
        listener and the file); the last accepted listeners keep serving."""
        try:
            self.listeners.tls.check_listener(listener)
        except CredentialsError as error:
            raise CompileError("listener", listener.name, str(error)) from None

    # the ADS stream

    async def run(self) -> None:
        publisher = asyncio.get_running_loop().create_task(self._publish())
        try:
            backoff = 0.25
            while not self.stopped.is_set():
                try:
                    await self._stream()
                    backoff = 0.25
                except Exception as error:
                    log.warning("ADS stream to %s failed: %s", self.discovery_address, error)
                self.connected = False
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, 10.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), delay)
        finally:
            publisher.cancel()

    async def _stream(self) -> None:
        async with Channel(self.discovery_address) as channel:
            call = channel.stream(ADS_METHOD)
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            self._outbox = outbox
            self._nonces = {}
            first = True
            for type_url in WILDCARD_TYPES:
                outbox.put_nowait(self._request(type_url, frozenset(), node=first))
                first = False
            for type_url in (ENDPOINT, ROUTE):
                names = self._subscribed.get(type_url)
                if names:
                    outbox.put_nowait(self._request(type_url, names))
            loop = asyncio.get_running_loop()
            sender = loop.create_task(self._requests(call, outbox))
            stop = loop.create_task(self.stopped.wait())
            try:
                while True:
                    next_response = loop.create_task(call.recv())
                    done, _ = await asyncio.wait(
                        {next_response, stop, sender}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if stop in done:
                        next_response.cancel()
                        call.cancel()
                        return
                    if next_response not in done:  # the sender failed: its error ends the stream
                        next_response.cancel()
                        call.cancel()
                        sender.result()
                        raise ConnectionError("the ADS request stream ended")
                    message = next_response.result()
                    if message is None:
                        raise ConnectionError("Pilot closed the stream")
                    self.connected = True
                    self._on_response(envoy.DiscoveryResponse.decode(message))
            finally:
                stop.cancel()
                sender.cancel()
                if sender.done() and not sender.cancelled():
                    sender.exception()  # the call's error, already raised by recv: retrieved
                self._outbox = None

    async def _requests(self, call: Call, outbox: asyncio.Queue[Any]) -> None:
        while True:
            request = await outbox.get()
            await call.send(request)

    def _request(
        self,
        type_url: str,
        names: frozenset[str],
        *,
        node: bool = False,
        nonce: str = "",
        error: str | None = None,
    ) -> bytes:
        """An encoded DiscoveryRequest (istio.proxy.wire writes it: no protobuf at run time)."""
        return discovery_request(
            type_url=type_url,
            version_info=self.state.types[type_url].version,
            resource_names=sorted(names),
            response_nonce=nonce,
            node_id=self.node.id if node else "",
            node_cluster="istio-proxy" if node else "",
            node_user_agent="istio-proxy" if node else "",
            node_metadata=self.node.metadata if node else None,
            error_code=3 if error is not None else 0,  # INVALID_ARGUMENT
            error_message=error or "",
        )

    def _on_response(self, response: Any) -> None:
        type_url = response.type_url
        outbox = self._outbox
        assert outbox is not None
        self._nonces[type_url] = response.nonce
        names = self._subscribed.get(type_url, frozenset())
        error = self.state.accept(type_url, response.version_info, response.resources)
        short = SHORT_NAMES.get(type_url, type_url)
        if error is not None:
            log.error("rejected %s version %s: %s", short, response.version_info, error)
            outbox.put_nowait(self._request(type_url, names, nonce=response.nonce, error=error))
            return
        log.info(
            "accepted %s version %s (%d)", short, response.version_info, len(response.resources)
        )
        outbox.put_nowait(self._request(type_url, names, nonce=response.nonce))
        if type_url == CLUSTER:
            self._resubscribe(ENDPOINT, self.state.eds_names())
        elif type_url == LISTENER:
            self._resubscribe(ROUTE, self.state.rds_names())
        self._changed.set()

    def _resubscribe(self, type_url: str, names: frozenset[str]) -> None:
        if self._subscribed.get(type_url) == names:
            return
        self._subscribed[type_url] = names
        assert self._outbox is not None
        self._outbox.put_nowait(
            self._request(type_url, names, nonce=self._nonces.get(type_url, ""))
        )

    # applying snapshots

    async def _publish(self) -> None:
        loop = asyncio.get_running_loop()
        warming_since: float | None = None
        while True:
            timeout = None
            if warming_since is not None:
                timeout = max(0.0, warming_since + self.warm_timeout - loop.time())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
                self._changed.clear()
            except TimeoutError:
                pass
            snapshot = self.state.snapshot()
            if not self.state.complete(snapshot):
                if warming_since is None:
                    warming_since = loop.time()
                if loop.time() - warming_since < self.warm_timeout or not (
                    self.state.received >= set(WILDCARD_TYPES)
                ):
                    continue
                log.warning("applying config still missing %s", ", ".join(snapshot.missing()))
            warming_since = None
            await self.apply(snapshot)

    async def apply(self, snapshot: Snapshot) -> None:
        self.context.apply(snapshot)
        await self.listeners.apply(snapshot)
        self.ready.set()

    # admin

    def admin(self, method: str, target: str) -> tuple[int, str, str]:
        path = urlsplit(target).path
        if path == "/ready":
            if self.ready.is_set():
                return 200, "text/plain", "LIVE\n"
            return 503, "text/plain", "PRE_INITIALIZING: waiting for the first config\n"
        if path == "/quitquitquit":
            if method != "POST":
                return 405, "text/plain", "use POST\n"
            asyncio.get_running_loop().call_soon(self.stopped.set)
            return 200, "text/plain", "OK\n"
        if path == "/config_dump":
            return 200, "application/json", json_body(self.config_dump())
        if path == "/stats":
            return 200, "text/plain", self.context.stats.text()
        if path == "/stats/prometheus":
            return 200, "text/plain; version=0.0.4", self.context.stats.prometheus()
        if path == "/clusters":
            return 200, "text/plain", self.clusters_text()
        if path == "/server_info":
            return (
                200,
                "application/json",
                json_body(
                    {
                        "node": self.node.id,
                        "state": "LIVE" if self.ready.is_set() else "PRE_INITIALIZING",
                        "connected": self.connected,
                        "versions": dict(self.context.snapshot.versions),
                        "nacks": self.state.nacks,
                        "last_nack": self.state.last_nack,
                        "listener_errors": self.listeners.errors,
                    }
                ),
            )
        return 404, "text/plain", f"unknown admin path {path}\n"

    def config_dump(self) -> dict[str, Any]:
        # protobuf and Envoy's full descriptors are loaded on the first dump only (several MB
        # the idle sidecar does not carry otherwise): see XdsState.message.
        from google.protobuf import json_format

        configs = []
        for type_url, (dump_type, key, field_name) in _DUMP_TYPES.items():
            state = self.state.types[type_url]
            entries = []
            for name in sorted(state.raw):
                body = json_format.MessageToDict(state.message(type_url, name))
                if type_url == LISTENER:
                    body = {"version_info": state.version, "listener": body}
                entries.append({"name": name, "version_info": state.version, field_name: body})
            configs.append({"@type": dump_type, "version_info": state.version, key: entries})
        return {"configs": configs}

    def clusters_text(self) -> str:
        lines = []
        for name, runtime in sorted(self.context.clusters.clusters.items()):
            for host in runtime.hosts.values():
                address = f"{host.address[0]}:{host.address[1]}"
                lines.append(f"{name}::{address}::rq_active::{host.active}")
                lines.append(f"{name}::{address}::idle_cx::{len(host.idle)}")
                health = "/failed_outlier_check" if host.ejected_until else "healthy"
                lines.append(f"{name}::{address}::health_flags::{health}")
        return "\n".join(lines) + "\n"

    async def serve_admin(
        self, host: str, admin_port: int, stats_port: int
    ) -> list[asyncio.Server]:
        servers = [await serve(host, admin_port, self.admin)]
        if stats_port and stats_port != admin_port:
            servers.append(await serve(host, stats_port, self.admin))
        return servers
