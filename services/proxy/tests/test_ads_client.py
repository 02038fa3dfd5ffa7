"""The agent's ADS stream on the proxy's own HTTP/2 codec: a real pilot-discovery pushes config
to a real pilot-agent, which never imports grpcio (issue 4's 30 MB idle goal rules it out), nor,
configured and idle, protobuf or the HTTP/2 data path, and which keeps serving while Pilot is
away and picks up config again when it is back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
PROXY_IP = "127.0.0.70"
SERVICE = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: 127.0.0.71, ports: {{http: 8080}}, labels: {{app: {name}}}}}
"""
# Runs the agent as its console script does, and says at exit which of the packages the idle
# sidecar must not carry it ever imported (a JSON list): grpcio (about 10 MB), protobuf and
# Envoy's descriptors (about 6 MB: /config_dump alone loads them), the HTTP/2 data path (loaded
# by the first h2 client or http2 cluster) and the Mixer client (the first listener with Mixer).
AGENT = """
import atexit, json, sys
HEAVY = (
    "grpc", "google.protobuf", "envoy", "istio.proxy.downstream_h2", "istio.proxy.upstream_h2",
    "istio.mixerclient",
)
atexit.register(lambda: print(json.dumps(sorted(
    {h for h in HEAVY for n in sys.modules if n == h or n.startswith(h + ".")}
)), flush=True))
from istio.proxy.main import main
main(sys.argv[1:])
"""


@dataclass
class Mesh:
    tmp: Path
    grpc_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=lambda: free_port(PROXY_IP))
    pilot: asyncio.subprocess.Process | None = None
    agent: asyncio.subprocess.Process | None = None

    async def start_pilot(self) -> None:
        self.pilot = await asyncio.create_subprocess_exec(
            str(BIN / "pilot-discovery"),
            "--registry",
            f"file:{self.tmp / 'registry'}",
            "--config-store",
            f"file://{self.tmp / 'config'}",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc_port}",
            "--http-addr",
            f"127.0.0.1:{free_port()}",
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.pilot.stderr is not None
        while b"serving xDS" not in (line := await self.pilot.stderr.readline()):
            assert line, "pilot-discovery exited before serving xDS"
        asyncio.get_running_loop().create_task(_drain(self.pilot.stderr))

    async def stop_pilot(self) -> None:
        if self.pilot is not None and self.pilot.returncode is None:
            self.pilot.terminate()
            await self.pilot.wait()

    async def start_agent(self) -> None:
        self.agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            AGENT,
            "proxy",
            "sidecar",
            "--discovery-address",
            f"127.0.0.1:{self.grpc_port}",
            "--bind-address",
            PROXY_IP,
            "--admin-port",
            str(self.admin_port),
            "--stats-port",
            "0",
            "--meta",
            "INTERCEPTION_MODE=NONE",
            "--access-log",
            "off",
            stdout=asyncio.subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    async def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            request = urllib.request.Request(
                f"http://{PROXY_IP}:{self.admin_port}{path}", method=method
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        return await asyncio.to_thread(fetch)

    async def until(self, path: str, check: str, limit: float = 30.0) -> str:
        """Poll an admin page (another process's: no event to await) until its body contains
        `check`, for at most `limit` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        body = ""
        while loop.time() < deadline:
            try:
                _, body = await self.admin(path)
            except OSError:
                body = ""
            if check in body:
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never showed {check!r}; last: {body[:500]}")

    async def stop(self) -> None:
        await self.stop_pilot()
        if self.agent is not None and self.agent.returncode is None:
            self.agent.terminate()
            await self.agent.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    (tmp_path / "registry").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "registry" / "alpha.yaml").write_text(SERVICE.format(name="alpha"))
    mesh = Mesh(tmp_path)
    try:
        yield mesh
    finally:
        await mesh.stop()


def _clusters(body: str) -> set[str]:
    dump = json.loads(body)
    return {entry["name"] for entry in dump["configs"][0]["dynamic_active_clusters"]}


async def test_ads_without_grpcio_survives_pilot_restart(mesh: Mesh) -> None:
    await mesh.start_pilot()
    await mesh.start_agent()
    await mesh.until("/ready", "LIVE")
    body = await mesh.until("/config_dump", "alpha.default.svc.cluster.local")
    assert "outbound|9080||alpha.default.svc.cluster.local" in _clusters(body)
    info = json.loads(await mesh.until("/server_info", '"connected": true'))
    assert info["nacks"] == 0
    assert all(info["versions"].values()), info["versions"]

    # Pilot goes away: the proxy keeps its config and keeps serving.
    await mesh.stop_pilot()
    await mesh.until("/server_info", '"connected": false')
    assert (await mesh.admin("/ready"))[0] == 200
    assert "outbound|9080||alpha.default.svc.cluster.local" in _clusters(
        (await mesh.admin("/config_dump"))[1]
    )

    # Pilot comes back with a new service: the agent reconnects (with backoff) and gets it.
    (mesh.tmp / "registry" / "beta.yaml").write_text(SERVICE.format(name="beta"))
    await mesh.start_pilot()
    body = await mesh.until("/config_dump", "beta.default.svc.cluster.local")
    assert {
        "outbound|9080||alpha.default.svc.cluster.local",
        "outbound|9080||beta.default.svc.cluster.local",
    } <= _clusters(body)

    assert (await mesh.admin("/quitquitquit", "POST"))[0] == 200
    assert mesh.agent is not None
    assert mesh.agent.stdout is not None
    out = await asyncio.wait_for(mesh.agent.stdout.read(), 30)
    assert await mesh.agent.wait() == 0
    assert "grpc" not in json.loads(out.decode().strip().splitlines()[-1])


async def test_a_configured_idle_sidecar_imports_neither_protobuf_nor_the_http2_data_path(
    mesh: Mesh,
) -> None:
    await mesh.start_pilot()
    await mesh.start_agent()
    await mesh.until("/ready", "LIVE")
    info = json.loads(await mesh.until("/server_info", '"connected": true'))
    assert info["nacks"] == 0
    assert all(info["versions"].values()), info["versions"]
    assert (await mesh.admin("/quitquitquit", "POST"))[0] == 200
    assert mesh.agent is not None
    assert mesh.agent.stdout is not None
    out = await asyncio.wait_for(mesh.agent.stdout.read(), 30)
    assert await mesh.agent.wait() == 0
    assert json.loads(out.decode().strip().splitlines()[-1]) == []


def test_proxy_modules_import_no_grpc() -> None:
    """Every module of the proxy (but __main__, which runs it), imported together: none pulls
    in grpcio."""
    code = (
        "import importlib, pkgutil, sys, istio.proxy\n"
        "for m in pkgutil.iter_modules(istio.proxy.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('istio.proxy.' + m.name)\n"
        "from envoy.service.discovery.v3 import discovery_pb2\n"
        "print(sorted(n for n in sys.modules if n == 'grpc' or n.startswith('grpc.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
