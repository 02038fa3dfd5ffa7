"""The e2e test app in-process: what it echoes, and /call without a sidecar (no HTTP_PROXY)."""

from __future__ import annotations

import asyncio
import os
from unittest import mock

import aiohttp
from aiohttp.test_utils import TestServer

from istio.platform.echo import make_app


async def _exchange() -> tuple[dict[str, object], dict[str, object], int]:
    with mock.patch.dict(os.environ, {"HTTP_PROXY": "", "http_proxy": ""}):
        async with (
            TestServer(make_app("b"), host="127.0.0.1") as b,
            TestServer(make_app("a", "v2"), host="127.0.0.1") as a,
            aiohttp.ClientSession() as session,
        ):
            echoed = await (await session.get(b.make_url("/x?y=1"))).json()
            url = a.make_url("/call").with_query(
                [("url", str(b.make_url("/hi"))), ("header", "x-test: 1")]
            )
            called = await (await session.get(url, headers={"x-request-id": "rid"})).json()
            bad = (await session.get(a.make_url("/call"))).status
    return echoed, called, bad


def test_echo_reports_who_and_what_and_calls_onwards() -> None:
    echoed, called, bad = asyncio.run(_exchange())
    assert (echoed["service"], echoed["version"], echoed["path"]) == ("b", "v1", "/x?y=1")
    assert (called["service"], called["version"], called["status"]) == ("a", "v2", 200)
    body = called["body"]
    assert isinstance(body, dict)
    assert body["path"] == "/hi"
    assert body["headers"]["x-request-id"] == "rid"  # trace headers are forwarded
    assert body["headers"]["x-test"] == "1"
    assert bad == 400
