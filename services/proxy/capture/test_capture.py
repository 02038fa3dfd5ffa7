"""The capture script proved for real: network namespaces, a veth pair, iptables as root.

Two namespaces joined by a veth: the "pod" (client) where the script runs, with a stand-in
sidecar on 15001 (uid 1337) and an app on 9090, and a "server" namespace with a plain server
on 8080 at two addresses. curl, unmodified and unaware of any proxy, connects; whoever answers
says so in the JSON body, so each test sees whether the connection was captured and which
original destination the stand-in read with SO_ORIGINAL_DST. Traffic never leaves the two
namespaces, and they are removed after the run even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("istio-iptables.sh")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create network namespaces and iptables rules"
)

# A /24 used only inside the namespaces this module creates.
SERVER_IP = "10.231.7.1"  # server namespace, inside any -x 10.231.7.128/25
SERVER_IP_HIGH = "10.231.7.130"  # server namespace, the upper half of the /24
POD_IP = "10.231.7.2"  # client namespace: the "pod"
SERVER_PORT = 8080
APP_PORT = 9090
PROXY_PORT = 15001
PROXY_UID = 1337
APP_UID = 1000  # an ordinary, non-exempt user
EXEMPT_GID = 1338

SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])

# The peers: stdlib only, run with `python3 -I -c`. `server NAME PORT` answers with who it is
# and where the connection arrived; `proxy PORT POD_IP...` is the stand-in sidecar: it reads
# SO_ORIGINAL_DST, forwards the request (to 127.0.0.1:port for the pod's own addresses, as
# Envoy's inbound listeners do; to the original destination otherwise) and answers with what
# it saw and what upstream said. Both print "ready" once listening.
PEER = r"""
import asyncio, json, os, socket, struct, sys

SO_ORIGINAL_DST = 80
HEAD_END = b"\r\n\r\n"


def response(body):
    data = json.dumps(body).encode()
    head = "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    return (head % len(data)).encode() + b"Connection: close\r\n\r\n" + data


def addr(pair):
    return "%s:%d" % (pair[0], pair[1])


async def server(name, reader, writer):
    try:
        await reader.readuntil(HEAD_END)
        body = {
            "via": name,
            "local": addr(writer.get_extra_info("sockname")),
            "peer": writer.get_extra_info("peername")[0],
        }
        writer.write(response(body))
        await writer.drain()
    finally:
        writer.close()


def original_dst(sock):
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None  # not redirected
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def forward(target, head):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return json.loads(raw.split(HEAD_END, 1)[1])


async def proxy(pod_ips, reader, writer):
    try:
        head = await reader.readuntil(HEAD_END)
        dst = original_dst(writer.get_extra_info("socket"))
        body = {
            "via": "proxy",
            "uid": os.getuid(),
            "local": addr(writer.get_extra_info("sockname")),
            "peer": writer.get_extra_info("peername")[0],
            "original_dst": addr(dst) if dst else None,
        }
        if dst:
            target = ("127.0.0.1", dst[1]) if dst[0] in pod_ips else dst
            try:
                body["upstream"] = await forward(target, head)
            except Exception as e:
                body["upstream"] = {"error": repr(e)}
        writer.write(response(body))
        await writer.drain()
    finally:
        writer.close()


async def main():
    kind, arg, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "server":
        handler = lambda r, w: server(arg, r, w)
    else:
        pod_ips = set(arg.split(","))
        handler = lambda r, w: proxy(pod_ips, r, w)
    srv = await asyncio.start_server(handler, "0.0.0.0", port)
    print("ready", kind, port, "uid", os.getuid(), flush=True)
    async with srv:
        await srv.serve_forever()


asyncio.run(main())
"""


def _which(name: str) -> str:
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `make setup` as root, which installs it", pytrace=False
        )
    return path


def _peer_python() -> str:
    # The peers run as uid 1337 too: prefer an interpreter outside root's home.
    for candidate in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.access(candidate, os.X_OK) and not candidate.startswith("/root/"):
            return candidate
    return os.path.realpath(sys.executable)


def _env() -> dict[str, str]:
    # No *_proxy variables: the clients are unmodified and must not know about any proxy.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PATH"] = SYSTEM_PATH
    return env


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _as(uid: int, gid: int | None = None) -> list[str]:
    return [
        _which("setpriv"),
        f"--reuid={uid}",
        f"--regid={uid if gid is None else gid}",
        "--clear-groups",
    ]


def _follow(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    """Reads a peer's output in the background, line by line into `lines` ("" at the end),
    so that the peer never blocks on a full pipe."""

    def run() -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in proc.stdout:
                lines.put(line)
        lines.put("")

    threading.Thread(target=run, daemon=True).start()


def _save_rules(text: str) -> str:
    """iptables-save output without its timestamps and packet counters."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in lines)


class Pods:
    """The two namespaces, their peers, and the means to capture and connect."""

    def __init__(self, prefix: str = "cap") -> None:
        tag = os.getpid()
        self.client = f"{prefix}-client-{tag}"
        self.server = f"{prefix}-server-{tag}"
        self.procs: list[subprocess.Popen[str]] = []
        self.ip = _which("ip")
        self.iptables_save = _which("iptables-save")
        self.curl = _which("curl")
        _which("iptables")
        self.python = _peer_python()

    def setup(self, *, stand_in: bool = True) -> None:
        for ns in (self.client, self.server):
            self._del_netns(ns)  # a leftover of a crashed run with the same pid
            _run(self.ip, "netns", "add", ns)
        c, s = ("-n", self.client), ("-n", self.server)
        # The veth is made inside the client namespace with its peer in the server's: it
        # never appears in the host's namespace.
        veth = f"link add veth-pod type veth peer name veth-srv netns {self.server}"
        _run(self.ip, *c, *veth.split())
        _run(self.ip, *c, "addr", "add", f"{POD_IP}/24", "dev", "veth-pod")
        _run(self.ip, *s, "addr", "add", f"{SERVER_IP}/24", "dev", "veth-srv")
        _run(self.ip, *s, "addr", "add", f"{SERVER_IP_HIGH}/24", "dev", "veth-srv")
        for args in (c, s):
            _run(self.ip, *args, "link", "set", "lo", "up")
        _run(self.ip, *c, "link", "set", "veth-pod", "up")
        _run(self.ip, *s, "link", "set", "veth-srv", "up")
        if stand_in:
            self._start(self.server, [], "server", "server", SERVER_PORT)
            self._start(self.client, [], "server", "app", APP_PORT)
            self._start(self.client, _as(PROXY_UID), "proxy", POD_IP, PROXY_PORT)

    def _start(self, ns: str, prefix: list[str], *args: object) -> None:
        argv = [self.ip, "netns", "exec", ns, *prefix, self.python, "-I", "-c", PEER]
        self.spawn([*argv, *map(str, args)], "ready", timeout=30)

    def spawn(
        self, argv: list[str], marker: str, *, env: dict[str, str] | None = None, timeout: float
    ) -> subprocess.Popen[str]:
        """Starts `argv` and waits for a line of its output containing `marker`."""
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd="/",
            env=env or _env(),
        )
        self.procs.append(proc)
        lines: queue.Queue[str] = queue.Queue()
        _follow(proc, lines)
        # Wait for the marker: an event, not a guess at how long it takes.
        seen = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if marker in line or not line:
                break
        if not seen or marker not in seen[-1]:
            text = "".join(seen)
            pytest.fail(f"{argv[:8]} did not print {marker!r}:\n{text}", pytrace=False)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in (self.client, self.server):
            self._del_netns(ns)

    def _del_netns(self, ns: str) -> None:
        subprocess.run([self.ip, "netns", "del", ns], capture_output=True, check=False)

    def capture(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Runs the capture script in the pod's namespace."""
        return _run(self.ip, "netns", "exec", self.client, "bash", str(SCRIPT), *args)

    def nat_rules(self) -> str:
        return _save_rules(
            _run(self.ip, "netns", "exec", self.client, self.iptables_save, "-t", "nat").stdout
        )

    def get(
        self, ip: str, port: int, *, uid: int = 0, gid: int | None = None, ns: str | None = None
    ) -> dict[str, object]:
        """curl http://ip:port/ from the pod (or `ns`) as `uid`; returns who answered."""
        prefix = _as(uid, gid) if uid else []
        url = f"http://{ip}:{port}/"
        proc = _run(
            self.ip,
            "netns",
            "exec",
            ns or self.client,
            *prefix,
            self.curl,
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            url,
        )
        body: dict[str, object] = json.loads(proc.stdout)
        return body


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    p = Pods()
    try:
        p.setup()
        yield p
    finally:
        p.cleanup()


def _captured(body: dict[str, object], original_dst: str) -> dict[str, object]:
    """Asserts the stand-in sidecar answered for `original_dst`; returns upstream's answer."""
    assert body["via"] == "proxy", body
    assert body["uid"] == PROXY_UID, body
    assert body["original_dst"] == original_dst, body
    upstream = body["upstream"]
    assert isinstance(upstream, dict), body
    return upstream


@needs_root
def test_outbound_connection_is_captured_with_its_original_destination(pods: Pods) -> None:
    pods.capture("-p", str(PROXY_PORT), "-u", str(PROXY_UID))
    for uid in (0, APP_UID):
        body = pods.get(SERVER_IP, SERVER_PORT, uid=uid)
        assert body["local"] == f"127.0.0.1:{PROXY_PORT}", body
        upstream = _captured(body, f"{SERVER_IP}:{SERVER_PORT}")
        # The sidecar's own connection (uid 1337) went out as it was: no loop.
        assert upstream == {
            "via": "server",
            "local": f"{SERVER_IP}:{SERVER_PORT}",
            "peer": POD_IP,
        }


@needs_root
def test_exempt_uid_is_not_captured(pods: Pods) -> None:
    pods.capture("-u", str(PROXY_UID))
    body = pods.get(SERVER_IP, SERVER_PORT, uid=PROXY_UID)
    assert body == {"via": "server", "local": f"{SERVER_IP}:{SERVER_PORT}", "peer": POD_IP}


@needs_root
def test_exempt_gid_is_not_captured(pods: Pods) -> None:
    pods.capture("-u", str(PROXY_UID), "-g", str(EXEMPT_GID))
    body = pods.get(SERVER_IP, SERVER_PORT, uid=APP_UID, gid=EXEMPT_GID)
    assert body["via"] == "server", body
    assert pods.get(SERVER_IP, SERVER_PORT, uid=APP_UID)["via"] == "proxy"


@needs_root
def test_excluded_cidr_is_not_captured(pods: Pods) -> None:
    pods.capture("-x", "10.231.7.128/25")
    body = pods.get(SERVER_IP_HIGH, SERVER_PORT)
    assert body == {"via": "server", "local": f"{SERVER_IP_HIGH}:{SERVER_PORT}", "peer": POD_IP}
    _captured(pods.get(SERVER_IP, SERVER_PORT), f"{SERVER_IP}:{SERVER_PORT}")


@needs_root
def test_only_included_cidrs_are_captured(pods: Pods) -> None:
    pods.capture("-i", "10.231.7.0/25,192.0.2.0/24")
    _captured(pods.get(SERVER_IP, SERVER_PORT), f"{SERVER_IP}:{SERVER_PORT}")
    assert pods.get(SERVER_IP_HIGH, SERVER_PORT)["via"] == "server"


@needs_root
def test_explicit_localhost_is_not_captured_but_own_pod_ip_is(pods: Pods) -> None:
    pods.capture()
    body = pods.get("127.0.0.1", APP_PORT)
    assert body == {"via": "app", "local": f"127.0.0.1:{APP_PORT}", "peer": "127.0.0.1"}
    # 0.2's `-o lo ! -d 127.0.0.1/32` rule: the app calling its own pod IP goes through the
    # sidecar, which hands it to the app on 127.0.0.1 as its inbound listener would.
    upstream = _captured(pods.get(POD_IP, APP_PORT), f"{POD_IP}:{APP_PORT}")
    assert upstream["via"] == "app"
    assert upstream["local"] == f"127.0.0.1:{APP_PORT}"


@needs_root
def test_inbound_connections_are_captured_except_excluded_ports(pods: Pods) -> None:
    pods.capture()
    body = pods.get(POD_IP, APP_PORT, ns=pods.server)
    assert body["local"] == f"{POD_IP}:{PROXY_PORT}", body
    assert body["peer"] == SERVER_IP, body
    upstream = _captured(body, f"{POD_IP}:{APP_PORT}")
    assert upstream == {"via": "app", "local": f"127.0.0.1:{APP_PORT}", "peer": "127.0.0.1"}

    direct = {"via": "app", "local": f"{POD_IP}:{APP_PORT}", "peer": SERVER_IP}
    pods.capture("-d", f"22,{APP_PORT}")
    assert pods.get(POD_IP, APP_PORT, ns=pods.server) == direct
    pods.capture("-b", "8000,8001")
    assert pods.get(POD_IP, APP_PORT, ns=pods.server) == direct
    pods.capture("-b", "")
    assert pods.get(POD_IP, APP_PORT, ns=pods.server) == direct
    assert "ISTIO_INBOUND" not in pods.nat_rules()
    pods.capture("-b", f"8000,{APP_PORT}")
    assert pods.get(POD_IP, APP_PORT, ns=pods.server)["via"] == "proxy"


@needs_root
def test_clean_removes_everything(pods: Pods) -> None:
    pods.capture("-g", str(EXEMPT_GID), "-x", "10.231.7.128/25", "-d", "22")
    assert "ISTIO_OUTPUT" in pods.nat_rules()
    pods.capture("-c")
    rules = pods.nat_rules()
    assert "ISTIO" not in rules
    assert not [ln for ln in rules.splitlines() if ln.startswith("-A")], rules
    assert pods.get(SERVER_IP, SERVER_PORT)["via"] == "server"
    assert pods.get(POD_IP, APP_PORT, ns=pods.server)["via"] == "app"
    # Cleaning what is already clean is fine.
    pods.capture("-c")
    assert pods.nat_rules() == rules


@needs_root
def test_running_twice_gives_identical_rules(pods: Pods) -> None:
    args = ("-p", "15001", "-u", "1337", "-g", "1338", "-x", "10.231.7.128/25", "-d", "22")
    pods.capture(*args)
    once = pods.nat_rules()
    pods.capture(*args)
    assert pods.nat_rules() == once
    # Traffic in between (counters) and another configuration in between change nothing.
    _captured(pods.get(SERVER_IP, SERVER_PORT), f"{SERVER_IP}:{SERVER_PORT}")
    pods.capture("-i", "10.231.7.0/25", "-b", "")
    pods.capture(*args)
    assert pods.nat_rules() == once


@needs_root
def test_rules_are_istio_02s(pods: Pods) -> None:
    pods.capture("-x", "10.231.7.128/25", "-d", "22")
    rules = [ln for ln in pods.nat_rules().splitlines() if ln.startswith("-A")]
    assert rules == [
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {PROXY_PORT}",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ISTIO_REDIRECT",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -d 10.231.7.128/25 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {PROXY_PORT}",
    ]


@needs_root
def test_dry_run_prints_and_changes_nothing(pods: Pods) -> None:
    pods.capture("-c")
    before = pods.nat_rules()
    out = pods.capture("-n", "-i", "10.0.0.0/8", "-b", "").stdout.splitlines()
    assert pods.nat_rules() == before
    assert out == [
        "iptables -t nat -N ISTIO_REDIRECT",
        f"iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {PROXY_PORT}",
        "iptables -t nat -N ISTIO_OUTPUT",
        "iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -j ISTIO_REDIRECT",
        "iptables -t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
    ]
    # With rules in place, a dry run lists their removal first.
    pods.capture()
    installed = pods.nat_rules()
    out = pods.capture("-n", "-c").stdout.splitlines()
    assert out[:2] == ["iptables -t nat -D PREROUTING 1", "iptables -t nat -D OUTPUT 1"]
    assert "iptables -t nat -X ISTIO_REDIRECT" in out
    assert pods.nat_rules() == installed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "0"], "-p: '0' is not a TCP port"),
        (["-p", "http"], "-p: 'http' is not a TCP port"),
        (["-u", "istio-proxy"], "-u: 'istio-proxy' is not a numeric uid"),
        (["-g", "-1"], "-g: '-1' is not a numeric gid"),
        (["-i", "10.0.0.0/33"], "-i: '10.0.0.0/33' is not an IPv4 address or CIDR"),
        (["-i", "10.0.0.300"], "-i: '10.0.0.300' is not an IPv4 address or CIDR"),
        (["-i", "*,10.0.0.0/8"], "-i: '*' cannot be combined"),
        (["-i", "fd00::/8"], "-i: 'fd00::/8' is IPv6"),
        (["-x", "*"], "-x: '*' is not allowed here"),
        (["-b", "65536"], "-b: '65536' is not a TCP port"),
        (["-d", "ssh"], "-d: 'ssh' is not a TCP port"),
        (["-q"], "unknown option -q"),
        (["-p"], "option -p needs a value"),
        (["-i", "10.0.0.0/8", "172.16.0.0/12"], "unexpected argument '172.16.0.0/12'"),
    ],
)
def test_bad_arguments_fail_clearly_before_touching_anything(args: list[str], message: str) -> None:
    # No namespace, no root needed: arguments are checked before iptables is looked at.
    proc = subprocess.run(
        ["bash", str(SCRIPT), "-n", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"istio-iptables.sh: error: {message}"), proc.stderr


def test_help_lists_every_flag() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "-h"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for flag in ("-p", "-u", "-g", "-i", "-x", "-b", "-d", "-n", "-c"):
        assert f"\n  {flag} " in proc.stdout, flag


def test_script_is_executable_and_strict() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert "set -euo pipefail" in SCRIPT.read_text()


# The real thing: pilot-discovery and pilot-agent in the pod's namespace, the capture script,
# and two versions of a service in the server namespace; a RouteRule picks the version.
VIP = "10.231.8.10"  # reviews' service address: no interface has it, only capture reaches it
SERVICE_PORT = 9080
V1_PORT, V2_PORT = 8080, 8081
PILOT_GRPC, PILOT_HTTP = 15010, 15014
SERVICE_ENTRY = f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [{VIP}]
  ports: [{{number: {SERVICE_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {SERVER_IP}, ports: {{http: {V1_PORT}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: {SERVER_IP}, ports: {{http: {V2_PORT}}}, labels: {{app: reviews, version: v2}}}}
"""
# The pod itself serves ratings on APP_PORT: its sidecar gets the inbound listener for it.
RATINGS_ENTRY = f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{{number: {APP_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {POD_IP}, ports: {{http: {APP_PORT}}}, labels: {{app: ratings, version: v1}}}}
"""
ROUTE_RULE = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: reviews-v2}
spec:
  destination: {name: reviews}
  precedence: 1
  route:
  - labels: {version: v2}
"""


def _python_path() -> str:
    """The workspace's packages for an interpreter outside root's home: the venv's
    site-packages and the source trees its .pth files name (uid 1337 cannot enter /root,
    where the venv's own interpreter lives)."""
    site = next(Path(sys.prefix, "lib").glob("python3*/site-packages")).resolve()
    paths = [str(site)]
    for pth in sorted(site.glob("istio_*.pth")):
        paths.extend(line.strip() for line in pth.read_text().splitlines() if line.strip())
    return os.pathsep.join(paths)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and iptables rules")
    tmp = tmp_path_factory.mktemp("capture-mesh")
    (tmp / "registry").mkdir()
    (tmp / "config").mkdir()
    (tmp / "registry" / "reviews.yaml").write_text(SERVICE_ENTRY)
    (tmp / "registry" / "ratings.yaml").write_text(RATINGS_ENTRY)
    (tmp / "config" / "reviews-v2.yaml").write_text(ROUTE_RULE)
    p = Pods("mesh")
    try:
        p.setup(stand_in=False)
        # A route for the service range, as a pod's default route would give: connect()
        # needs one before iptables' OUTPUT chain gets to redirect the connection.
        _run(p.ip, "-n", p.client, "route", "add", "10.231.8.0/24", "dev", "veth-pod")
        p._start(p.server, [], "server", "v1", V1_PORT)
        p._start(p.server, [], "server", "v2", V2_PORT)
        p._start(p.client, [], "server", "ratings", APP_PORT)
        p.capture("-p", str(PROXY_PORT), "-u", str(PROXY_UID))
        bin_dir = Path(sys.executable).parent
        netns = [p.ip, "netns", "exec", p.client]
        p.spawn(
            [
                *netns,
                str(bin_dir / "pilot-discovery"),
                "--registry",
                f"file:{tmp / 'registry'}",
                "--config-store",
                f"file://{tmp / 'config'}",
                "--grpc-addr",
                f"127.0.0.1:{PILOT_GRPC}",
                "--http-addr",
                f"127.0.0.1:{PILOT_HTTP}",
            ],
            "serving xDS",
            timeout=60,
        )
        env = {**_env(), "PYTHONPATH": _python_path(), "INSTANCE_IP": POD_IP, "POD_NAME": "app"}
        p.spawn(
            [
                *netns,
                *_as(PROXY_UID),
                p.python,
                "-m",
                "istio.proxy",
                "proxy",
                "sidecar",
                "--discovery-address",
                f"127.0.0.1:{PILOT_GRPC}",
                "--access-log",
                "-",
            ],
            "proxy ready",
            env=env,
            timeout=60,
        )
        yield p
    finally:
        p.cleanup()


def _curl(pods: Pods, url: str, *, uid: int = APP_UID) -> subprocess.CompletedProcess[str]:
    return _run(
        pods.ip,
        "netns",
        "exec",
        pods.client,
        *_as(uid),
        pods.curl,
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        url,
        check=False,
    )


@needs_root
def test_real_sidecar_routes_a_captured_connection_by_route_rule(mesh: Pods) -> None:
    # The app is unmodified: plain curl to the service address, as an ordinary user. Only
    # capture can make that work (no interface has the VIP); the sidecar found the listener
    # by SO_ORIGINAL_DST and the RouteRule sent every request to v2.
    for _ in range(5):
        proc = _curl(mesh, f"http://{VIP}:{SERVICE_PORT}/reviews/1")
        assert proc.returncode == 0, proc.stderr
        body = json.loads(proc.stdout)
        assert body == {"via": "v2", "local": f"{SERVER_IP}:{V2_PORT}", "peer": POD_IP}
    # The sidecar's own uid is not captured: the same URL goes nowhere without it.
    proc = _curl(mesh, f"http://{VIP}:{SERVICE_PORT}/", uid=PROXY_UID)
    assert proc.returncode != 0, proc.stdout


@needs_root
def test_real_sidecar_serves_a_captured_inbound_connection(mesh: Pods) -> None:
    # A caller outside the pod connects to the pod's own address. PREROUTING hands the
    # connection to the sidecar, which finds the inbound listener by SO_ORIGINAL_DST and
    # forwards to the app over loopback: the app sees the sidecar (127.0.0.1) as its peer,
    # never the caller, which it would without capture.
    for _ in range(3):
        body = mesh.get(POD_IP, APP_PORT, ns=mesh.server)
        assert body == {"via": "ratings", "local": f"127.0.0.1:{APP_PORT}", "peer": "127.0.0.1"}
