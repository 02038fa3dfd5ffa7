"""Serving a fake's aiohttp application on loopback, shared by the Consul and Eureka fakes."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


class Listening:
    """An aiohttp application served on our own asyncio server rather than a SockSite, so that
    `close` can pause accepting. Made by `listen`."""

    __slots__ = ("listener", "port", "runner")

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, port: int) -> None:
        self.runner = runner
        self.listener = listener
        self.port = port

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        # Stop accepting, then let the connections accepted already be set up before the
        # close: asyncio 3.11 leaks a socket whose setup runs after its server closed.
        loop = asyncio.get_running_loop()
        for sock in self.listener.sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        self.listener.close()
        await self.runner.cleanup()


async def listen(
    app: web.Application,
    host: str,
    port: int = 0,
    *,
    shutdown_timeout: float,
    handler_cancellation: bool = False,
) -> Listening:
    """Serve `app` on `host`:`port`, a free port when 0; `Listening.port` is the one bound."""
    runner = web.AppRunner(
        app,
        handler_cancellation=handler_cancellation,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    handlers = runner.server
    assert handlers is not None
    listener = await asyncio.get_running_loop().create_server(handlers, sock=sock)
    return Listening(runner, listener, sock.getsockname()[1])
