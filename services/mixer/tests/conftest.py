"""Fixtures: the installed adapters, a Runtime fed from YAML, a real redis-server, and a
MixerServer on free loopback ports with a file config store."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from istio.api.mixer.v1 import check_pb2, report_pb2, service_pb2_grpc
from istio.config import Config, parse_documents
from istio.configstore.file import FileStore
from istio.expr.types import Value
from istio.mixer.metrics import MixerMetrics
from istio.mixer.runtime import Runtime
from istio.mixer.server import MixerServer, mixer_registry
from istio.mixerclient.attributes import encode
from istio.mixersdk import AdapterInfo, discover
from istio.testing.net import free_port


@pytest.fixture(scope="session")
def adapters() -> dict[str, AdapterInfo]:
    found, problems = discover()
    assert not problems
    return found


def parse(text: str, adapters: Mapping[str, AdapterInfo]) -> list[Config]:
    registry, _ = mixer_registry(adapters)
    configs, problems = parse_documents(text, "test.yaml", registry=registry)
    assert not problems, [str(p) for p in problems]
    return configs


@pytest.fixture
def parse_configs(adapters: dict[str, AdapterInfo]) -> Callable[[str], list[Config]]:
    """YAML -> Config objects, as the store would parse them (with the adapters' kinds)."""
    return lambda text: parse(text, adapters)


@dataclass
class Harness:
    """A Runtime and the way to feed it YAML."""

    runtime: Runtime
    adapters: dict[str, AdapterInfo]

    async def load(self, text: str) -> list[str]:
        problems = await self.runtime.update(parse(text, self.adapters))
        return [str(p) for p in problems]


@pytest.fixture
async def harness(adapters: dict[str, AdapterInfo]) -> AsyncIterator[Harness]:
    runtime = Runtime(
        dict(adapters),
        MixerMetrics(CollectorRegistry()),
        adapter_timeout=0.5,
        prometheus_registry=CollectorRegistry(),
    )
    yield Harness(runtime, runtime.adapters)  # type: ignore[arg-type]
    await runtime.close()


class RedisServer:
    """A real redis-server on a free loopback port, without persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            self.process = await asyncio.create_subprocess_exec(
                "setpriv",
                "--pdeathsig",
                "SIGTERM",
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for _ in range(200):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    await writer.wait_closed()
                    return
                if self.process.returncode is not None:
                    break
                await asyncio.sleep(0.025)
            await self.stop()
        raise RuntimeError("redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make setup` (Debian's redis-server)")
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@dataclass
class RunningMixer:
    server: MixerServer
    config_dir: Path
    channel: grpc.aio.Channel
    stub: service_pb2_grpc.MixerStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    async def apply(self, name: str, text: str) -> None:
        """Write a config file and wait until the server has taken (or refused) it."""
        before = self.server.applied_views
        (self.config_dir / name).write_text(text)
        await self.server.wait_applied(before + 1)

    async def check(self, bag: Mapping[str, Value], **kwargs: Any) -> check_pb2.CheckResponse:
        request = check_pb2.CheckRequest(attributes=encode(bag), **kwargs)
        response: check_pb2.CheckResponse = await self.stub.Check(request)
        return response

    async def report(self, *bags: Mapping[str, Value]) -> None:
        request = report_pb2.ReportRequest(attributes=[encode(b) for b in bags])
        await self.stub.Report(request)


@pytest.fixture
async def mixer(
    tmp_path: Path, adapters: dict[str, AdapterInfo]
) -> AsyncIterator[Callable[..., Any]]:
    """A factory: `await mixer(extra_adapters=...)` starts a MixerServer over a file store."""
    started: list[RunningMixer] = []

    async def start(extra_adapters: Mapping[str, AdapterInfo] | None = None) -> RunningMixer:
        all_adapters = {**adapters, **(extra_adapters or {})}
        config_dir = tmp_path / f"config{len(started)}"
        registry, _ = mixer_registry(all_adapters)
        metrics = MixerMetrics(CollectorRegistry())
        runtime = Runtime(
            all_adapters, metrics, adapter_timeout=0.5, prometheus_registry=CollectorRegistry()
        )
        server = MixerServer(runtime, FileStore(config_dir, registry=registry), metrics)
        await server.start("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0")
        await server.wait_applied(1)  # the store's first listing is in force
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        running = RunningMixer(server, config_dir, channel, service_pb2_grpc.MixerStub(channel))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        await running.server.stop()
