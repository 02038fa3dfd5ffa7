"""pilot-discovery's command line: flags, defaults, one-line errors, and a real run (the
installed module, in its own process) that becomes ready and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.pilot.main import (
    RegistryFlag,
    StartupError,
    load_mesh_config,
    main,
    make_registry,
    parse_args,
)
from istio.pilot.registry.consul import ConsulRegistry
from istio.pilot.registry.eureka import EurekaRegistry
from istio.pilot.registry.kube import KubeRegistry
from istio.pilot.registry.serviceentry import ServiceEntryRegistry


def test_every_flag(tmp_path: Path) -> None:
    options = parse_args(
        [
            "--registry",
            "file:/etc/mesh",
            "--registry",
            "kube",
            "--registry",
            "kube:/root/.kube/config",
            "--registry",
            "consul:http://127.0.0.1:8500",
            "--registry",
            "eureka:https://eureka.example.com/eureka/v2",
            "--config-store",
            "etcd://127.0.0.1:2379/istio",
            "--grpc-addr",
            "0.0.0.0:15010",
            "--http-addr",
            "[::1]:15014",
            "--mesh-config",
            str(tmp_path / "mesh.yaml"),
            "--domain",
            "cluster.example",
            "--ingress-certs-dir",
            "/srv/ingress-certs",
            "--log-level",
            "debug",
        ]
    )
    assert options.registries == [
        RegistryFlag("file", "/etc/mesh"),
        RegistryFlag("kube", ""),
        RegistryFlag("kube", "/root/.kube/config"),
        RegistryFlag("consul", "http://127.0.0.1:8500"),
        RegistryFlag("eureka", "https://eureka.example.com/eureka/v2"),
    ]
    assert options.config_store == "etcd://127.0.0.1:2379/istio"
    assert (options.grpc_addr, options.http_addr) == ("0.0.0.0:15010", "[::1]:15014")
    assert options.mesh_config == tmp_path / "mesh.yaml"
    assert (options.domain, options.log_level) == ("cluster.example", "debug")
    assert options.ingress_certs_dir == "/srv/ingress-certs"


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ISTIO_CONFIG_STORE", raising=False)
    monkeypatch.setenv("MESH_DIR", str(tmp_path / "mesh"))
    options = parse_args(["--registry", "file:///srv/mesh"])
    assert options.registries == [RegistryFlag("file", "/srv/mesh")]
    assert options.config_store == f"file://{tmp_path / 'mesh' / 'config'}"
    assert (options.grpc_addr, options.http_addr) == ("127.0.0.1:15010", "127.0.0.1:15014")
    assert options.ingress_certs_dir == "/etc/istio/ingress-certs"
    assert (options.domain, options.log_level, options.mesh_config) == (
        "svc.cluster.local",
        "info",
        None,
    )
    monkeypatch.setenv("ISTIO_CONFIG_STORE", "etcd://etcd:2379")
    assert parse_args(["--registry", "kube"]).config_store == "etcd://etcd:2379"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "at least one --registry is needed"),
        (["--registry", "zookeeper:zk:2181"], "unknown registry 'zookeeper:zk:2181'"),
        (["--registry", "file:"], "file registry needs a directory"),
        (["--registry", "consul"], "consul registry needs an http(s) URL"),
        (["--registry", "eureka:eureka:8080"], "eureka registry needs an http(s) URL"),
        (["--registry", "kube", "--grpc-addr", "15010"], "'15010' is not host:port"),
        (["--registry", "kube", "--http-addr", "localhost:http"], "port 'http' is not a number"),
        (["--registry", "kube", "--log-level", "loud"], "invalid choice: 'loud'"),
        (["--registry", "kube", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_give_one_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pilot-discovery: error: ")
    assert complaint in err


def test_each_registry_kind(tmp_path: Path) -> None:
    assert isinstance(make_registry(RegistryFlag("file", str(tmp_path))), ServiceEntryRegistry)
    assert isinstance(make_registry(RegistryFlag("kube", "")), KubeRegistry)
    assert isinstance(make_registry(RegistryFlag("consul", "http://consul:8500")), ConsulRegistry)
    assert isinstance(make_registry(RegistryFlag("eureka", "http://eureka:8080")), EurekaRegistry)


def test_mesh_config_is_merged_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "mixerAddress: istio-mixer:9091\n"
        "authPolicy: MUTUAL_TLS\n"
        "connectTimeout: 500ms\n"
        "defaultConfig: {discoveryAddress: istio-pilot:15010}\n"
    )
    mesh = load_mesh_config(path)
    assert mesh.mixer_address == "istio-mixer:9091"
    assert mesh.auth_policy == proxy_mesh_pb2.MeshConfig.AuthPolicy.MUTUAL_TLS
    assert mesh.connect_timeout.ToMilliseconds() == 500
    assert mesh.default_config.discovery_address == "istio-pilot:15010"
    # Everything not in the file is Istio 0.2's default.
    assert mesh.proxy_listen_port == 15001
    assert mesh.ingress_service == "istio-ingress"
    assert mesh.default_config.proxy_admin_port == 15000


def test_bad_mesh_config_names_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("mixerAdress: istio-mixer:9091\n")
    with pytest.raises(StartupError, match=r"mesh\.yaml: mixerAdress: unknown field"):
        load_mesh_config(path)
    code = main(["--registry", f"file:{tmp_path}", "--mesh-config", str(path)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pilot-discovery: error: ")
    with pytest.raises(StartupError, match="cannot read the mesh config"):
        load_mesh_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("flag", "what"), [("--grpc-addr", "xDS"), ("--http-addr", "HTTP")])
def test_a_taken_port_is_one_line(
    flag: str, what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        addresses = {"--grpc-addr": "127.0.0.1:0", "--http-addr": "127.0.0.1:0"}
        addresses[flag] = f"127.0.0.1:{port}"
        code = main(
            [
                "--registry",
                f"file:{tmp_path / 'registry'}",
                "--config-store",
                f"file://{tmp_path / 'config'}",
                *(item for pair in addresses.items() for item in pair),
            ]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"pilot-discovery: error: cannot listen on 127.0.0.1:{port} for {what}")


async def test_runs_until_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "istio.pilot",
        "--registry",
        f"file:{tmp_path / 'registry'}",
        "--config-store",
        f"file://{tmp_path / 'config'}",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        log = await asyncio.wait_for(_read_until(process.stderr, "serving xDS on"), 30)
        found = re.search(r"serving xDS on 127\.0\.0\.1:(\d+), HTTP on 127\.0\.0\.1:(\d+)", log)
        assert found, log
        log += await asyncio.wait_for(_read_until(process.stderr, "synced: serving xDS"), 30)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{found[2]}/ready") as response,
        ):
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        assert await process.wait() == 0
        assert b"shutting down" in rest
        assert b"Traceback" not in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _read_until(stream: asyncio.StreamReader, text: str) -> str:
    lines: list[str] = []
    while True:
        line = (await stream.readline()).decode()
        assert line, "pilot-discovery exited early:\n" + "".join(lines)
        lines.append(line)
        if text in line:
            return "".join(lines)
