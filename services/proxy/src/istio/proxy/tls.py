"""Mutual TLS between sidecars: the proxy's certificate files, the SSL contexts made from them,
the peer's SPIFFE identity, and the first look at a connection that may or may not be TLS.

Theory of operation. `TlsManager` keeps one `Credentials` per set of files: the mesh's, from
--cert-dir (cert-chain.pem, key.pem, root-cert.pem, as Istio mounted the secret `istio.<sa>` at
/etc/certs and as the node agent writes them), or the files an Envoy TLS context names. A
`Credentials` makes SSL contexts on demand, one per use (server or client, ALPN list, TLS
versions), and, at most once per `CHECK_INTERVAL` and only when a connection asks, compares
the files' inode, size and mtime with what it loaded. When the node agent has rewritten them
it loads them again: new handshakes use the new certificate, open connections keep theirs. A
set caught half-rewritten (the new key with the old chain) fails to load; the old contexts
stay in force and the next check tries again.

Client side (`TlsManager.connect`): TCP, then TLS over it, then the server's SPIFFE id checked
against the trust domain (and the expected names), and only then is the connection handed to
its protocol. A client context offers each server the last session it got from it (keyed by
server name: the SNI, else the address), so a reconnect resumes instead of a full handshake.

Server side (`Acceptor`): the protocol every connection of a TLS listener starts with. It
peeks at the first bytes without taking them (recv MSG_PEEK on a duplicate of the socket): a
TLS record header (0x16, 0x03) means a handshake; anything else is plaintext, which a
permissive listener serves exactly as a listener without TLS would (the transport handed over
untouched, so the plaintext path costs one peek and nothing per byte), and a strict one
refuses. After the handshake the client's certificate has been verified against the root; its
SPIFFE id must be in the trust domain, and the connection reaches the listener's protocol with
the peer's identity (`PeerIdentity`: source.user and connection.mtls for Mixer, and the
x-forwarded-client-cert header).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from istio.proxy.config import DownstreamTls, Listener, SanMatcher, TlsFiles, UpstreamTls
from istio.proxy.stats import ProtocolStats

log = logging.getLogger(__name__)

CERT_CHAIN = "cert-chain.pem"
KEY = "key.pem"
ROOT_CERT = "root-cert.pem"
DEFAULT_CERT_DIR = "/etc/certs"
DEFAULT_TRUST_DOMAIN = "cluster.local"
SPIFFE = "spiffe://"
CHECK_INTERVAL = 1.0  # seconds between looks at the certificate files (on demand)
HANDSHAKE_TIMEOUT = 10.0
# A permissive port waits this long for a client's first byte before serving the connection
# as plaintext (a protocol where the server speaks first); a strict port closes it.
PEEK_TIMEOUT = 5.0
LOG_INTERVAL = 60.0  # one refusal logged per peer address in this many seconds

# ALPN. A client offers what it will speak; a server accepts what its chain serves. "istio"
# marks sidecar-to-sidecar connections as Istio's proxies marked them. An HTTP chain takes
# either version: the connection tells them apart by its first bytes (the HTTP/2 preface),
# so what ALPN picked never has to be passed along. A TCP chain passes bytes through, so it
# accepts any of them.
ALPN_HTTP1 = ("http/1.1", "istio")
ALPN_H2 = ("h2", "istio")
ALPN_TCP = ("istio",)
ALPN_SERVER_HTTP = ("h2", "http/1.1", "istio")
ALPN_SERVER_TCP = ("istio", "h2", "http/1.1")

_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}
_TLS_RECORD_HANDSHAKE = 0x16
_TLS_MAJOR_VERSION = 0x03


class CredentialsError(Exception):
    """The certificate files cannot be used; the message names them and says why."""


class PeerRejected(Exception):
    """The peer's certificate verified but its identity is not one this side accepts."""

    def __init__(self, reason: str, stat: str) -> None:
        super().__init__(reason)
        self.stat = stat


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is at the other end of a mutual TLS connection."""

    spiffe_id: str  # the peer's SPIFFE id (its certificate's URI SAN)
    cert_hash: str  # SHA-256 of the peer's certificate (DER), hex
    local_id: str = ""  # this proxy's own SPIFFE id
    alpn: str = ""  # the negotiated protocol, "" when none

    def xfcc(self) -> str:
        """The x-forwarded-client-cert value Envoy sets: By=<this side>;Hash=<peer
        certificate>;URI=<peer SPIFFE id>."""
        by = f"By={self.local_id};" if self.local_id else ""
        return f"{by}Hash={self.cert_hash};URI={self.spiffe_id}"

    def attributes(self) -> dict[str, Any]:
        """The Mixer attributes this connection carries."""
        return {"source.user": self.spiffe_id, "connection.mtls": True}


def trust_domain_of(spiffe_id: str) -> str:
    """`spiffe://TD/path` to TD (lowercase); "" when it is not a SPIFFE id with a path."""
    if not spiffe_id.startswith(SPIFFE):
        return ""
    domain, slash, path = spiffe_id[len(SPIFFE) :].partition("/")
    return domain.lower() if slash and path and domain else ""


def verify_peer(
    ssl_object: ssl.SSLObject,
    trust_domain: str,
    names: tuple[SanMatcher, ...],
    local_id: str = "",
) -> PeerIdentity:
    """The identity of a peer whose certificate the handshake verified against the root: it
    must carry exactly one SPIFFE id, in `trust_domain`, and match one of `names` if any."""
    cert = ssl_object.getpeercert()
    if not cert:
        raise PeerRejected("the peer presented no certificate", "fail_verify_no_cert")
    sans = cast(tuple[tuple[str, str], ...], tuple(cert.get("subjectAltName", ())))
    ids = [value for kind, value in sans if kind == "URI" and value.startswith(SPIFFE)]
    if len(ids) != 1:
        raise PeerRejected(
            f"the peer's certificate carries {len(ids)} SPIFFE ids, not one", "fail_verify_san"
        )
    spiffe_id = ids[0]
    if trust_domain_of(spiffe_id) != trust_domain.lower():
        raise PeerRejected(
            f"peer {spiffe_id} is outside the trust domain {trust_domain}", "fail_verify_san"
        )
    if names and not any(matcher.matches(sans) for matcher in names):
        raise PeerRejected(f"peer {spiffe_id} is not one of the names expected", "fail_verify_san")
    der = ssl_object.getpeercert(binary_form=True) or b""
    return PeerIdentity(
        spiffe_id,
        hashlib.sha256(der).hexdigest(),
        local_id,
        ssl_object.selected_alpn_protocol() or "",
    )


class ClientContext(ssl.SSLContext):
    """A client context that offers each server the last session it got from it. asyncio
    takes no session for a handshake, but every loop makes its SSL object through
    `wrap_bio`, which names the server."""

    sessions: dict[str, ssl.SSLSession]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and server_hostname:
            key = server_hostname if isinstance(server_hostname, str) else server_hostname.decode()
            session = self.sessions.get(key)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def remember_session(transport: asyncio.BaseTransport) -> None:
    """Keep the session of a client connection for the next one to the same server (after the
    first response: TLS 1.3 sends its tickets after the handshake)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return
    context = ssl_object.context
    name = ssl_object.server_hostname
    if isinstance(context, ClientContext) and name:
        session = ssl_object.session
        if session is not None:
            context.sessions[name] = session


def _own_spiffe_id(path: str) -> str:
    """The SPIFFE id in the first certificate of a PEM file, for XFCC's By=. The ssl module
    decodes a certificate file only through this test hook; without it By= is left out."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return ""
    try:
        decoded = decode(path)
    except (OSError, ssl.SSLError, ValueError):
        return ""
    for kind, value in decoded.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(SPIFFE):
            return str(value)
    return ""


Signature = tuple[tuple[int, int, int] | None, ...]
# Python's SSLContext.sni_callback: (connection, server name or None, context) -> alert or None.
SniCallback = Callable[[Any, str | None, ssl.SSLContext], int | None]


class Credentials:
    """One set of certificate files and the SSL contexts made from them, reloaded when the
    files change (see the module's docstring)."""

    def __init__(
        self,
        files: TlsFiles,
        *,
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self.check_interval = check_interval
        self.clock = clock
        self.local_id = ""
        self.error = "not loaded yet"
        self._loaded: Signature | None = None
        self._next_check = float("-inf")
        self._contexts: dict[tuple[Any, ...], ssl.SSLContext] = {}

    def _paths(self) -> tuple[str, ...]:
        files = self.files
        return tuple(p for p in (files.cert_chain, files.private_key, files.trusted_ca) if p)

    def _signature(self) -> Signature:
        marks: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                info = os.stat(path)
            except OSError:
                marks.append(None)
            else:
                marks.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(marks)

    def refresh(self) -> None:
        """Load the files again if they changed since they were loaded (at most once per
        check interval)."""
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval
        signature = self._signature()
        if signature == self._loaded:
            return
        try:
            self._make("server", (), ssl.CERT_NONE, "", "")
        except (OSError, ssl.SSLError, ValueError) as error:
            message = self._explain(error)
            if message != self.error:
                log.warning(
                    "%s (%s)",
                    message,
                    "keeping the certificate in use" if self._loaded else "no certificate yet",
                )
            self.error = message
            return  # the loaded contexts stay; the next check tries again
        self._loaded = signature
        self._contexts = {}
        self.error = ""
        self.local_id = _own_spiffe_id(self.files.cert_chain) if self.files.cert_chain else ""
        log.info(
            "certificate %s loaded (%s)", self.files.cert_chain, self.local_id or "no SPIFFE id"
        )

    def check(self) -> None:
        """Look at the files now, whatever the interval; CredentialsError saying which file is
        at fault unless they load (a certificate loaded before stays in use meanwhile)."""
        self._next_check = float("-inf")
        self.refresh()
        if self.error:
            raise CredentialsError(self.error)

    def _explain(self, error: BaseException) -> str:
        """Why the files do not load, naming the one at fault where that can be told."""
        files = self.files
        contents: dict[str, bytes] = {}
        for path in self._paths():
            try:
                with open(path, "rb") as file:
                    contents[path] = file.read()
            except OSError as problem:
                return f"cannot load {path}: {problem.strerror or problem}"
        if files.cert_chain and b"-----BEGIN CERTIFICATE-----" not in contents[files.cert_chain]:
            return f"cannot load {files.cert_chain}: no PEM certificate in it"
        if files.private_key and b"PRIVATE KEY-----" not in contents[files.private_key]:
            return f"cannot load {files.private_key}: no PEM private key in it"
        reason = str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)
        if reason == "KEY_VALUES_MISMATCH":
            return (
                f"cannot load {files.private_key}: the key does not match the certificate "
                f"in {files.cert_chain}"
            )
        return f"cannot load {', '.join(self._paths())}: {reason}"

    def _context(
        self,
        side: str,
        alpn: tuple[str, ...],
        verify: ssl.VerifyMode,
        low: str,
        high: str,
        sni: SniCallback | None = None,
    ) -> ssl.SSLContext:
        self.refresh()
        if self._loaded is None:
            raise CredentialsError(self.error)
        key = (side, alpn, verify, low, high, sni)
        context = self._contexts.get(key)
        if context is None:
            try:
                context = self._contexts[key] = self._make(side, alpn, verify, low, high, sni)
            except (OSError, ssl.SSLError, ValueError) as error:
                raise CredentialsError(self._explain(error)) from None
        return context

    def _make(
        self,
        side: str,
        alpn: tuple[str, ...],
        verify: ssl.VerifyMode,
        low: str,
        high: str,
        sni: SniCallback | None = None,
    ) -> ssl.SSLContext:
        files = self.files
        context: ssl.SSLContext
        if side == "server":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        else:
            client = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
            client.sessions = {}
            client.check_hostname = False  # peers are checked by SPIFFE id, not host name
            context = client
        context.minimum_version = _VERSIONS.get(low, ssl.TLSVersion.TLSv1_2)
        if high:
            context.maximum_version = _VERSIONS[high]
        if files.cert_chain:
            context.load_cert_chain(files.cert_chain, files.private_key)
        if files.trusted_ca:
            context.load_verify_locations(cafile=files.trusted_ca)
        context.verify_mode = verify
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if sni is not None:
            context.sni_callback = sni
        return context

    def server_context(
        self, settings: DownstreamTls, alpn: tuple[str, ...], sni: SniCallback | None = None
    ) -> ssl.SSLContext:
        """The context a listener's handshakes start with; with `sni`, the callback that
        may switch each one to another certificate's context on the client's SNI."""
        if settings.require_client_certificate:
            verify = ssl.CERT_REQUIRED
        elif self.files.trusted_ca:
            verify = ssl.CERT_OPTIONAL
        else:
            verify = ssl.CERT_NONE
        return self._context(
            "server", settings.alpn or alpn, verify, settings.min_version, settings.max_version, sni
        )

    def client_context(self, settings: UpstreamTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
        return self._context(
            "client",
            settings.alpn or alpn,
            ssl.CERT_REQUIRED,
            settings.min_version,
            settings.max_version,
        )


class SniSelector:
    """The certificates of a listener whose client's SNI picks one (`DownstreamTls.sni`): the
    handshake starts with the default certificate's context, whose callback switches it, as
    soon as the ClientHello is read, to the context of the certificate for the name sent. An
    exact name first, then the longest `*.suffix` wildcard, then the default (or a refusal
    when the listener has none). Each certificate is a `Credentials`: reloaded when its files
    change, as the mesh's are."""

    def __init__(self, manager: TlsManager, settings: DownstreamTls, alpn: tuple[str, ...]):
        self.settings = settings
        self.alpn = alpn
        self.default = manager.credentials(settings.files)
        self.exact: dict[str, Credentials] = {}
        wildcards: list[tuple[str, Credentials]] = []
        for certificate in settings.sni:
            credentials = manager.credentials(certificate.files)
            for name in certificate.server_names:
                if name.startswith("*."):
                    wildcards.append((name[1:], credentials))
                else:
                    self.exact.setdefault(name, credentials)
        wildcards.sort(key=lambda item: -len(item[0]))
        self.wildcards = tuple(wildcards)

    def lookup(self, server_name: str | None) -> Credentials | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            for suffix, credentials in self.wildcards:
                if name.endswith(suffix) and len(name) > len(suffix):
                    return credentials
        return self.default if self.settings.sni_default else None

    def context(self) -> ssl.SSLContext:
        return self.default.server_context(self.settings, self.alpn, self._select)

    def _select(self, connection: Any, server_name: str | None, _: ssl.SSLContext) -> int | None:
        credentials = self.lookup(server_name)
        if credentials is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if credentials is self.default:
            return None  # the context the handshake started with
        try:
            connection.context = credentials.server_context(self.settings, self.alpn)
        except CredentialsError:
            # Refused, not served with another name's certificate; the Acceptor logs it.
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


class RateLimitedLog:
    """Warnings about one peer at most once per interval, with bounded memory."""

    def __init__(self, interval: float = LOG_INTERVAL, capacity: int = 4096) -> None:
        self.interval = interval
        self.capacity = capacity
        self._last: dict[str, float] = {}

    def warning(self, peer: str, message: str, *args: object) -> bool:
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= self.capacity:
            self._last.clear()
        self._last[peer] = now
        log.warning(message, *args)
        return True


class _Verifier(asyncio.Protocol):
    """A TLS connection's first protocol: once the handshake is done, checks the peer
    (`check` raises PeerRejected) and hands the connection to the protocol `serve` makes,
    before a byte of application data is read."""

    def __init__(
        self,
        check: Callable[[ssl.SSLObject], PeerIdentity | None],
        serve: Callable[[PeerIdentity | None], asyncio.Protocol | None],
    ) -> None:
        self.check = check
        self.serve = serve
        self.protocol: asyncio.Protocol | None = None
        self.rejected: PeerRejected | None = None
        self.identity: PeerIdentity | None = None
        self.resumed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            self.identity = self.check(ssl_object)
        except PeerRejected as rejected:
            self.rejected = rejected
            cast(asyncio.Transport, transport).abort()
            return
        self.resumed = bool(ssl_object.session_reused)
        protocol = self.serve(self.identity)
        if protocol is None:
            transport.close()
            return
        self.protocol = protocol
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Only before a hand-over (a rejected peer): nothing to tell."""


def _handshake_failure(error: BaseException) -> tuple[str, str]:
    """The stat and the reason for a failed handshake."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "fail_verify_error", error.verify_message or str(error)
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "fail_verify_no_cert", "the peer presented no certificate"
        return "connection_error", reason
    return "connection_error", str(error) or type(error).__name__


class TlsError(Exception):
    """A TLS connection to a server failed after TCP connected; the message says why."""


class TlsManager:
    """The proxy's TLS credentials and trust domain, shared by its listeners and clusters."""

    def __init__(
        self,
        cert_dir: str | Path | None = DEFAULT_CERT_DIR,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.cert_dir = Path(cert_dir) if cert_dir else None
        self.trust_domain = trust_domain.lower()
        self.check_interval = check_interval
        self.mesh_files = (
            TlsFiles(
                str(self.cert_dir / CERT_CHAIN),
                str(self.cert_dir / KEY),
                str(self.cert_dir / ROOT_CERT),
            )
            if self.cert_dir is not None
            else None
        )
        self.refusals = RateLimitedLog()
        self._credentials: dict[TlsFiles, Credentials] = {}
        self._selectors: dict[tuple[DownstreamTls, tuple[str, ...]], SniSelector] = {}
        self._handshakes: set[asyncio.Task[None]] = set()

    def credentials(self, files: TlsFiles | None) -> Credentials:
        files = files or self.mesh_files
        if files is None:
            raise CredentialsError("mutual TLS asked for, and the proxy has no --cert-dir")
        credentials = self._credentials.get(files)
        if credentials is None:
            credentials = self._credentials[files] = Credentials(
                files, check_interval=self.check_interval
            )
        return credentials

    def server_context(self, settings: DownstreamTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The context a listener's handshakes start with (CredentialsError without one)."""
        if not settings.sni:
            return self.credentials(settings.files).server_context(settings, alpn)
        key = (settings, alpn)
        selector = self._selectors.get(key)
        if selector is None:
            if len(self._selectors) >= 256:  # listeners come and go: forget the old ones
                self._selectors.clear()
            selector = self._selectors[key] = SniSelector(self, settings, alpn)
        return selector.context()

    def check_listener(self, listener: Listener) -> None:
        """Before a listener is accepted: the certificate files its TLS names must load, as
        Envoy refuses a listener whose files do not (the mesh's own, from --cert-dir, are
        the node agent's to write, and may come later). CredentialsError naming the file."""
        settings = listener.tls
        if settings is None or settings.files is None:
            return
        for files in (settings.files, *(c.files for c in settings.sni)):
            self.credentials(files).check()

    async def connect(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: str,
        port: int,
        settings: UpstreamTls,
        alpn: tuple[str, ...],
        stats: ProtocolStats,
        *,
        local_addr: tuple[str, int] | None = None,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A mutual TLS connection to `host:port` (from `local_addr` when given), served by
        `factory()`'s protocol once the server's identity is checked. OSError for TCP, TlsError
        for TLS; the caller bounds the time."""
        try:
            credentials = self.credentials(settings.files)
            context = credentials.client_context(settings, alpn)
        except CredentialsError as error:
            stats.count("local_certificate_missing")
            raise TlsError(str(error)) from None
        trust_domain = self.trust_domain

        def check(ssl_object: ssl.SSLObject) -> PeerIdentity:
            return verify_peer(
                ssl_object, trust_domain, settings.subject_alt_names, credentials.local_id
            )

        verifier = _Verifier(check, lambda _: factory())
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: verifier,
                host,
                port,
                ssl=context,
                server_hostname=settings.sni or host,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                local_addr=local_addr,
            )
        except ssl.SSLError as error:
            stat, reason = _handshake_failure(error)
            stats.count(stat)
            raise TlsError(f"TLS handshake: {reason}") from None
        if verifier.rejected is not None:
            stats.count(verifier.rejected.stat)
            raise TlsError(str(verifier.rejected))
        if verifier.protocol is None:
            stats.count("connection_error")
            raise TlsError("the connection closed during the TLS handshake")
        stats.count("handshake")
        if verifier.resumed:
            stats.count("session_reused")
        return transport, verifier.protocol

    def track(self, task: asyncio.Task[None]) -> None:
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def quiet(self) -> None:
        """Until no accepted connection is being handed over (its handshake done, its peer
        checked and counted)."""
        while self._handshakes:
            await asyncio.wait(set(self._handshakes))


class Acceptor(asyncio.Protocol):
    """The first protocol of a connection to a listener with TLS. It takes the socket from
    its transport before a byte is read (uvloop starts reading right after connection_made,
    so pausing is no use: the transport is closed on a duplicate of the socket, which keeps
    the connection open), peeks at the first bytes, then gives the socket back to the loop as
    plaintext or as TLS with the listener's current context (`connect_accepted_socket`). The
    protocol `serve(identity)` makes serves it from then on (identity None: plaintext on a
    permissive port, or TLS without a client certificate)."""

    def __init__(
        self,
        manager: TlsManager,
        settings: DownstreamTls,
        alpn: tuple[str, ...],
        stats: ProtocolStats,
        serve: Callable[[PeerIdentity | None], asyncio.Protocol | None],
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.alpn = alpn
        self.stats = stats
        self.serve = serve
        self.peer = ""
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        raw = transport.get_extra_info("socket")
        try:
            self.sock = socket.socket(fileno=os.dup(raw.fileno()))
        except (OSError, AttributeError) as error:
            log.error("cannot take a connection from %s: %s", self.peer, error)
            cast(asyncio.Transport, transport).abort()
            return
        cast(asyncio.Transport, transport).abort()  # closes its descriptor, not the socket
        self.sock.setblocking(False)
        self._peek()

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport given up in connection_made: the socket lives on in `sock`."""

    def _peek(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            head = sock.recv(3, socket.MSG_PEEK)
        except BlockingIOError:
            if not self.watching:
                loop = asyncio.get_running_loop()
                loop.add_reader(sock.fileno(), self._peek)
                self.timer = loop.call_later(PEEK_TIMEOUT, self._peek_timeout)
                self.watching = True
            return
        except OSError:
            self._close()
            return
        self._stop_watching()
        if not head:
            self._close()  # the client left without a byte
        elif head[0] == _TLS_RECORD_HANDSHAKE and (len(head) < 2 or head[1] == _TLS_MAJOR_VERSION):
            self._start(self._tls())
        else:
            self._plaintext()

    def _peek_timeout(self) -> None:
        self.timer = None
        self._stop_watching()
        if self.sock is None:
            return
        if self.settings.permissive:
            self._plaintext()  # a protocol where the server speaks first, maybe
        else:
            self.stats.count("connection_error")
            self._close()

    def _stop_watching(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watching and self.sock is not None:
            self.watching = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def _close(self) -> None:
        self._stop_watching()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        self.manager.track(asyncio.get_running_loop().create_task(work))

    def _plaintext(self) -> None:
        if not self.settings.permissive:
            self.stats.count("plaintext_refused")
            self.manager.refusals.warning(
                self.peer,
                "refused a plaintext connection from %s: this port takes %s only",
                self.peer,
                "mutual TLS" if self.settings.require_client_certificate else "TLS",
            )
            self._close()
            return
        self.stats.count("plaintext")
        self._start(self._plain())

    async def _plain(self) -> None:
        sock, self.sock = self.sock, None
        assert sock is not None
        protocol = self.serve(None)
        if protocol is None:
            sock.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            sock.close()

    async def _tls(self) -> None:
        sock, self.sock = self.sock, None
        assert sock is not None
        settings = self.settings
        try:
            credentials = self.manager.credentials(settings.files)
            context = self.manager.server_context(settings, self.alpn)
        except CredentialsError as error:
            sock.close()
            self.stats.count("local_certificate_missing")
            self.manager.refusals.warning(
                f"credentials {settings.files}", "cannot serve TLS: %s", error
            )
            return
        trust_domain = self.manager.trust_domain

        def check(ssl_object: ssl.SSLObject) -> PeerIdentity | None:
            if not settings.require_client_certificate and not ssl_object.getpeercert():
                return None  # TLS without a client certificate, where that is allowed
            return verify_peer(
                ssl_object, trust_domain, settings.subject_alt_names, credentials.local_id
            )

        verifier = _Verifier(check, self.serve)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: verifier, sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError) as error:
            sock.close()
            stat, reason = _handshake_failure(error)
            self.stats.count(stat)
            self.manager.refusals.warning(
                self.peer, "TLS handshake from %s failed: %s", self.peer, reason
            )
            return
        if verifier.rejected is not None:
            self.stats.count(verifier.rejected.stat)
            self.manager.refusals.warning(
                self.peer, "refused a TLS connection from %s: %s", self.peer, verifier.rejected
            )
            return
        self.stats.count("handshake")
        if verifier.resumed:
            self.stats.count("session_reused")
