"""The ADS server: Envoy xDS v3, state of the world, for CDS, EDS, LDS and RDS on one stream.

Theory of operation. The wiring hands the server immutable MeshSnapshots through `push`; a
debounce window (100 ms of quiet, at most 10 s after its first change) coalesces bursts into
one flush. A flush makes the newest snapshot current and notifies every stream; a stream's
notification slot holds at most one pending push, so a slow stream coalesces too.

Each stream is one proxy (its node id, from the first request). The stream's own task does
everything for it, in order: it handles requests and pushes from one inbox, generates the
proxy's Resources from the current snapshot (a pure function, on the event loop: one proxy's
generation is short and the streams interleave between proxies), and writes the responses.
Per type it keeps the subscription (EDS and RDS name their resources, CDS and LDS take all),
the version and nonce last sent and the version last acked. Versions are content hashes of
what the proxy would get, so a push writes only the types whose version moved, in PUSH_ORDER
(clusters before the endpoints, listeners and routes that use them).

A request is answered only if it is the first of its type, changes a named subscription, or is
a reply to the last nonce sent for its type; a reply to an older nonce is stale and ignored. A
reply carrying error_detail is a NACK: it is logged and counted, and the proxy keeps its last
good config; nothing is resent until the generated content changes.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeAlias

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from istio.model import Proxy
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.registry import Change
from istio.pilot.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    NAMED_TYPES,
    PUSH_ORDER,
    ROUTE,
    SHORT_NAMES,
    Part,
    Resources,
)

log = logging.getLogger(__name__)

Generator = Callable[[MeshSnapshot, Proxy], Resources]
# For an endpoint-only change from one snapshot to the next: the assignments that may have
# changed, by cluster name, with their content digests (None: not known, compare them all).
EndpointChanges = Callable[[MeshSnapshot, MeshSnapshot], Mapping[str, tuple[Any, bytes]] | None]


@dataclass(frozen=True, slots=True)
class Debounce:
    """Push after `quiet` seconds without a change, and at most `max_delay` after the first."""

    quiet: float = 0.1
    max_delay: float = 10.0


DEFAULT_DEBOUNCE = Debounce()

# After this long without a flush, one full garbage collection (see AdsServer._flush).
IDLE_COLLECT_SECONDS = 30.0


class AdsMetrics:
    """The xDS counters, registered in the given (never the global) CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "pilot_xds_pushes", "xDS responses sent, by type", ["type"], registry=registry
        )
        self.push_seconds = Histogram(
            "pilot_xds_push_seconds",
            "Time from a debounced flush to a proxy's push written (generation included)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.nacks = Counter(
            "pilot_xds_nacks",
            "xDS responses rejected by proxies, by type",
            ["type"],
            registry=registry,
        )
        self.connected = Gauge("pilot_xds_connected_proxies", "Open ADS streams", registry=registry)
        for short in SHORT_NAMES.values():  # every type shows, from 0
            self.pushes.labels(short)
            self.nacks.labels(short)


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    nonce: str
    reason: str
    at: datetime


_NOTHING: Mapping[str, bytes] = MappingProxyType({})


class Held:
    """The digests of what a proxy holds of one type: a shared mapping (the generator's
    digests it was last sent in full, shared by every proxy sent the same) and the few names
    where it differs (newer assignments sent since, or names it does not hold: None)."""

    __slots__ = ("base", "overrides")

    def __init__(
        self, base: Mapping[str, bytes], overrides: dict[str, bytes | None] | None = None
    ) -> None:
        self.base = base
        self.overrides: dict[str, bytes | None] = overrides if overrides is not None else {}

    def get(self, name: str) -> bytes | None:
        overrides = self.overrides
        if overrides and name in overrides:
            return overrides[name]
        return self.base.get(name)


@dataclass(slots=True)
class TypeState:
    """One xDS type on one stream. `names` is None for a wildcard (CDS, LDS) subscription."""

    names: frozenset[str] | None
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    last_nack: Nack | None = None
    # What the last response carried, by name (kept for clusters: make-before-break).
    sent: Mapping[str, Any] = field(default_factory=dict)
    # EDS and RDS: the content digest of every resource the proxy holds, by name. Responses
    # of these types carry only the resources whose digest moved (state of the world allows
    # it for types the client names: it keeps the others).
    held: Held = field(default_factory=lambda: Held(_NOTHING))


# Envoy's messages (xds-protos ships no type stubs).
_Request: TypeAlias = Any  # discovery_pb2.DiscoveryRequest
_Response: TypeAlias = Any  # discovery_pb2.DiscoveryResponse


class _Signal:
    """A marker in a stream's inbox."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_PUSH = _Signal("PUSH")
_CLOSED = _Signal("CLOSED")


class _Inbox:
    """A stream's requests and signals, in order, and whether all of them have been handled."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[_Request | _Signal] = asyncio.Queue()
        self.idle = asyncio.Event()

    def put(self, item: _Request | _Signal) -> None:
        self.idle.clear()
        self._queue.put_nowait(item)

    async def get(self) -> _Request | _Signal:
        if self._queue.empty():
            self.idle.set()
        return await self._queue.get()


class ProxyStream:
    """One proxy's ADS stream and its sync state (what /debug/syncz shows)."""

    def __init__(self, stream_id: int, proxy: Proxy, peer: str, inbox: _Inbox) -> None:
        self.id = stream_id
        self.proxy = proxy
        self.peer = peer
        self.connected_since = datetime.now(UTC)
        self.types: dict[str, TypeState] = {}
        self.generation_error = ""
        self._inbox = inbox
        self._push_types: set[str] = set()
        self._push_since: float | None = None
        self._nonces = itertools.count(1)
        self._resources: Resources | None = None
        self._generated_from: MeshSnapshot | None = None
        # The snapshot whose endpoints the proxy holds (what an endpoint-only push diffs from).
        self._endpoints_from: MeshSnapshot | None = None

    @property
    def node_id(self) -> str:
        return self.proxy.node_id

    def _notify(self, types: Iterable[str], since: float) -> None:
        """Queue a push of `types`, merging into one already pending (a slot of size one)."""
        if not self._push_types:
            self._inbox.put(_PUSH)
        self._push_types.update(types)
        if self._push_since is None:
            self._push_since = since

    def _take_push(self) -> tuple[set[str], float]:
        types, since = self._push_types, self._push_since
        self._push_types, self._push_since = set(), None
        assert since is not None
        return types, since

    def _next_nonce(self) -> str:
        return str(next(self._nonces))


class AdsServer:
    """AggregatedDiscoveryService for grpc.aio. `generate` is xDS generation (pure)."""

    def __init__(
        self,
        generate: Generator,
        *,
        debounce: Debounce = DEFAULT_DEBOUNCE,
        metrics: AdsMetrics | None = None,
        endpoint_changes: EndpointChanges | None = None,
    ) -> None:
        self._generate = generate
        self._endpoint_changes = endpoint_changes
        # Set by an endpoint-only flush: (previous snapshot, current one, changed assignments).
        self._endpoint_delta: tuple[MeshSnapshot, MeshSnapshot, Mapping[str, Any]] | None = None
        self._debounce = debounce
        self.metrics = metrics or AdsMetrics(CollectorRegistry())
        self._snapshot: MeshSnapshot | None = None
        self._streams: dict[int, ProxyStream] = {}
        self._stream_ids = itertools.count(1)
        self._pending: MeshSnapshot | None = None
        self._pending_changes: set[Change] = set()
        self._window_opened: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._idle_collect: asyncio.TimerHandle | None = None
        self.flushes = 0
        # Encoded resources by (type, version): the version is a content hash, so proxies that
        # get the same content (most of a namespace) share one encoding. Cleared each flush.
        self._packed: dict[tuple[str, str], bytes] = {}
        # Each resource packed once per flush, by (type, name, content digest), for every
        # stream that sends it (streams whose versions differ still share most resources).
        self._anys: dict[tuple[str, str, bytes], any_pb2.Any] = {}
        # Equal subscriptions (most proxies ask for the same names) share one frozenset.
        self._subscriptions: dict[frozenset[str], frozenset[str]] = {}
        # What moved between two shared digest mappings (held, now), per flush: the objects
        # are kept in the entry, so their ids are not reused while it lives.
        self._diffs: dict[
            tuple[int, int], tuple[Mapping[str, bytes], Mapping[str, bytes], list[str]]
        ] = {}
        # Each shared part's encoded resources, per flush (the part is kept: ids stay unique),
        # and each packed resource's encoding.
        self._part_packs: dict[int, tuple[Part, bytes]] = {}
        self._any_wire: dict[int, tuple[any_pb2.Any, bytes]] = {}

    @property
    def snapshot(self) -> MeshSnapshot | None:
        """The snapshot streams are served from; None until the first push."""
        return self._snapshot

    @property
    def streams(self) -> tuple[ProxyStream, ...]:
        return tuple(self._streams.values())

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve ADS on `server`. Responses are written as bytes already encoded (most of
        each is shared by many streams): the method handlers pass them through."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )

    # Pushes.

    def push(self, snapshot: MeshSnapshot, change: Change) -> None:
        """Make `snapshot` current after the debounce window. The first one applies at once:
        there is nothing to coalesce it with, and streams are waiting for it."""
        self._pending = snapshot
        self._pending_changes.add(change)
        if self._snapshot is None:
            self._flush()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._window_opened is None:
            self._window_opened = now
        deadline = min(now + self._debounce.quiet, self._window_opened + self._debounce.max_delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._flush)
        self._flushed.clear()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        snapshot, changes = self._pending, self._pending_changes
        self._timer, self._window_opened = None, None
        self._pending, self._pending_changes = None, set()
        self._flushed.set()
        if snapshot is None:
            return
        previous, self._snapshot = self._snapshot, snapshot
        self._endpoint_delta = None
        if changes == {Change.ENDPOINTS} and previous is not None and self._endpoint_changes:
            delta = self._endpoint_changes(previous, snapshot)
            if delta is not None:
                self._endpoint_delta = (previous, snapshot, delta)
        # What lives now (the config every proxy holds) moves out of the cyclic collector's
        # generations, so its collections during the push do not walk it all again; garbage
        # cycles among it are freed by one full collection once pushes have been idle a while.
        gc.freeze()
        loop = asyncio.get_running_loop()
        if self._idle_collect is not None:
            self._idle_collect.cancel()
        self._idle_collect = loop.call_later(IDLE_COLLECT_SECONDS, _collect_all)
        self._packed = {}
        self._anys = {}
        self._subscriptions = {}
        self._diffs = {}
        self._part_packs = {}
        self._any_wire = {}
        self.flushes += 1
        types = (ENDPOINT,) if changes == {Change.ENDPOINTS} else PUSH_ORDER
        since = loop.time()
        for stream in self._streams.values():
            stream._notify(types, since)

    async def wait_idle(self) -> None:
        """Until no push is pending and every stream has handled everything queued to it."""
        while True:
            await self._flushed.wait()
            for stream in self.streams:
                await stream._inbox.idle.wait()
            if self._flushed.is_set() and all(s._inbox.idle.is_set() for s in self.streams):
                return

    # The RPCs.

    async def DeltaAggregatedResources(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "incremental (delta) xDS is not supported: use StreamAggregatedResources",
        )

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[_Request], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Response]:
        inbox = _Inbox()
        reader = asyncio.create_task(_read(requests, inbox))
        stream: ProxyStream | None = None
        try:
            first = await inbox.get()
            if first is _CLOSED:
                return
            try:
                proxy = _proxy_of(first)
            except ValueError as error:
                log.warning("refused ADS stream from %s: %s", context.peer(), error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            stream = ProxyStream(next(self._stream_ids), proxy, context.peer(), inbox)
            self._streams[stream.id] = stream
            self.metrics.connected.inc()
            log.info("ADS stream %d opened by %s (%s)", stream.id, stream.node_id, stream.peer)
            item: _Request | _Signal = first
            while item is not _CLOSED:
                if item is _PUSH:
                    types, since = stream._take_push()
                    responses = self._respond(stream, types, forced=set())
                    sent = bool(responses)
                    # Each response is dropped as it is written: none stays alive in this
                    # frame until the stream's next push.
                    responses.reverse()
                    while responses:
                        yield responses.pop()
                    if sent:
                        self.metrics.push_seconds.observe(asyncio.get_running_loop().time() - since)
                else:
                    responses = self._on_request(stream, item)
                    del item  # a request names up to every cluster: not kept while waiting
                    responses.reverse()
                    while responses:
                        yield responses.pop()
                item = await inbox.get()
        finally:
            reader.cancel()
            if stream is not None:
                del self._streams[stream.id]
                inbox.idle.set()
                self.metrics.connected.dec()
                log.info("ADS stream %d of %s closed", stream.id, stream.node_id)

    # One stream's requests and responses.

    def _on_request(self, stream: ProxyStream, request: _Request) -> list[_Response]:
        type_url: str = request.type_url
        if type_url not in SHORT_NAMES:
            log.debug("%s asked for unsupported type %s", stream.node_id, type_url)
            return []
        names = _subscription(type_url, request.resource_names)
        if names is not None:
            names = self._subscriptions.setdefault(names, names)
        state = stream.types.get(type_url)
        if state is None:
            stream.types[type_url] = TypeState(names)
            return self._respond(stream, {type_url}, forced={type_url})
        if state.sent_nonce == "":
            # Nothing sent yet (no snapshot when it first asked): only the names can change.
            state.names = names
            return []
        if request.response_nonce != state.sent_nonce:
            log.debug(
                "%s: stale %s request (nonce %r, last sent %r) ignored",
                stream.node_id,
                SHORT_NAMES[type_url],
                request.response_nonce,
                state.sent_nonce,
            )
            return []
        if request.HasField("error_detail"):
            self._on_nack(stream, type_url, state, request)
        else:
            state.acked_version = request.version_info
        if names != state.names:
            state.names = names
            return self._respond(stream, {type_url}, forced={type_url})
        return []

    def _on_nack(
        self, stream: ProxyStream, type_url: str, state: TypeState, request: _Request
    ) -> None:
        reason: str = request.error_detail.message or f"code {request.error_detail.code}"
        state.last_nack = Nack(state.sent_version, state.sent_nonce, reason, datetime.now(UTC))
        self.metrics.nacks.labels(SHORT_NAMES[type_url]).inc()
        log.warning(
            "NACK from %s for %s version %s (keeps version %s): %s",
            stream.node_id,
            SHORT_NAMES[type_url],
            state.sent_version,
            request.version_info or "none",
            reason,
        )

    def _respond(
        self, stream: ProxyStream, types: set[str], *, forced: set[str]
    ) -> list[_Response]:
        """Responses for those of `types` the stream subscribed to whose version moved (or
        that are `forced`: a first request or a changed subscription), in PUSH_ORDER."""
        if types == {ENDPOINT} and not forced:
            delta = self._endpoint_delta
            state = stream.types.get(ENDPOINT)
            if (
                delta is not None
                and state is not None
                and state.sent_nonce
                and stream._endpoints_from is delta[0]
                and delta[1] is self._snapshot
            ):
                return self._respond_endpoint_delta(stream, state, delta[1], delta[2])
        resources = self._resources_for(stream)
        if resources is None:
            return []
        responses = []
        final_clusters: _Response | None = None
        for type_url in PUSH_ORDER:
            state = stream.types.get(type_url)
            if type_url not in types or state is None:
                continue
            if type_url in NAMED_TYPES:
                response = self._named_response(stream, state, type_url, resources, forced)
                if response is not None:
                    responses.append(response)
                continue
            version = resources.version(type_url, state.names)
            if version == state.sent_version and type_url not in forced:
                continue
            current = resources.of(type_url)
            if type_url == CLUSTER:
                stale = {
                    name: message
                    for name, message in state.sent.items()
                    if name not in current and (state.names is None or name in state.names)
                }
                state.sent = {
                    n: m for n, m in current.items() if state.names is None or n in state.names
                }
                if stale and types & {LISTENER, ROUTE}:
                    # Make before break: routes may still name the clusters this push
                    # removes, so they stay until the new listeners and routes are sent
                    # (0.2's 404s, and calls failing mid-change in gRPC clients).
                    responses.append(
                        self._response(
                            stream,
                            state,
                            CLUSTER,
                            f"{version}+{len(stale)}",
                            {**current, **stale},
                            shared=False,
                        )
                    )
                    final_clusters = self._response(stream, state, CLUSTER, version, current)
                    continue
            responses.append(
                self._response(
                    stream,
                    state,
                    type_url,
                    version,
                    current,
                    layout=resources.layout.get(type_url) if state.names is None else None,
                )
            )
        if final_clusters is not None:
            responses.append(final_clusters)
        return responses

    def _named_response(
        self,
        stream: ProxyStream,
        state: TypeState,
        type_url: str,
        resources: Resources,
        forced: set[str],
    ) -> _Response | None:
        """EDS or RDS from a full generation: the subscribed resources whose digest differs
        from what the proxy holds (all of them the first time), or None when none does and
        nothing forces an answer."""
        current = resources.of(type_url)
        digests = resources.digests.get(type_url, {})
        if len(digests) != len(current):  # a generator that left some out: compute them
            digests = {name: resources.digest(type_url, name) for name in current}
        names = state.names
        held = state.held
        # What the proxy holds differs from `digests` only where its shared base does (one
        # diff per pair of mappings per flush, shared by every stream) or where it has
        # overrides: only those names are looked at.
        candidates: Iterable[str] = self._moved(held.base, digests)
        if held.overrides:
            candidates = {*candidates, *held.overrides}
        unwanted = (
            frozenset()
            if names is None or names.issuperset(current.keys())
            else current.keys() - names
        )
        changed: dict[str, Any] = {}
        for name in candidates:
            if name in unwanted or name not in current:
                continue
            if held.get(name) != digests[name]:
                changed[name] = current[name]
        state.held = Held(digests, dict.fromkeys(unwanted))
        now = digests
        if type_url == ENDPOINT:
            stream._endpoints_from = stream._generated_from
        if not changed and type_url not in forced:
            return None
        version = resources.version(type_url, names)
        if len(changed) == len(now):  # everything: the packing is shared by version
            return self._response(
                stream,
                state,
                type_url,
                version,
                changed,
                digests=now,
                layout=resources.layout.get(type_url) if now is digests else None,
            )
        return self._response(stream, state, type_url, version, changed, shared=False, digests=now)

    def _moved(self, base: Mapping[str, bytes], digests: Mapping[str, bytes]) -> list[str]:
        """Names whose digest in `digests` differs from `base`'s (or that `base` lacks),
        computed once per flush for each pair of mappings."""
        if base is digests:
            return []
        key = (id(base), id(digests))
        diff = self._diffs.get(key)
        if diff is None or diff[0] is not base or diff[1] is not digests:
            moved = [name for name, d in digests.items() if base.get(name) != d]
            diff = self._diffs[key] = (base, digests, moved)
        return diff[2]

    def _respond_endpoint_delta(
        self,
        stream: ProxyStream,
        state: TypeState,
        snapshot: MeshSnapshot,
        delta: Mapping[str, tuple[Any, bytes]],
    ) -> list[_Response]:
        """An endpoint-only push without generating the proxy's config again: of the
        assignments that may have changed, those the proxy subscribes to and holds another
        version of. The version moves on from the last one sent (a chain, not a content hash:
        the proxy's other assignments are unchanged and not looked at)."""
        stream._endpoints_from = snapshot
        names = state.names
        held = state.held
        changed: dict[str, Any] = {}
        digests: dict[str, bytes] = {}
        digest = hashlib.sha256(state.sent_version.encode())
        for name, (message, content) in delta.items():
            if (names is None or name in names) and held.get(name) != content:
                changed[name] = message
                held.overrides[name] = digests[name] = content
                digest.update(name.encode() + b"\0" + content)
        if not changed:
            return []
        version = digest.hexdigest()[:16]
        return [
            self._response(stream, state, ENDPOINT, version, changed, shared=False, digests=digests)
        ]

    def _response(
        self,
        stream: ProxyStream,
        state: TypeState,
        type_url: str,
        version: str,
        current: Mapping[str, Any],
        *,
        shared: bool = True,
        digests: Mapping[str, bytes] | None = None,
        layout: tuple[tuple[Part, ...], tuple[str, ...]] | None = None,
    ) -> _Response:
        """A response for the stream; `shared` packings are cached by (type, version), a
        content hash, for every stream that gets the same content."""
        state.sent_version = version
        state.sent_nonce = stream._next_nonce()
        wire = self._packed.get((type_url, version)) if shared else None
        if wire is None:
            if digests is None and stream._resources is not None:
                digests = stream._resources.digests.get(type_url)
            if layout is not None:
                wire = self._wire_layout(type_url, current, layout, digests or {})
            else:
                wire = self._wire(self._pack(type_url, current, state.names, digests or {}))
            if shared and (layout is None or not layout[1]):
                # Kept for the flush. Not when the proxy has resources of its own (its
                # inbound ones): that content is its alone, and its shared parts are kept
                # already.
                self._packed[type_url, version] = wire
        self.metrics.pushes.labels(SHORT_NAMES[type_url]).inc()
        # The response as it goes on the wire (see `_serialize`): its small header fields,
        # then the resources' encoding, shared by every stream that sends the same ones.
        head = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=state.sent_nonce
        ).SerializeToString()
        return head + wire

    def _wire_layout(
        self,
        type_url: str,
        current: Mapping[str, Any],
        layout: tuple[tuple[Part, ...], tuple[str, ...]],
        digests: Mapping[str, bytes],
    ) -> bytes:
        """All of a type, encoded: each shared part packed and encoded once per flush (reused
        by every stream that sends it), then the proxy's own resources."""
        parts, own = layout
        chunks = []
        for part in parts:
            entry = self._part_packs.get(id(part))
            if entry is None or entry[0] is not part:
                entry = (part, self._wire(self._pack(type_url, part.named, None, part.digests)))
                self._part_packs[id(part)] = entry
            chunks.append(entry[1])
        if own:
            chunks.append(
                self._wire(self._pack(type_url, {n: current[n] for n in own}, None, digests))
            )
        return b"".join(chunks)

    def _wire(self, packed: list[any_pb2.Any]) -> bytes:
        """`packed` as DiscoveryResponse's repeated field 2 (resources); each resource's
        encoding is kept with it for the flush."""
        chunks = []
        for item in packed:
            entry = self._any_wire.get(id(item))
            if entry is None or entry[0] is not item:
                encoded = item.SerializeToString()
                entry = (item, _RESOURCES_TAG + _varint(len(encoded)) + encoded)
                self._any_wire[id(item)] = entry
            chunks.append(entry[1])
        return b"".join(chunks)

    def _pack(
        self,
        type_url: str,
        current: Mapping[str, Any],
        names: frozenset[str] | None,
        digests: Mapping[str, bytes],
    ) -> list[any_pb2.Any]:
        """`current` (only `names`, when given) packed in name order; resources whose digest
        is known are packed once per flush and shared by every stream."""
        packed = []
        for name, message in sorted(current.items()):
            if names is not None and name not in names:
                continue
            digest = digests.get(name)
            item = self._anys.get((type_url, name, digest)) if digest is not None else None
            if item is None:
                item = any_pb2.Any()
                item.Pack(message)
                if digest is not None:
                    self._anys[type_url, name, digest] = item
            packed.append(item)
        return packed

    def _resources_for(self, stream: ProxyStream) -> Resources | None:
        """The stream's resources for the current snapshot; on a generation failure the last
        good ones (so the proxy keeps its config), None before the first snapshot."""
        snapshot = self._snapshot
        if snapshot is None or snapshot is stream._generated_from:
            return stream._resources
        stream._generated_from = snapshot
        try:
            stream._resources = self._generate(snapshot, stream.proxy)
            stream.generation_error = ""
        except Exception as error:
            stream.generation_error = f"{type(error).__name__}: {error}"
            log.exception("xDS generation failed for %s; it keeps its last config", stream.node_id)
        return stream._resources


ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_RESOURCES_TAG = b"\x12"  # field 2 (resources), length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serialize(response: Any) -> bytes:
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def _collect_all() -> None:
    """One full collection, frozen objects included; what survives is frozen again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _read(requests: AsyncIterator[_Request], inbox: _Inbox) -> None:
    """Move the client's requests into the stream's inbox, then CLOSED."""
    try:
        async for request in requests:
            inbox.put(request)
    except (grpc.RpcError, asyncio.InvalidStateError) as error:
        log.debug("ADS stream read ended: %s", error)
    finally:
        inbox.put(_CLOSED)


def _proxy_of(request: _Request) -> Proxy:
    node_id: str = request.node.id
    if not node_id:
        raise ValueError("the first request must carry node.id (type~ip~pod.namespace~domain)")
    return Proxy.parse(node_id, _metadata_strings(request.node.metadata))


def _metadata_strings(metadata: Any) -> dict[str, str]:
    """Node metadata as strings: string values as they are, others as JSON."""
    values: dict[str, str] = {}
    for key, value in metadata.fields.items():
        if value.WhichOneof("kind") == "string_value":
            values[key] = value.string_value
        else:
            values[key] = json.dumps(json_format.MessageToDict(value), sort_keys=True)
    return values


def _subscription(type_url: str, requested: Iterable[str]) -> frozenset[str] | None:
    """The names a request subscribes to, or None for everything. EDS and RDS are always by
    name; CDS and LDS are wildcards unless the client names what it wants (gRPC's xDS client
    names the one listener of its target), and `*` asks for everything explicitly."""
    names = frozenset(requested)
    if type_url in NAMED_TYPES:
        return names
    return None if not names or "*" in names else names
