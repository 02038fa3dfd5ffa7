"""The node agent's loop.

Theory of operation. On start it uses the certificate already in --out-dir when that one is
valid, for the right identity and under the given root; otherwise it needs a join token. Each
refresh makes a new key and CSR and asks the CA: with a join token at the CA's bootstrap
address, or with the current certificate as the TLS client certificate at its CSR address (the
CA lets a certificate renew only its own identity). The next refresh is at a random point
between 50% and 80% of the new certificate's remaining lifetime, so that many agents do not
renew at once and a failed renewal has time to be retried; failures are retried with
exponential backoff and jitter until the certificate runs out, and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from istio.api.auth.v1 import ca_pb2, ca_pb2_grpc
from istio.nodeagent.files import CERT_CHAIN, KEY, write_credentials

log = logging.getLogger(__name__)

CA_SERVER_NAME = "istio-ca"
ROTATE_WINDOW = (0.5, 0.8)
RPC_TIMEOUT = 30.0


class AgentError(Exception):
    """A refresh failed; the message says why."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    ca_address: str
    bootstrap_address: str
    identity: str
    out_dir: Path
    root_cert: Path
    join_token: str = ""
    server_name: str = CA_SERVER_NAME
    key_type: str = "ecdsa"
    requested_ttl_minutes: int = 0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True, slots=True)
class Current:
    cert: x509.Certificate
    key_pem: bytes
    chain_pem: bytes


class NodeAgent:
    def __init__(self, config: AgentConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._token = config.join_token
        self._rng = rng or random.Random()
        # Set after each successful refresh and after each failed one; whoever waits clears them.
        self.refreshed = asyncio.Event()
        self.failed = asyncio.Event()

    def current(self) -> Current | None:
        """The certificate in out-dir, if it is usable as a credential: readable, for our
        identity, in date."""
        try:
            chain_pem = (self.config.out_dir / CERT_CHAIN).read_bytes()
            key_pem = (self.config.out_dir / KEY).read_bytes()
            cert = x509.load_pem_x509_certificates(chain_pem)[0]
        except (OSError, ValueError, IndexError):
            return None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            return None
        if _uri_sans(cert) != [self.config.identity]:
            return None
        return Current(cert, key_pem, chain_pem)

    def rotation_delay(self, cert: x509.Certificate) -> float:
        """Seconds until the next refresh: 50-80% of the certificate's remaining lifetime."""
        remaining = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds()
        return max(0.0, remaining * self._rng.uniform(*ROTATE_WINDOW))

    async def refresh(self) -> x509.Certificate:
        """Get a new certificate and write it out; AgentError or grpc.aio.AioRpcError."""
        try:
            root = self.config.root_cert.read_bytes()
        except OSError as error:
            raise AgentError(
                f"cannot read the root certificate {self.config.root_cert}: {error}"
            ) from None
        key = _new_key(self.config.key_type)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.config.identity)]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        request = ca_pb2.CsrRequest(
            csr_pem=csr.public_bytes(serialization.Encoding.PEM),
            requested_ttl_minutes=self.config.requested_ttl_minutes,
        )
        current = self.current()
        if current is not None:
            address = self.config.ca_address
            credentials = grpc.ssl_channel_credentials(root, current.key_pem, current.chain_pem)
            request.credential_type = "onprem"
        elif self._token:
            address = self.config.bootstrap_address
            credentials = grpc.ssl_channel_credentials(root)
            request.credential_type = "token"
            request.node_agent_credential = self._token.encode()
            self._token = ""  # one use, whatever the answer
        else:
            raise AgentError(
                f"no credential: {self.config.out_dir} holds no valid certificate for "
                f"{self.config.identity} and no (unused) join token was given"
            )
        options = [("grpc.ssl_target_name_override", self.config.server_name)]
        async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
            stub = ca_pb2_grpc.IstioCAServiceStub(channel)
            response = await stub.HandleCSR(request, timeout=RPC_TIMEOUT)
        if not response.is_approved:
            raise AgentError(f"the CA refused: {response.status.message}")
        try:
            cert = x509.load_pem_x509_certificate(response.signed_cert)
        except ValueError:
            raise AgentError("the CA answered with an unreadable certificate") from None
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise AgentError("the CA's certificate is not for the key this agent made")
        write_credentials(
            self.config.out_dir,
            key=key_pem,
            cert_chain=response.signed_cert + response.cert_chain,
            root=root,
        )
        log.info(
            "new certificate for %s, serial %x, valid until %s",
            self.config.identity,
            cert.serial_number,
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
        self.refreshed.set()
        return cert

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until `stop` is set."""
        current = self.current()
        delay = self.rotation_delay(current.cert) if current is not None else 0.0
        if current is not None:
            log.info(
                "using the certificate in %s; next refresh in %.0fs", self.config.out_dir, delay
            )
        backoff = self.config.backoff_initial
        while not await _wait(stop, delay):
            try:
                cert = await self.refresh()
            except (AgentError, grpc.aio.AioRpcError, OSError) as error:
                reason = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                delay = backoff * self._rng.uniform(0.5, 1.0)
                backoff = min(backoff * 2, self.config.backoff_max)
                log.warning("refresh failed (%s); retrying in %.1fs", reason, delay)
                self.failed.set()
                continue
            backoff = self.config.backoff_initial
            delay = self.rotation_delay(cert)
            log.info("next refresh in %.1fs", delay)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Whether `stop` was set within `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))
