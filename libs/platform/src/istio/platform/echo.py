"""The e2e test app (0.2's `apps/app`): an echo server a platform deploys with a sidecar.

    python -m istio.platform.echo --name a [--version v1] --host HOST --port PORT

`GET /health` answers 200. `GET /call?url=URL[&header=NAME:VALUE]...` makes the request from
inside the app, through its sidecar (HTTP_PROXY, routed by Host), forwarding the trace headers it
received plus the given ones, and answers `{"service", "version", "headers", "status", "body"}`:
who it is, what it received, and what the callee answered. Any other GET answers `{"service",
"version", "method", "path", "host", "headers"}`: who it is and what it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

log = logging.getLogger("istio.platform.echo")
TRACE_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
)
CALL_TIMEOUT = 10.0
NAME: web.AppKey[str] = web.AppKey("name", str)
VERSION: web.AppKey[str] = web.AppKey("version", str)
CLIENT: web.AppKey[aiohttp.ClientSession] = web.AppKey("client", aiohttp.ClientSession)


def _who(request: web.Request) -> dict[str, object]:
    return {
        "service": request.app[NAME],
        "version": request.app[VERSION],
        "headers": {name.lower(): value for name, value in request.headers.items()},
    }


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": f"{request.app[NAME]} is healthy"})


async def echo(request: web.Request) -> web.Response:
    answer = _who(request)
    answer.update(method=request.method, path=request.path_qs, host=request.host)
    return web.json_response(answer)


async def call(request: web.Request) -> web.Response:
    url = request.query.get("url")
    if not url:
        return web.json_response({"error": "url= is required"}, status=400)
    headers = {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
    for value in request.query.getall("header", []):
        name, colon, content = value.partition(":")
        if not colon or not name:
            return web.json_response({"error": f"header= wants NAME:VALUE: {value!r}"}, status=400)
        headers[name.strip()] = content.strip()
    answer = _who(request)
    try:
        async with request.app[CLIENT].get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)
        ) as response:
            text = await response.text(errors="replace")
            answer["status"] = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        answer["status"] = 0
        text = str(error) or type(error).__name__
    try:
        answer["body"] = json.loads(text)
    except ValueError:
        answer["body"] = text
    return web.json_response(answer)


def make_app(name: str, version: str = "v1") -> web.Application:
    app = web.Application()
    app[NAME] = name
    app[VERSION] = version

    async def client(app: web.Application) -> AsyncIterator[None]:
        # trust_env: HTTP_PROXY (the sidecar) carries every outbound call, routed by Host.
        async with aiohttp.ClientSession(trust_env=True) as session:
            app[CLIENT] = session
            yield

    app.cleanup_ctx.append(client)
    app.router.add_get("/health", health)
    app.router.add_get("/call", call)
    app.router.add_get("/{tail:.*}", echo)
    return app


async def serve(name: str, version: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(make_app(name, version), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("%s-%s listening on http://%s:%d", name, version, host, port)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m istio.platform.echo", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--name", required=True, help="the service name it reports")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(options.name, options.version, options.host, options.port))
    except OSError as error:
        log.error("cannot serve on %s:%d: %s", options.host, options.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
