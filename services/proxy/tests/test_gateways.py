"""The gateways end to end: pilot-discovery with ServiceEntry files and a file config store,
`pilot-agent proxy ingress` serving an IngressRule (with the destination's RouteRule behind
it, as 0.2 did) through two workers sharing its listener with SO_REUSEPORT, and
`pilot-agent proxy egress` forwarding to the one external host an EgressRule allows, the
host resolved through the proxy's --hosts-file to a server on loopback."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
INGRESS_IP = "127.0.0.43"
V1, V2 = "127.0.0.44", "127.0.0.45"
EGRESS_IP = "127.0.0.46"
EXTERNAL_IP = "127.0.0.47"  # both external hosts resolve here; only one is allowed


async def workload(host: str, port: int, name: str) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=f"{name} {request.host} {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def curl(*args: str) -> tuple[str, str]:
    """curl's stdout and the HTTP status (-w); no proxy but an explicit --proxy."""
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: run `make setup` as root")
    no_proxy = [] if "--proxy" in args else ["--noproxy", "*"]
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        *no_proxy,
        "-w",
        "\\n%{http_code}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    body, _, status = out.decode().rpartition("\n")
    return body, status


@dataclass
class Mesh:
    tmp: Path
    grpc_port: int = field(default_factory=free_port)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def pilot(self) -> None:
        await self.spawn(
            "serving xDS",
            BIN / "pilot-discovery",
            "--registry",
            f"file:{self.tmp / 'registry'}",
            "--config-store",
            f"file://{self.tmp / 'config'}",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc_port}",
            "--http-addr",
            f"127.0.0.1:{free_port()}",
        )

    async def proxy(self, kind: str, ip: str, *args: str, workers: int = 1) -> int:
        """Starts `pilot-agent proxy KIND` on `ip` with `workers` processes, and waits until
        every one of them is ready; returns the admin port."""
        admin = free_port(ip)
        await self.spawn(
            "proxy ready",
            BIN / "pilot-agent",
            "proxy",
            kind,
            "--discovery-address",
            f"127.0.0.1:{self.grpc_port}",
            "--bind-address",
            ip,
            "--admin-port",
            str(admin),
            "--stats-port",
            str(free_port(ip)),
            "--access-log",
            "off",
            "--concurrency",
            str(workers),
            *args,
            count=workers,
        )
        return admin

    async def spawn(self, marker: str, *argv: str | Path, count: int = 1) -> None:
        """Starts `argv`, waits until its stderr has said `marker` `count` times."""
        process = await asyncio.create_subprocess_exec(
            *map(str, argv), stderr=asyncio.subprocess.PIPE
        )
        self.processes.append(process)
        stream = process.stderr
        assert stream is not None
        seen = []
        while count:
            line = await asyncio.wait_for(stream.readline(), 60)
            seen.append(line.decode())
            assert line, f"{argv[0]} exited before {marker!r}:\n{''.join(seen)}"
            count -= marker.encode() in line

        async def drain() -> None:
            while await stream.readline():
                pass

        task = asyncio.get_running_loop().create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.terminate()
                assert await asyncio.wait_for(process.wait(), 30) == 0


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    (tmp_path / "registry").mkdir()
    (tmp_path / "config").mkdir()
    mesh = Mesh(tmp_path)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def test_ingress_routes_by_ingress_rule_then_route_rule_across_two_workers(
    mesh: Mesh,
) -> None:
    app_port = free_port(V1)
    runners = [await workload(V1, app_port, "v1"), await workload(V2, app_port, "v2")]
    (mesh.tmp / "registry" / "productpage.yaml").write_text(
        f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: productpage}}
spec:
  hosts: [productpage.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1}, ports: {{http: {app_port}}}, labels: {{app: productpage, version: v1}}}}
  - {{address: {V2}, ports: {{http: {app_port}}}, labels: {{app: productpage, version: v2}}}}
"""
    )
    port = free_port(INGRESS_IP)
    (mesh.tmp / "config" / "rules.yaml").write_text(
        f"""
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {{name: productpage}}
spec:
  port: {port}
  destination: {{name: productpage}}
  destinationPort: 9080
  match: {{request: {{headers: {{uri: {{prefix: /productpage}}}}}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {{name: static}}
spec:
  port: {port}
  destination: {{name: productpage}}
  destinationPortName: http
  match: {{request: {{headers: {{uri: {{prefix: /static/}}}}}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {{name: productpage-v2}}
spec:
  destination: {{name: productpage}}
  precedence: 1
  route:
  - labels: {{version: v2}}
"""
    )
    try:
        await mesh.pilot()
        admin = await mesh.proxy("ingress", INGRESS_IP, workers=2)
        base = f"http://{INGRESS_IP}:{port}"
        body, status = await curl(f"{base}/productpage")
        assert status == "200", body
        assert (body.split()[0], body.split()[2]) == ("v2", "/productpage")
        assert await curl(f"{base}/static/app.css") == (
            f"v2 {INGRESS_IP}:{port} /static/app.css",
            "200",
        )
        assert (await curl(f"{base}/reviews"))[1] == "404"  # no IngressRule matches
        # 40 connections, each a request: SO_REUSEPORT spreads them over both workers, and
        # the first (the one serving admin) sums its own stats and the other's.
        seen: Counter[str] = Counter()
        for _ in range(40):
            reader, writer = await asyncio.open_connection(INGRESS_IP, port)
            writer.write(b"GET /productpage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
            seen[reply.split(b"\r\n", 1)[0].decode()] += 1
            seen[reply.rsplit(b"\r\n\r\n", 1)[1].split()[0].decode()] += 1
        assert seen == Counter({"HTTP/1.1 200 OK": 40, "v2": 40})
        stats, _ = await curl(f"http://{INGRESS_IP}:{admin}/stats")
        accepted = re.search(
            rf"^listener\.{re.escape(INGRESS_IP)}_{port}\.downstream_cx_total: (\d+)$",
            stats,
            re.M,
        )
        assert accepted is not None, stats
        assert int(accepted.group(1)) == 43, stats  # the 3 curls above and the 40
        prometheus, _ = await curl(f"http://{INGRESS_IP}:{admin}/stats/prometheus")
        served = re.findall(
            r'^envoy_http_downstream_rq_xx\{envoy_http_conn_manager_prefix="[^"]+",'
            r'envoy_response_code_class="([245])"\} (\d+)$',
            prometheus,
            re.M,
        )
        assert sorted(served) == [("2", "42"), ("4", "1"), ("5", "0")], prometheus
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_egress_forwards_allowed_hosts_only(mesh: Mesh) -> None:
    port = free_port(EGRESS_IP)
    external = await workload(EXTERNAL_IP, port, "external")
    hosts = mesh.tmp / "hosts"
    hosts.write_text(f"{EXTERNAL_IP} api.example.test blocked.example.test\n")
    (mesh.tmp / "config" / "egress.yaml").write_text(
        f"""
apiVersion: config.istio.io/v1alpha2
kind: EgressRule
metadata: {{name: example-api}}
spec:
  destination: {{service: api.example.test}}
  ports: [{{port: {port}, protocol: http}}]
"""
    )
    try:
        await mesh.pilot()
        await mesh.proxy(
            "egress", EGRESS_IP, "--meta", f"GATEWAY_PORTS={port}", "--hosts-file", str(hosts)
        )
        url = f"http://{EGRESS_IP}:{port}/v1/things"
        body, status = await curl("-H", f"Host: api.example.test:{port}", url)
        assert (body, status) == (f"external api.example.test:{port} /v1/things", "200")
        # The same server, by a name no EgressRule allows: no route (404, `NR`).
        body, status = await curl("-H", f"Host: blocked.example.test:{port}", url)
        assert status == "404", body
        body, status = await curl(
            "--proxy", f"http://{EGRESS_IP}:{port}", f"http://api.example.test:{port}/p"
        )
        assert (body, status) == (f"external api.example.test:{port} /p", "200")
    finally:
        await external.cleanup()
