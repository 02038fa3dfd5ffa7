"""etcd v3 as a config store (`etcd://host:port/prefix`).

Theory of operation. Each object is one key, `<prefix>/<group>/<version>/<plural>/<namespace>/
<name>`, whose value is the object's JSON document (as `istioctl get -o json` prints it) with
its creationTimestamp and without a resourceVersion: the resource version is the key's
mod_revision, so etcd's transactions give optimistic concurrency. Create commits only while the
key's create_revision is 0; update and delete read the key and commit only while its
mod_revision is still the one read (and the caller's, when given).

A watch reads the whole prefix in one request (one revision), opens an etcd watch from the next
revision, and only then reports what it read, so no change is lost or reported twice and the
events follow etcd's single revision order. Values that are not valid objects (written by hand
with etcdctl, say) are logged with their key and skipped by list and watch (they never end a
watch); get reports them as a ConfigError naming the key, and update replaces them.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import aetcd

from istio.config import (
    DEFAULT_REGISTRY,
    AlreadyExists,
    Config,
    ConfigError,
    ConfigKey,
    Conflict,
    NotFound,
    Problem,
    SchemaRegistry,
    parse_object,
    to_object,
)
from istio.config.model import DEFAULT_NAMESPACE
from istio.configstore.store import ConfigEvent, EventType, check_writable, known_kind

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
# A listing or a watch's first read returns every object in one response.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class _KeyValue(Protocol):
    """What this store reads of an etcd key-value (aetcd's KeyValue and Get have it)."""

    key: bytes
    value: bytes
    mod_revision: int


class EtcdStore:
    def __init__(
        self,
        host: str,
        port: int = 2379,
        *,
        prefix: str = "/istio/config",
        registry: SchemaRegistry = DEFAULT_REGISTRY,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        self._registry = registry
        self._timeout = timeout
        self._kinds_by_path = {(s.group, s.version, s.plural): s.kind for s in registry}
        self._client: aetcd.Client | None = None
        self._closed = False

    @property
    def registry(self) -> SchemaRegistry:
        return self._registry

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def key(self, kind: str, namespace: str, name: str) -> str:
        """The etcd key of an object: `<prefix>/<group>/<version>/<plural>/<namespace>/<name>`."""
        return f"{self._kind_prefix(kind)}{namespace}/{name}"

    async def get(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> Config | None:
        key = self.key(kind, namespace, name).encode()
        client = self._etcd()
        with self._reaching_etcd():
            found = await client.get(key)
        # A value that is not an object is an error here, not a miss: create would refuse it.
        return None if found is None else self._decode(found)

    async def list(self, kind: str, namespace: str | None = None) -> builtins.list[Config]:
        prefix = self._kind_prefix(kind) + (f"{namespace}/" if namespace is not None else "")
        client = self._etcd()
        with self._reaching_etcd():
            found = await client.get_prefix(prefix.encode())
        configs = [config for kv in found if (config := self._decode_or_skip(kv)) is not None]
        return sorted(configs, key=lambda c: (c.meta.namespace, c.meta.name))

    async def create(self, config: Config) -> Config:
        check_writable(self._registry, config)
        key = self.key(*config.key).encode()
        stored = config.with_meta(resource_version="", creation_timestamp=_now())
        client = self._etcd()
        revision = await self._put_if(client.transactions.create(key) == 0, key, _encode(stored))
        if revision is None:
            raise AlreadyExists(_problem(config.key, "already exists"))
        return stored.with_meta(resource_version=revision)

    async def update(self, config: Config) -> Config:
        check_writable(self._registry, config)
        key = self.key(*config.key).encode()
        client = self._etcd()
        while True:
            current = await self._current(key, config.key, config.meta.resource_version)
            try:
                created = self._decode(current).meta.creation_timestamp or _now()
            except ConfigError:
                created = _now()  # replacing a value that was not an object repairs it
            stored = config.with_meta(resource_version="", creation_timestamp=created)
            revision = await self._put_if(
                client.transactions.mod(key) == current.mod_revision, key, _encode(stored)
            )
            if revision is not None:
                return stored.with_meta(resource_version=revision)
            # Changed between the read and the write: read again (NotFound or Conflict, or retry
            # when the caller asked for no particular version).

    async def delete(
        self,
        kind: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        resource_version: str = "",
    ) -> None:
        key = self.key(kind, namespace, name).encode()
        client = self._etcd()
        while True:
            current = await self._current(key, ConfigKey(kind, namespace, name), resource_version)
            with self._reaching_etcd():
                succeeded, _ = await client.transaction(
                    compare=[client.transactions.mod(key) == current.mod_revision],
                    success=[client.transactions.delete(key)],
                    failure=[],
                )
            if succeeded:
                return

    async def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        wanted = None if kinds is None else {known_kind(self._registry, k) for k in kinds}
        root = f"{self.prefix}/".encode()
        client = self._etcd()
        with self._reaching_etcd():
            snapshot = await client.get_prefix(root)
            changes = await client.watch_prefix(root, start_revision=snapshot.header.revision + 1)
        # Last seen object per key: tells ADDED from UPDATED, and is what DELETED reports.
        seen: dict[bytes, Config] = {}
        # Started only once read: an async generator never started needs no closing.
        stream: AsyncGenerator[Any, None] | None = None
        try:
            for kv in snapshot:
                if not self._is_wanted(kv.key, wanted):
                    continue
                config = self._decode_or_skip(kv)
                if config is not None:
                    seen[kv.key] = config
                    yield ConfigEvent(EventType.ADDED, config)
            yield ConfigEvent(EventType.SYNCED)
            stream = aiter(changes)
            while True:
                try:
                    with self._reaching_etcd():
                        change = await anext(stream)
                except StopAsyncIteration:
                    return  # the store was closed
                key = change.kv.key
                if not self._is_wanted(key, wanted):
                    continue
                if change.kind == aetcd.EventKind.DELETE:
                    if key in seen:
                        yield ConfigEvent(EventType.DELETED, seen.pop(key))
                    continue
                config = self._decode_or_skip(change.kv)
                if config is not None:
                    event_type = EventType.UPDATED if key in seen else EventType.ADDED
                    seen[key] = config
                    yield ConfigEvent(event_type, config)
        finally:
            if stream is not None:
                await stream.aclose()
            if self._client is client:
                await changes.cancel()

    async def close(self) -> None:
        """Close the connection; watches end, and later calls raise ConfigError."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- internals ------------------------------------------------------------------------

    def _etcd(self) -> aetcd.Client:
        """The client, made on first use (it connects when the first request is sent)."""
        if self._closed:
            raise ConfigError(Problem(f"the etcd store at {self.address} is closed"))
        if self._client is None:
            self._client = aetcd.Client(
                host=f"[{self.host}]" if ":" in self.host else self.host,
                port=self.port,
                timeout=self._timeout,
                options={"grpc.max_receive_message_length": MAX_RESPONSE_BYTES},
            )
        return self._client

    @contextlib.contextmanager
    def _reaching_etcd(self) -> Iterator[None]:
        try:
            yield
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as error:
            raise ConfigError(
                Problem(
                    f"cannot reach etcd at {self.address} ({error}); check that etcd is running "
                    "there and that the store URL names it"
                )
            ) from error
        except aetcd.ClientError as error:
            raise ConfigError(Problem(f"etcd at {self.address} failed: {error}")) from error

    async def _current(self, key: bytes, config_key: ConfigKey, resource_version: str) -> Any:
        """The stored key-value; NotFound when missing, Conflict when not `resource_version`."""
        client = self._etcd()
        with self._reaching_etcd():
            current = await client.get(key)
        if current is None:
            raise NotFound(_problem(config_key, "not found"))
        if resource_version and resource_version != str(current.mod_revision):
            raise Conflict(
                _problem(
                    config_key,
                    f"changed since it was read (resource version {resource_version} is stale, "
                    f"current is {current.mod_revision}); get it and try again",
                )
            )
        return current

    async def _put_if(self, compare: Any, key: bytes, value: bytes) -> str | None:
        """Put `value` at `key` if `compare` holds: the new resource version, or None."""
        client = self._etcd()
        with self._reaching_etcd():
            succeeded, responses = await client.transaction(
                compare=[compare], success=[client.transactions.put(key, value)], failure=[]
            )
        return str(responses[0].response_put.header.revision) if succeeded else None

    def _kind_prefix(self, kind: str) -> str:
        schema = self._registry.by_kind(known_kind(self._registry, kind))
        assert schema is not None
        return f"{self.prefix}/{schema.group}/{schema.version}/{schema.plural}/"

    def _identity(self, key: bytes) -> ConfigKey | None:
        """The object a key names, or None when the key is not laid out as this store's are."""
        try:
            relative = key.decode().removeprefix(f"{self.prefix}/")
        except UnicodeDecodeError:
            return None
        parts = relative.split("/")
        if len(parts) != 5:
            return None
        group, version, plural, namespace, name = parts
        kind = self._kinds_by_path.get((group, version, plural))
        return ConfigKey(kind, namespace, name) if kind else None

    def _is_wanted(self, key: bytes, kinds: set[str] | None) -> bool:
        if kinds is None:
            return True
        identity = self._identity(key)
        # Keys of no known kind are reported (as skipped) by the watches of every kind alone.
        return identity is not None and identity.kind in kinds

    def _decode(self, kv: _KeyValue) -> Config:
        """The object stored in `kv`; ConfigError naming the key when it holds none."""
        location = kv.key.decode(errors="replace")
        expected = self._identity(kv.key)
        if expected is None:
            raise ConfigError(
                Problem(
                    f"not a config key: expected {self.prefix}/<group>/<version>/<plural>/"
                    "<namespace>/<name> of a known kind",
                    source=location,
                )
            )
        try:
            document = json.loads(kv.value)
        except ValueError as error:
            raise ConfigError(Problem(f"value is not JSON: {error}", source=location)) from None
        try:
            config = parse_object(document, registry=self._registry, namespace=expected.namespace)
        except ConfigError as error:
            raise ConfigError(p.located(source=location) for p in error.problems) from None
        if config.key != expected:
            raise ConfigError(
                Problem(f"value holds {config.key}, not the key's {expected}", source=location)
            )
        return config.with_meta(resource_version=str(kv.mod_revision))

    def _decode_or_skip(self, kv: _KeyValue) -> Config | None:
        try:
            return self._decode(kv)
        except ConfigError as error:
            log.warning("skipping etcd key %s: %s", kv.key.decode(errors="replace"), error)
            return None


def _encode(config: Config) -> bytes:
    # With resource_version empty, the only status field to_object writes is creationTimestamp.
    return json.dumps(to_object(config.with_meta(resource_version=""))).encode()


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _problem(key: ConfigKey, message: str) -> Problem:
    return Problem(message, kind=key.kind, name=f"{key.namespace}/{key.name}")
