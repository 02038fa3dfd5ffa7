"""End to end as the local platform runs it: pilot-discovery with ServiceEntry files and a file
config store, reviews v1 and v2 as aiohttp workloads on their own loopback addresses, the
sidecar (pilot-agent, INTERCEPTION_MODE=NONE) on 127.0.0.40, and real curl in front."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
PROXY_IP = "127.0.0.40"
V1, V2 = "127.0.0.41", "127.0.0.42"
RULE = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {{name: {name}}}
spec:
  destination: {{name: reviews}}
  precedence: {precedence}
{body}
"""


async def workload(host: str, port: int, name: str) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.Response(text=f"{name} {request.path} {size}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


@dataclass
class Mesh:
    tmp: Path
    grpc_port: int
    pilot: asyncio.subprocess.Process | None = None
    agent: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None

    def apply(self, name: str, precedence: int, body: str) -> None:
        text = RULE.format(name=name, precedence=precedence, body=body)
        (self.tmp / "config" / f"{name}.yaml").write_text(text)

    async def start(self) -> None:
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
        await self._wait_for(self.pilot, b"serving xDS")
        self.agent = await asyncio.create_subprocess_exec(
            str(BIN / "pilot-agent"),
            "proxy",
            "sidecar",
            "--discovery-address",
            f"127.0.0.1:{self.grpc_port}",
            "--bind-address",
            PROXY_IP,
            "--meta",
            "INTERCEPTION_MODE=NONE",
            "--access-log",
            str(self.tmp / "access.log"),
            stderr=asyncio.subprocess.PIPE,
        )
        await self._wait_for(self.agent, b"proxy ready")

    async def _wait_for(self, process: asyncio.subprocess.Process, marker: bytes) -> None:
        assert process.stderr is not None
        while marker not in (line := await asyncio.wait_for(process.stderr.readline(), 30)):
            assert line, f"exited before {marker!r}"
        stream = process.stderr

        async def drain() -> None:
            while await stream.readline():
                pass

        asyncio.get_running_loop().create_task(drain())

    async def stop_pilot(self) -> None:
        if self.pilot is not None and self.pilot.returncode is None:
            self.pilot.terminate()
            await self.pilot.wait()

    async def stop(self) -> None:
        await self.stop_pilot()
        if self.agent is not None and self.agent.returncode is None:
            self.agent.terminate()
            assert await self.agent.wait() == 0


async def curl(*args: str) -> tuple[str, str]:
    """curl's stdout and stderr."""
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: run `make setup` as root")
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return out.decode(), err.decode()


async def names(count: int, *args: str) -> Counter[str]:
    """`count` requests for reviews on one keep-alive connection; the answering versions."""
    urls = [f"http://{PROXY_IP}:15001/r{i}" for i in range(count)]
    out, _ = await curl("-H", "Host: reviews:9080", *args, "-w", "\\n", *urls)
    return Counter(line.split()[0] for line in out.splitlines() if line)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    port = free_port(V1)
    v1 = await workload(V1, port, "v1")
    v2 = await workload(V2, port, "v2")
    (tmp_path / "registry").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "registry" / "reviews.yaml").write_text(
        f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {V1}, ports: {{http: {port}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: {V2}, ports: {{http: {port}}}, labels: {{app: reviews, version: v2}}}}
"""
    )
    mesh = Mesh(tmp_path, free_port())
    try:
        yield mesh
    finally:
        await mesh.stop()
        await v1.cleanup()
        await v2.cleanup()


async def test_default_route_by_host_and_as_explicit_proxy(mesh: Mesh) -> None:
    await mesh.start()
    assert set(await names(20)) == {"v1", "v2"}
    out, _ = await curl("--proxy", f"http://{PROXY_IP}:15001", "http://reviews:9080/p")
    assert out.split()[:2] in (["v1", "/p"], ["v2", "/p"])
    dump, _ = await curl(f"http://{PROXY_IP}:15000/config_dump")
    listeners = json.loads(dump)["configs"][2]["dynamic_listeners"]
    assert {"virtualOutbound", "0.0.0.0_9080"} <= {entry["name"] for entry in listeners}
    metrics, _ = await curl(f"http://{PROXY_IP}:15090/stats/prometheus")
    assert (
        'envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="outbound_9080",'
        'envoy_response_code_class="2"} 21' in metrics
    )
    await mesh.stop()
    log = [json.loads(line) for line in (mesh.tmp / "access.log").read_text().splitlines()]
    assert len(log) == 21
    assert all(entry["request_id"] for entry in log)


async def test_connect_tunnels_to_mesh_hosts_only(mesh: Mesh) -> None:
    await mesh.start()
    # curl asks for a tunnel (CONNECT reviews:9080), then speaks HTTP through it to the
    # workload itself: bytes the proxy passes on without reading them.
    proxy = ("--proxytunnel", "--proxy", f"http://{PROXY_IP}:15001")
    out, err = await curl(*proxy, "http://reviews:9080/tunnelled")
    assert out.split()[:2] in (["v1", "/tunnelled"], ["v2", "/tunnelled"]), err
    out, err = await curl(*proxy, "http://nowhere.example.test:9080/")
    assert "CONNECT tunnel failed, response 404" in err, (out, err)
    await mesh.stop()
    log = [json.loads(line) for line in (mesh.tmp / "access.log").read_text().splitlines()]
    assert [(e["method"], e["response_code"], e["authority"]) for e in log] == [
        ("CONNECT", 200, "reviews:9080"),
        ("CONNECT", 404, "nowhere.example.test:9080"),
    ]
    assert log[0]["bytes_received"] > 0
    assert log[0]["bytes_sent"] > 0


async def test_weighted_split_header_match_and_fault_abort(mesh: Mesh) -> None:
    mesh.apply(
        "split",
        1,
        "  route:\n  - {labels: {version: v1}, weight: 75}\n"
        "  - {labels: {version: v2}, weight: 25}",
    )
    mesh.apply(
        "jason",
        2,
        "  match: {request: {headers: {x-user: {exact: jason}}}}\n"
        "  route:\n  - labels: {version: v2}",
    )
    mesh.apply(
        "abort",
        3,
        "  match: {request: {headers: {x-user: {exact: bob}}}}\n"
        "  httpFault: {abort: {percent: 100, httpStatus: 418}}",
    )
    await mesh.start()
    split = await names(200)
    assert split["v1"] + split["v2"] == 200, split
    assert 120 <= split["v1"] <= 180, split
    assert await names(20, "-H", "x-user: jason") == Counter({"v2": 20})
    out, _ = await curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: reviews:9080",
        "-H",
        "x-user: bob",
        f"http://{PROXY_IP}:15001/",
    )
    assert out == "418"


async def test_rule_change_applies_while_running_and_pilot_loss_is_survived(mesh: Mesh) -> None:
    mesh.apply("pin", 1, "  route:\n  - labels: {version: v1}")
    await mesh.start()
    assert await names(10) == Counter({"v1": 10})
    mesh.apply("pin", 1, "  route:\n  - labels: {version: v2}")
    seen: Counter[str] = Counter()
    for _ in range(200):  # each round is real requests; the push lands within a few rounds
        seen = await names(5)
        if seen == Counter({"v2": 5}):
            break
    assert seen == Counter({"v2": 5})
    await mesh.stop_pilot()
    assert await names(10) == Counter({"v2": 10})  # the last good config keeps serving


async def test_keep_alive_chunked_upload_and_smuggling(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start()
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * 3_000_000)
    url = f"http://{PROXY_IP}:15001/up"
    out, err = await curl(
        "-v",
        "-H",
        "Host: reviews:9080",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{upload}",
        url,
        "-w",
        "\\n",
        url,
    )
    first, second = out.splitlines()
    assert first.split()[1:] == ["/up", "3000000"]
    assert second.split()[1:] == ["/up", "3000000"]
    assert "Re-using existing connection" in err or "Reusing existing connection" in err
    bystander = await asyncio.open_connection(PROXY_IP, 15001)
    attacker = await asyncio.open_connection(PROXY_IP, 15001)
    attacker[1].write(
        b"POST / HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
    )
    reply = await asyncio.wait_for(attacker[0].read(), 10)  # to EOF: the proxy closed it
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"/smuggled" not in reply
    bystander[1].write(b"GET /fine HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
    status = await asyncio.wait_for(bystander[0].readline(), 10)
    assert status.startswith(b"HTTP/1.1 200 ")
    for _, writer in (bystander, attacker):
        writer.close()
        await writer.wait_closed()
