"""Pilot against a real xDS client nobody here wrote: gRPC's own, in a proxyless client.

pilot-discovery runs as users run it (its console script, ServiceEntry files as the registry,
a file config store); two gRPC servers stand for grpc-echo v1 and v2 on their own loopback
addresses; the client process asks Pilot for `xds:///grpc-echo.default.svc.cluster.local:7070`
and reports each call. Whatever gRPC's client refuses (NACKs) shows up as failed calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
CLIENT = Path(__file__).with_name("grpc_xds_client.py")
TARGET = "grpc-echo.default.svc.cluster.local:7070"
NODE = "sidecar~127.0.0.50~client.default~default.svc.cluster.local"


async def echo_server(host: str, name: str) -> tuple[grpc.aio.Server, int]:
    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return name.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "echo.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
            )
        ]
    )
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port


@dataclass
class Mesh:
    config_dir: Path
    bootstrap: Path
    registry: Path
    grpc_port: int
    http_port: int
    pilot: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start pilot-discovery and wait until it serves xDS (rules applied before this are in
        the first config every client gets)."""
        self.pilot = await asyncio.create_subprocess_exec(
            str(BIN / "pilot-discovery"),
            "--registry",
            f"file:{self.registry}",
            "--config-store",
            f"file://{self.config_dir}",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc_port}",
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.pilot.stderr is not None
        while b"serving xDS" not in (
            line := await asyncio.wait_for(self.pilot.stderr.readline(), 30)
        ):
            assert line, "pilot-discovery exited before it was ready"

    async def stop(self) -> None:
        if self.pilot is not None:
            self.pilot.terminate()
            await self.pilot.wait()

    async def check_no_nacks(self) -> None:
        if self.pilot is None:
            return
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            metrics = await response.text()
        nacks = [line for line in metrics.splitlines() if line.startswith("pilot_xds_nacks_total{")]
        assert all(line.endswith(" 0.0") for line in nacks), nacks

    def apply(self, name: str, text: str) -> None:
        """Write a rule file into the config store's directory (what `istioctl create` does)."""
        (self.config_dir / f"{name}.yaml").write_text(text)

    def remove(self, name: str) -> None:
        (self.config_dir / f"{name}.yaml").unlink()

    async def client(self, calls: int, *headers: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT),
            TARGET,
            str(calls),
            *headers,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(self.bootstrap)},
        )

    async def outcomes(self, calls: int, *headers: str) -> Counter[str]:
        process = await self.client(calls, *headers)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return Counter(out.decode().split("\n")[:-1])


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    v1, v1_port = await echo_server("127.0.0.9", "v1")
    v2, v2_port = await echo_server("127.0.0.10", "v2")
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "grpc-echo.yaml").write_text(
        f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: grpc-echo}}
spec:
  hosts: [grpc-echo.default.svc.cluster.local]
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: 127.0.0.9, ports: {{grpc: {v1_port}}}, labels: {{app: grpc-echo, version: v1}}}}
  - {{address: 127.0.0.10, ports: {{grpc: {v2_port}}}, labels: {{app: grpc-echo, version: v2}}}}
"""
    )
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    grpc_port, http_port = free_port(), free_port()
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(
        json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{grpc_port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": NODE, "metadata": {"GENERATOR": "grpc"}},
            }
        )
    )
    mesh = Mesh(config_dir, bootstrap, registry, grpc_port, http_port)
    try:
        yield mesh
        await mesh.check_no_nacks()
    finally:
        await mesh.stop()
        await v1.stop(None)
        await v2.stop(None)


RULE = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {{name: {name}}}
spec:
  destination: {{name: grpc-echo}}
  precedence: {precedence}
{body}
"""


async def test_default_route_reaches_both_versions(mesh: Mesh) -> None:
    await mesh.start()
    outcomes = await mesh.outcomes(40)
    assert set(outcomes) == {"ok v1", "ok v2"}, outcomes


async def test_weighted_split(mesh: Mesh) -> None:
    mesh.apply(
        "split",
        RULE.format(
            name="split",
            precedence=1,
            body="  route:\n  - {labels: {version: v1}, weight: 75}\n"
            "  - {labels: {version: v2}, weight: 25}",
        ),
    )
    await mesh.start()
    outcomes = await mesh.outcomes(400)
    assert outcomes["ok v1"] + outcomes["ok v2"] == 400, outcomes
    assert 240 <= outcomes["ok v1"] <= 350, outcomes


async def test_header_match(mesh: Mesh) -> None:
    mesh.apply(
        "all-v1",
        RULE.format(name="all-v1", precedence=1, body="  route:\n  - labels: {version: v1}"),
    )
    mesh.apply(
        "jason-v2",
        RULE.format(
            name="jason-v2",
            precedence=2,
            body="  match: {request: {headers: {x-user: {exact: jason}}}}\n"
            "  route:\n  - labels: {version: v2}",
        ),
    )
    await mesh.start()
    assert await mesh.outcomes(30, "x-user=jason") == Counter({"ok v2": 30})
    assert await mesh.outcomes(30) == Counter({"ok v1": 30})


async def test_fault_abort(mesh: Mesh) -> None:
    mesh.apply(
        "abort",
        RULE.format(
            name="abort",
            precedence=1,
            body="  httpFault: {abort: {percent: 100, httpStatus: 503}}",
        ),
    )
    await mesh.start()
    assert await mesh.outcomes(20) == Counter({"error UNAVAILABLE": 20})


async def test_rule_change_reaches_a_running_client(mesh: Mesh) -> None:
    mesh.apply(
        "pin", RULE.format(name="pin", precedence=1, body="  route:\n  - labels: {version: v1}")
    )
    await mesh.start()
    process = await mesh.client(5000)
    assert process.stdout is not None
    seen: Counter[str] = Counter()
    try:
        while seen["ok v1"] < 20:
            seen[(await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()] += 1
        mesh.apply(
            "pin", RULE.format(name="pin", precedence=1, body="  route:\n  - labels: {version: v2}")
        )
        streak = 0
        while streak < 20:  # twenty v2 replies in a row: the change is in force
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
            assert line.startswith("ok "), line  # no call fails while the rule changes
            streak = streak + 1 if line == "ok v2" else 0
    finally:
        process.kill()
        await process.wait()
