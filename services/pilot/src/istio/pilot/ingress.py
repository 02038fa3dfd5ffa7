"""Kubernetes Ingress resources as IngressRules, as 0.2's ingress controller read them.

0.2 served Ingresses whose `kubernetes.io/ingress.class` annotation is `istio` (the mesh's
`ingressClass`) on the ingress gateway: each path of each rule routes to its backend service
port, matched on the rule's host (the request's authority) and the path, TLS from the
Ingress's secret (on 443, with the certificate SNI picks: istio.pilot.xds.gateways). Here
each path becomes an IngressRule config (`convert`, pure), merged with the store's
IngressRules: the gateway's routes come out the same way for both. The mesh's
`ingressControllerMode` says which Ingresses count: STRICT those with the class, DEFAULT also
those with none, OFF none. `spec.ingressClassName` (networking.k8s.io/v1) counts as the class.

Paths: `Exact` ones match exactly, `Prefix` and `ImplementationSpecific` ones as prefixes; a
path ending in `.*` (0.2's regex-looking prefixes) is the prefix before it. More specific paths
win: exact before prefix, longer before shorter, then the default backend.

`KubeIngressSource` follows the Ingresses of every namespace through istio.kube and hands
Pilot the converted configs whenever they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from istio.api.proxy.v1.config import ingress_rule_pb2, route_rule_pb2
from istio.config import Config, ConfigMeta
from istio.kube import EventType, KubeClient, Resource, load_cluster_access
from istio.pilot.registry.status import Backoff

log = logging.getLogger(__name__)

INGRESSES = Resource("networking.k8s.io", "v1", "ingresses")
CLASS_ANNOTATION = "kubernetes.io/ingress.class"
KIND = "IngressRule"
API_VERSION = "config.istio.io/v1alpha2"
# Precedence bands: exact paths over prefixes over the default backend; longer paths first.
_EXACT, _PREFIX = 2_000_000, 1_000_000
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def selected(ingress: Mapping[str, Any], mode: str, ingress_class: str) -> bool:
    """Does the mesh's ingress controller serve this Ingress (mode OFF, DEFAULT or STRICT)?"""
    if mode == "OFF":
        return False
    metadata = ingress.get("metadata") or {}
    given = (metadata.get("annotations") or {}).get(CLASS_ANNOTATION) or (
        ingress.get("spec") or {}
    ).get("ingressClassName")
    if given is None:
        return mode == "DEFAULT"
    return bool(given == ingress_class)


def convert(ingress: Mapping[str, Any]) -> tuple[list[Config], list[str]]:
    """The IngressRules for one Ingress (v1 or extensions/v1beta1 shapes), and a line per
    part that cannot be served (named by Ingress, rule and path)."""
    metadata = ingress.get("metadata") or {}
    name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace") or "default")
    spec = ingress.get("spec") or {}
    where = f"Ingress {namespace}/{name}"
    configs: list[Config] = []
    problems: list[str] = []
    secrets: dict[str, str] = {}
    for i, tls in enumerate(spec.get("tls") or ()):
        secret = str(tls.get("secretName") or "")
        if secret and not _SECRET_NAME.match(secret):
            problems.append(f"{where}: tls {i}: secret {secret!r} is not a secret's name")
            secret = ""
        for host in tls.get("hosts") or ("*",):
            secrets[host] = secret

    def add(suffix: str, backend: Mapping[str, Any], host: str, path: str, kind: str) -> None:
        target = _backend(backend)
        if isinstance(target, str):
            problems.append(f"{where}: {suffix}: {target}")
            return
        service, port = target
        rule = ingress_rule_pb2.IngressRule(
            destination=route_rule_pb2.IstioService(name=service, namespace=namespace),
            tls_secret=secrets.get(host, secrets.get("*", "")),
        )
        if isinstance(port, int):
            rule.destination_port = port
        else:
            rule.destination_port_name = port
        headers = rule.match.request.headers
        if host:
            headers["authority"].exact = host
        if kind == "Exact":
            headers["uri"].exact = path
            rule.precedence = _EXACT + min(len(path), 999_999)
        elif path and path != "/":
            headers["uri"].prefix = path
            rule.precedence = _PREFIX + min(len(path), 999_999)
        else:
            rule.precedence = _PREFIX if host else 1
        configs.append(
            Config(
                ConfigMeta(
                    kind=KIND,
                    api_version=API_VERSION,
                    name=f"{name}-{suffix}",
                    namespace=namespace,
                    labels={"istio.io/ingress": name},
                ),
                rule,
            )
        )

    default = spec.get("defaultBackend") or spec.get("backend")
    if default:
        add("default", default, "", "", "Prefix")
    for i, rule in enumerate(spec.get("rules") or ()):
        host = str(rule.get("host") or "")
        paths = ((rule.get("http") or {}).get("paths")) or ()
        if not paths:
            problems.append(f"{where}: rule {i}: no http paths")
        for j, item in enumerate(paths):
            path = str(item.get("path") or "/")
            kind = str(item.get("pathType") or "ImplementationSpecific")
            if path.endswith(".*"):  # 0.2's prefixes written as regexes
                path, kind = path[:-2] or "/", "Prefix"
            add(f"{i}-{j}", item.get("backend") or {}, host, path, kind)
    return configs, problems


def _backend(backend: Mapping[str, Any]) -> tuple[str, int | str] | str:
    """(service, port number or name) of a v1 or v1beta1 backend; else what is wrong."""
    service = backend.get("service")
    if isinstance(service, Mapping):  # networking.k8s.io/v1
        port = service.get("port") or {}
        value: Any = port.get("number") or port.get("name")
        name = service.get("name")
    else:  # extensions/v1beta1
        name, value = backend.get("serviceName"), backend.get("servicePort")
    if not name:
        return "backend names no service (resource backends are not served)"
    if isinstance(value, int) and 0 < value < 65536:
        return str(name), value
    if isinstance(value, str) and value.isdigit():
        return str(name), int(value)
    if isinstance(value, str) and value:
        return str(name), value
    return f"backend {name} has no service port"


class KubeIngressSource:
    """IngressRules from a cluster's Ingresses, for Pilot to merge with the store's."""

    def __init__(
        self,
        kubeconfig: Path | None = None,
        context: str | None = None,
        *,
        mode: str = "STRICT",
        ingress_class: str = "istio",
    ) -> None:
        self._kubeconfig = kubeconfig
        self._context = context
        self._mode = mode
        self._class = ingress_class
        self._objects: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.configs: tuple[Config, ...] = ()
        self.synced = asyncio.Event()
        self.problems: list[str] = []
        self._backoff = Backoff()

    async def run(self, changed: Callable[[], None]) -> None:
        """Follow the Ingresses until cancelled; `changed()` after every change of `configs`
        (and once at the first complete listing). Failures are retried, the last configs
        kept meanwhile."""
        failures = 0
        client: KubeClient | None = None
        try:
            while True:
                try:
                    if client is None:
                        access = load_cluster_access(self._kubeconfig, self._context)
                        client = KubeClient(access, user_agent="istio-pilot")
                    await self._follow(client, changed)
                    failures = 0
                except Exception as error:  # retried, never fatal: the last configs stay
                    failures += 1
                    log.warning("Kubernetes Ingresses: %s; keeping the last ones", error)
                await asyncio.sleep(self._backoff.delay(failures))
        finally:
            if client is not None:
                await client.close()

    async def _follow(self, client: KubeClient, changed: Callable[[], None]) -> None:
        listing: dict[tuple[str, str], Mapping[str, Any]] | None = {}
        async with contextlib.aclosing(client.watch([INGRESSES])) as events:
            async for event in events:
                target = listing if listing is not None else self._objects
                if event.type is EventType.SYNCED and listing is not None:
                    self._objects, listing = listing, None
                    self._convert()
                    self.synced.set()
                    changed()
                elif event.object is not None:
                    metadata = event.object.get("metadata") or {}
                    key = (str(metadata.get("namespace", "")), str(metadata.get("name", "")))
                    if event.type is EventType.DELETED:
                        target.pop(key, None)
                    else:
                        target[key] = event.object
                    if listing is None and self._convert():
                        changed()

    def _convert(self) -> bool:
        """Convert every selected Ingress; True when the configs changed."""
        configs: list[Config] = []
        problems: list[str] = []
        for key in sorted(self._objects):
            ingress = self._objects[key]
            if not selected(ingress, self._mode, self._class):
                continue
            found, wrong = convert(ingress)
            configs += found
            problems += wrong
        for problem in problems:
            if problem not in self.problems:
                log.warning("%s: not served", problem)
        self.problems = problems
        new = tuple(configs)
        if len(new) == len(self.configs) and all(
            a.same_content(b) and a.meta.namespace == b.meta.namespace
            for a, b in zip(new, self.configs, strict=True)
        ):
            return False
        self.configs = new
        return True
