"""A fake Kubernetes API server for tests: `async with FakeKubeAPI() as api:`.

No cluster can run on these machines, so this is the project's stand-in for one. It speaks the
real REST JSON on 127.0.0.1 (plain HTTP or HTTPS, bearer token checked): discovery, core and custom
resources with namespaced and all-namespace lists, get, create, replace, merge-patch, delete,
label and field selectors, and watches; errors are real `Status` objects.

Theory of operation. All state lives in this process and is changed only by synchronous code on
the event loop, so every write is atomic: it takes the next value of one global counter as its
resourceVersion, stores the object, appends a change to a bounded history and hands the change
to every open watch's queue, all without yielding. A watch that names a resourceVersion replays
the history after it and then follows the live changes; when the history no longer reaches back
that far (it overflowed, or `compact()` dropped it) the watch gets one ERROR event carrying a 410
Status, as the real server's watch cache answers. Bookmarks are markers queued behind the
changes already queued, so the version a bookmark carries never skips an undelivered change.

Built-in kinds are validated with kubernetes-validate's JSON schemas (the newest Kubernetes it
ships) and custom resources structurally against their CRD's openAPIV3Schema (types, required
fields, pruning of unknown fields); a rejected write is a 422 Invalid Status with causes.

Departures from a real server, kept small on purpose: namespaces are created on first use
unless `strict_namespaces=True`; deleting a namespace or a CRD removes its objects at once
(no Terminating phase, no garbage collector); lists are always served from the latest state;
CRD status is set on write rather than by a controller; only JSON merge patch is understood.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import functools
import json
import re
import secrets
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes_validate
import yaml
from aiohttp import web

JSON = dict[str, Any]
TypeKey = tuple[str, str]  # (group, plural): objects of every served version share storage

HOST = "127.0.0.1"
DEFAULT_HISTORY = 1000
DEFAULT_BOOKMARK_INTERVAL = 5.0
SHUTDOWN_TIMEOUT = 5.0
KUBERNETES_VERSION = kubernetes_validate.utils.latest_version()
ISTIO_CRDS = Path("install/kubernetes/crds.yaml")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_REQUIRED_PROPERTY = re.compile(r"^'(.+)' is a required property$")
_UNSET_BY_CLIENTS = ("uid", "creationTimestamp", "generation", "deletionTimestamp", "selfLink")
_NAMESPACE_KIND_NAMES = frozenset({"namespaces", "services"})


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One servable resource: a built-in or a version of a CustomResourceDefinition."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    custom: bool = False
    schema: Mapping[str, Any] | None = None  # a CRD version's openAPIV3Schema

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def type_key(self) -> TypeKey:
        return (self.group, self.plural)

    @property
    def resource(self) -> str:
        """How Status messages name the resource: `pods`, `routerules.config.istio.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """How Invalid messages name the kind: `Pod`, `RouteRule.config.istio.io`."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


BUILTIN_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, short_names=("no",)),
    ResourceType("", "v1", "services", "Service", short_names=("svc",)),
    ResourceType("", "v1", "endpoints", "Endpoints", short_names=("ep",)),
    ResourceType("", "v1", "pods", "Pod", short_names=("po",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",)),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
    ),
    ResourceType(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        namespaced=False,
    ),
)
_CRD_KEY: TypeKey = ("apiextensions.k8s.io", "customresourcedefinitions")
_NAMESPACE_KEY: TypeKey = ("", "namespaces")


@dataclass(slots=True)
class RecordedRequest:
    """One request, logged as it arrives, for assertions: `api.requests`. `status` is set once
    the answer is known (a watch's as soon as its stream starts)."""

    method: str
    path: str
    query: Mapping[str, str]
    status: int | None = None


_RECORD = web.RequestKey("record", RecordedRequest)


class StatusError(Exception):
    """A request failed; `status` is the Kubernetes Status object the server answers with."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    @property
    def status(self) -> JSON:
        status: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def _details(rtype: ResourceType, name: str) -> JSON:
    details: JSON = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return details


def _not_found(rtype: ResourceType, name: str) -> StatusError:
    return StatusError(
        404, "NotFound", f'{rtype.resource} "{name}" not found', _details(rtype, name)
    )


def _no_such_resource() -> StatusError:
    return StatusError(404, "NotFound", "the server could not find the requested resource")


def _bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def _conflict(rtype: ResourceType, name: str, why: str) -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.resource} "{name}": {why}',
        _details(rtype, name),
    )


@dataclass(frozen=True, slots=True)
class _Cause:
    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, ...
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _invalid(rtype: ResourceType, name: str, causes: Sequence[_Cause]) -> StatusError:
    listed = str(causes[0]) if len(causes) == 1 else "[" + ", ".join(str(c) for c in causes) + "]"
    details: JSON = {
        "name": name,
        "kind": rtype.kind,
        "causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
    }
    if rtype.group:
        details["group"] = rtype.group
    return StatusError(
        422, "Invalid", f'{rtype.qualified_kind} "{name}" is invalid: {listed}', details
    )


def _expired(since: int, oldest: int) -> StatusError:
    return StatusError(410, "Expired", f"too old resource version: {since} ({oldest})")


@dataclass(frozen=True, slots=True)
class _Change:
    resource_version: int
    type_key: TypeKey
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    object: JSON
    old: JSON | None = None


@dataclass(frozen=True, slots=True)
class _Bookmark:
    resource_version: int


class _Selector:
    """A label selector (`app=x,tier!=db,env in (a,b),!legacy`) or a field selector."""

    _REQUIREMENT = re.compile(
        r"^(?P<neg>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
        r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
        r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?$"
    )

    def __init__(self, text: str, *, fields: bool = False) -> None:
        self._tests: list[Callable[[Mapping[str, str]], bool]] = []
        for part in _split_requirements(text):
            match = self._REQUIREMENT.match(part.strip())
            if match is None or (fields and (match["neg"] or match["setop"] or not match["op"])):
                raise _bad_request(f"unable to parse requirement: {part.strip()!r}")
            key = match["key"]
            if fields and key not in ("metadata.name", "metadata.namespace"):
                raise _bad_request(f'field label not supported: "{key}"')
            self._tests.append(self._test(match, key))

    @staticmethod
    def _test(match: re.Match[str], key: str) -> Callable[[Mapping[str, str]], bool]:
        if match["op"]:
            value, equal = match["value"], match["op"] != "!="
            return lambda labels: (labels.get(key) == value) == equal
        if match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            if match["setop"] == "in":
                return lambda labels: labels.get(key) in values
            return lambda labels: labels.get(key) not in values
        present = not match["neg"]
        return lambda labels: (key in labels) == present

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(test(labels) for test in self._tests)


def _split_requirements(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            yield text[start:index]
            start = index + 1
    if text[start:].strip():
        yield text[start:]


@dataclass(frozen=True, slots=True)
class _Filter:
    namespace: str | None
    labels: _Selector
    fields: _Selector

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        field_values = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
        }
        return self.labels.matches(meta.get("labels") or {}) and self.fields.matches(field_values)


@dataclass(eq=False, slots=True)
class _Watch:
    rtype: ResourceType
    filter: _Filter
    bookmarks: bool
    # None ends the stream.
    queue: asyncio.Queue[_Change | _Bookmark | None] = field(default_factory=asyncio.Queue)


class FakeKubeAPI:
    """A Kubernetes API server on 127.0.0.1:<free port>, for one test.

    `crds`: CRD manifests to install at start; by default the project's
    install/kubernetes/crds.yaml (every Istio config kind). `history`: how many changes watches
    can replay. `bookmark_interval`: seconds between BOOKMARK events on watches that allow them.
    `tls`: a certificate and key file to serve HTTPS with (the certificate must be valid for
    127.0.0.1; kubeconfigs then trust it as their certificate authority).
    """

    def __init__(
        self,
        *,
        crds: Sequence[Path] | None = None,
        history: int = DEFAULT_HISTORY,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        strict_namespaces: bool = False,
        token: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        if history < 1:
            raise ValueError("history must keep at least one change")
        self.token = token or secrets.token_urlsafe(24)
        self.tls = tls
        self.host = HOST
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.strict_namespaces = strict_namespaces
        self.bookmark_interval = bookmark_interval
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._objects: dict[TypeKey, dict[tuple[str, str], JSON]] = {}
        self._resource_version = 0
        self._history: deque[_Change] = deque(maxlen=history)
        self._expired_through = 0  # changes up to this resourceVersion are no longer replayable
        self._watches: set[_Watch] = set()
        self._refusing_watches = False
        self._runner: web.AppRunner | None = None
        self._bookmarker: asyncio.Task[None] | None = None
        for rtype in BUILTIN_TYPES:
            self.add_resource_type(rtype)
        for namespace in ("default", "kube-system", "kube-public", "istio-system"):
            self.create_object(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
            )
        for path in crds if crds is not None else [_istio_crds()]:
            self.install_crds(path)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeKubeAPI:
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
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
        await web.SockSite(runner, sock, ssl_context=context).start()
        self._runner = runner
        self._refusing_watches = False
        self._bookmarker = asyncio.create_task(self._send_bookmarks_periodically())

    async def stop(self) -> None:
        self._refusing_watches = True
        if self._bookmarker is not None:
            self._bookmarker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bookmarker
            self._bookmarker = None
        self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test hooks ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's base URL, e.g. http://127.0.0.1:40123."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends to be let in."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion handed out."""
        return str(self._resource_version)

    def write_kubeconfig(
        self, path: Path, *, context: str = "fake", namespace: str = "default"
    ) -> Path:
        """A kubeconfig whose current context is this server with its bearer token."""
        cluster: JSON = {"server": self.url}
        if self.tls is not None:
            cluster["certificate-authority-data"] = base64.b64encode(
                self.tls[0].read_bytes()
            ).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": f"{context}-cluster", "cluster": cluster}],
            "users": [{"name": f"{context}-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {
                        "cluster": f"{context}-cluster",
                        "user": f"{context}-user",
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": context,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def install_crds(self, path: Path) -> list[str]:
        """Create or replace every CustomResourceDefinition in a YAML file; their names."""
        names = []
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            if document.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: {document.get('kind')!r} is not a CRD")
            name = document.get("metadata", {}).get("name", "")
            current = self._objects.get(_CRD_KEY, {}).get(("", name))
            if current is None:
                self.create_object(document)
            else:
                replacement = copy.deepcopy(document)
                replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self._replace(self._type_of(document), None, name, replacement)
            names.append(name)
        return names

    def add_resource_type(self, rtype: ResourceType) -> None:
        """Serve another built-in resource (stored generically, validated when a schema exists)."""
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self._objects.setdefault(rtype.type_key, {})

    def compact(self) -> None:
        """Forget the change history, as etcd compaction does: a watch from any version older
        than the current one gets 410 Gone."""
        self._history.clear()
        self._expired_through = self._resource_version

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every watch that allows them."""
        bookmark = _Bookmark(self._resource_version)
        for watch in self._watches:
            if watch.bookmarks:
                watch.queue.put_nowait(bookmark)

    def close_watches(self) -> None:
        """End every open watch stream, as the server does when a watch times out."""
        for watch in self._watches:
            watch.queue.put_nowait(None)

    @contextlib.contextmanager
    def watch_outage(self) -> Iterator[None]:
        """Close open watches and answer new ones 503 until the block ends; reads and writes
        go on. Lets a test change things while a client cannot watch."""
        self._refusing_watches = True
        self.close_watches()
        try:
            yield
        finally:
            self._refusing_watches = False

    # -- in-process access (no HTTP): seeding and inspecting state -------------------------------

    def create_object(self, obj: Mapping[str, Any]) -> JSON:
        """Create an object as a POST would (validated); the stored object."""
        rtype = self._type_of(obj)
        namespace = obj.get("metadata", {}).get("namespace") or "default"
        return self._create(rtype, namespace if rtype.namespaced else None, dict(obj))

    def get_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        rtype = self._type_of({"apiVersion": api_version, "kind": kind})
        found = self._objects[rtype.type_key].get((namespace or "", name))
        return self._output(rtype, found) if found is not None else None

    def list_objects(self, api_version: str, kind: str, namespace: str | None = None) -> list[JSON]:
        rtype = self._type_of({"apiVersion": api_version, "kind": kind})
        return [
            self._output(rtype, obj)
            for (obj_namespace, _), obj in sorted(self._objects[rtype.type_key].items())
            if namespace is None or obj_namespace == namespace
        ]

    def delete_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON:
        rtype = self._type_of({"apiVersion": api_version, "kind": kind})
        return self._delete(rtype, namespace if rtype.namespaced else None, name, {})

    def _type_of(self, obj: Mapping[str, Any]) -> ResourceType:
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        for rtype in self._types.values():
            if rtype.api_version == api_version and rtype.kind == kind:
                return rtype
        raise StatusError(
            404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"'
        )

    # -- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RecordedRequest(request.method, request.path, dict(request.query))
        self.requests.append(record)
        request[_RECORD] = record
        try:
            response = await self._route(request)
        except StatusError as error:
            response = web.json_response(error.status, status=error.code)
        record.status = response.status
        return response

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return web.json_response(_version_info())
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise StatusError(401, "Unauthorized", "Unauthorized")
        if parts == ["api"]:
            return web.json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                    ],
                }
            )
        if parts == ["apis"]:
            groups = [self._api_group(g) for g in sorted({t.group for t in self._types.values()})]
            return web.json_response(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": [g for g in groups if g]}
            )
        if len(parts) == 2 and parts[0] == "apis":
            api_group = self._api_group(parts[1])
            if api_group is None:
                raise _no_such_resource()
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **api_group})
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _no_such_resource()
        if not rest:
            return web.json_response(self._resource_list(group, version))
        return await self._resource_request(request, group, version, rest)

    async def _resource_request(
        self, request: web.Request, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise _no_such_resource()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        rtype = self._types.get((group, version, plural))
        if rtype is None or subresource not in (None, "status"):
            raise _no_such_resource()
        if subresource is not None and request.method not in ("GET", "PUT"):
            raise StatusError(405, "MethodNotAllowed", f"{request.method} is not supported here")
        if not rtype.namespaced and namespace is not None:
            raise _no_such_resource()
        if rtype.namespaced and namespace is None and name is not None:
            raise _no_such_resource()
        query = request.query
        method = request.method
        if name is None:
            if method == "GET" and query.get("watch") in ("1", "true"):
                return await self._watch(request, rtype, namespace)
            if method == "GET":
                return web.json_response(self._list(rtype, namespace, query))
            if method == "POST":
                assert namespace is not None or not rtype.namespaced
                body = await _json_body(request)
                strict = query.get("fieldValidation") == "Strict"
                return web.json_response(
                    self._create(rtype, namespace, body, strict=strict), status=201
                )
            raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")
        if method == "GET":
            return web.json_response(self._get(rtype, namespace, name))
        if method == "PUT":
            body = await _json_body(request)
            strict = query.get("fieldValidation") == "Strict"
            if subresource == "status":
                return web.json_response(self._replace_status(rtype, namespace, name, body))
            return web.json_response(self._replace(rtype, namespace, name, body, strict=strict))
        if method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                raise StatusError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/merge-patch+json (got {request.content_type})",
                )
            patch = await _json_body(request)
            current = self._get(rtype, namespace, name)
            patched = _merge_patch(current, patch)
            if "resourceVersion" not in patch.get("metadata", {}):
                patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return web.json_response(self._replace(rtype, namespace, name, patched))
        if method == "DELETE":
            body = await _json_body(request) if request.can_read_body else {}
            return web.json_response(self._delete(rtype, namespace, name, body))
        raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")

    # -- discovery -------------------------------------------------------------------------------

    def _api_group(self, group: str) -> JSON | None:
        if not group:
            return None
        versions: list[str] = []
        for rtype in self._types.values():
            if rtype.group == group and rtype.version not in versions:
                versions.append(rtype.version)
        if not versions:
            return None
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": listed, "preferredVersion": listed[0]}

    def _resource_list(self, group: str, version: str) -> JSON:
        served = [t for t in self._types.values() if (t.group, t.version) == (group, version)]
        if not served:
            raise _no_such_resource()
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [
                {
                    "name": t.plural,
                    "singularName": t.kind.lower(),
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": verbs,
                    **({"shortNames": list(t.short_names)} if t.short_names else {}),
                    **({"categories": list(t.categories)} if t.categories else {}),
                }
                for t in sorted(served, key=lambda t: t.plural)
            ],
        }

    # -- reads -----------------------------------------------------------------------------------

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> JSON:
        found = self._objects[rtype.type_key].get((namespace or "", name))
        if found is None:
            raise _not_found(rtype, name)
        return self._output(rtype, found)

    def _list(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]) -> JSON:
        selected = _Filter(
            namespace,
            _Selector(query.get("labelSelector", "")),
            _Selector(query.get("fieldSelector", ""), fields=True),
        )
        keys = sorted(self._objects[rtype.type_key])
        start = _continue_key(query.get("continue", ""))
        items = [
            self._objects[rtype.type_key][k]
            for k in keys
            if (start is None or k > start) and selected.matches(self._objects[rtype.type_key][k])
        ]
        metadata: JSON = {"resourceVersion": str(self._resource_version)}
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise _bad_request(f"invalid limit: {query['limit']!r}") from None
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            token = json.dumps([last.get("namespace", ""), last["name"]])
            metadata["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        # As the real server does: typed lists leave kind and apiVersion out of their items.
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": [
                self._output(rtype, obj) if rtype.custom else _without_type(obj) for obj in items
            ],
        }

    def _output(self, rtype: ResourceType, obj: JSON) -> JSON:
        return {"apiVersion": rtype.api_version, "kind": rtype.kind, **_without_type(obj)}

    # -- writes ----------------------------------------------------------------------------------

    def _next_resource_version(self) -> int:
        self._resource_version += 1
        return self._resource_version

    def _publish(self, change: _Change) -> None:
        if len(self._history) == self._history.maxlen:
            self._expired_through = self._history[0].resource_version
        self._history.append(change)
        for watch in self._watches:
            if watch.rtype.type_key == change.type_key:
                watch.queue.put_nowait(change)

    def _create(
        self, rtype: ResourceType, namespace: str | None, body: JSON, *, strict: bool = False
    ) -> JSON:
        obj = self._admit(rtype, namespace, body, strict=strict, creating=True)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta["name"]
        if namespace is not None:
            self._require_namespace(namespace)
        objects = self._objects[rtype.type_key]
        if (namespace or "", name) in objects:
            raise StatusError(
                409,
                "AlreadyExists",
                f'{rtype.resource} "{name}" already exists',
                _details(rtype, name),
            )
        resource_version = self._next_resource_version()
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=str(resource_version),
            generation=1,
        )
        if rtype.type_key == _CRD_KEY:
            self._serve_crd(obj)
        if rtype.type_key == _NAMESPACE_KEY:
            obj["status"] = {"phase": "Active"}
        objects[(namespace or "", name)] = obj
        self._publish(_Change(resource_version, rtype.type_key, namespace or "", "ADDED", obj))
        return self._output(rtype, obj)

    def _replace(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: JSON,
        *,
        strict: bool = False,
    ) -> JSON:
        objects = self._objects[rtype.type_key]
        current = objects.get((namespace or "", name))
        if current is None:
            raise _not_found(rtype, name)
        obj = self._admit(rtype, namespace, body, strict=strict, creating=False)
        meta = obj["metadata"]
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({name})"
            )
        wanted = meta.get("resourceVersion")
        if not wanted and rtype.custom:
            raise _invalid(
                rtype,
                name,
                [
                    _Cause(
                        "metadata.resourceVersion",
                        "FieldValueInvalid",
                        "Invalid value: 0x0: must be specified for an update",
                    )
                ],
            )
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise _conflict(
                rtype,
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        resource_version = self._next_resource_version()
        generation = current["metadata"].get("generation", 1)
        if obj.get("spec") != current.get("spec"):
            generation += 1
        meta.update(
            uid=current["metadata"]["uid"],
            creationTimestamp=current["metadata"]["creationTimestamp"],
            resourceVersion=str(resource_version),
            generation=generation,
        )
        if "status" in current and "status" not in obj:
            obj["status"] = current["status"]
        if rtype.type_key == _CRD_KEY:
            self._unserve_crd(current)
            self._serve_crd(obj)
        objects[(namespace or "", name)] = obj
        self._publish(
            _Change(resource_version, rtype.type_key, namespace or "", "MODIFIED", obj, current)
        )
        return self._output(rtype, obj)

    def _replace_status(
        self, rtype: ResourceType, namespace: str | None, name: str, body: JSON
    ) -> JSON:
        current = copy.deepcopy(self._get(rtype, namespace, name))
        current["status"] = body.get("status")
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted:
            current["metadata"]["resourceVersion"] = wanted
        return self._replace(rtype, namespace, name, current)

    def _delete(self, rtype: ResourceType, namespace: str | None, name: str, options: JSON) -> JSON:
        objects = self._objects[rtype.type_key]
        current = objects.get((namespace or "", name))
        if current is None:
            raise _not_found(rtype, name)
        preconditions = options.get("preconditions") or {}
        stored = current["metadata"]
        for key, label in (("resourceVersion", "ResourceVersion"), ("uid", "UID")):
            wanted = preconditions.get(key)
            if wanted and wanted != stored[key]:
                raise _conflict(
                    rtype,
                    name,
                    f"the {label} in the precondition ({wanted}) does not match the {label} in "
                    f"record ({stored[key]}). The object might have been modified",
                )
        if rtype.type_key == _NAMESPACE_KEY:
            for rtype_inside in self._types.values():
                if rtype_inside.namespaced:
                    for obj_namespace, obj_name in list(self._objects[rtype_inside.type_key]):
                        if obj_namespace == name:
                            self._delete(rtype_inside, name, obj_name, {})
        if rtype.type_key == _CRD_KEY:
            self._unserve_crd(current)
        deleted = copy.deepcopy(current)
        resource_version = self._next_resource_version()
        deleted["metadata"]["resourceVersion"] = str(resource_version)
        del objects[(namespace or "", name)]
        self._publish(
            _Change(resource_version, rtype.type_key, namespace or "", "DELETED", deleted)
        )
        return self._output(rtype, deleted)

    def _require_namespace(self, namespace: str) -> None:
        if ("", namespace) in self._objects[_NAMESPACE_KEY]:
            return
        if self.strict_namespaces:
            raise StatusError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        self._create(
            self._types[("", "v1", "namespaces")],
            None,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )

    # -- admission: checks every write, as the real server's validation does ---------------------

    def _admit(
        self,
        rtype: ResourceType,
        namespace: str | None,
        body: JSON,
        *,
        strict: bool,
        creating: bool,
    ) -> JSON:
        obj = copy.deepcopy(body)
        api_version = obj.setdefault("apiVersion", rtype.api_version)
        if api_version != rtype.api_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rtype.api_version})"
            )
        kind = obj.setdefault("kind", rtype.kind)
        if kind != rtype.kind:
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})"
            )
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        body_namespace = meta.get("namespace")
        if namespace is None:
            meta.pop("namespace", None)
        elif body_namespace and body_namespace != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        else:
            meta["namespace"] = namespace
        for key in _UNSET_BY_CLIENTS:
            meta.pop(key, None)
        if creating:
            meta.pop("resourceVersion", None)
        name = meta.get("name") or ""
        causes = _metadata_causes(rtype, meta, namespace, creating=creating)
        if not causes:
            causes = (
                _structural_causes(obj, rtype.schema, strict=strict)
                if rtype.custom
                else _builtin_causes(obj, strict=strict)
            )
        if not causes and rtype.type_key == _CRD_KEY:
            causes = _crd_causes(obj)
        if causes:
            raise _invalid(rtype, name, causes)
        return obj

    def _serve_crd(self, crd: JSON) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                self.add_resource_type(
                    ResourceType(
                        group=spec["group"],
                        version=version["name"],
                        plural=names["plural"],
                        kind=names["kind"],
                        namespaced=spec["scope"] == "Namespaced",
                        short_names=tuple(names.get("shortNames", ())),
                        categories=tuple(names.get("categories", ())),
                        custom=True,
                        schema=version.get("schema", {}).get("openAPIV3Schema"),
                    )
                )
        now = _now()
        crd["status"] = {
            "acceptedNames": names,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now, "reason": r}
                for t, r in (
                    ("NamesAccepted", "NoConflicts"),
                    ("Established", "InitialNamesAccepted"),
                )
            ],
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
        }

    def _unserve_crd(self, crd: JSON) -> None:
        spec = crd["spec"]
        type_key = (spec["group"], spec["names"]["plural"])
        for key, rtype in list(self._types.items()):
            if rtype.custom and rtype.type_key == type_key:
                del self._types[key]
        for watch in self._watches:
            if watch.rtype.type_key == type_key:
                watch.queue.put_nowait(None)
        dropped = self._objects.pop(type_key, {})
        for (namespace, _), obj in sorted(dropped.items()):
            deleted = copy.deepcopy(obj)
            resource_version = self._next_resource_version()
            deleted["metadata"]["resourceVersion"] = str(resource_version)
            self._publish(_Change(resource_version, type_key, namespace, "DELETED", deleted))

    # -- watch -----------------------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, rtype: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        if self._refusing_watches:
            raise StatusError(503, "ServiceUnavailable", "watches are unavailable (test outage)")
        query = request.query
        watch = _Watch(
            rtype,
            _Filter(
                namespace,
                _Selector(query.get("labelSelector", "")),
                _Selector(query.get("fieldSelector", ""), fields=True),
            ),
            bookmarks=query.get("allowWatchBookmarks") in ("1", "true"),
        )
        timeout = _seconds(query.get("timeoutSeconds"))
        since_text = query.get("resourceVersion", "")
        expired: StatusError | None = None
        backlog: list[_Change] = []
        if since_text in ("", "0"):
            backlog = [
                _Change(int(obj["metadata"]["resourceVersion"]), rtype.type_key, ns, "ADDED", obj)
                for (ns, _), obj in sorted(self._objects[rtype.type_key].items())
            ]
        else:
            try:
                since = int(since_text)
            except ValueError:
                raise _bad_request(f"invalid resource version: {since_text!r}") from None
            if since < self._expired_through:
                expired = _expired(since, self._expired_through + 1)
            else:
                backlog = [
                    c
                    for c in self._history
                    if c.resource_version > since and c.type_key == rtype.type_key
                ]
        if expired is None:
            self._watches.add(watch)  # registered with its backlog in one step: no gap, no repeat
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(request)
            request[_RECORD].status = response.status
            if expired is not None:
                await _write_event(response, "ERROR", expired.status)
                return response
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for change in backlog:
                        await self._send_change(response, watch, change)
                    while (item := await watch.queue.get()) is not None:
                        if isinstance(item, _Bookmark):
                            await _write_event(
                                response,
                                "BOOKMARK",
                                {
                                    "kind": rtype.kind,
                                    "apiVersion": rtype.api_version,
                                    "metadata": {"resourceVersion": str(item.resource_version)},
                                },
                            )
                        else:
                            await self._send_change(response, watch, item)
        except ConnectionResetError:
            pass
        finally:
            self._watches.discard(watch)
        return response

    async def _send_change(
        self, response: web.StreamResponse, watch: _Watch, change: _Change
    ) -> None:
        matches = watch.filter.matches
        now = matches(change.object)
        before = change.old is not None and matches(change.old)
        if change.type == "MODIFIED" and now != before:
            if now:
                await _write_event(response, "ADDED", self._output(watch.rtype, change.object))
            else:
                assert change.old is not None
                gone = copy.deepcopy(change.old)
                gone["metadata"]["resourceVersion"] = change.object["metadata"]["resourceVersion"]
                await _write_event(response, "DELETED", self._output(watch.rtype, gone))
        elif now:
            await _write_event(response, change.type, self._output(watch.rtype, change.object))

    async def _send_bookmarks_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.bookmark_interval)
            self.send_bookmarks()


# -- helpers -------------------------------------------------------------------------------------


def _istio_crds() -> Path:
    for parent in Path(__file__).resolve().parents:
        if (parent / ISTIO_CRDS).is_file():
            return parent / ISTIO_CRDS
    raise FileNotFoundError(
        f"{ISTIO_CRDS} not found above {__file__}; pass FakeKubeAPI(crds=[...]) explicitly"
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_info() -> JSON:
    major, minor, *_ = KUBERNETES_VERSION.split(".")
    return {
        "major": major,
        "minor": minor,
        "gitVersion": f"v{KUBERNETES_VERSION}",
        "platform": "linux/amd64",
    }


def _seconds(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return max(float(text), 0.0)
    except ValueError:
        raise _bad_request(f"invalid timeoutSeconds: {text!r}") from None


def _continue_key(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        namespace, name = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, TypeError):
        raise _bad_request("continue key is not valid") from None
    return (str(namespace), str(name))


async def _json_body(request: web.Request) -> JSON:
    try:
        body = await request.json()
    except ValueError as error:
        raise _bad_request(f"the body of the request is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise _bad_request("the body of the request must be a JSON object")
    return body


async def _write_event(response: web.StreamResponse, event_type: str, obj: JSON) -> None:
    await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")


def _without_type(obj: JSON) -> JSON:
    copied = copy.deepcopy(obj)
    copied.pop("apiVersion", None)
    copied.pop("kind", None)
    return copied


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _metadata_causes(
    rtype: ResourceType, meta: JSON, namespace: str | None, *, creating: bool
) -> list[_Cause]:
    causes: list[_Cause] = []
    name = meta.get("name")
    if not name and not (creating and meta.get("generateName")):
        causes.append(
            _Cause(
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            )
        )
    elif name:
        label_only = rtype.plural in _NAMESPACE_KIND_NAMES and not rtype.group
        pattern, limit = (_DNS_LABEL, 63) if label_only else (_DNS_SUBDOMAIN, 253)
        if not isinstance(name, str) or len(name) > limit or not pattern.match(name):
            what = "RFC 1123 label" if label_only else "RFC 1123 subdomain"
            causes.append(
                _Cause(
                    "metadata.name",
                    "FieldValueInvalid",
                    f'Invalid value: "{name}": a lowercase {what} must consist of lower case '
                    "alphanumeric characters, '-' or '.', and must start and end with an "
                    "alphanumeric character",
                )
            )
    if namespace is not None and (len(namespace) > 63 or not _DNS_LABEL.match(namespace)):
        causes.append(
            _Cause("metadata.namespace", "FieldValueInvalid", f'Invalid value: "{namespace}"')
        )
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (
            (prefix and not _DNS_SUBDOMAIN.match(prefix))
            or len(label) > 63
            or not _LABEL_NAME.match(label)
        ):
            causes.append(
                _Cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    f'Invalid value: "{key}": invalid label key',
                )
            )
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            causes.append(
                _Cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    f'Invalid value: "{value}": a valid label must be an empty string or '
                    "consist of alphanumeric characters, '-', '_' or '.'",
                )
            )
    return causes


def _builtin_causes(obj: JSON, *, strict: bool) -> list[_Cause]:
    return list(_schema_causes(json.dumps(obj, sort_keys=True), strict))


# kubernetes-validate reads its schemas from disk on every call; every fake server validates
# the same namespaces and CRDs at start, so answers are remembered by content.
@functools.lru_cache(maxsize=1024)
def _schema_causes(document: str, strict: bool) -> tuple[_Cause, ...]:
    try:
        kubernetes_validate.validate(json.loads(document), KUBERNETES_VERSION, strict=strict)
    except kubernetes_validate.SchemaNotFoundError:
        return ()
    except kubernetes_validate.ValidationError as error:
        path = _field_path(error.path)
        required = _REQUIRED_PROPERTY.match(error.message)
        if required:
            field_path = f"{path}.{required[1]}" if path else required[1]
            return (_Cause(field_path, "FieldValueRequired", "Required value"),)
        reason = {"type": "FieldValueTypeInvalid", "enum": "FieldValueNotSupported"}.get(
            error.validator, "FieldValueInvalid"
        )
        return (_Cause(path, reason, f"Invalid value: {error.message}"),)
    return ()


def _field_path(parts: Iterable[object]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _crd_causes(crd: JSON) -> list[_Cause]:
    spec = crd["spec"]
    causes = []
    expected = f"{spec['names']['plural']}.{spec['group']}"
    if crd["metadata"]["name"] != expected:
        causes.append(
            _Cause(
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{crd["metadata"]["name"]}": must be spec.names.plural+"."+'
                "spec.group",
            )
        )
    if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        causes.append(
            _Cause(
                "spec.versions",
                "FieldValueInvalid",
                "Invalid value: must have exactly one version marked as storage version",
            )
        )
    return causes


_JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _structural_causes(
    obj: JSON, schema: Mapping[str, Any] | None, *, strict: bool
) -> list[_Cause]:
    """Check a custom resource against its CRD's schema, pruning unknown fields in place."""
    if schema is None:
        return []
    causes: list[_Cause] = []
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    pruned = _check_value(body, schema, "", causes, strict=strict)
    for key in body:
        if key in pruned:
            obj[key] = pruned[key]
        else:
            del obj[key]
    return causes


def _check_value(
    value: Any, schema: Mapping[str, Any], path: str, causes: list[_Cause], *, strict: bool
) -> Any:
    where = path or "<root>"
    if value is None:
        if not schema.get("nullable") and "type" in schema:
            causes.append(
                _Cause(
                    path,
                    "FieldValueTypeInvalid",
                    f'Invalid value: "null": {where} in body '
                    f'must be of type {schema["type"]}: "null"',
                )
            )
        return value
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            causes.append(_Cause(path, "FieldValueTypeInvalid", "must be an integer or a string"))
        return value
    expected = schema.get("type")
    if expected in _JSON_TYPES and not _JSON_TYPES[expected](value):
        causes.append(
            _Cause(
                path,
                "FieldValueTypeInvalid",
                f'Invalid value: "{_json_type(value)}": {where} in body must be of type '
                f'{expected}: "{_json_type(value)}"',
            )
        )
        return value
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        causes.append(
            _Cause(
                path,
                "FieldValueNotSupported",
                f"Unsupported value: {json.dumps(value)}: supported values: {allowed}",
            )
        )
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [
            _check_value(item, schema["items"], f"{path}[{i}]", causes, strict=strict)
            for i, item in enumerate(value)
        ]
    if not isinstance(value, dict):
        return value
    properties: Mapping[str, Any] = schema.get("properties", {})
    for required in schema.get("required", ()):
        if required not in value:
            causes.append(_Cause(_join(path, required), "FieldValueRequired", "Required value"))
    additional = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or additional is True
    result = {}
    for key, item in value.items():
        child = _join(path, key)
        if key in properties:
            result[key] = _check_value(item, properties[key], child, causes, strict=strict)
        elif isinstance(additional, Mapping):
            result[key] = _check_value(item, additional, child, causes, strict=strict)
        elif keep_unknown:
            result[key] = item
        elif strict:
            causes.append(_Cause(child, "FieldValueInvalid", f'unknown field "{child}"'))
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: object) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return "null"
