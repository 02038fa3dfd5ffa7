from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from istio.nodeagent.main import parse_config


def test_flags_and_the_default_bootstrap_address(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config, level = parse_config(
        [
            "--ca-address", "ca.example:8060",
            "--identity", "spiffe://cluster.local/ns/vm/sa/db",
            "--join-token-file", str(token_file),
            "--out-dir", str(tmp_path / "certs"),
            "--root-cert", str(tmp_path / "root.pem"),
        ]
    )  # fmt: skip
    assert config.bootstrap_address == "ca.example:8061"
    assert config.join_token == "s3cret"
    assert level == "info"


def test_a_bad_identity_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "istio.nodeagent", "--ca-address", "h:1", "--identity", "db",
         "--out-dir", str(tmp_path), "--root-cert", str(tmp_path / "r")],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "must be spiffe://<td>/ns/<ns>/sa/<sa>" in result.stderr
