from __future__ import annotations

import stat
from pathlib import Path

import pytest

from istio.jointokens import JoinTokens, token_directory
from istio.model.identity import SpiffeId

DB = SpiffeId("cluster.local", "vm", "mysql")


def test_a_token_grants_its_identity_once(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path / "tokens")
    token = tokens.create(DB, 60)
    assert tokens.spend(token).identity == DB
    again = tokens.spend(token)
    assert again.identity is None
    assert again.reason == "unknown or already used join token"


def test_only_a_hash_is_kept_readable_by_the_owner_alone(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path / "tokens")
    token = tokens.create(DB, 60)
    (record,) = (tmp_path / "tokens").iterdir()
    assert token not in record.name
    assert token not in record.read_text()
    assert str(DB) in record.read_text()
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o700


def test_expired_unknown_empty_and_unreadable_tokens_grant_nothing(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path)
    expired = tokens.create(DB, 60, now=1000)
    assert tokens.spend(expired, now=1061).reason == "expired join token"
    assert tokens.spend("made-up").reason == "unknown or already used join token"
    assert tokens.spend("").reason == "no join token presented"
    broken = tokens.create(DB, 60)
    (record,) = tmp_path.iterdir()
    record.write_text("[1, 2]")
    assert tokens.spend(broken).reason == "unreadable join token record (not an object)"


def test_a_lifetime_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        JoinTokens(tmp_path).create(DB, 0)


def test_a_directory_that_cannot_be_made_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        JoinTokens(tmp_path / "file" / "tokens").create(DB, 60)


def test_the_token_directory_is_explicit_or_under_the_ca_directory(tmp_path: Path) -> None:
    assert token_directory(tmp_path, None) == tmp_path / "join-tokens"
    assert token_directory(tmp_path, tmp_path / "t") == tmp_path / "t"
    assert token_directory(None, tmp_path / "t") == tmp_path / "t"
    assert token_directory(None, None) is None
