"""TCP, Redis and MongoDB ports end to end: pilot-discovery with ServiceEntry files (a `redis`
port and a `mongo` port) and a DestinationPolicy, the sidecar (pilot-agent, INTERCEPTION_MODE=
NONE) binding both ports on 127.0.0.60 in front of its workloads: a real redis-server driven
by redis-cli, and a MongoDB wire-protocol responder (no MongoDB server exists here) driven by
pymongo. The bytes pass unchanged and the proxy's Prometheus stats count commands by name,
errors and latencies; the policy's idle timeout closes an idle connection."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
import pymongo
import pytest

from istio.testing.net import free_port

BIN = Path(sys.executable).parent
PROXY_IP = "127.0.0.60"
OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli (Debian's redis-server, redis-tools) are not installed",
)


class MongoResponder:
    """Enough of a MongoDB server for pymongo: hello/isMaster (OP_QUERY or OP_MSG), ping,
    insert and find over OP_MSG, endSessions; any other command fails with ok: 0."""

    def __init__(self) -> None:
        self.collections: dict[str, list[dict[str, Any]]] = {}
        self.next_id = 1000
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self.serve, host, port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(16)
                length, request_id, _, op_code = struct.unpack("<iiii", header)
                body = await reader.readexactly(length - 16)
                if op_code == OP_QUERY:
                    end = body.index(b"\x00", 4)
                    command = bson.decode(body[end + 9 :])
                    writer.write(self.reply(request_id, self.answer(command, {})))
                elif op_code == OP_MSG:
                    command, sequences = self.sections(body)
                    writer.write(self.msg(request_id, self.answer(command, sequences)))
                else:
                    break
                await writer.drain()
        writer.close()

    @staticmethod
    def sections(body: bytes) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        flags = struct.unpack_from("<I", body)[0]
        end = len(body) - (4 if flags & 1 else 0)
        position = 4
        command: dict[str, Any] = {}
        sequences: dict[str, list[dict[str, Any]]] = {}
        while position < end:
            kind = body[position]
            position += 1
            size = struct.unpack_from("<i", body, position)[0]
            if kind == 0:
                command = bson.decode(body[position : position + size])
            else:
                name_end = body.index(b"\x00", position + 4)
                name = body[position + 4 : name_end].decode()
                sequences[name] = list(bson.decode_iter(body[name_end + 1 : position + size]))
            position += size
        return command, sequences

    def answer(
        self, command: dict[str, Any], sequences: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        name = next(iter(command))
        if name.lower() in ("hello", "ismaster"):
            return {
                "ismaster": True,
                "isWritablePrimary": True,
                "helloOk": True,
                "maxBsonObjectSize": 16 * 1024 * 1024,
                "maxMessageSizeBytes": 48_000_000,
                "maxWriteBatchSize": 100_000,
                "localTime": datetime.datetime.now(datetime.UTC),
                "minWireVersion": 0,
                "maxWireVersion": 21,
                "ok": 1.0,
            }
        if name in ("ping", "endSessions"):
            return {"ok": 1.0}
        if name == "insert":
            documents = command.get("documents", []) + sequences.get("documents", [])
            self.collections.setdefault(command["insert"], []).extend(documents)
            return {"n": len(documents), "ok": 1.0}
        if name == "find":
            wanted = command.get("filter", {})
            found = [
                dict(document)
                for document in self.collections.get(command["find"], [])
                if all(document.get(k) == v for k, v in wanted.items())
            ]
            namespace = f"{command.get('$db', 'test')}.{command['find']}"
            return {"cursor": {"id": 0, "ns": namespace, "firstBatch": found}, "ok": 1.0}
        return {"ok": 0.0, "errmsg": f"no such command: '{name}'", "code": 59}

    def header(self, length: int, response_to: int, op_code: int) -> bytes:
        self.next_id += 1
        return struct.pack("<iiii", 16 + length, self.next_id, response_to, op_code)

    def reply(self, response_to: int, document: dict[str, Any]) -> bytes:
        body = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(document)
        return self.header(len(body), response_to, OP_REPLY) + body

    def msg(self, response_to: int, document: dict[str, Any]) -> bytes:
        body = struct.pack("<I", 0) + b"\x00" + bson.encode(document)
        return self.header(len(body), response_to, OP_MSG) + body


@dataclass
class Mesh:
    tmp: Path
    redis_port: int = field(default_factory=lambda: free_port(PROXY_IP))
    mongo_port: int = field(default_factory=lambda: free_port(PROXY_IP))
    stats_port: int = field(default_factory=lambda: free_port(PROXY_IP))
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def spawn(self, marker: str, *argv: str | Path, stderr: bool = True) -> None:
        process = await asyncio.create_subprocess_exec(
            *map(str, argv),
            stdout=asyncio.subprocess.DEVNULL if stderr else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if stderr else asyncio.subprocess.DEVNULL,
        )
        self.processes.append(process)
        stream = process.stderr if stderr else process.stdout
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

        task = asyncio.get_running_loop().create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def metrics(self) -> str:
        reader, writer = await asyncio.open_connection(PROXY_IP, self.stats_port)
        writer.write(b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return response.partition(b"\r\n\r\n")[2].decode()

    async def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.terminate()
                await process.wait()
        for task in list(self.tasks):
            task.cancel()


SERVICE = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: {port}, name: {name}, protocol: {protocol}}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {ip}, ports: {{{name}: {port}}}, labels: {{app: {name}}}}}
"""
IDLE_POLICY = """
apiVersion: config.istio.io/v1alpha2
kind: DestinationPolicy
metadata:
  name: redis-idle
  annotations: {networking.istio.io/tcpIdleTimeout: 1s}
spec:
  destination: {name: redis}
  loadBalancing: {name: ROUND_ROBIN}
"""


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = Mesh(tmp_path)
    responder = MongoResponder()
    redis_app, mongo_app = free_port(PROXY_IP), free_port(PROXY_IP)
    registry, config = tmp_path / "registry", tmp_path / "config"
    registry.mkdir()
    config.mkdir()
    for name, port, protocol in (
        ("redis", mesh.redis_port, "REDIS"),
        ("mongo", mesh.mongo_port, "MONGO"),
    ):
        text = SERVICE.format(name=name, port=port, protocol=protocol, ip=PROXY_IP)
        (registry / f"{name}.yaml").write_text(text)
    (config / "redis-idle.yaml").write_text(IDLE_POLICY)
    grpc_port = free_port()
    try:
        await mesh.spawn(
            "Ready to accept connections",
            "redis-server",
            "--bind",
            PROXY_IP,
            "--port",
            str(redis_app),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            stderr=False,
        )
        await responder.start(PROXY_IP, mongo_app)
        await mesh.spawn(
            "serving xDS",
            BIN / "pilot-discovery",
            "--registry",
            f"file:{registry}",
            "--config-store",
            f"file://{config}",
            "--grpc-addr",
            f"127.0.0.1:{grpc_port}",
            "--http-addr",
            f"127.0.0.1:{free_port()}",
        )
        await mesh.spawn(
            "proxy ready",
            BIN / "pilot-agent",
            "proxy",
            "sidecar",
            "--discovery-address",
            f"127.0.0.1:{grpc_port}",
            "--bind-address",
            PROXY_IP,
            "--admin-port",
            str(free_port(PROXY_IP)),
            "--stats-port",
            str(mesh.stats_port),
            "--access-log",
            "off",
            "--meta",
            "INTERCEPTION_MODE=NONE",
            "--meta",
            f"APP_PORTS={mesh.redis_port}:{redis_app},{mesh.mongo_port}:{mongo_app}",
        )
        yield mesh
    finally:
        await mesh.stop()
        await responder.stop()


async def redis_cli(mesh: Mesh, *args: str, stdin: bytes | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        "redis-cli",
        "-h",
        PROXY_IP,
        "-p",
        str(mesh.redis_port),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), 30)
    return out.decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in wanted.split(",")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not in the proxy's metrics")


def resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


async def test_redis_cli_through_the_sidecar(mesh: Mesh) -> None:
    value = "v" * 100_000
    assert (await redis_cli(mesh, "SET", "greeting", value)).strip() == "OK"
    assert (await redis_cli(mesh, "GET", "greeting")).strip() == value
    assert "ERR unknown command" in await redis_cli(mesh, "BOGUS", "x")
    pipeline = b"".join(resp(b"INCR", b"counter") for _ in range(500)) + resp(b"GET", b"counter")
    out = await redis_cli(mesh, "--pipe", stdin=pipeline)
    assert "errors: 0, replies: 501" in out, out
    assert (await redis_cli(mesh, "GET", "counter")).strip() == "500"
    # The same bytes straight from a raw client: exactly what redis-server answers.
    reader, writer = await asyncio.open_connection(PROXY_IP, mesh.redis_port)
    writer.write(resp(b"SET", b"k", b"x\r\ny") + resp(b"GET", b"k") + resp(b"LPUSH", b"k", b"a"))
    expected = b"+OK\r\n$4\r\nx\r\ny\r\n-WRONGTYPE Operation against a key holding the wrong"
    assert await reader.readexactly(len(expected)) == expected
    writer.close()

    prefix = f"inbound|{mesh.redis_port}||redis.default.svc.cluster.local"
    text = await mesh.metrics()
    labels = {"envoy_redis_prefix": prefix}
    assert metric(text, "envoy_redis_command_total", **labels, envoy_redis_cmd="incr") == 500
    assert metric(text, "envoy_redis_command_success", **labels, envoy_redis_cmd="incr") == 500
    assert metric(text, "envoy_redis_command_total", **labels, envoy_redis_cmd="set") >= 2
    assert metric(text, "envoy_redis_command_error", **labels, envoy_redis_cmd="bogus") == 1
    assert metric(text, "envoy_redis_command_error", **labels, envoy_redis_cmd="lpush") == 1
    assert metric(text, "envoy_redis_command_time_count", **labels, envoy_redis_cmd="get") >= 3
    assert metric(text, "envoy_redis_error_reply", **labels) == 2
    assert "envoy_redis_decoding_error" not in text
    assert metric(text, "envoy_tcp_downstream_cx_total", envoy_tcp_prefix=prefix) >= 6


async def test_idle_timeout_from_the_destination_policy(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection(PROXY_IP, mesh.redis_port)
    writer.write(resp(b"PING"))
    assert await reader.readexactly(7) == b"+PONG\r\n"
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the proxy after 1s
    assert asyncio.get_running_loop().time() - started >= 0.9
    writer.close()
    prefix = f"inbound|{mesh.redis_port}||redis.default.svc.cluster.local"
    assert metric(await mesh.metrics(), "envoy_tcp_idle_timeout", envoy_tcp_prefix=prefix) == 1


async def test_pymongo_through_the_sidecar(mesh: Mesh) -> None:
    def session() -> tuple[list[dict[str, Any]], str]:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            PROXY_IP, mesh.mongo_port, directConnection=True, serverSelectionTimeoutMS=10_000
        )
        try:
            client.admin.command("ping")
            books = client.shop.books
            books.insert_one({"title": "dune", "year": 1965})
            books.insert_many([{"title": "emma", "year": 1815}, {"title": "ulysses"}])
            found = [{k: v for k, v in d.items() if k != "_id"} for d in books.find({"year": 1815})]
            try:
                client.shop.command("bogus")
                error = ""
            except pymongo.errors.OperationFailure as failure:
                error = str(failure)
            return found, error
        finally:
            client.close()

    found, error = await asyncio.to_thread(session)
    assert found == [{"title": "emma", "year": 1815}]
    assert "no such command" in error
    prefix = f"inbound|{mesh.mongo_port}||mongo.default.svc.cluster.local"
    text = await mesh.metrics()
    labels = {"envoy_mongo_prefix": prefix}
    assert metric(text, "envoy_mongo_op_msg", **labels) >= 5
    assert metric(text, "envoy_mongo_op_msg_reply", **labels) >= 5
    assert metric(text, "envoy_mongo_cmd_total", **labels, envoy_mongo_cmd="insert") == 2
    assert metric(text, "envoy_mongo_cmd_success", **labels, envoy_mongo_cmd="insert") == 2
    assert metric(text, "envoy_mongo_cmd_total", **labels, envoy_mongo_cmd="find") == 1
    assert metric(text, "envoy_mongo_cmd_total", **labels, envoy_mongo_cmd="ping") == 1
    assert metric(text, "envoy_mongo_cmd_error", **labels, envoy_mongo_cmd="bogus") == 1
    assert metric(text, "envoy_mongo_cmd_time_count", **labels, envoy_mongo_cmd="find") == 1
    assert metric(text, "envoy_mongo_reply_error", **labels) == 1
    assert "envoy_mongo_decoding_error" not in text
