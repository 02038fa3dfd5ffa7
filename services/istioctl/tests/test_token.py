"""`istioctl token create`, run as users run it (the installed console script, its own process):
the token on stdout and only its hash on disk, where istio-ca looks; one line and exit 1 for a
bad identity or a directory it cannot write, exit 2 for a malformed command line."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from istio.jointokens import JoinTokens
from istio.model.identity import SpiffeId

ISTIOCTL = str(Path(sys.executable).parent / "istioctl")
MYSQL = "spiffe://cluster.local/ns/vm/sa/mysql"


def istioctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ISTIOCTL, *args], capture_output=True, text=True, check=False, timeout=60
    )


def record(directory: Path, token: str) -> dict[str, object]:
    path = directory / hashlib.sha256(token.encode()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text
    loaded: dict[str, object] = json.loads(text)
    return loaded


def test_a_token_for_an_identity_goes_where_the_ca_looks(tmp_path: Path) -> None:
    before = time.time()
    result = istioctl("token", "create", "--identity", MYSQL, "--ca-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # nothing else, for TOKEN=$(istioctl token create ...)
    assert len(token) >= 40
    assert f"Created a join token for {MYSQL}" in result.stderr
    stored = record(tmp_path / "join-tokens", token)
    assert stored["identity"] == MYSQL
    assert isinstance(stored["expires"], float)
    assert before + 3600 <= stored["expires"] <= time.time() + 3600
    # The store istio-ca spends from grants it once.
    tokens = JoinTokens(tmp_path / "join-tokens")
    assert tokens.spend(token).identity == SpiffeId.parse(MYSQL)
    assert tokens.spend(token).reason == "unknown or already used join token"


@pytest.mark.parametrize(
    ("flags", "identity"),
    [
        (["--namespace", "vm", "--service-account", "mysql"], MYSQL),
        (["-n", "vm", "--service-account", "mysql"], MYSQL),
        (["--service-account", "mysql"], "spiffe://cluster.local/ns/default/sa/mysql"),
        (
            ["-n", "vm", "--service-account", "mysql", "--trust-domain", "example.com"],
            "spiffe://example.com/ns/vm/sa/mysql",
        ),
    ],
)
def test_a_token_for_a_service_account(tmp_path: Path, flags: list[str], identity: str) -> None:
    result = istioctl("token", "create", *flags, "--token-dir", str(tmp_path), "--ttl", "10m")
    assert result.returncode == 0, result.stderr
    stored = record(tmp_path, result.stdout.strip())
    assert stored["identity"] == identity
    assert isinstance(stored["expires"], float)
    assert stored["expires"] <= time.time() + 600


def test_the_namespace_may_come_before_the_command(tmp_path: Path) -> None:
    result = istioctl("-n", "vm", "token", "create", "--service-account", "mysql",
                      "--token-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert record(tmp_path, result.stdout.strip())["identity"] == MYSQL


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--identity", "mysql"], "--identity: 'mysql' is not a SPIFFE id: it must start with"),
        (["--identity", "spiffe://cluster.local/ns/vm"], "is not a workload identity"),
        (["--identity", "spiffe://Cluster_Local/ns/vm/sa/mysql"], "'Cluster_Local' is not a DNS"),
        (["--service-account", "my/sql"], "the service account 'my/sql' is not a valid name"),
        (["-n", "v m", "--service-account", "mysql"], "the namespace 'v m' is not a valid name"),
        (["--identity", MYSQL, "-n", "vm"], "--identity names the whole identity: drop --names"),
        (["--identity", MYSQL, "--ttl", "1d"], "--ttl: invalid duration '1d'"),
        (["--identity", MYSQL, "--ttl", "0s"], "--ttl: '0s' must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, flags: list[str], error: str) -> None:
    result = istioctl("token", "create", *flags, "--ca-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert error in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "join-tokens").exists()


def test_a_directory_it_cannot_write_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "tokens"
    result = istioctl("token", "create", "--identity", MYSQL, "--token-dir", str(where))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: cannot keep a join token in {where}: Not a directory\n"


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--identity", MYSQL], "one of the arguments --ca-dir --token-dir is required"),
        (["--ca-dir", "d"], "one of the arguments --identity --service-account is required"),
        (["--identity", MYSQL, "--service-account", "a", "--ca-dir", "d"], "not allowed with"),
        (["--identity", MYSQL, "--ca-dir", "d", "--token-dir", "t"], "not allowed with"),
    ],
)
def test_a_malformed_command_line_is_exit_2(tmp_path: Path, flags: list[str], error: str) -> None:
    result = subprocess.run(
        [ISTIOCTL, "token", "create", *flags],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert error in result.stderr
    assert list(tmp_path.iterdir()) == []
