"""Writing the files the proxy reads, each replaced atomically (write aside, fsync, rename)."""

from __future__ import annotations

import os
from pathlib import Path

CERT_CHAIN = "cert-chain.pem"
KEY = "key.pem"
ROOT_CERT = "root-cert.pem"


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_credentials(out_dir: Path, *, key: bytes, cert_chain: bytes, root: bytes) -> None:
    """The key first, then the chain that goes with it, so a reader that sees the new chain
    finds its key already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / ROOT_CERT, root)
    write_atomically(out_dir / KEY, key, 0o600)
    write_atomically(out_dir / CERT_CHAIN, cert_chain)
