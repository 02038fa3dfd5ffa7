"""Ingress TLS termination with a certificate per host, chosen by SNI.

What Pilot sends (its golden `ingress-tls.json`) compiles to one listener whose certificate
the client's SNI picks; chains the data path cannot serve as one are refused. Certificate
files that do not load make the proxy NACK the listeners, naming listener and file, and keep
the last good ones. End to end: pilot-discovery (--ingress-certs-dir) and `pilot-agent proxy
ingress` with two hosts and two certificates from a CA made here: `openssl s_client
-servername` gets each host's certificate (and the default one without SNI), `curl
--resolve --cacert` gets each host's app, a garbage handshake is closed and counted while a
keep-alive connection carries on, a rewritten certificate is served to new handshakes, and a
rule naming a secret whose files are missing is refused while the others keep serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2, json_format

from istio.pilot.xds import generate
from istio.proxy import compile
from istio.proxy.agent import Agent, Node
from istio.proxy.config import DownstreamTls, SniCertificate, TlsFiles
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.proxy.tls import SniSelector, TlsManager
from istio.proxy.xds import LISTENER, from_protobuf
from istio.testing.net import free_port

assert generate  # registers the descriptors of every type Pilot packs in an Any (json_format)
GOLDEN = Path(__file__).parents[2] / "pilot" / "tests" / "golden" / "ingress-tls.json"
BIN = Path(sys.executable).parent
INGRESS_IP, APP_IP = "127.0.6.1", "127.0.6.2"
NOW = datetime.datetime.now(datetime.UTC)


# Certificates


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "ingress test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, host: str) -> tuple[bytes, bytes, int]:
        """A server certificate for `host`: (chain PEM, key PEM, serial)."""
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial

    def write(self, directory: Path, host: str) -> int:
        """tls.crt and tls.key in `directory` (as a Kubernetes secret is mounted), each
        replaced atomically, the key first; the certificate's serial."""
        chain, key, serial = self.issue(host)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in (("tls.key", key), ("tls.crt", chain)):
            temporary = directory / f".{name}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, directory / name)
        return serial


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.make()


# Compiling


def golden_listener(name: str) -> listener_pb2.Listener:
    body = json.loads(GOLDEN.read_text())["lds"][name]
    return json_format.ParseDict(body, listener_pb2.Listener())


def test_pilots_tls_listener_compiles_to_certificates_by_server_name() -> None:
    listener = compile.listener(from_protobuf(golden_listener("ingress_443")))
    tls = listener.tls
    assert tls is not None
    base = "/etc/istio/ingress-certs"
    assert tls.files == TlsFiles(f"{base}/tls.crt", f"{base}/tls.key", "")
    assert tls.sni == (
        SniCertificate(
            ("bookinfo.example.com",),
            TlsFiles(f"{base}/bookinfo-certs/tls.crt", f"{base}/bookinfo-certs/tls.key", ""),
        ),
        SniCertificate(
            ("reviews.example.com",),
            TlsFiles(f"{base}/reviews-certs/tls.crt", f"{base}/reviews-certs/tls.key", ""),
        ),
    )
    assert (tls.sni_default, tls.require_client_certificate, tls.permissive) == (
        True,
        False,
        False,
    )
    assert tls.alpn == ("h2", "http/1.1")
    assert listener.chain is not None
    assert listener.chain.rds == "ingress_443"  # type: ignore[union-attr]


def test_chains_sni_picks_must_differ_in_their_certificate_alone() -> None:
    resource = golden_listener("ingress_443")
    duplicate = listener_pb2.Listener()
    duplicate.CopyFrom(resource)
    duplicate.filter_chains[1].filter_chain_match.server_names[0] = "BOOKINFO.example.com"
    with pytest.raises(compile.CompileError, match=r"'bookinfo\.example\.com' in more than one"):
        compile.listener(from_protobuf(duplicate))

    other_routes = listener_pb2.Listener()
    other_routes.CopyFrom(resource)
    other_routes.filter_chains[0].filters[0].name = "another"
    with pytest.raises(compile.CompileError, match="must carry the same filters"):
        compile.listener(from_protobuf(other_routes))

    no_tls = listener_pb2.Listener()
    no_tls.CopyFrom(resource)
    no_tls.filter_chains[0].ClearField("transport_socket")
    with pytest.raises(compile.CompileError, match="server_names without TLS"):
        compile.listener(from_protobuf(no_tls))

    # Without a chain for other names, a client naming none of them is refused.
    strict = listener_pb2.Listener()
    strict.CopyFrom(resource)
    del strict.filter_chains[-1]
    compiled = compile.listener(from_protobuf(strict)).tls
    assert compiled is not None
    assert not compiled.sni_default
    assert compiled.files == compiled.sni[0].files


def test_certificate_files_that_do_not_load_are_nacked_naming_listener_and_file(
    tmp_path: Path, authority: Authority
) -> None:
    context = Context()
    tls = TlsManager(None, check_interval=0.0)
    ingress = Agent(
        Node("ingress~127.0.0.1~ingress.default~default.svc.cluster.local"),
        "127.0.0.1:1",
        context,
        ListenerManager(context, "127.0.0.1", tls=tls),
    )
    resource = golden_listener("ingress_8443")
    files = {"/etc/istio/ingress-certs": str(tmp_path)}
    text = json_format.MessageToJson(resource)
    for old, new in files.items():
        text = text.replace(old, new)
    resource = json_format.Parse(text, listener_pb2.Listener())
    packed = any_pb2.Any()
    packed.Pack(resource)

    error = ingress.state.accept(LISTENER, "v1", [packed])
    assert error == (
        f"listener 'ingress_8443': cannot load {tmp_path}/admin-certs/tls.crt: "
        "No such file or directory"
    )
    authority.write(tmp_path / "admin-certs", "admin.example.com")
    assert ingress.state.accept(LISTENER, "v2", [packed]) is None
    # A broken file later: the new push is refused, the accepted listener stays.
    (tmp_path / "admin-certs" / "tls.crt").write_text("not a certificate\n")
    error = ingress.state.accept(LISTENER, "v3", [packed])
    assert error == (
        f"listener 'ingress_8443': cannot load {tmp_path}/admin-certs/tls.crt: "
        "no PEM certificate in it"
    )
    _, other_key, _ = authority.issue("admin.example.com")
    authority.write(tmp_path / "admin-certs", "admin.example.com")
    (tmp_path / "admin-certs" / "tls.key").write_bytes(other_key)
    error = ingress.state.accept(LISTENER, "v4", [packed])
    assert error is not None
    assert "the key does not match the certificate" in error, error
    assert ingress.state.types[LISTENER].version == "v2"
    assert ingress.state.nacks == 3


# End to end


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@dataclass
class Mesh:
    tmp: Path
    authority: Authority
    port: int = field(default_factory=lambda: free_port(INGRESS_IP))
    grpc_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=lambda: free_port(INGRESS_IP))
    app_port: int = field(default_factory=lambda: free_port(APP_IP))
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def certs(self) -> Path:
        return self.tmp / "ingress-certs"

    @property
    def ca_file(self) -> Path:
        return self.tmp / "ca.pem"

    def rules(self, *hosts: tuple[str, str]) -> None:
        """An IngressRule per (host, secret), on the test's port, to the app."""
        documents = [
            f"""
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {{name: {host.split(".")[0]}}}
spec:
  port: {self.port}
  tlsSecret: {secret}
  destination: {{name: web}}
  destinationPort: 8080
  match: {{request: {{headers: {{authority: {{exact: "{host}:{self.port}"}}}}}}}}
"""
            for host, secret in hosts
        ]
        temporary = self.tmp / "config" / ".rules.tmp"
        temporary.write_text("---".join(documents))
        os.replace(temporary, self.tmp / "config" / "rules.yaml")

    async def start(self) -> None:
        self.ca_file.write_bytes(self.authority.pem())
        (self.tmp / "registry" / "web.yaml").write_text(
            f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {APP_IP}, ports: {{http: {self.app_port}}}}}]
"""
        )
        await self.spawn(
            "serving xDS",
            BIN / "pilot-discovery",
            "--registry",
            f"file:{self.tmp / 'registry'}",
            "--config-store",
            f"file://{self.tmp / 'config'}",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc_port}",
            "--http-addr",
            f"127.0.0.1:{free_port()}",
            "--ingress-certs-dir",
            str(self.certs),
        )
        await self.spawn(
            "proxy ready",
            BIN / "pilot-agent",
            "proxy",
            "ingress",
            "--discovery-address",
            f"127.0.0.1:{self.grpc_port}",
            "--bind-address",
            INGRESS_IP,
            "--admin-port",
            str(self.admin_port),
            "--stats-port",
            str(self.admin_port),
            "--access-log",
            "off",
        )

    async def spawn(self, marker: str, *argv: str | Path) -> None:
        """Starts `argv`, waits until its stderr has said `marker`."""
        process = await asyncio.create_subprocess_exec(
            *map(str, argv), stderr=asyncio.subprocess.PIPE
        )
        self.processes.append(process)
        stream = process.stderr
        assert stream is not None
        seen = []
        while True:
            line = await asyncio.wait_for(stream.readline(), 60)
            seen.append(line.decode())
            assert line, f"{argv[0]} exited before {marker!r}:\n{''.join(seen)}"
            if marker.encode() in line:
                break

        async def drain() -> None:
            while await stream.readline():
                pass

        task = asyncio.get_running_loop().create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.terminate()
                assert await asyncio.wait_for(process.wait(), 30) == 0

    async def served_certificate(self, server_name: str | None) -> tuple[str, str]:
        """(subject CN, serial in hex) of the certificate `openssl s_client` is served,
        verified against the test's CA."""
        sni = ["-servername", server_name] if server_name else ["-noservername"]
        code, out, err = await run(
            "openssl",
            "s_client",
            "-connect",
            f"{INGRESS_IP}:{self.port}",
            *sni,
            "-CAfile",
            str(self.ca_file),
            "-alpn",
            "http/1.1",
            "-showcerts",
        )
        assert code == 0, err
        assert "Verify return code: 0 (ok)" in out, out
        assert "ALPN protocol: http/1.1" in out, out
        pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
        assert pem is not None, out
        cert = x509.load_pem_x509_certificate(pem.group(0).encode())
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return str(common_name), f"{cert.serial_number:x}"

    async def curl(self, host: str) -> tuple[str, str]:
        """What the app said to `https://host:port/hello`, and the HTTP status."""
        code, out, err = await run(
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--resolve",
            f"{host}:{self.port}:{INGRESS_IP}",
            "--cacert",
            str(self.ca_file),
            "-w",
            "\\n%{http_code} %{http_version}",
            f"https://{host}:{self.port}/hello",
        )
        assert code == 0, err
        body, _, status = out.rpartition("\n")
        status, version = status.split()
        assert version == "2"  # ALPN chose h2: the ingress serves HTTP/2 over TLS
        return body, status

    async def stats(self) -> dict[str, int]:
        """The listener's ssl.* counters, from the admin /stats page."""
        _, out, _ = await run("curl", "-sS", f"http://{INGRESS_IP}:{self.admin_port}/stats")
        prefix = f"ssl.listener.{INGRESS_IP}_{self.port}."
        found = {}
        for line in out.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                found[name[len(prefix) :]] = int(value)
        return found

    async def server_info(self) -> dict[str, object]:
        _, out, _ = await run("curl", "-sS", f"http://{INGRESS_IP}:{self.admin_port}/server_info")
        info: dict[str, object] = json.loads(out)
        return info


@pytest.fixture
async def mesh(tmp_path: Path, authority: Authority) -> AsyncIterator[Mesh]:
    for tool in ("curl", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup` as root")
    (tmp_path / "registry").mkdir()
    (tmp_path / "config").mkdir()

    async def hello(request: web.Request) -> web.Response:
        proto = request.headers.get("x-forwarded-proto", "")
        return web.Response(text=f"web {request.host} {request.path} {proto}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    made = Mesh(tmp_path, authority)
    await web.TCPSite(runner, APP_IP, made.app_port).start()
    try:
        yield made
    finally:
        await made.stop()
        await runner.cleanup()


async def closed_without_a_byte(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Did the server close the connection (a FIN or a reset) without sending anything?"""
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
    return data == b""


async def keep_alive_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
) -> bytes:
    """One request on an open connection; the response body (by its content-length)."""
    writer.write(f"GET /again HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    return await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)


async def test_each_host_gets_its_certificate_by_sni(mesh: Mesh) -> None:
    a_serial = f"{mesh.authority.write(mesh.certs / 'a-certs', 'a.example.test'):x}"
    b_serial = f"{mesh.authority.write(mesh.certs / 'b-certs', 'b.example.test'):x}"
    mesh.rules(("a.example.test", "a-certs"), ("b.example.test", "b-certs"))
    await mesh.start()

    assert await mesh.served_certificate("a.example.test") == ("a.example.test", a_serial)
    assert await mesh.served_certificate("b.example.test") == ("b.example.test", b_serial)
    # No SNI, or a name no rule has: the default certificate (the lowest secret's name).
    assert await mesh.served_certificate(None) == ("a.example.test", a_serial)
    assert await mesh.served_certificate("c.example.test") == ("a.example.test", a_serial)
    for host in ("a.example.test", "b.example.test"):
        assert await mesh.curl(host) == (f"web {host}:{mesh.port} /hello https", "200")

    # A keep-alive connection, then garbage on another: the garbage is closed and counted,
    # the keep-alive connection carries on.
    client = ssl.create_default_context(cafile=str(mesh.ca_file))
    authority = f"b.example.test:{mesh.port}"
    reader, writer = await asyncio.open_connection(
        INGRESS_IP, mesh.port, ssl=client, server_hostname="b.example.test"
    )
    try:
        assert await keep_alive_get(reader, writer, authority) == (
            f"web {authority} /again https".encode()
        )
        before = await mesh.stats()
        garbage_reader, garbage_writer = await asyncio.open_connection(INGRESS_IP, mesh.port)
        garbage_writer.write(b"\x16\x03\x01\x00\x40" + bytes(range(64)) + b"\x00" * 512)
        assert await closed_without_a_byte(garbage_reader, garbage_writer)
        plain_reader, plain_writer = await asyncio.open_connection(INGRESS_IP, mesh.port)
        plain_writer.write(b"GET / HTTP/1.1\r\nhost: a.example.test\r\n\r\n")
        assert await closed_without_a_byte(plain_reader, plain_writer)
        assert await keep_alive_get(reader, writer, authority) == (
            f"web {authority} /again https".encode()
        )
        after = await mesh.stats()
        assert after.get("connection_error", 0) == before.get("connection_error", 0) + 1
        assert after.get("plaintext_refused", 0) == before.get("plaintext_refused", 0) + 1
        assert after["handshake"] == 7  # 4 s_clients, 2 curls, the keep-alive connection
    finally:
        writer.close()

    # A rewritten certificate is served to new handshakes (the files are looked at no more
    # than once a second: polled, a bounded number of times).
    new_serial = f"{mesh.authority.write(mesh.certs / 'b-certs', 'b.example.test'):x}"
    for _ in range(40):
        if await mesh.served_certificate("b.example.test") == ("b.example.test", new_serial):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the rewritten certificate was never served")

    # A host whose secret has no files: the proxy refuses the push, naming the listener and
    # the file, and serves the other hosts as before.
    mesh.rules(
        ("a.example.test", "a-certs"), ("b.example.test", "b-certs"), ("c.example.test", "c-certs")
    )
    for _ in range(100):
        info = await mesh.server_info()
        if info["nacks"]:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the push naming missing certificate files was accepted")
    missing = mesh.certs / "c-certs" / "tls.crt"
    assert info["last_nack"] == (
        f"listener 'ingress_{mesh.port}': cannot load {missing}: No such file or directory"
    )
    assert await mesh.curl("a.example.test") == (
        f"web a.example.test:{mesh.port} /hello https",
        "200",
    )


def test_sni_picks_an_exact_name_then_the_longest_wildcard_then_the_default() -> None:
    def files(name: str) -> TlsFiles:
        return TlsFiles(f"/certs/{name}/tls.crt", f"/certs/{name}/tls.key", "")

    settings = DownstreamTls(
        files=files("default"),
        require_client_certificate=False,
        sni=(
            SniCertificate(("shop.example.com",), files("shop")),
            SniCertificate(("*.example.com",), files("any")),
            SniCertificate(("*.eu.example.com",), files("eu")),
        ),
    )
    tls = TlsManager(None)
    selector = SniSelector(tls, settings, ("http/1.1",))

    def picked(name: str | None) -> str | None:
        found = selector.lookup(name)
        return None if found is None else found.files.cert_chain.split("/")[2]

    assert picked("Shop.Example.com.") == "shop"
    assert picked("www.eu.example.com") == "eu"
    assert picked("a.b.example.com") == "any"
    assert picked("example.com") == "default"  # a wildcard needs a label before it
    assert picked(None) == "default"
    # Without a chain for other names (no default), they are refused.
    strict = SniSelector(tls, dataclasses.replace(settings, sni_default=False), ("http/1.1",))
    assert strict.lookup("example.com") is None
    assert strict.lookup(None) is None
    assert strict.lookup("shop.example.com") is selector.lookup("shop.example.com")
