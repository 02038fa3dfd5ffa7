"""A real `mixs server` for tests, on loopback, reading its config from a directory."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class MixerServer:
    address: str  # gRPC host:port, what a proxy's Mixer filter names
    metrics_url: str  # the prometheus adapter's /metrics


@contextlib.asynccontextmanager
async def serve(config_dir: Path, host: str = "127.0.0.1") -> AsyncIterator[MixerServer]:
    """`mixs server` over the `file://` store at `config_dir`, once its first config is in
    force; terminated on exit."""
    port, prometheus = free_port(host), free_port(host)
    process = await asyncio.create_subprocess_exec(
        str(BIN / "mixs"),
        "server",
        "--config-store",
        f"file://{config_dir}",
        "--grpc-addr",
        f"{host}:{port}",
        "--monitoring-addr",
        f"{host}:{free_port(host)}",
        "--prometheus-addr",
        f"{host}:{prometheus}",
        stdout=asyncio.subprocess.DEVNULL,  # the stdio adapter's access log
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        seen: list[bytes] = []
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), STARTUP_TIMEOUT)
            seen.append(line)
            if not line:
                raise RuntimeError("mixs exited:\n" + b"".join(seen).decode(errors="replace"))
            if b"config generation 1 in force" in line:
                break
        # Keep reading its log so that a chatty server never blocks on a full pipe.
        drain = asyncio.get_running_loop().create_task(_drain(process.stderr))
        try:
            yield MixerServer(f"{host}:{port}", f"http://{host}:{prometheus}/metrics")
        finally:
            drain.cancel()
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
