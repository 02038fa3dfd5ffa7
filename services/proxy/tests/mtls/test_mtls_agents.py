"""Mutual TLS as the local platform runs it, with Pilot's real output: pilot-discovery with a
MeshConfig of authPolicy MUTUAL_TLS (strict, and with mtlsPermissive), ServiceEntry files for
two workloads, and a pilot-agent sidecar for each (uvloop, INTERCEPTION_MODE=NONE) reading its
--cert-dir. Workload a calls b by name through its sidecar; b's app sees a's SPIFFE id; a
client without a sidecar is refused on b's port when strict and served when permissive. A third
workload c whose ServiceEntry carries `auth.istio.io/9080` takes the other policy than the
mesh's, at both ends, while b keeps the mesh's."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
IPS = {"a": "127.0.3.10", "b": "127.0.3.11", "c": "127.0.3.14"}
PILOT_IP = "127.0.3.12"
SERVICE_PORT = 9080
OUTBOUND_PORT = 15001
SPIFFE = "spiffe://cluster.local/ns/default/sa/{}"


def service_entry(name: str, annotations: dict[str, str]) -> str:
    return json.dumps(
        {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": {
                "hosts": [f"{name}.default.svc.cluster.local"],
                "ports": [{"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"}],
                "resolution": "STATIC",
                "location": "MESH_INTERNAL",
                "endpoints": [
                    {
                        "address": IPS[name],
                        "ports": {"http": SERVICE_PORT},
                        "labels": {"app": name},
                        "serviceAccount": name,
                    }
                ],
            },
        }
    )


@dataclass
class Mesh:
    tmp: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    runners: list[web.AppRunner] = field(default_factory=list)
    admin: dict[str, int] = field(default_factory=dict)
    seen: list[dict[str, str]] = field(default_factory=list)

    async def start(
        self,
        mesh_ca: Any,
        *,
        permissive: bool = False,
        auth_policy: str = "MUTUAL_TLS",
        annotations: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Pilot, and a sidecar for each workload: a and b, and c when `annotations` (the
        ServiceEntries' metadata.annotations, by workload) name it."""
        annotations = annotations or {}
        names = [name for name in IPS if name != "c" or name in annotations]
        (self.tmp / "registry").mkdir()
        (self.tmp / "config").mkdir()
        for name in names:
            entry = service_entry(name, annotations.get(name, {}))
            (self.tmp / "registry" / f"{name}.json").write_text(entry)
        mesh_config = self.tmp / "mesh.yaml"
        mesh_config.write_text(
            f"authPolicy: {auth_policy}\nmtlsPermissive: {'true' if permissive else 'false'}\n"
        )
        grpc_port = free_port(PILOT_IP)
        await self.spawn(
            "serving xDS",
            BIN / "pilot-discovery",
            "--registry",
            f"file:{self.tmp / 'registry'}",
            "--config-store",
            f"file://{self.tmp / 'config'}",
            "--grpc-addr",
            f"{PILOT_IP}:{grpc_port}",
            "--http-addr",
            f"{PILOT_IP}:{free_port(PILOT_IP)}",
            "--mesh-config",
            mesh_config,
        )
        for name in names:
            ip = IPS[name]
            app_port = free_port(ip)
            await self.app(ip, app_port)
            certs = mesh_ca.write(self.tmp / "certs" / name, SPIFFE.format(name))
            self.admin[name] = free_port(ip)
            await self.spawn(
                "proxy ready",
                BIN / "pilot-agent",
                "proxy",
                "sidecar",
                "--discovery-address",
                f"{PILOT_IP}:{grpc_port}",
                "--bind-address",
                ip,
                "--node-id",
                f"sidecar~{ip}~{name}.default~default.svc.cluster.local",
                "--admin-port",
                str(self.admin[name]),
                "--stats-port",
                str(free_port(ip)),
                "--access-log",
                "off",
                "--cert-dir",
                certs,
                "--meta",
                "INTERCEPTION_MODE=NONE",
                "--meta",
                f"APP_PORTS={SERVICE_PORT}:{app_port}",
                "--meta",
                f"APP_HOST={ip}",
            )

    async def app(self, ip: str, port: int) -> None:
        async def echo(request: web.Request) -> web.Response:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.seen.append(headers)
            return web.json_response(headers)

        app = web.Application()
        app.router.add_get("/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, port).start()
        self.runners.append(runner)

    async def spawn(self, marker: str, *argv: str | Path) -> None:
        process = await asyncio.create_subprocess_exec(
            *map(str, argv), stderr=asyncio.subprocess.PIPE
        )
        self.processes.append(process)
        stream = process.stderr
        assert stream is not None
        seen = []
        while True:
            line = await asyncio.wait_for(stream.readline(), 60)
            seen.append(line.decode())
            assert line, f"{argv[0]} exited before {marker!r}:\n{''.join(seen)}"
            if marker.encode() in line:
                break

        async def drain() -> None:
            while await stream.readline():
                pass

        task = asyncio.get_running_loop().create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stats(self, name: str) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{IPS[name]}:{self.admin[name]}/stats") as response,
        ):
            return await response.text()

    async def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.terminate()
                assert await asyncio.wait_for(process.wait(), 30) == 0
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    started = Mesh(tmp_path)
    try:
        yield started
    finally:
        await started.stop()


async def get(url: str, **headers: str) -> tuple[int, str]:
    """(status, body); status 0 when the connection was refused or reset."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=15)) as answer,
        ):
            return answer.status, await answer.text()
    except aiohttp.ClientError as error:
        return 0, str(error)


@pytest.mark.parametrize("permissive", [False, True], ids=["strict", "permissive"])
async def test_sidecars_speak_mtls_from_pilots_mesh_config(
    mesh: Mesh, mesh_ca: Any, permissive: bool
) -> None:
    await mesh.start(mesh_ca, permissive=permissive)
    # a's app calls b by name through its sidecar (Host routing on the outbound listener).
    status, body = await get(f"http://{IPS['a']}:{OUTBOUND_PORT}/hello", Host=f"b:{SERVICE_PORT}")
    assert status == 200, body
    xfcc = json.loads(body)["x-forwarded-client-cert"]
    assert xfcc.startswith(f"By={SPIFFE.format('b')};Hash=")
    assert xfcc.endswith(f";URI={SPIFFE.format('a')}")
    stats = await mesh.stats("b")
    assert f"ssl.listener.{IPS['b']}_{SERVICE_PORT}.handshake: 1" in stats, stats
    assert "ssl.cluster.outbound|9080||b.default.svc.cluster.local.handshake: 1" in (
        await mesh.stats("a")
    )
    # A client without a sidecar, straight to b's port.
    mesh.seen.clear()
    status, body = await get(f"http://{IPS['b']}:{SERVICE_PORT}/direct")
    if permissive:
        assert status == 200, body
        assert "x-forwarded-client-cert" not in json.loads(body)
    else:
        assert status == 0, body
        assert mesh.seen == []
        assert f"ssl.listener.{IPS['b']}_{SERVICE_PORT}.plaintext_refused: " in (
            await mesh.stats("b")
        )


@pytest.mark.parametrize(
    ("mesh_policy", "annotated"),
    [("MUTUAL_TLS", "NONE"), ("NONE", "MUTUAL_TLS")],
    ids=["mesh-mtls-c-none", "mesh-none-c-mtls"],
)
async def test_a_service_annotation_overrides_the_mesh_policy(
    mesh: Mesh, mesh_ca: Any, mesh_policy: str, annotated: str
) -> None:
    await mesh.start(
        mesh_ca,
        auth_policy=mesh_policy,
        annotations={"c": {f"auth.istio.io/{SERVICE_PORT}": annotated}},
    )
    over_mtls = {"b": mesh_policy == "MUTUAL_TLS", "c": annotated == "MUTUAL_TLS"}
    for name, mtls in over_mtls.items():
        # a's app calls the service through a's sidecar.
        status, body = await get(
            f"http://{IPS['a']}:{OUTBOUND_PORT}/{name}", Host=f"{name}:{SERVICE_PORT}"
        )
        assert status == 200, (name, body)
        xfcc = json.loads(body).get("x-forwarded-client-cert", "")
        assert xfcc.endswith(f";URI={SPIFFE.format('a')}") if mtls else xfcc == "", (name, xfcc)
        handshake = f"ssl.cluster.outbound|9080||{name}.default.svc.cluster.local.handshake: 1"
        assert (handshake in await mesh.stats("a")) is mtls, name
        listener = f"ssl.listener.{IPS[name]}_{SERVICE_PORT}.handshake: 1"
        assert (listener in await mesh.stats(name)) is mtls, name
        # A client without a sidecar, straight to the service's port: served in plaintext
        # only where the port's policy is NONE.
        mesh.seen.clear()
        status, body = await get(f"http://{IPS[name]}:{SERVICE_PORT}/direct")
        if mtls:
            assert status == 0, (name, body)
            assert mesh.seen == []
        else:
            assert status == 200, (name, body)
            assert "x-forwarded-client-cert" not in json.loads(body)
