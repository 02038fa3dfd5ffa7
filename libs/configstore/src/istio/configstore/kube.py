"""Kubernetes custom resources as a config store (`kube://`).

Theory of operation. Every kind is a custom resource of its schema's group, version and plural
(install/kubernetes/crds.yaml defines them, one CRD per kind). An object is stored as
`to_object` renders it and its resource_version is metadata.resourceVersion, so the API
server's optimistic concurrency is the store's: a stale version is a 409 Conflict. An update
without a resource_version reads the current one and replaces it: last writer wins (retried a
few times if another writer slips in between the read and the write).

Watches work as client-go's reflector does: list each kind across all namespaces and report
what was listed, say SYNCED once every kind is listed, then watch each kind from its list's
resourceVersion, with bookmarks so that a reconnect resumes from a recent version. A watch the
server ends is reopened where it stopped. A 410 Gone (the server no longer keeps history back to
that version) is answered by listing again and reporting the difference from what this watch
reported before, so a reader never misses a change, though changes made during the gap arrive
as one net change. Dropped connections are retried with exponential backoff, capped at
RETRY_MAX seconds. Objects that do not parse (written around istioctl, with kubectl say) are
logged with kind, namespace/name and problem, and skipped; a reader keeps the last good version
of an object that turns bad.

Access comes from a kubeconfig (the named or current context: server, CA, client certificate,
token, tokenFile, basic auth, insecure-skip-tls-verify) or, with no kubeconfig at all, from the
pod's service account, as client-go's in-cluster config does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import json
import logging
import os
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from istio.config import (
    DEFAULT_REGISTRY,
    AlreadyExists,
    Config,
    ConfigError,
    ConfigKey,
    Conflict,
    NotFound,
    Problem,
    Schema,
    SchemaRegistry,
    parse_object,
    to_object,
)
from istio.config.model import DEFAULT_NAMESPACE
from istio.configstore.store import ConfigEvent, EventType, check_writable, known_kind

log = logging.getLogger(__name__)

JSON = dict[str, Any]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 30.0
WATCH_TIMEOUT = 300  # timeoutSeconds asked of the server for one watch request
RETRY_INITIAL = 0.1
RETRY_MAX = 10.0
SHORT_WATCH = 1.0  # a watch that ends sooner, without an event, is retried after a pause
UPDATE_ATTEMPTS = 5
LIST_PAGE = 500
_KEPT_METADATA = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "resourceVersion",
    "creationTimestamp",
)
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


# -- access: where the API server is and who we are ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """How to reach one API server and authenticate to it. `source` says where the settings
    came from (a kubeconfig and context, or the service account), for error messages."""

    server: str
    source: str
    token: str = ""
    token_file: Path | None = None
    username: str = ""
    password: str = ""
    ca_file: Path | None = None
    ca_data: str = ""
    client_cert_file: Path | None = None
    client_cert_data: bytes = b""
    client_key_file: Path | None = None
    client_key_data: bytes = b""
    insecure: bool = False
    tls_server_name: str = ""

    def authorization(self) -> str | None:
        """The Authorization header; a token file is read each time, as tokens rotate."""
        if self.token_file is not None:
            try:
                return f"Bearer {self.token_file.read_text().strip()}"
            except OSError as error:
                raise ConfigError(
                    Problem(
                        f"cannot read the token file {self.token_file} ({self.source}): {error}"
                    )
                ) from None
        if self.token:
            return f"Bearer {self.token}"
        if self.username:
            credentials = f"{self.username}:{self.password}".encode()
            return f"Basic {base64.b64encode(credentials).decode()}"
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS settings for an https server; None for plain http."""
        if not self.server.startswith("https://"):
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None, cadata=self.ca_data or None
            )
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.client_cert_file or self.client_cert_data:
                with tempfile.TemporaryDirectory(prefix="kube-client-") as scratch:
                    cert = _as_file(self.client_cert_file, self.client_cert_data, scratch, "cert")
                    key = _as_file(self.client_key_file, self.client_key_data, scratch, "key")
                    if cert is not None:
                        context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigError(
                Problem(f"bad TLS settings for {self.server} ({self.source}): {error}")
            ) from None
        return context


def _as_file(path: Path | None, data: bytes, scratch: str, name: str) -> str | None:
    if path is not None:
        return str(path)
    if not data:
        return None
    written = Path(scratch) / name
    written.touch(mode=0o600)
    written.write_bytes(data)
    return str(written)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A named cluster, user or context of a kubeconfig, and the directory its relative paths
    are relative to."""

    value: Mapping[str, Any]
    base: Path


def load_cluster_access(
    kubeconfig: Path | None = None, context: str | None = None
) -> ClusterAccess:
    """Access as kubectl would find it: `kubeconfig`, else $KUBECONFIG (a list of files merged,
    the first to name something wins), else ~/.kube/config, else the pod's service account."""
    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise ConfigError(Problem(f"kubeconfig {kubeconfig} not found"))
        return _from_kubeconfigs([kubeconfig], context)
    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        paths = [Path(p) for p in listed.split(os.pathsep) if p and Path(p).is_file()]
        if not paths:
            raise ConfigError(Problem(f"KUBECONFIG={listed} names no existing file"))
        return _from_kubeconfigs(paths, context)
    default = Path.home() / ".kube" / "config"
    if default.is_file():
        return _from_kubeconfigs([default], context)
    if context is not None:
        raise ConfigError(
            Problem(f"context {context!r}: no kubeconfig found (KUBECONFIG, {default})")
        )
    return _in_cluster()


def _in_cluster() -> ClusterAccess:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    token = SERVICE_ACCOUNT_DIR / "token"
    if not host or not port or not token.is_file():
        raise ConfigError(
            Problem(
                "no Kubernetes configuration found: name a kubeconfig "
                "(kube:///path/to/kubeconfig), set KUBECONFIG, create ~/.kube/config, "
                "or run in a pod with a service account"
            )
        )
    if ":" in host:
        host = f"[{host}]"
    ca = SERVICE_ACCOUNT_DIR / "ca.crt"
    return ClusterAccess(
        server=f"https://{host}:{port}",
        source=f"in-cluster service account {SERVICE_ACCOUNT_DIR}",
        token_file=token,
        ca_file=ca if ca.is_file() else None,
    )


def _from_kubeconfigs(paths: builtins.list[Path], context: str | None) -> ClusterAccess:
    sections: dict[str, dict[str, _Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    current = ""
    for path in paths:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(Problem(f"cannot read kubeconfig {path}: {error}")) from None
        if not isinstance(document, Mapping):
            raise ConfigError(Problem(f"kubeconfig {path} is not a mapping"))
        current = current or str(document.get("current-context") or "")
        for section, entries in sections.items():
            singular = section[:-1]
            for item in document.get(section) or []:
                if isinstance(item, Mapping) and isinstance(item.get(singular), Mapping):
                    entries.setdefault(str(item.get("name")), _Entry(item[singular], path.parent))
    files = ", ".join(str(p) for p in paths)
    name = context or current
    if not name:
        raise ConfigError(
            Problem(f"kubeconfig {files} has no current-context: name one (kube://CONTEXT/path)")
        )
    found = sections["contexts"].get(name)
    if found is None:
        known = ", ".join(sorted(sections["contexts"])) or "none"
        raise ConfigError(
            Problem(f"kubeconfig {files} has no context {name!r} (contexts: {known})")
        )
    source = f"kubeconfig {files}, context {name}"
    cluster = sections["clusters"].get(str(found.value.get("cluster")))
    if cluster is None or not cluster.value.get("server"):
        raise ConfigError(
            Problem(f"{source}: cluster {found.value.get('cluster')!r} has no server")
        )
    user = sections["users"].get(str(found.value.get("user")), _Entry({}, found.base))
    settings, auth = cluster.value, user.value
    if ("exec" in auth or "auth-provider" in auth) and not (
        auth.get("token")
        or auth.get("tokenFile")
        or auth.get("client-certificate-data")
        or auth.get("client-certificate")
    ):
        raise ConfigError(
            Problem(f"{source}: exec and auth-provider credentials are not supported; use a token")
        )
    return ClusterAccess(
        server=str(settings["server"]).rstrip("/"),
        source=source,
        token=str(auth.get("token") or ""),
        token_file=_path(auth.get("tokenFile"), user.base),
        username=str(auth.get("username") or ""),
        password=str(auth.get("password") or ""),
        ca_file=_path(settings.get("certificate-authority"), cluster.base),
        ca_data=_base64(settings.get("certificate-authority-data"), source).decode(),
        client_cert_file=_path(auth.get("client-certificate"), user.base),
        client_cert_data=_base64(auth.get("client-certificate-data"), source),
        client_key_file=_path(auth.get("client-key"), user.base),
        client_key_data=_base64(auth.get("client-key-data"), source),
        insecure=bool(settings.get("insecure-skip-tls-verify")),
        tls_server_name=str(settings.get("tls-server-name") or ""),
    )


def _path(value: object, base: Path) -> Path | None:
    return base / str(value) if value else None


def _base64(value: object, source: str) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(Problem(f"{source}: a *-data field is not valid base64")) from None


# -- HTTP ----------------------------------------------------------------------------------------


class _ApiError(Exception):
    """The API server answered with an error; its Status object."""

    def __init__(self, code: int, status: Mapping[str, Any]) -> None:
        self.code = code
        self.reason = str(status.get("reason") or "")
        self.message = str(status.get("message") or f"HTTP {code}")
        details = status.get("details")
        self.details: Mapping[str, Any] = details if isinstance(details, Mapping) else {}
        super().__init__(f"{code} {self.reason}: {self.message}")


class _Unreachable(ConfigError):
    """The API server could not be reached (refused, reset, timed out)."""


async def _api_error(response: aiohttp.ClientResponse) -> _ApiError:
    text = await response.text()
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        status = {"message": text.strip()[:300] or response.reason or ""}
    return _ApiError(response.status, status)


def _collection(schema: Schema, namespace: str | None) -> str:
    base = f"/apis/{schema.group}/{schema.version}"
    if namespace is None:
        return f"{base}/{schema.plural}"
    return f"{base}/namespaces/{quote(namespace, safe='')}/{schema.plural}"


def _item(schema: Schema, namespace: str, name: str) -> str:
    return f"{_collection(schema, namespace)}/{quote(name, safe='')}"


def _problem(key: ConfigKey, message: str) -> Problem:
    return Problem(message, kind=key.kind, name=f"{key.namespace}/{key.name}")


# -- the store -----------------------------------------------------------------------------------


class KubeStore:
    """Config objects as Kubernetes custom resources, over the API server's REST API.

    Nothing is read or connected until first use.
    """

    def __init__(
        self,
        *,
        kubeconfig: Path | None = None,
        context: str | None = None,
        registry: SchemaRegistry = DEFAULT_REGISTRY,
    ) -> None:
        self._registry = registry
        self._kubeconfig = kubeconfig
        self._context = context
        self._access: ClusterAccess | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watch_queues: set[asyncio.Queue[ConfigEvent | BaseException | None]] = set()
        self._watch_tasks: set[asyncio.Task[None]] = set()

    @property
    def registry(self) -> SchemaRegistry:
        return self._registry

    @property
    def access(self) -> ClusterAccess:
        """The API server and credentials in use (loaded on first use)."""
        if self._access is None:
            self._access = load_cluster_access(self._kubeconfig, self._context)
        return self._access

    async def get(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> Config | None:
        schema = self._schema(kind)
        key = ConfigKey(schema.kind, namespace, name)
        try:
            obj = await self._request("GET", _item(schema, namespace, name))
        except _ApiError as error:
            translated = self._translate(error, schema, key)
            if isinstance(translated, NotFound):
                return None
            raise translated from None
        return self._parse(obj, schema)

    async def list(self, kind: str, namespace: str | None = None) -> builtins.list[Config]:
        configs, _, _ = await self._list_or_raise(self._schema(kind), namespace)
        return configs

    async def create(self, config: Config) -> Config:
        check_writable(self._registry, config)
        schema = self._schema(config.meta.kind)
        body = to_object(config, with_status_fields=False)
        try:
            obj = await self._request("POST", _collection(schema, config.meta.namespace), body)
        except _ApiError as error:
            raise self._translate(error, schema, config.key) from None
        return self._parse(obj, schema)

    async def update(self, config: Config) -> Config:
        """Replace an object; with no resource_version, whatever is current (last writer wins)."""
        check_writable(self._registry, config)
        schema = self._schema(config.meta.kind)
        key, wanted = config.key, config.meta.resource_version
        path = _item(schema, key.namespace, key.name)
        attempt = 1
        while True:
            body = to_object(config, with_status_fields=False)
            try:
                body["metadata"]["resourceVersion"] = wanted or await self._current_version(path)
                obj = await self._request("PUT", path, body)
            except _ApiError as error:
                translated = self._translate(error, schema, key)
                if wanted or attempt == UPDATE_ATTEMPTS or not isinstance(translated, Conflict):
                    raise translated from None
                attempt += 1
                continue
            return self._parse(obj, schema)

    async def _current_version(self, path: str) -> str:
        current = await self._request("GET", path)
        return str(current["metadata"]["resourceVersion"])

    async def delete(
        self,
        kind: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        resource_version: str = "",
    ) -> None:
        schema = self._schema(kind)
        options: JSON = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if resource_version:
            options["preconditions"] = {"resourceVersion": resource_version}
        try:
            await self._request("DELETE", _item(schema, namespace, name), options)
        except _ApiError as error:
            raise self._translate(error, schema, ConfigKey(schema.kind, namespace, name)) from None

    def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        schemas = (
            [self._schema(k) for k in kinds] if kinds is not None else builtins.list(self._registry)
        )
        return self._watch(schemas)

    async def close(self) -> None:
        for queue in self._watch_queues:
            queue.put_nowait(None)
        tasks = builtins.list(self._watch_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- requests --------------------------------------------------------------------------------

    def _schema(self, kind: str) -> Schema:
        schema = self._registry.by_kind(known_kind(self._registry, kind))
        assert schema is not None
        return schema

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = self.access.ssl_context()
            self._session = aiohttp.ClientSession(
                # Every watched kind holds a connection: no pool limit.
                connector=aiohttp.TCPConnector(
                    ssl=context if context is not None else True, limit=0
                ),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                headers={"Accept": "application/json", "User-Agent": "istio-configstore"},
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        authorization = self.access.authorization()
        return {"Authorization": authorization} if authorization else {}

    def _unreachable(self, error: BaseException) -> _Unreachable:
        reason = str(error) or type(error).__name__
        return _Unreachable(
            Problem(
                f"cannot reach the Kubernetes API server at {self.access.server} "
                f"({self.access.source}): {reason}"
            )
        )

    async def _request(
        self,
        method: str,
        path: str,
        body: JSON | None = None,
        params: Mapping[str, str] | None = None,
    ) -> JSON:
        session = self._client()
        try:
            async with session.request(
                method,
                self.access.server + path,
                json=body,
                params=params,
                headers=self._headers(),
                server_hostname=self.access.tls_server_name or None,
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._unreachable(error) from None
        if not isinstance(payload, dict):
            raise ConfigError(
                Problem(f"the API server at {self.access.server} answered {path} with a non-object")
            )
        return payload

    def _translate(self, error: _ApiError, schema: Schema, key: ConfigKey | None) -> ConfigError:
        """The API server's refusal as the store's error, naming the object."""
        server = self.access.server
        resource = f"{schema.plural}.{schema.group}"
        if error.code in (401, 403):
            return ConfigError(
                Problem(f"the API server at {server} refused {self.access.source}: {error.message}")
            )
        if key is None:
            if error.code == 404:
                return ConfigError(
                    Problem(
                        f"the API server at {server} does not serve {resource}: install the CRDs "
                        "(kubectl apply -f install/kubernetes/crds.yaml)"
                    )
                )
            return ConfigError(Problem(f"{resource} at {server}: {error}"))
        if error.code == 404:
            if error.details.get("kind") == "namespaces":
                return ConfigError(_problem(key, f"namespace {key.namespace!r} does not exist"))
            if error.details.get("name") == key.name:
                return NotFound(_problem(key, "not found"))
            return self._translate(error, schema, None)
        if error.reason == "AlreadyExists":
            return AlreadyExists(_problem(key, "already exists"))
        if error.code == 409:
            return Conflict(_problem(key, f"changed since it was read: {error.message}"))
        if error.code == 422:
            return ConfigError(_problem(key, f"rejected by the API server: {error.message}"))
        return ConfigError(_problem(key, f"the API server at {server} answered {error}"))

    # -- reading objects -------------------------------------------------------------------------

    def _parse(self, obj: Mapping[str, Any], schema: Schema) -> Config:
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        document = {
            "apiVersion": obj.get("apiVersion", schema.api_version),
            "kind": obj.get("kind", schema.kind),
            "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
            "spec": obj.get("spec"),
        }
        return parse_object(document, registry=self._registry)

    def _parse_or_skip(self, obj: Mapping[str, Any], schema: Schema) -> Config | None:
        try:
            return self._parse(obj, schema)
        except ConfigError as error:
            key = _key_of(obj, schema)
            log.warning(
                "skipping %s %s/%s from %s: %s",
                key.kind,
                key.namespace,
                key.name,
                self.access.server,
                "; ".join(
                    p.message if not p.field else f"{p.field}: {p.message}" for p in error.problems
                ),
            )
            return None

    async def _list_or_raise(
        self, schema: Schema, namespace: str | None
    ) -> tuple[builtins.list[Config], set[ConfigKey], str]:
        try:
            return await self._list(schema, namespace)
        except _ApiError as error:
            raise self._translate(error, schema, None) from None

    async def _list(
        self, schema: Schema, namespace: str | None
    ) -> tuple[builtins.list[Config], set[ConfigKey], str]:
        """Every good object of a kind, the keys of the ones that do not parse, and the list's
        resourceVersion."""
        configs: builtins.list[Config] = []
        malformed: set[ConfigKey] = set()
        params = {"limit": str(LIST_PAGE)}
        resource_version = ""
        while True:
            page = await self._request("GET", _collection(schema, namespace), params=params)
            metadata = page.get("metadata") or {}
            resource_version = resource_version or str(metadata.get("resourceVersion", ""))
            for item in page.get("items") or []:
                config = self._parse_or_skip(item, schema)
                if config is None:
                    malformed.add(_key_of(item, schema))
                else:
                    configs.append(config)
            if not metadata.get("continue"):
                break
            params = {"limit": str(LIST_PAGE), "continue": str(metadata["continue"])}
        configs.sort(key=lambda c: (c.meta.namespace, c.meta.name))
        return configs, malformed, resource_version

    # -- watching --------------------------------------------------------------------------------

    async def _watch(self, schemas: builtins.list[Schema]) -> AsyncIterator[ConfigEvent]:
        listed = await asyncio.gather(*(self._list_or_raise(s, None) for s in schemas))
        # Followers start now and queue what they see while the listing is being read; each
        # keeps the state of its kind as reported, starting from the listing.
        queue: asyncio.Queue[ConfigEvent | BaseException | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(
                self._follow(schema, resource_version, {c.key: c for c in configs}, queue)
            )
            for schema, (configs, _, resource_version) in zip(schemas, listed, strict=True)
        ]
        self._watch_queues.add(queue)
        self._watch_tasks.update(tasks)
        try:
            for configs, _, _ in listed:
                for config in configs:
                    yield ConfigEvent(EventType.ADDED, config)
            yield ConfigEvent(EventType.SYNCED)
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._watch_tasks.difference_update(tasks)
            self._watch_queues.discard(queue)

    async def _follow(
        self,
        schema: Schema,
        resource_version: str,
        state: dict[ConfigKey, Config],
        queue: asyncio.Queue[ConfigEvent | BaseException | None],
    ) -> None:
        """Watch one kind from `resource_version` for as long as the store's watch runs,
        keeping `state` equal to what has been reported."""
        loop = asyncio.get_running_loop()
        delay = RETRY_INITIAL
        relist = False
        while True:
            try:
                if relist:
                    resource_version = await self._relist(schema, state, queue)
                    relist = False
                opened, received = loop.time(), False
                async for event_type, obj in self._stream(schema, resource_version):
                    received, delay = True, RETRY_INITIAL
                    if event_type == "ERROR":
                        raise _ApiError(int(obj.get("code") or 500), obj)
                    metadata = obj.get("metadata") or {}
                    resource_version = str(metadata.get("resourceVersion") or resource_version)
                    if event_type != "BOOKMARK":
                        for event in self._apply(schema, state, event_type, obj):
                            queue.put_nowait(event)
                if received or loop.time() - opened >= SHORT_WATCH:
                    continue  # the server ended the watch (timeoutSeconds): resume at once
                reason = "the server ended the watch at once"
            except _ApiError as error:
                if error.code == 410:
                    log.info("%s: %s; listing again", schema.plural, error.message)
                    relist = True
                    continue
                if error.code not in _RETRYABLE:
                    queue.put_nowait(self._translate(error, schema, None))
                    return
                reason = str(error)
            except _Unreachable as error:
                reason = str(error)
            except Exception as error:  # a bug, or a server talking nonsense: tell the reader
                queue.put_nowait(error)
                return
            pause = delay * random.uniform(0.5, 1.0)
            log.warning(
                "watch of %s interrupted (%s); retrying in %.1fs", schema.plural, reason, pause
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, RETRY_MAX)

    async def _stream(
        self, schema: Schema, resource_version: str
    ) -> AsyncIterator[tuple[str, JSON]]:
        """The events of one watch request, as (type, object)."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT),
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_TIMEOUT + REQUEST_TIMEOUT
        )
        try:
            async with self._client().get(
                self.access.server + _collection(schema, None),
                params=params,
                headers=self._headers(),
                timeout=timeout,
                server_hostname=self.access.tls_server_name or None,
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                pending = b""
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            yield str(event.get("type", "")), event.get("object") or {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise self._unreachable(error) from None

    def _apply(
        self, schema: Schema, state: dict[ConfigKey, Config], event_type: str, obj: JSON
    ) -> builtins.list[ConfigEvent]:
        """The events a watch event means for a reader holding `state`; updates `state`."""
        key = _key_of(obj, schema)
        if event_type == "DELETED":
            gone = state.pop(key, None)
            return [ConfigEvent(EventType.DELETED, gone)] if gone is not None else []
        config = self._parse_or_skip(obj, schema)
        if config is None:
            return []
        before = state.get(key)
        if before is not None and before.meta.resource_version == config.meta.resource_version:
            return []
        state[key] = config
        return [ConfigEvent(EventType.UPDATED if before else EventType.ADDED, config)]

    async def _relist(
        self,
        schema: Schema,
        state: dict[ConfigKey, Config],
        queue: asyncio.Queue[ConfigEvent | BaseException | None],
    ) -> str:
        """List a kind again and report how it differs from `state`; the list's version."""
        configs, malformed, resource_version = await self._list(schema, None)
        fresh = {c.key: c for c in configs}
        for key in sorted(state.keys() - fresh.keys() - malformed):
            queue.put_nowait(ConfigEvent(EventType.DELETED, state.pop(key)))
        for key, config in fresh.items():
            before = state.get(key)
            if before is None or before.meta.resource_version != config.meta.resource_version:
                state[key] = config
                event_type = EventType.UPDATED if before else EventType.ADDED
                queue.put_nowait(ConfigEvent(event_type, config))
        return resource_version


def _key_of(obj: Mapping[str, Any], schema: Schema) -> ConfigKey:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return ConfigKey(
        schema.kind, str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta.get("name") or "")
    )
