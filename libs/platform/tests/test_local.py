"""The local platform's pure parts and its port checks, without starting a mesh (e2e/ does)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from istio.config import parse_documents
from istio.platform.driver import percentile, reviews_version
from istio.platform.local import Layout
from istio.platform.local.layout import ingress_rules, write_hosts, write_registry
from istio.platform.local.mesh import mixer_producer, sidecar_argv
from istio.platform.local.ports import check, holder


def test_layout_addresses_and_node_ids(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    names = [(w.name, w.ip) for w in layout.workloads]
    assert names[0] == ("productpage-v1", "127.0.0.2")
    assert names[-1] == ("ratings-v1", "127.0.0.7")
    assert (
        layout.workloads[3].node_id
        == "sidecar~127.0.0.5~reviews-v2.default~default.svc.cluster.local"
    )
    assert (layout.pilot_grpc, layout.pilot_http) == ("127.0.0.1:15010", "127.0.0.1:15014")
    assert layout.ingress_url == "http://127.0.0.1:8080"
    assert len(layout.listen_addresses()) == 5 + 3 + 5 * 6  # Pilot, ingress, Mixer, workloads
    with pytest.raises(ValueError, match="/24 of 127/8"):
        Layout(tmp_path, "10.0.0")


def test_registry_files_are_valid_service_entries(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "127.0.9")
    alive = [w for w in layout.workloads if w.name != "reviews-v2"]
    write_registry(layout, alive)
    assert sorted(p.name for p in layout.registry_dir.iterdir()) == [
        "details.yaml",
        "productpage.yaml",
        "ratings.yaml",
        "reviews.yaml",
    ]
    text = (layout.registry_dir / "reviews.yaml").read_text()
    configs, problems = parse_documents(text, "reviews.yaml")
    assert problems == []
    endpoints = yaml.safe_load(text)["spec"]["endpoints"]
    assert [(e["address"], e["labels"]["version"], e["ports"]["http"]) for e in endpoints] == [
        ("127.0.9.4", "v1", 9080),
        ("127.0.9.6", "v3", 9080),
    ]
    assert len(configs) == 1


def test_mixer_finds_callers_by_their_workloads_address(tmp_path: Path) -> None:
    """Every proxy's upstream connections leave from its workload's address, and Mixer's
    kubernetes producer reads the registry those addresses are in."""
    layout = Layout(tmp_path, "127.0.9")
    reviews = layout.workloads[4]
    argv = sidecar_argv(layout, reviews)
    assert argv[argv.index("--source-address") + 1] == reviews.ip == "127.0.9.6"
    (handler,), problems = parse_documents(mixer_producer(layout), "producer")
    assert problems == []
    assert (handler.meta.kind, handler.meta.namespace) == ("kubernetes", "istio-system")
    document = yaml.safe_load(mixer_producer(layout))
    assert document["spec"] == {"registry": f"file:{layout.registry_dir.resolve()}"}


def test_ingress_rules_are_valid() -> None:
    documents = ingress_rules()
    for document in documents:
        document["spec"]["port"] = 8080
    configs, problems = parse_documents(yaml.safe_dump_all(documents))
    assert problems == []
    assert [c.meta.name for c in configs] == [
        "bookinfo-productpage",
        "bookinfo-login",
        "bookinfo-logout",
        "bookinfo-static",
        "bookinfo-api",
    ]


def test_hosts_file_keeps_user_lines_and_replaces_named_ones(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("10.1.1.1 mine.example\n127.0.0.9 old.test\n")
    write_hosts(Layout(tmp_path, extra_hosts={"old.test": "127.0.0.10", "new.test": "127.0.0.11"}))
    lines = (tmp_path / "hosts").read_text().splitlines()
    assert lines == ["10.1.1.1 mine.example", "127.0.0.11 new.test", "127.0.0.10 old.test"]


def test_a_taken_port_names_the_process_holding_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.8.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        busy = check([("127.0.8.1", port, "ingress gateway"), ("127.0.8.2", port, "free one")])
        assert len(busy) == 1
        assert str(busy[0]).startswith(f"127.0.8.1:{port} (ingress gateway) is already in use")
        assert holder("127.0.8.1", port) == busy[0].holder
        assert busy[0].holder is not None
        assert busy[0].holder.startswith(f"pid {os.getpid()} (")


def test_up_refuses_to_start_when_a_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.8.1", 8080))
        sock.listen()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "istio.platform.local",
                "up",
                "--mesh-dir",
                str(tmp_path),
                "--network",
                "127.0.8",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    expected = f"127.0.8.1:8080 (ingress gateway): already in use by pid {os.getpid()} ("
    assert expected in done.stdout
    assert not (tmp_path / "pids").exists()


def test_down_without_a_mesh_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "istio.platform.local", "down", "--mesh-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"mesh: none running from {tmp_path}")


def test_reviews_version_and_percentile() -> None:
    star = '<span class="stars" data-stars="5" data-color="{}" style="">'
    assert reviews_version("<p>no stars</p>") == "v1"
    assert reviews_version(star.format("black") * 2) == "v2"
    assert reviews_version(star.format("red")) == "v3"
    assert reviews_version("Sorry, product reviews are currently unavailable for this book.") == (
        "unavailable"
    )
    assert percentile([0.3, 0.1, 0.2], 0.5) == 0.2
    assert percentile([1.0] * 99 + [5.0], 0.99) == 1.0
