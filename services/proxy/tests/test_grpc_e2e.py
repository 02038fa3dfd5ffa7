"""gRPC through two sidecars as the mesh runs it: pilot-discovery reads a ServiceEntry whose
port is named `grpc`, so both sidecars get HTTP/2 clusters (the client's outbound one to the
server sidecar, the server's inbound one to its app); a grpcio client calls through the
client sidecar's 15001 and a grpc.aio server answers behind the server sidecar. RouteRules
apply to gRPC as to HTTP: a fault abort becomes the matching grpc-status."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from istio.platform.driver import sync_state, wait_for_propagation
from istio.testing.net import free_port

BIN = Path(sys.executable).parent
CLIENT_IP, SERVER_IP, APP_IP = "127.0.0.50", "127.0.0.51", "127.0.0.52"
SERVICE_PORT = 9090
ENTRY = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: greeter}}
spec:
  hosts: [greeter.default.svc.cluster.local]
  ports: [{{number: {port}, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {address}, labels: {{app: greeter, version: v1}}}}
"""
ABORT = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: greeter-abort}
spec:
  destination: {name: greeter}
  httpFault:
    abort: {percent: 100, httpStatus: 503}
"""


class Greeter:
    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    async def hello(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.seen = {m.key: str(m.value) for m in context.invocation_metadata() or ()}
        context.set_trailing_metadata((("x-served-by", "greeter"),))
        return b"hello " + request

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message[::-1]


@dataclass
class Mesh:
    tmp: Path
    pilot_http: str = ""
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def spawn(self, marker: bytes, *argv: str) -> None:
        process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        self.processes.append(process)
        stream = process.stderr
        assert stream is not None
        while marker not in (line := await asyncio.wait_for(stream.readline(), 30)):
            assert line, f"{argv[0]} exited before {marker!r}"

        async def drain() -> None:
            while await stream.readline():
                pass

        asyncio.get_running_loop().create_task(drain())

    def sidecar(self, discovery: str, ip: str, *meta: str) -> list[str]:
        argv = [
            str(BIN / "pilot-agent"), "proxy", "sidecar", "--discovery-address", discovery,
            "--bind-address", ip, "--meta", "INTERCEPTION_MODE=NONE",
            "--access-log", str(self.tmp / f"access-{ip}.log"),
        ]  # fmt: skip
        for item in meta:
            argv += ["--meta", item]
        return argv

    async def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.terminate()
                await process.wait()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[tuple[Mesh, Greeter]]:
    greeter = Greeter()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Greeter",
                {
                    "Hello": grpc.unary_unary_rpc_method_handler(greeter.hello),
                    "Chat": grpc.stream_stream_rpc_method_handler(greeter.chat),
                },
            ),
        )
    )
    app_port = server.add_insecure_port(f"{APP_IP}:0")
    await server.start()
    (tmp_path / "registry").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "registry" / "greeter.yaml").write_text(
        ENTRY.format(port=SERVICE_PORT, address=SERVER_IP)
    )
    mesh = Mesh(tmp_path, pilot_http=f"127.0.0.1:{free_port()}")
    discovery = f"127.0.0.1:{free_port()}"
    try:
        await mesh.spawn(
            b"serving xDS",
            str(BIN / "pilot-discovery"), "--registry", f"file:{tmp_path / 'registry'}",
            "--config-store", f"file://{tmp_path / 'config'}", "--grpc-addr", discovery,
            "--http-addr", mesh.pilot_http,
        )  # fmt: skip
        await mesh.spawn(b"proxy ready", *mesh.sidecar(discovery, CLIENT_IP))
        await mesh.spawn(
            b"proxy ready",
            *mesh.sidecar(
                discovery, SERVER_IP, f"APP_HOST={APP_IP}", f"APP_PORTS={SERVICE_PORT}:{app_port}"
            ),
        )
        yield mesh, greeter
    finally:
        await mesh.stop()
        await server.stop(None)


def stubs(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    return (
        channel.unary_unary("/test.Greeter/Hello"),
        channel.stream_stream("/test.Greeter/Chat"),
    )


async def test_grpc_through_two_sidecars_and_a_fault_rule(
    mesh: tuple[Mesh, Greeter],
) -> None:
    platform, greeter = mesh
    # the client addresses the service; its sidecar's 15001 routes by :authority
    options = [("grpc.default_authority", f"greeter:{SERVICE_PORT}")]
    async with grpc.aio.insecure_channel(f"{CLIENT_IP}:15001", options=options) as channel:
        hello, chat = stubs(channel)
        call = hello(b"mesh", metadata=(("x-user", "jason"),))
        assert await call == b"hello mesh"
        assert ("x-served-by", "greeter") in tuple(await call.trailing_metadata())
        assert greeter.seen["x-user"] == "jason"
        assert greeter.seen["x-request-id"]
        stream = chat()
        for word in (b"abc", b"mesh"):
            await stream.write(word)
            assert await stream.read() == word[::-1]
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        replies = await asyncio.gather(*(hello(b"%d" % i) for i in range(50)))
        assert replies == [b"hello %d" % i for i in range(50)]

        before = await asyncio.to_thread(sync_state, platform.pilot_http)
        (platform.tmp / "config" / "abort.yaml").write_text(ABORT)
        await asyncio.to_thread(wait_for_propagation, platform.pilot_http, before, proxies=2)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hello(b"x")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "fault filter abort"
    await platform.stop()  # the access logs are flushed at exit
    text = (platform.tmp / f"access-{CLIENT_IP}.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert {line["protocol"] for line in lines} == {"HTTP/2"}
    assert lines[-1]["response_flags"] == "FI"
