"""What every Bookinfo app shares: health, logging, trace headers and the outbound client."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

log = logging.getLogger("istio.bookinfo")

# The headers a request carries through the mesh so a trace joins up (as the original apps did).
TRACE_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
)
DEFAULT_PORT = 9080
# Each app answers with the workload it is, e.g. "reviews-v2"; productpage shows it.
VERSION_HEADER = "X-Bookinfo-Version"

SERVICE_NAME: web.AppKey[str] = web.AppKey("service_name", str)
CLIENT: web.AppKey[aiohttp.ClientSession] = web.AppKey("client", aiohttp.ClientSession)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def service_url(name: str, environ: Mapping[str, str] | None = None) -> str:
    """A peer's base URL: http://NAME:9080, host from NAME_HOSTNAME and port from NAME_PORT."""
    env = os.environ if environ is None else environ
    host = env.get(f"{name.upper()}_HOSTNAME") or name
    port = env.get(f"{name.upper()}_PORT") or str(DEFAULT_PORT)
    return f"http://{host}:{port}"


def forward_headers(request: web.Request, *, user: bool = True) -> dict[str, str]:
    """The trace headers of `request`, and its user alone as `Cookie: user=<name>`."""
    headers = {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
    name = request.cookies.get("user")
    if user and name:
        headers["Cookie"] = f"user={name}"
    return headers


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request, with its x-request-id, whatever the outcome."""
    start = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        log.info(
            "%s %s %s %d %.1fms x-request-id=%s",
            request.app[SERVICE_NAME],
            request.method,
            request.path_qs,
            status,
            (time.monotonic() - start) * 1000,
            request.headers.get("x-request-id", "-"),
        )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": f"{request.app[SERVICE_NAME]} is healthy"})


def base_app(service: str, version: str) -> web.Application:
    """An app with logging, /health, the version header and an outbound client session."""
    workload = f"{service}-{version}"
    app = web.Application(middlewares=[log_requests])
    app[SERVICE_NAME] = workload

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[VERSION_HEADER] = workload

    async def client(app: web.Application) -> AsyncIterator[None]:
        # trust_env: HTTP_PROXY (the sidecar) carries every outbound call, routed by Host.
        async with aiohttp.ClientSession(trust_env=True) as session:
            app[CLIENT] = session
            yield

    app.on_response_prepare.append(stamp)
    app.cleanup_ctx.append(client)
    app.router.add_get("/health", health)
    return app


async def get_json(
    request: web.Request, url: str, *, time_limit: float
) -> tuple[int, object, str | None]:
    """GET `url` forwarding trace headers (and the user): status, JSON body, version header.

    Any failure to get an answer (refused, reset, timed out, not JSON) is status 0.
    """
    session = request.app[CLIENT]
    try:
        async with session.get(
            url,
            headers=forward_headers(request),
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as response:
            body: object = None
            if response.status == 200:
                body = await response.json(content_type=None)
            else:
                await response.read()
            return response.status, body, response.headers.get(VERSION_HEADER)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        log.warning("GET %s failed: %s", url, error or type(error).__name__)
        return 0, None, None
