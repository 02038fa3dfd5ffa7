"""CSR signing over gRPC against a bare grpc.aio unary echo server, in one run.

    .venv/bin/python tools/bench/ca_bench.py [--seconds 5 --rounds 3 --concurrency 32]

A child process runs both servers on 127.0.0.1 with the same mutual-TLS credentials (the CA's
serving certificate, client certificates required and checked against its root):
  csr   istio-ca's own `HandleCSR` service (services/ca, start_server), rate limit lifted, audit
        log on, signing ECDSA P-256 workload certificates: each call parses the CSR, checks
        the caller's client certificate may have the identity, signs, logs;
  echo  a generic grpc.aio unary handler answering every request with 1.5 kB (about what a
        certificate chain weighs).
This process is the client: one channel per server, `--concurrency` calls in flight, each
call a renewal (CSR for the caller's own identity, pre-generated: client-side key generation
is not what is measured). Paths interleave per round; figures are medians, the ratio the
median of per-round ratios. Target (issue 7): csr >= 0.5x echo.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from istio.api.auth.v1 import ca_pb2, ca_pb2_grpc

IDENTITY = "spiffe://cluster.local/ns/default/sa/bench"
ECHO_METHOD = "/bench.Echo/Echo"
SERVER_NAME = "istio-ca.istio-system"


async def serve(directory: Path) -> None:
    """The child: both servers, credentials for the client in `directory`, then wait."""
    from istio.ca import pki
    from istio.ca.audit import AuditLog
    from istio.ca.authority import CertificateAuthority
    from istio.ca.ratelimit import RateLimiter
    from istio.ca.service import server_hosts, start_server
    from istio.ca.storage import load_or_create_in_directory
    from istio.model.identity import SpiffeId

    material, _ = load_or_create_in_directory(
        directory / "ca",
        key_type=pki.KeyType.ECDSA,
        org="bench",
        root_ttl=datetime.timedelta(days=30),
        now=datetime.datetime.now(datetime.UTC),
    )
    authority = CertificateAuthority(material, trust_domain="cluster.local")
    ca = await start_server(
        authority,
        grpc_addr="127.0.0.1:0",
        bootstrap_addr=None,
        limiter=RateLimiter(1e9, 10**9),
        audit=AuditLog(directory / "audit.jsonl"),
        tokens=None,
    )
    key, chain = authority.serving_credentials(server_hosts(["127.0.0.1:0"], "cluster.local"))
    answer = b"x" * 1500

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return answer

    echo_server = grpc.aio.server()
    echo_server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=authority.root_pem, require_client_auth=True
    )
    echo_port = echo_server.add_secure_port("127.0.0.1:0", credentials)
    await echo_server.start()
    client_key, issued = authority.issue(SpiffeId.parse(IDENTITY))
    (directory / "client-key.pem").write_bytes(client_key)
    (directory / "client-chain.pem").write_bytes(issued.cert_chain_pem)
    (directory / "root.pem").write_bytes(authority.root_pem)
    print(json.dumps({"csr": ca.port, "echo": echo_port}), flush=True)
    await asyncio.get_running_loop().create_future()  # until terminated


def make_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def load(
    target: str, port: int, credentials: grpc.ChannelCredentials, args: argparse.Namespace
) -> float:
    """Calls per second with `args.concurrency` in flight for `args.seconds`."""
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        if target == "csr":
            stub = ca_pb2_grpc.IstioCAServiceStub(channel)
            csrs = [make_csr() for _ in range(16)]

            async def call(number: int) -> None:
                request = ca_pb2.CsrRequest(csr_pem=csrs[number % 16], credential_type="onprem")
                response = await stub.HandleCSR(request, timeout=30)
                if not response.is_approved:
                    raise RuntimeError(f"CSR refused: {response.status.message}")

        else:
            echo = channel.unary_unary(ECHO_METHOD)
            payload = make_csr()

            async def call(number: int) -> None:
                await echo(payload, timeout=30)

        await call(0)  # connected and warm
        done = 0
        deadline = time.monotonic() + args.seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await call(done)
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return done / (time.monotonic() - began)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="ca-bench-") as name:
        directory = Path(name)
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(directory), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            ports = json.loads(await child.stdout.readline())
            credentials = grpc.ssl_channel_credentials(
                (directory / "root.pem").read_bytes(),
                (directory / "client-key.pem").read_bytes(),
                (directory / "client-chain.pem").read_bytes(),
            )
            rates: dict[str, list[float]] = {"echo": [], "csr": []}
            server_cpu: dict[str, list[float]] = {"echo": [], "csr": []}
            for _ in range(args.rounds):
                for target in ("echo", "csr"):
                    before, began = cpu_seconds(child.pid), time.monotonic()
                    rates[target].append(await load(target, ports[target], credentials, args))
                    spent = (cpu_seconds(child.pid) - before) / (time.monotonic() - began)
                    server_cpu[target].append(spent)
                    print(f"{target}: {rates[target][-1]:,.0f}/s", file=sys.stderr, flush=True)
        finally:
            child.terminate()
            await child.wait()
    ratios = [c / e for c, e in zip(rates["csr"], rates["echo"], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= 0.5 else "**missed**"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`tools/bench/ca_bench.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {args.concurrency}` on {when}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}:",
        "",
        "| server | calls/s (median) | server CPU (cores) |",
        "|---|---:|---:|",
    ]
    for target, label in (("echo", "bare grpc.aio unary echo"), ("csr", "istio-ca HandleCSR")):
        lines.append(
            f"| {label} | {statistics.median(rates[target]):,.0f} | "
            f"{statistics.median(server_cpu[target]):.2f} |"
        )
    lines += [
        "",
        f"HandleCSR / echo: **{ratio:.2f}x** (target >= 0.5x, {verdict}; rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ").",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    text = asyncio.run(measure(args))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
