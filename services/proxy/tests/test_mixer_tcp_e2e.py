"""Mixer's TCP telemetry end to end: mixs with 0.2's default telemetry (install/mixer),
pilot-discovery with a mesh config naming it and a ServiceEntry for a TCP port, and the
sidecar (pilot-agent, INTERCEPTION_MODE=NONE) in front of an echo server. Bytes through the
sidecar's inbound TCP listener show up in mixs's tcp_bytes_received and tcp_bytes_sent for
the destination service Pilot named."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from istio.testing import mixer as mixer_server
from istio.testing.net import free_port

BIN = Path(sys.executable).parent
INSTALL = Path(__file__).resolve().parents[3] / "install" / "mixer"
PROXY_IP, APP_IP = "127.0.0.77", "127.0.0.78"
SERVICE = "echo.default.svc.cluster.local"
ENTRY = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [{service}]
  ports: [{{number: {port}, name: tcp-echo, protocol: TCP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {ip}, ports: {{tcp-echo: {port}}}, labels: {{app: echo, version: v1}}}}
"""
REPORT_WAIT = 20.0  # Reports are batched for up to a second; mixs counts them at once


async def spawn(
    processes: list[asyncio.subprocess.Process], marker: str, *argv: str | Path
) -> None:
    """Start a process and wait for `marker` on its stderr (then keep draining it)."""
    process = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    processes.append(process)
    stream = process.stderr
    assert stream is not None
    seen = []
    while True:
        line = await asyncio.wait_for(stream.readline(), 60)
        seen.append(line.decode(errors="replace"))
        assert line, f"{argv[0]} exited before {marker!r}:\n{''.join(seen)}"
        if marker.encode() in line:
            break

    async def drain() -> None:
        while await stream.readline():
            pass

    asyncio.get_running_loop().create_task(drain())  # ends with the process's stderr


@pytest.fixture
async def echo_backend() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data + b" echoed")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, APP_IP, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def tcp_bytes(metrics_url: str, metric: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as answer:
        text = await answer.text()
    pattern = re.compile(rf'^{metric}(?:_total)?\{{[^}}]*destination_service="{SERVICE}"')
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if pattern.match(line))


async def test_tcp_bytes_reach_the_default_telemetry(tmp_path: Path, echo_backend: int) -> None:
    mixer_config, registry, config = tmp_path / "mixer", tmp_path / "registry", tmp_path / "config"
    for directory in (mixer_config, registry, config):
        directory.mkdir()
    for name in ("attributes.yaml", "telemetry.yaml"):
        shutil.copy(INSTALL / name, mixer_config / name)
    port = free_port(PROXY_IP)
    (registry / "echo.yaml").write_text(ENTRY.format(service=SERVICE, port=port, ip=PROXY_IP))
    processes: list[asyncio.subprocess.Process] = []
    async with mixer_server.serve(mixer_config) as mixer:
        (tmp_path / "mesh.yaml").write_text(f"mixerAddress: {mixer.address}\n")
        grpc_port = free_port()
        try:
            await spawn(
                processes,
                "serving xDS",
                BIN / "pilot-discovery",
                "--registry",
                f"file:{registry}",
                "--config-store",
                f"file://{config}",
                "--mesh-config",
                tmp_path / "mesh.yaml",
                "--grpc-addr",
                f"127.0.0.1:{grpc_port}",
                "--http-addr",
                f"127.0.0.1:{free_port()}",
            )
            await spawn(
                processes,
                "proxy ready",
                BIN / "pilot-agent",
                "proxy",
                "sidecar",
                "--discovery-address",
                f"127.0.0.1:{grpc_port}",
                "--node-id",
                f"sidecar~{PROXY_IP}~echo-v1.default~default.svc.cluster.local",
                "--bind-address",
                PROXY_IP,
                "--admin-port",
                str(free_port(PROXY_IP)),
                "--stats-port",
                str(free_port(PROXY_IP)),
                "--access-log",
                "off",
                "--meta",
                "INTERCEPTION_MODE=NONE",
                "--meta",
                f"APP_PORTS={port}:{echo_backend}",
                "--meta",
                f"APP_HOST={APP_IP}",
            )
            payload = b"through the sidecar " * 500
            reader, writer = await asyncio.open_connection(PROXY_IP, port)
            writer.write(payload)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == payload + b" echoed"
            writer.close()
            deadline = time.monotonic() + REPORT_WAIT
            while await tcp_bytes(mixer.metrics_url, "tcp_bytes_received") < len(payload):
                assert time.monotonic() < deadline, "no tcp_bytes_received from the sidecar"
                await asyncio.sleep(0.2)  # polling another process's metrics: no event here
            assert await tcp_bytes(mixer.metrics_url, "tcp_bytes_received") == len(payload)
            assert await tcp_bytes(mixer.metrics_url, "tcp_bytes_sent") == len(payload) + 7
        finally:
            for process in reversed(processes):
                if process.returncode is None:
                    process.terminate()
                    await process.wait()
