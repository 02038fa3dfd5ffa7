"""One entry point for every Bookinfo app, so a platform starts them all the same way.

    python -m istio.bookinfo SERVICE [--version v1|v2|v3] --host HOST --port PORT

Peers are reached as http://details:9080, http://reviews:9080 and http://ratings:9080 (hosts
from DETAILS_HOSTNAME, REVIEWS_HOSTNAME, RATINGS_HOSTNAME; ports from DETAILS_PORT, ...),
through HTTP_PROXY when it is set. SIGTERM or SIGINT stops the app cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from istio.bookinfo import SERVICES, details, productpage, ratings, reviews
from istio.bookinfo.common import DEFAULT_PORT, SERVICE_NAME

log = logging.getLogger("istio.bookinfo")
VERSIONS = ("v1", "v2", "v3")


def make_app(service: str, version: str) -> web.Application:
    if service == "productpage":
        return productpage.make_app(version)
    if service == "details":
        return details.make_app(version)
    if service == "reviews":
        return reviews.make_app(version)
    if service == "ratings":
        return ratings.make_app(version)
    raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")


async def serve(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            log.info("%s listening on http://%s:%s", app[SERVICE_NAME], address[0], address[1])
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


async def run(service: str, version: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(make_app(service, version), host, port, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m istio.bookinfo", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--version", choices=VERSIONS, default="v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run(options.service, options.version, options.host, options.port))
    except OSError as error:  # most often: the port is taken
        log.error("cannot serve on %s:%d: %s", options.host, options.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
