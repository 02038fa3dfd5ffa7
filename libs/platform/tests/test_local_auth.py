"""The local platform with mutual TLS (`--auth mtls|permissive`), without starting a mesh (e2e/
does): the MeshConfig Pilot gets, the CA's addresses, each proxy's identity, certificate
directory and node agent, and the service accounts in the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from istio.config import parse_documents
from istio.platform.local import Layout
from istio.platform.local.layout import write_registry
from istio.platform.local.mesh import agent_argv, ca_argv, node_agent_argv, sidecar_argv


def test_auth_modes_set_the_mesh_config_pilot_reads(tmp_path: Path) -> None:
    mixer = {"mixerAddress": "127.0.0.1:9091"}  # every mesh has Mixer (0.2's telemetry)
    assert Layout(tmp_path).mesh_config() == mixer
    assert Layout(tmp_path, auth="mtls").mesh_config() == {
        **mixer,
        "authPolicy": "MUTUAL_TLS",
        "mtlsPermissive": False,
    }
    assert Layout(tmp_path, auth="permissive").mesh_config()["mtlsPermissive"] is True
    with pytest.raises(ValueError, match="auth must be one of none, mtls, permissive"):
        Layout(tmp_path, auth="tls")


def test_with_mtls_the_ca_listens_and_every_proxy_reads_its_certificates(tmp_path: Path) -> None:
    plain, mtls = Layout(tmp_path, "127.0.9"), Layout(tmp_path, "127.0.9", auth="mtls")
    assert len(mtls.listen_addresses()) == len(plain.listen_addresses()) + 2
    assert ("127.0.9.1", 8060, "istio-ca HandleCSR") in mtls.listen_addresses()
    reviews = mtls.workloads[3]
    assert reviews.identity == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    argv = sidecar_argv(mtls, reviews)
    cert_dir = str((tmp_path / "certs" / "reviews-v2").resolve())
    assert argv[argv.index("--cert-dir") + 1] == cert_dir
    assert "--cert-dir" not in sidecar_argv(plain, plain.workloads[3])
    ingress = agent_argv(mtls, "ingress", mtls.ingress_ip, mtls.ingress_node_id, "ingress")
    assert ingress[ingress.index("--cert-dir") + 1].endswith("/certs/ingress")
    assert mtls.ingress_identity == (
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingress-service-account"
    )
    agent = node_agent_argv(mtls, "reviews-v2", reviews.identity)
    assert agent[agent.index("--out-dir") + 1] == cert_dir
    assert agent[agent.index("--join-token-file") + 1] == f"{cert_dir}.join-token"
    assert agent[agent.index("--root-cert") + 1].endswith("/ca/ca-cert.pem")
    assert agent[agent.index("--ca-address") + 1] == "127.0.9.1:8060"
    ca = ca_argv(mtls)
    assert ca[ca.index("--ca-dir") + 1] == str((tmp_path / "ca").resolve())
    assert ca[ca.index("--bootstrap-addr") + 1] == "127.0.9.1:8061"


def test_registry_names_each_endpoints_service_account(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "127.0.9", auth="mtls")
    write_registry(layout, layout.workloads)
    text = (layout.registry_dir / "ratings.yaml").read_text()
    configs, problems = parse_documents(text, "ratings.yaml")
    assert problems == []
    assert len(configs) == 1
    [endpoint] = yaml.safe_load(text)["spec"]["endpoints"]
    assert endpoint["serviceAccount"] == "bookinfo-ratings"
