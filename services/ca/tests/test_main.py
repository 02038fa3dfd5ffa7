"""istio-ca as its users run it: a process, real files, its stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CA = [sys.executable, "-m", "istio.ca"]


def run_ca(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CA, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_and_stop(ca_dir: Path, *flags: str) -> str:
    """Start the CA, wait until it serves, stop it with SIGTERM; its stderr."""
    process = subprocess.Popen(
        [
            *CA,
            "--ca-dir",
            str(ca_dir),
            "--grpc-addr",
            "127.0.0.1:0",
            "--bootstrap-addr",
            "127.0.0.1:0",
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "(join tokens) on" in line:
            break
    process.terminate()
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0, "".join(lines) + rest
    return "".join(lines) + rest


def test_a_restart_keeps_the_same_root_and_never_logs_the_key(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = start_and_stop(ca_dir, "--log-level", "debug")
    root = (ca_dir / "ca-cert.pem").read_bytes()
    second = start_and_stop(ca_dir, "--log-level", "debug")
    assert "made the root" in first
    assert "loaded the root" in second
    assert (ca_dir / "ca-cert.pem").read_bytes() == root
    key_lines = (ca_dir / "ca-key.pem").read_text().splitlines()[1:-1]
    for line in key_lines:
        assert line not in first + second


def test_a_key_readable_by_others_stops_the_ca_saying_why(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    start_and_stop(ca_dir)
    os.chmod(ca_dir / "ca-key.pem", 0o644)
    result = run_ca("--ca-dir", str(ca_dir), "--grpc-addr", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"istio-ca: {ca_dir / 'ca-key.pem'}: the CA key is accessible by group or others "
        f"(mode 0644); refusing to start: run `chmod 600 {ca_dir / 'ca-key.pem'}`"
    )


def test_the_root_must_be_placed_somewhere() -> None:
    result = run_ca()
    assert result.returncode == 2
    assert "--ca-dir DIR, --cacerts-dir DIR or --kube" in result.stderr


def test_token_create_keeps_only_a_hash(tmp_path: Path) -> None:
    result = run_ca(
        "token",
        "create",
        "--ca-dir",
        str(tmp_path),
        "--identity",
        "spiffe://cluster.local/ns/vm/sa/db",
        "--ttl",
        "1h",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    (stored,) = (tmp_path / "join-tokens").iterdir()
    assert re.fullmatch(r"[0-9a-f]{64}", stored.name)
    assert token not in stored.read_text()
    assert oct(stored.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "create", "--identity", "nope", "--ca-dir", "x"], "must start with spiffe://"),
        (
            ["token", "create", "--identity", "spiffe://cluster.local/ns/a/sa/b"],
            "--ca-dir or --token-dir",
        ),
        (["--ca-dir", "x", "--workload-cert-ttl", "1d"], "is not a duration"),
    ],
)
def test_bad_command_lines_say_what_is_wrong(args: list[str], message: str) -> None:
    result = run_ca(*args)
    assert result.returncode == 2
    assert message in result.stderr
