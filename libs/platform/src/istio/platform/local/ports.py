"""Is a port free, and if not, which process holds it (from /proc/net/tcp and /proc/*/fd)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"


@dataclass(frozen=True)
class Busy:
    ip: str
    port: int
    what: str  # who in the mesh wanted it
    reason: str
    holder: str | None  # "pid 123 (python3 -m http.server 8080)"

    def __str__(self) -> str:
        held = f" by {self.holder}" if self.holder else ""
        return f"{self.ip}:{self.port} ({self.what}) is {self.reason}{held}"


def bindable(ip: str, port: int) -> str | None:
    """None when `ip:port` can be listened on now, else why not."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "already in use"
            if error.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine (Linux routes all of 127/8 to lo)"
            return error.strerror or str(error)
    return None


def check(addresses: list[tuple[str, int, str]]) -> list[Busy]:
    busy = []
    for ip, port, what in addresses:
        reason = bindable(ip, port)
        if reason is not None:
            busy.append(Busy(ip, port, what, reason, holder(ip, port)))
    return busy


def _listening_inodes(ip: str, port: int, proc: Path) -> set[str]:
    wanted = {f"{_hex_ip(ip)}:{port:04X}", f"00000000:{port:04X}"}
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != LISTEN:
                    continue
                if local in wanted or (table == "tcp6" and local.endswith(f":{port:04X}")):
                    inodes.add(inode)
    return inodes


def _hex_ip(ip: str) -> str:
    return "".join(f"{int(part):02X}" for part in reversed(ip.split(".")))


def holder(ip: str, port: int, proc: Path = Path("/proc")) -> str | None:
    """The process listening on ip:port (or the wildcard), when /proc lets us see it."""
    inodes = _listening_inodes(ip, port, proc)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return f"pid {entry.name} ({command_line(int(entry.name), proc)})"
        except OSError:
            continue
    return "a process this user cannot see"


def command_line(pid: int, proc: Path = Path("/proc")) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
