"""Bookinfo in-process: each app on its own 127.0.0.N behind a forward proxy playing sidecar.

The proxy maps the Host of each proxied request (details:9080, reviews:9080, ratings:9080) to
the app serving it, as the sidecar does from Pilot's routes, records what it forwarded, and can
refuse, fail or hold a service's requests to stand in for faults.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from istio.bookinfo import details, productpage, ratings, reviews

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "host",
}
ADDRESSES = {
    "proxy": "127.0.0.2",
    "productpage-v1": "127.0.0.3",
    "details-v1": "127.0.0.4",
    "reviews-v1": "127.0.0.5",
    "reviews-v2": "127.0.0.6",
    "reviews-v3": "127.0.0.7",
    "ratings-v1": "127.0.0.8",
}


@dataclass(frozen=True)
class Forwarded:
    host: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class SidecarProxy:
    """A forward HTTP proxy routing by Host, as the app's sidecar does."""

    routes: dict[str, str] = field(default_factory=dict)  # "reviews:9080" -> base URL
    seen: list[Forwarded] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # host -> requests to answer 503
    hold: set[str] = field(default_factory=set)  # hosts whose requests never get an answer
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def to(self, service: str) -> list[Forwarded]:
        return [f for f in self.seen if f.host == f"{service}:9080"]

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        path = request.rel_url.path_qs
        self.seen.append(Forwarded(host, path, {k.lower(): v for k, v in request.headers.items()}))
        if host in self.hold:
            await self.released.wait()
            return web.Response(status=503, text="released")
        if self.fail.get(host, 0) > 0:
            self.fail[host] -= 1
            return web.Response(status=503, text="injected failure")
        upstream = self.routes.get(host)
        if upstream is None:
            return web.Response(status=503, text="no healthy upstream")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    request.method,
                    upstream + path,
                    headers=headers,
                    data=await request.read(),
                    allow_redirects=False,
                ) as answer,
            ):
                body = await answer.read()
                back = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=answer.status, body=body, headers=back)
        except aiohttp.ClientError:
            return web.Response(status=503, text="upstream connect error")


async def start(app: web.Application | web.Server, address: str) -> tuple[str, web.BaseRunner]:
    runner: web.BaseRunner
    if isinstance(app, web.Application):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    else:
        runner = web.ServerRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, address, 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://{address}:{port}", runner


@dataclass
class Mesh:
    proxy: SidecarProxy
    urls: dict[str, str]  # workload -> its base URL
    runners: dict[str, web.BaseRunner]
    client: aiohttp.ClientSession

    @property
    def productpage(self) -> str:
        return self.urls["productpage-v1"]

    def route(self, service: str, workload: str) -> None:
        self.proxy.routes[f"{service}:9080"] = self.urls[workload]

    def unroute(self, service: str) -> None:
        del self.proxy.routes[f"{service}:9080"]

    async def stop(self, workload: str) -> None:
        await self.runners.pop(workload).cleanup()

    async def page(self, **headers: str) -> tuple[int, str]:
        async with self.client.get(
            f"{self.productpage}/productpage", headers=headers or None
        ) as response:
            return response.status, await response.text()

    async def get_json(self, url: str, **headers: str) -> tuple[int, object]:
        async with self.client.get(url, headers=headers or None) as response:
            return response.status, await response.json()


@pytest.fixture
async def mesh(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mesh]:
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "DETAILS_HOSTNAME",
        "REVIEWS_HOSTNAME",
        "RATINGS_HOSTNAME",
        "DETAILS_PORT",
        "REVIEWS_PORT",
        "RATINGS_PORT",
    ):
        monkeypatch.delenv(name, raising=False)
    proxy = SidecarProxy()
    proxy_url, proxy_runner = await start(web.Server(proxy.handle), ADDRESSES["proxy"])
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    apps = {
        "productpage-v1": productpage.make_app("v1"),
        "details-v1": details.make_app("v1"),
        "reviews-v1": reviews.make_app("v1"),
        "reviews-v2": reviews.make_app("v2"),
        "reviews-v3": reviews.make_app("v3"),
        "ratings-v1": ratings.make_app("v1"),
    }
    urls: dict[str, str] = {}
    runners: dict[str, web.BaseRunner] = {}
    client = aiohttp.ClientSession()  # straight to the apps, never through the proxy
    try:
        for workload, app in apps.items():
            urls[workload], runners[workload] = await start(app, ADDRESSES[workload])
        mesh = Mesh(proxy, urls, runners, client)
        for service in ("productpage", "details", "reviews", "ratings"):
            mesh.route(service, f"{service}-v1")
        yield mesh
    finally:
        proxy.released.set()
        await client.close()
        for runner in runners.values():
            await runner.cleanup()
        await proxy_runner.cleanup()
