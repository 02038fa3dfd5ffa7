"""The node agent against a real istio-ca over loopback, with real files."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from istio.nodeagent.agent import AgentConfig, AgentError, NodeAgent

from .conftest import IDENTITY, CAProcess, StartCA


def config(ca: CAProcess, out_dir: Path, token: str = "", **kwargs: object) -> AgentConfig:
    return AgentConfig(
        ca_address=ca.csr_address,
        bootstrap_address=ca.bootstrap_address,
        identity=IDENTITY,
        out_dir=out_dir,
        root_cert=ca.root_cert,
        join_token=token,
        **kwargs,  # type: ignore[arg-type]
    )


def leaf(out_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((out_dir / "cert-chain.pem").read_bytes())[0]


async def failures(agent: NodeAgent, count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(agent.failed.wait(), 20)
        agent.failed.clear()


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def test_first_certificate_with_a_join_token(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    out = tmp_path / "certs"
    agent = NodeAgent(config(ca, out, await ca.token()))
    cert = await agent.refresh()
    assert {p.name for p in out.iterdir()} == {"cert-chain.pem", "key.pem", "root-cert.pem"}
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert (out / "root-cert.pem").read_bytes() == ca.root_cert.read_bytes()
    assert leaf(out) == cert
    root = x509.load_pem_x509_certificate(ca.root_cert.read_bytes())
    PolicyBuilder().store(Store([root])).build_client_verifier().verify(cert, [])
    (entry,) = ca.audit()
    assert entry["decision"] == "approved"
    assert entry["identity"] == IDENTITY


@pytest.mark.parametrize(
    "flags",
    [("--identity", IDENTITY), ("-n", "vm", "--service-account", "mysql", "--ttl", "10m")],
)
async def test_a_join_token_made_with_istioctl_is_accepted_once(
    start_ca: StartCA, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    ca = await start_ca()
    token = await ca.istioctl_token(*flags)
    cert = await NodeAgent(config(ca, tmp_path / "first", token)).refresh()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
    # Another machine presenting the same token (say it was copied) gets nothing.
    with pytest.raises(AgentError, match="the CA refused: unknown or already used join token"):
        await NodeAgent(config(ca, tmp_path / "second", token)).refresh()
    assert not (tmp_path / "second").exists()
    approved, denied = ca.audit()
    assert (approved["decision"], approved["identity"]) == ("approved", IDENTITY)
    assert denied["decision"] == "denied"
    assert denied["caller"].startswith("join-token:")


async def test_rotation_renews_with_the_current_certificate(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca("--workload-cert-ttl", "3s")
    out = tmp_path / "certs"
    agent = NodeAgent(config(ca, out, await ca.token()))
    async with running(agent):
        await asyncio.wait_for(agent.refreshed.wait(), 20)
        first_chain, first_key = (
            (out / "cert-chain.pem").read_bytes(),
            (out / "key.pem").read_bytes(),
        )
        first = leaf(out)
        lifetime = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
        assert lifetime <= 3 + 5 * 60  # the CA's TTL plus its clock-skew backdating
        agent.refreshed.clear()
        await asyncio.wait_for(agent.refreshed.wait(), 20)  # the agent's own schedule
        assert (out / "cert-chain.pem").read_bytes() != first_chain
        second = leaf(out)
    assert second.serial_number != first.serial_number
    assert (out / "key.pem").read_bytes() != first_key  # a new key each time
    assert second.not_valid_after_utc > first.not_valid_after_utc
    decisions = [(e["caller"], e["decision"]) for e in ca.audit()]
    assert decisions[0][0].startswith("join-token:")
    assert (IDENTITY, "approved") in decisions[1:]  # the renewal authenticated by the old cert


async def test_a_restarted_agent_uses_the_certificate_it_has(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca()
    out = tmp_path / "certs"
    await NodeAgent(config(ca, out, await ca.token())).refresh()
    again = NodeAgent(config(ca, out))  # no token this time
    assert again.current() is not None
    await again.refresh()
    assert [e["caller"] for e in ca.audit()][1] == IDENTITY


async def test_without_a_credential_the_agent_says_so(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    with pytest.raises(AgentError, match="no credential"):
        await NodeAgent(config(ca, tmp_path / "certs")).refresh()


async def test_a_refused_request_is_retried_with_backoff(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = await start_ca()
    token = await ca.token("spiffe://cluster.local/ns/vm/sa/someone-else")
    agent = NodeAgent(config(ca, tmp_path / "certs", token, backoff_initial=0.05, backoff_max=0.2))
    async with running(agent):
        await failures(agent, 3)
    assert "the join token is for spiffe://cluster.local/ns/vm/sa/someone-else" in caplog.text
    assert "no credential" in caplog.text  # the token was spent; later tries say what is missing
    assert not (tmp_path / "certs" / "cert-chain.pem").exists()


async def test_an_unreachable_ca_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(b"")
    agent = NodeAgent(
        AgentConfig(
            ca_address="127.0.0.1:1",
            bootstrap_address="127.0.0.1:1",
            identity=IDENTITY,
            out_dir=tmp_path / "certs",
            root_cert=root,
            join_token="t",
            backoff_initial=0.05,
            backoff_max=0.1,
        )
    )
    async with running(agent):
        await failures(agent, 2)
    assert caplog.text.count("retrying in") >= 2
