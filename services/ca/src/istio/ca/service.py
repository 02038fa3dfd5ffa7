"""`istio.v1.auth.IstioCAService/HandleCSR` over gRPC with TLS, for node agents.

Two listeners, because a gRPC Python server either requires a client certificate or never asks
for one:
- the CSR address (`--grpc-addr`, 8060) requires a client certificate that chains to this CA's
  root (anything else, another CA's or an expired one, fails the TLS handshake); the caller is
  the SPIFFE id in that certificate and may only get certificates for that same identity
  (renewal);
- the bootstrap address (`--bootstrap-addr`, 8061) serves TLS without client certificates and
  takes a one-time join token in `node_agent_credential`; the caller may only get certificates
  for the identity the token was made for.

Every request is rate limited per caller and ends in one audit line (see istio.ca.audit).
Both listeners serve a certificate for the CA's own SPIFFE id, signed by the root.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from google.rpc import code_pb2, status_pb2

from istio.api.auth.v1 import ca_pb2, ca_pb2_grpc
from istio.ca import audit as decisions
from istio.ca import pki
from istio.ca.audit import AuditLog
from istio.ca.authority import CertificateAuthority
from istio.ca.ratelimit import RateLimiter
from istio.jointokens import JoinTokens
from istio.model.identity import SpiffeId

log = logging.getLogger(__name__)

CA_SERVER_NAME = "istio-ca"
DEFAULT_GRPC_ADDR = "127.0.0.1:8060"
DEFAULT_BOOTSTRAP_ADDR = "127.0.0.1:8061"
TOKEN_CREDENTIAL = "token"
CERT_CREDENTIAL = "onprem"


class Listener(enum.Enum):
    CLIENT_CERT = "client-cert"
    JOIN_TOKEN = "join-token"


class CAService(ca_pb2_grpc.IstioCAServiceServicer):
    def __init__(
        self,
        authority: CertificateAuthority,
        listener: Listener,
        *,
        limiter: RateLimiter,
        audit: AuditLog,
        tokens: JoinTokens | None = None,
    ) -> None:
        self.authority = authority
        self.listener = listener
        self.limiter = limiter
        self.audit = audit
        self.tokens = tokens

    async def HandleCSR(
        self, request: ca_pb2.CsrRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> ca_pb2.CsrResponse:
        peer = context.peer()
        caller_id: SpiffeId | None = None
        if self.listener is Listener.CLIENT_CERT:
            caller_id = self._client_identity(context)
            caller = str(caller_id) if caller_id else "client certificate without a SPIFFE id"
        else:
            caller = f"join-token@{_peer_host(peer)}"

        def deny(decision: str, code: int, reason: str, identity: str = "") -> ca_pb2.CsrResponse:
            self.audit.record(
                caller=caller, peer=peer, identity=identity, decision=decision, reason=reason
            )
            return ca_pb2.CsrResponse(
                is_approved=False, status=status_pb2.Status(code=code, message=reason)
            )

        if not self.limiter.allow(caller):
            return deny(
                decisions.RATE_LIMITED,
                code_pb2.RESOURCE_EXHAUSTED,
                f"rate limited: at most {self.limiter.rate:g} CSRs a second per caller",
            )
        try:
            csr, identity = self.authority.parse_csr(request.csr_pem)
        except pki.CsrError as error:
            return deny(decisions.INVALID, code_pb2.INVALID_ARGUMENT, f"malformed CSR: {error}")
        asked = str(identity)
        if self.listener is Listener.CLIENT_CERT:
            if caller_id is None:
                return deny(
                    decisions.DENIED,
                    code_pb2.UNAUTHENTICATED,
                    "the client certificate carries no SPIFFE id",
                    asked,
                )
            if caller_id != identity:
                return deny(
                    decisions.DENIED,
                    code_pb2.PERMISSION_DENIED,
                    f"{caller_id} may only get certificates for itself, not {identity}",
                    asked,
                )
        else:
            if self.tokens is None:
                return deny(
                    decisions.DENIED,
                    code_pb2.UNAUTHENTICATED,
                    "join tokens are not enabled on this CA (no token directory)",
                    asked,
                )
            if request.credential_type not in ("", TOKEN_CREDENTIAL):
                return deny(
                    decisions.DENIED,
                    code_pb2.UNAUTHENTICATED,
                    f"credential type {request.credential_type!r}: this address takes "
                    f"{TOKEN_CREDENTIAL!r} only; renew with a client certificate at the CSR "
                    "address",
                    asked,
                )
            token = request.node_agent_credential.decode("utf-8", errors="replace")
            caller = (
                f"join-token:{hashlib.sha256(token.encode()).hexdigest()[:12]}@{_peer_host(peer)}"
            )
            spent = self.tokens.spend(token)
            if spent.identity is None:
                return deny(decisions.DENIED, code_pb2.UNAUTHENTICATED, spent.reason, asked)
            if spent.identity != identity:
                return deny(
                    decisions.DENIED,
                    code_pb2.PERMISSION_DENIED,
                    f"the join token is for {spent.identity}, not {identity} (token now spent)",
                    asked,
                )
        issued = self.authority.sign(
            csr, identity, self.authority.ttl_for(request.requested_ttl_minutes)
        )
        self.audit.record(
            caller=caller,
            peer=peer,
            identity=asked,
            decision=decisions.APPROVED,
            reason=f"valid until {issued.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            serial=issued.cert.serial_number,
        )
        return ca_pb2.CsrResponse(
            is_approved=True,
            status=status_pb2.Status(code=code_pb2.OK),
            signed_cert=issued.cert_pem,
            cert_chain=issued.chain_pem,
        )

    def _client_identity(
        self, context: grpc.aio.ServicerContext[object, object]
    ) -> SpiffeId | None:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        if not pems:
            return None
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
        except ValueError:
            return None
        identity = pki.identity_of(cert)
        if identity is None or identity.trust_domain != self.authority.trust_domain:
            return None
        return identity


def _peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` -> 127.0.0.1; `ipv6:[::1]:5000` -> ::1."""
    _, _, address = peer.partition(":")
    host, _, _ = address.rpartition(":")
    return host.strip("[]") or peer


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def server_hosts(addresses: Sequence[str], domain: str) -> list[str]:
    """The names the CA's serving certificate answers to."""
    names = [
        CA_SERVER_NAME,
        f"{CA_SERVER_NAME}.istio-system",
        f"{CA_SERVER_NAME}.istio-system.svc",
        f"{CA_SERVER_NAME}.istio-system.svc.{domain}",
        "localhost",
    ]
    for address in addresses:
        host, _ = split_host_port(address)
        if host not in ("0.0.0.0", "::", ""):
            names.append(host)
    return names


@dataclass
class CAServer:
    """The running listeners; ports are the bound ones (useful with port 0)."""

    servers: list[grpc.aio.Server]
    port: int
    bootstrap_port: int | None

    async def stop(self, grace: float | None = 1.0) -> None:
        for server in self.servers:
            await server.stop(grace)


async def start_server(
    authority: CertificateAuthority,
    *,
    grpc_addr: str,
    bootstrap_addr: str | None,
    limiter: RateLimiter,
    audit: AuditLog,
    tokens: JoinTokens | None,
    domain: str = "cluster.local",
) -> CAServer:
    """Start the listeners, each its own gRPC server so that each knows how callers prove who
    they are; RuntimeError when an address cannot be bound."""
    addresses = [grpc_addr] + ([bootstrap_addr] if bootstrap_addr else [])
    key, chain = authority.serving_credentials(server_hosts(addresses, domain))
    servers: list[grpc.aio.Server] = []
    try:
        by_cert = grpc.aio.server()
        servers.append(by_cert)
        ca_pb2_grpc.add_IstioCAServiceServicer_to_server(
            CAService(authority, Listener.CLIENT_CERT, limiter=limiter, audit=audit), by_cert
        )
        mtls = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=authority.root_pem, require_client_auth=True
        )
        port = by_cert.add_secure_port(grpc_addr, mtls)
        await by_cert.start()
        bootstrap_port = None
        if bootstrap_addr:
            by_token = grpc.aio.server()
            servers.append(by_token)
            ca_pb2_grpc.add_IstioCAServiceServicer_to_server(
                CAService(
                    authority, Listener.JOIN_TOKEN, limiter=limiter, audit=audit, tokens=tokens
                ),
                by_token,
            )
            tls = grpc.ssl_server_credentials([(key, chain)], require_client_auth=False)
            bootstrap_port = by_token.add_secure_port(bootstrap_addr, tls)
            await by_token.start()
    except BaseException:
        for server in servers:
            await server.stop(None)
        raise
    return CAServer(servers, port, bootstrap_port)
