"""Kubernetes mode: a secret `istio.<serviceaccount>` for every service account.

Theory of operation. One watch follows service accounts and secrets in all namespaces; a ticker
adds a periodic pass. Both feed one queue, read by one loop, so reconciling never runs twice at
once. Once the watch has listed everything (SYNCED), every account and every istio secret is
reconciled; after that, each event reconciles the account it concerns, and each tick all of
them. Reconciling an account: no secret -> create it; a secret whose certificate is past the
grace point of its lifetime, unreadable, for another identity, or from another root -> replace
it; a secret whose account is gone -> delete it. Writes that lose a race (409) are left to the
next event or tick, as are failed ones (logged).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from cryptography import x509

from istio.ca import pki
from istio.ca.authority import CertificateAuthority
from istio.kube import ApiError, EventType, KubeClient, KubeError, Resource, WatchEvent, object_key
from istio.model.identity import SpiffeId

log = logging.getLogger(__name__)

SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts")
SECRETS = Resource("", "v1", "secrets")
SECRET_TYPE = "istio.io/key-and-cert"
SECRET_PREFIX = "istio."
ACCOUNT_ANNOTATION = "istio.io/service-account.name"
CERT_CHAIN, KEY, ROOT_CERT = "cert-chain.pem", "key.pem", "root-cert.pem"
DEFAULT_GRACE_RATIO = 0.5

JSON = dict[str, Any]
_TICK = object()


class SecretController:
    def __init__(
        self,
        client: KubeClient,
        authority: CertificateAuthority,
        *,
        refresh_interval: float,
        grace_ratio: float = DEFAULT_GRACE_RATIO,
    ) -> None:
        self.client = client
        self.authority = authority
        self.refresh_interval = refresh_interval
        self.grace_ratio = grace_ratio
        self.accounts: set[tuple[str, str]] = set()
        self.secrets: dict[tuple[str, str], JSON] = {}  # (namespace, account) -> istio secret
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """Until cancelled; ApiError or KubeError when the watch ends for good."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        ticker = asyncio.create_task(self._tick(queue))
        events = self.client.watch([SERVICE_ACCOUNTS, SECRETS])
        pump = asyncio.create_task(self._pump(events, queue))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _TICK:
                    if self.synced.is_set():
                        await self._reconcile_all()
                elif isinstance(item, WatchEvent):
                    await self._on_event(item)
        finally:
            for task in (ticker, pump):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await events.aclose()

    async def _pump(
        self, events: AsyncGenerator[WatchEvent, None], queue: asyncio.Queue[object]
    ) -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except (KubeError, OSError) as error:
            queue.put_nowait(error)

    async def _tick(self, queue: asyncio.Queue[object]) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            queue.put_nowait(_TICK)

    async def _on_event(self, event: WatchEvent) -> None:
        if event.type is EventType.SYNCED:
            self.synced.set()
            await self._reconcile_all()
            return
        if event.object is None:
            return
        namespace, name = object_key(event.object)
        if event.resource == SERVICE_ACCOUNTS:
            if event.type is EventType.DELETED:
                self.accounts.discard((namespace, name))
            else:
                self.accounts.add((namespace, name))
            account = name
        else:
            if event.object.get("type") != SECRET_TYPE or not name.startswith(SECRET_PREFIX):
                return
            account = name[len(SECRET_PREFIX) :]
            if event.type is EventType.DELETED:
                self.secrets.pop((namespace, account), None)
            else:
                self.secrets[(namespace, account)] = event.object
        if self.synced.is_set():
            await self._reconcile(namespace, account)

    async def _reconcile_all(self) -> None:
        for namespace, account in sorted(self.accounts | self.secrets.keys()):
            await self._reconcile(namespace, account)

    async def _reconcile(self, namespace: str, account: str) -> None:
        secret = self.secrets.get((namespace, account))
        name = SECRET_PREFIX + account
        try:
            if (namespace, account) not in self.accounts:
                if secret is not None:
                    log.info("deleting secret %s/%s: its service account is gone", namespace, name)
                    self.secrets.pop((namespace, account), None)
                    await self.client.request("DELETE", SECRETS.item(namespace, name))
                return
            identity = SpiffeId(self.authority.trust_domain, namespace, account)
            if secret is None:
                log.info("creating secret %s/%s for %s", namespace, name, identity)
                body = await self._secret(namespace, account, identity, None)
                created = await self.client.request("POST", SECRETS.collection(namespace), body)
                self.secrets[(namespace, account)] = created
                return
            why = self._stale(secret, identity)
            if why:
                log.info("re-issuing secret %s/%s: %s", namespace, name, why)
                body = await self._secret(namespace, account, identity, secret)
                replaced = await self.client.request("PUT", SECRETS.item(namespace, name), body)
                self.secrets[(namespace, account)] = replaced
        except ApiError as error:
            if error.code not in (404, 409):
                log.warning("secret %s/%s: %s; retrying later", namespace, name, error)
        except KubeError as error:
            log.warning("secret %s/%s: %s; retrying later", namespace, name, error)

    def _stale(self, secret: JSON, identity: SpiffeId) -> str:
        """Why the secret must be re-issued, or "" when it is good."""
        data = secret.get("data") or {}
        try:
            root = base64.b64decode(data.get(ROOT_CERT, ""))
            chain = x509.load_pem_x509_certificates(base64.b64decode(data.get(CERT_CHAIN, "")))
        except ValueError:
            return "its certificate cannot be read"
        if root != self.authority.root_pem:
            return "the root changed"
        cert = chain[0]
        if pki.identity_of(cert) != identity:
            return f"its certificate is not for {identity}"
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        grace = cert.not_valid_after_utc - lifetime * (1 - self.grace_ratio)
        if self.authority.clock() >= grace:
            return f"its certificate expires at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        return ""

    async def _secret(
        self, namespace: str, account: str, identity: SpiffeId, current: JSON | None
    ) -> JSON:
        key, issued = await asyncio.to_thread(self.authority.issue, identity)
        metadata: JSON = {
            "name": SECRET_PREFIX + account,
            "namespace": namespace,
            "annotations": {ACCOUNT_ANNOTATION: account},
        }
        if current is not None:
            metadata["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": SECRET_TYPE,
            "data": {
                CERT_CHAIN: _b64(issued.cert_chain_pem),
                KEY: _b64(key),
                ROOT_CERT: _b64(self.authority.root_pem),
            },
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
