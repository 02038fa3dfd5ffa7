"""The one entry point: python -m istio.bookinfo SERVICE ... serves, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

import aiohttp
import pytest

from istio.bookinfo.__main__ import main, make_app

START = 20.0  # seconds allowed for a child interpreter to start listening


async def bookinfo(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "istio.bookinfo",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def listening(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), START)).decode()
        assert line, "exited before listening"
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return found.group(1)


@pytest.mark.parametrize(
    ("service", "version", "path", "workload"),
    [
        ("ratings", "v1", "/ratings/0", "ratings-v1"),
        ("reviews", "v3", "/reviews/0", "reviews-v3"),
    ],
)
async def test_serves_and_stops_cleanly_on_sigterm(
    service: str, version: str, path: str, workload: str
) -> None:
    process = await bookinfo(service, "--version", version, "--host", "127.0.0.9", "--port", "0")
    try:
        url = await listening(process)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/health") as response:
                assert response.status == 200
                assert response.headers["X-Bookinfo-Version"] == workload
            async with client.get(url + path, headers={"x-request-id": "r-1"}) as response:
                assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        rest = (await asyncio.wait_for(process.stderr.read(), START)).decode()
        code = await process.wait()
    assert code == 0
    assert f"{workload} GET {path} 200" in rest
    assert "x-request-id=r-1" in rest
    assert "stopping" in rest
    assert "Traceback" not in rest


async def test_port_in_use_is_reported() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.9", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await bookinfo("details", "--host", "127.0.0.9", "--port", str(port))
        assert process.stderr is not None
        err = (await asyncio.wait_for(process.stderr.read(), START)).decode()
        assert await process.wait() == 1
    assert f"cannot serve on 127.0.0.9:{port}" in err


def test_unknown_service_or_version_is_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["mongodb", "--port", "0"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["reviews", "--version", "v4"])
    with pytest.raises(ValueError, match="unknown service"):
        make_app("mongodb", "v1")
