"""A real istio-ca process (its console entry, over loopback) for the agent to talk to, and join
tokens made as an operator makes them: `istio-ca token create` or `istioctl token create`."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IDENTITY = "spiffe://cluster.local/ns/vm/sa/mysql"
ISTIOCTL = str(Path(sys.executable).parent / "istioctl")
_SERVING = re.compile(r"serving HandleCSR \((client certificates|join tokens)\) on (\S+)")


@dataclass
class CAProcess:
    process: asyncio.subprocess.Process
    ca_dir: Path
    audit_log: Path
    addresses: dict[str, str] = field(default_factory=dict)
    stderr: list[str] = field(default_factory=list)

    @property
    def csr_address(self) -> str:
        return self.addresses["client certificates"]

    @property
    def bootstrap_address(self) -> str:
        return self.addresses["join tokens"]

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "ca-cert.pem"

    async def token(self, identity: str = IDENTITY) -> str:
        made = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "istio.ca",
            "token",
            "create",
            "--ca-dir",
            str(self.ca_dir),
            "--identity",
            identity,
            "--ttl",
            "10m",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await made.communicate()
        assert made.returncode == 0
        return out.decode().strip()

    async def istioctl_token(self, *flags: str) -> str:
        """`istioctl token create --ca-dir CA_DIR FLAGS...`: the token it printed."""
        made = await asyncio.create_subprocess_exec(
            ISTIOCTL,
            "token",
            "create",
            "--ca-dir",
            str(self.ca_dir),
            *flags,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(made.communicate(), 60)
        assert made.returncode == 0, err.decode()
        return out.decode().strip()

    def audit(self) -> list[dict[str, str]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


StartCA = Callable[..., Awaitable[CAProcess]]


@pytest.fixture
async def start_ca(tmp_path: Path) -> AsyncIterator[StartCA]:
    running: list[CAProcess] = []

    async def start(*flags: str) -> CAProcess:
        ca_dir = tmp_path / "ca"
        audit_log = tmp_path / "audit.jsonl"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "istio.ca",
            "--ca-dir",
            str(ca_dir),
            "--grpc-addr",
            "127.0.0.1:0",
            "--bootstrap-addr",
            "127.0.0.1:0",
            "--audit-log",
            str(audit_log),
            *flags,
            stderr=asyncio.subprocess.PIPE,
        )
        ca = CAProcess(process, ca_dir, audit_log)
        running.append(ca)
        assert process.stderr is not None
        while len(ca.addresses) < 2:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "istio-ca exited: " + "".join(ca.stderr)
            ca.stderr.append(line)
            if match := _SERVING.search(line):
                ca.addresses[match[1]] = match[2]
        return ca

    yield start
    for ca in running:
        if ca.process.returncode is None:
            ca.process.terminate()
            await ca.process.communicate()
