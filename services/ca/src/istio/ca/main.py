"""istio-ca: the command line.

    istio-ca (--ca-dir DIR | --cacerts-dir DIR | --kube) [--kubeconfig FILE] [flags...]
    istio-ca token create --identity spiffe://TD/ns/NS/sa/SA [--ttl 1h]
                          (--ca-dir DIR | --token-dir DIR)

Exit status 0 after a clean shutdown (SIGINT/SIGTERM), 1 when startup fails (one line on stderr
saying why), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from istio.ca import storage
from istio.ca.audit import AuditLog
from istio.ca.authority import CertificateAuthority, utcnow
from istio.ca.durations import parse_duration
from istio.ca.kubesecrets import SecretController
from istio.ca.pki import DEFAULT_ORG, KeyType, SigningMaterial
from istio.ca.ratelimit import RateLimiter
from istio.ca.service import (
    DEFAULT_BOOTSTRAP_ADDR,
    DEFAULT_GRPC_ADDR,
    split_host_port,
    start_server,
)
from istio.jointokens import JoinTokens, token_directory
from istio.kube import KubeClient, KubeError, load_cluster_access
from istio.model.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

PROG = "istio-ca"
log = logging.getLogger(PROG)


class StartupError(Exception):
    """The CA cannot start; the message says why in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _address(text: str) -> str:
    try:
        split_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _identity(text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The mesh's CA: SPIFFE workload certificates.")
    where = parser.add_argument_group("where the root lives (one of)")
    where.add_argument("--ca-dir", type=Path, help="keep a generated root here (and join tokens)")
    where.add_argument(
        "--cacerts-dir",
        type=Path,
        help="bring your own CA: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem",
    )
    where.add_argument(
        "--kube",
        action="store_true",
        help="Kubernetes mode: write istio.<sa> secrets; keep the root in the secret "
        "istio-ca-secret unless --ca-dir or --cacerts-dir says otherwise",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, help="default: $KUBECONFIG, ~/.kube/config, in-cluster"
    )
    parser.add_argument("--istio-namespace", default="istio-system")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument("--org", default=DEFAULT_ORG, help="the certificates' organization")
    parser.add_argument(
        "--key-type",
        choices=[k.value for k in KeyType],
        default=KeyType.ECDSA.value,
        help="ecdsa (P-256) or rsa (2048 bits), for a generated root and issued keys",
    )
    parser.add_argument("--workload-cert-ttl", type=_duration, default=3600.0, metavar="DURATION")
    parser.add_argument(
        "--root-cert-ttl", type=_duration, default=365 * 86400.0, metavar="DURATION"
    )
    parser.add_argument(
        "--grpc-addr",
        type=_address,
        default=DEFAULT_GRPC_ADDR,
        metavar="H:P",
        help="HandleCSR for callers with a client certificate from this CA (renewals)",
    )
    parser.add_argument(
        "--bootstrap-addr",
        default=DEFAULT_BOOTSTRAP_ADDR,
        metavar="H:P|off",
        help="HandleCSR for callers with a join token (server-side TLS only)",
    )
    parser.add_argument("--token-dir", type=Path, help="join tokens (default CA_DIR/join-tokens)")
    parser.add_argument("--rate", type=float, default=5.0, help="CSRs a second per caller")
    parser.add_argument("--burst", type=int, default=20, help="CSRs at once per caller")
    parser.add_argument("--audit-log", type=Path, help="also append the audit lines to this file")
    parser.add_argument(
        "--refresh-interval",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="how often Kubernetes secrets are checked for re-issue",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    return parser


def build_token_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} token create", description="Make a one-time join token.")
    parser.add_argument("--identity", type=_identity, required=True, metavar="SPIFFE_ID")
    parser.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION")
    parser.add_argument("--ca-dir", type=Path)
    parser.add_argument("--token-dir", type=Path)
    return parser


async def load_material(options: argparse.Namespace, client: KubeClient | None) -> SigningMaterial:
    now = utcnow()
    key_type = KeyType(options.key_type)
    root_ttl = datetime.timedelta(seconds=options.root_cert_ttl)
    if options.cacerts_dir is not None:
        material = storage.load_cacerts(options.cacerts_dir, now=now)
        log.info("signing with the CA brought in %s", options.cacerts_dir)
        return material
    if options.ca_dir is not None:
        material, made = storage.load_or_create_in_directory(
            options.ca_dir, key_type=key_type, org=options.org, root_ttl=root_ttl, now=now
        )
        log.info("%s the root in %s", "made" if made else "loaded", options.ca_dir)
        return material
    assert client is not None
    material, made = await storage.load_or_create_in_secret(
        client,
        options.istio_namespace,
        key_type=key_type,
        org=options.org,
        root_ttl=root_ttl,
        now=now,
    )
    log.info(
        "%s the root in secret %s/%s",
        "made" if made else "loaded",
        options.istio_namespace,
        storage.CA_SECRET,
    )
    return material


async def serve(options: argparse.Namespace) -> None:
    """Run the CA until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    client = None
    if options.kube:
        try:
            client = KubeClient(load_cluster_access(options.kubeconfig), user_agent=PROG)
        except KubeError as error:
            raise StartupError(str(error)) from None
    try:
        try:
            material = await load_material(options, client)
        except (storage.StorageError, KubeError) as error:
            raise StartupError(str(error)) from None
        authority = CertificateAuthority(
            material,
            trust_domain=options.trust_domain,
            org=options.org,
            workload_ttl=datetime.timedelta(seconds=options.workload_cert_ttl),
            key_type=KeyType(options.key_type),
        )
        tokens_at = token_directory(options.ca_dir, options.token_dir)
        bootstrap = None if options.bootstrap_addr == "off" else options.bootstrap_addr
        try:
            server = await start_server(
                authority,
                grpc_addr=options.grpc_addr,
                bootstrap_addr=bootstrap,
                limiter=RateLimiter(options.rate, options.burst),
                audit=AuditLog(options.audit_log),
                tokens=JoinTokens(tokens_at) if tokens_at is not None else None,
                domain=options.trust_domain,
            )
        except RuntimeError as error:
            raise StartupError(f"cannot listen: {error}") from None
        host, _ = split_host_port(options.grpc_addr)
        log.info("serving HandleCSR (client certificates) on %s:%d", host, server.port)
        if bootstrap is not None:
            host, _ = split_host_port(bootstrap)
            log.info("serving HandleCSR (join tokens) on %s:%d", host, server.bootstrap_port)
        tasks: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait())]
        if client is not None:
            controller = SecretController(
                client, authority, refresh_interval=options.refresh_interval
            )
            tasks.append(asyncio.create_task(controller.run()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise StartupError(f"Kubernetes: {task.exception()}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop()
    finally:
        if client is not None:
            await client.close()


def create_token(argv: Sequence[str]) -> int:
    parser = build_token_parser()
    options = parser.parse_args(argv)
    directory = token_directory(options.ca_dir, options.token_dir)
    if directory is None:
        parser.error("say where tokens are kept: --ca-dir or --token-dir")
    try:
        token = JoinTokens(directory).create(options.identity, options.ttl)
    except OSError as error:
        print(f"{PROG}: cannot write the token under {directory}: {error}", file=sys.stderr)
        return 1
    print(token)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.cacerts_dir is None and options.ca_dir is None and not options.kube:
        parser.error("say where the root lives: --ca-dir DIR, --cacerts-dir DIR or --kube")
    if options.bootstrap_addr != "off":
        _address(options.bootstrap_addr)
    if options.rate <= 0 or options.burst < 1:
        parser.error("--rate must be positive and --burst at least 1")
    return options


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        if args[1:2] != ["create"]:
            sys.exit(f"{PROG}: usage: {PROG} token create --identity SPIFFE_ID [--ttl 1h] ...")
        sys.exit(create_token(args[2:]))
    options = parse_args(args)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(options))
    except StartupError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
