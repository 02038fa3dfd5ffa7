"""Kubernetes custom resources as a config store (`kube://`).

Theory of operation. Every kind is a custom resource of its schema's group, version and plural
(install/kubernetes/crds.yaml defines them, one CRD per kind). An object is stored as
`to_object` renders it and its resource_version is metadata.resourceVersion, so the API
server's optimistic concurrency is the store's: a stale version is a 409 Conflict. An update
without a resource_version reads the current one and replaces it: last writer wins (retried a
few times if another writer slips in between the read and the write).

Talking to the API server is istio.kube's job: finding it from a kubeconfig or the pod's service
account, and watching as client-go's reflector does (list, SYNCED, watch with bookmarks, reopen
where a closed stream stopped, list again after 410 Gone and report the difference, retry
dropped connections with backoff). This module turns what it sees into config events. Objects
that do not parse (written around istioctl, with kubectl say) are logged with kind,
namespace/name and problem, and skipped; a reader keeps the last good version of an object that
turns bad.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Any

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
from istio.kube import ApiError, ClusterAccess, KubeClient, KubeError, Resource, WatchEvent
from istio.kube import EventType as WatchEventType
from istio.kube import access as kube_access

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Where the pod's service account is looked for when there is no kubeconfig.
SERVICE_ACCOUNT_DIR = kube_access.SERVICE_ACCOUNT_DIR
UPDATE_ATTEMPTS = 5
_KEPT_METADATA = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "resourceVersion",
    "creationTimestamp",
)


def load_cluster_access(
    kubeconfig: Path | None = None, context: str | None = None
) -> ClusterAccess:
    """Access as kubectl would find it: `kubeconfig`, else $KUBECONFIG, else ~/.kube/config,
    else the pod's service account; ConfigError says what is missing."""
    try:
        return kube_access.load_cluster_access(
            kubeconfig, context, service_account_dir=SERVICE_ACCOUNT_DIR
        )
    except KubeError as error:
        raise ConfigError(Problem(str(error))) from None


def _resource(schema: Schema) -> Resource:
    return Resource(schema.group, schema.version, schema.plural)


def _problem(key: ConfigKey, message: str) -> Problem:
    return Problem(message, kind=key.kind, name=f"{key.namespace}/{key.name}")


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
        self._kube: KubeClient | None = None

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
            obj = await self._request("GET", _resource(schema).item(namespace, name))
        except ApiError as error:
            translated = self._translate(error, schema, key)
            if isinstance(translated, NotFound):
                return None
            raise translated from None
        return self._parse(obj, schema)

    async def list(self, kind: str, namespace: str | None = None) -> builtins.list[Config]:
        schema = self._schema(kind)
        try:
            objects = await self._client().list(_resource(schema), namespace)
        except ApiError as error:
            raise self._translate(error, schema, None) from None
        except KubeError as error:
            raise ConfigError(Problem(str(error))) from None
        configs = [c for c in (self._parse_or_skip(o, schema) for o in objects.items) if c]
        return sorted(configs, key=lambda c: (c.meta.namespace, c.meta.name))

    async def create(self, config: Config) -> Config:
        check_writable(self._registry, config)
        schema = self._schema(config.meta.kind)
        body = to_object(config, with_status_fields=False)
        path = _resource(schema).collection(config.meta.namespace)
        try:
            obj = await self._request("POST", path, body)
        except ApiError as error:
            raise self._translate(error, schema, config.key) from None
        return self._parse(obj, schema)

    async def update(self, config: Config) -> Config:
        """Replace an object; with no resource_version, whatever is current (last writer wins)."""
        check_writable(self._registry, config)
        schema = self._schema(config.meta.kind)
        key, wanted = config.key, config.meta.resource_version
        path = _resource(schema).item(key.namespace, key.name)
        attempt = 1
        while True:
            body = to_object(config, with_status_fields=False)
            try:
                body["metadata"]["resourceVersion"] = wanted or await self._current_version(path)
                obj = await self._request("PUT", path, body)
            except ApiError as error:
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
            await self._request("DELETE", _resource(schema).item(namespace, name), options)
        except ApiError as error:
            raise self._translate(error, schema, ConfigKey(schema.kind, namespace, name)) from None

    def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        schemas = (
            [self._schema(k) for k in kinds] if kinds is not None else builtins.list(self._registry)
        )
        return self._watch(schemas)

    async def close(self) -> None:
        if self._kube is not None:
            await self._kube.close()

    # -- requests --------------------------------------------------------------------------------

    def _schema(self, kind: str) -> Schema:
        schema = self._registry.by_kind(known_kind(self._registry, kind))
        assert schema is not None
        return schema

    def _client(self) -> KubeClient:
        if self._kube is None:
            self._kube = KubeClient(self.access, user_agent="istio-configstore")
        return self._kube

    async def _request(self, method: str, path: str, body: JSON | None = None) -> JSON:
        """One request; ApiError for the caller to translate, ConfigError for the rest."""
        try:
            return await self._client().request(method, path, body)
        except ApiError:
            raise
        except KubeError as error:
            raise ConfigError(Problem(str(error))) from None

    def _translate(self, error: ApiError, schema: Schema, key: ConfigKey | None) -> ConfigError:
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

    # -- watching --------------------------------------------------------------------------------

    async def _watch(self, schemas: builtins.list[Schema]) -> AsyncIterator[ConfigEvent]:
        by_resource = {_resource(s): s for s in schemas}
        reported: dict[ConfigKey, Config] = {}
        try:
            async with contextlib.aclosing(
                self._client().watch(builtins.list(by_resource))
            ) as events:
                async for event in events:
                    if event.type is WatchEventType.SYNCED:
                        yield ConfigEvent(EventType.SYNCED)
                    elif event.resource is not None and event.object is not None:
                        schema = by_resource[event.resource]
                        for config_event in self._apply(schema, reported, event):
                            yield config_event
        except ApiError as error:
            failed = by_resource.get(error.resource) if error.resource else None
            raise self._translate(error, failed or schemas[0], None) from None
        except KubeError as error:
            raise ConfigError(Problem(str(error))) from None

    def _apply(
        self, schema: Schema, reported: dict[ConfigKey, Config], event: WatchEvent
    ) -> builtins.list[ConfigEvent]:
        """The config events a watch event means for a reader holding `reported`; updates it."""
        assert event.object is not None
        key = _key_of(event.object, schema)
        if event.type is WatchEventType.DELETED:
            gone = reported.pop(key, None)
            return [ConfigEvent(EventType.DELETED, gone)] if gone is not None else []
        config = self._parse_or_skip(event.object, schema)
        if config is None:
            return []
        before = reported.get(key)
        if before is not None and before.meta.resource_version == config.meta.resource_version:
            return []
        reported[key] = config
        return [ConfigEvent(EventType.UPDATED if before else EventType.ADDED, config)]


def _key_of(obj: Mapping[str, Any], schema: Schema) -> ConfigKey:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return ConfigKey(
        schema.kind, str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta.get("name") or "")
    )
