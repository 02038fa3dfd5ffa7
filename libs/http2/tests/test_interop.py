"""The codec against real HTTP/2 peers over loopback: nghttp, curl and h2load (nghttp2's and
curl's own HTTP/2 stacks) against a server on the codec; a client on the codec against
nghttpd; and abusive raw-socket peers that must get the right GOAWAY without harming the
other connections."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from istio.http2 import PREFACE, ErrorCode
from istio.http2.hpack import Encoder
from istio.testing.net import free_port

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"localhost")]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is missing: run `make setup` as root (Debian's nghttp2 packages)")
    return path


async def run(*argv: str, limit: float = 60) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), limit)
    assert process.returncode is not None
    return process.returncode, out, err


# -- real clients against a server on the codec --------------------------------------------


async def test_nghttp_get_post_and_multiplexing(h2_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = await run(tool("nghttp"), f"{h2_server.url}/hello")
    assert code == 0, err
    assert out == b"hello /hello"
    upload = tmp_path / "upload"
    upload.write_bytes(bytes(range(256)) * 4000)  # 1 MB: past every default window
    code, out, err = await run(tool("nghttp"), "-d", str(upload), f"{h2_server.url}/echo")
    assert code == 0, err
    assert out == upload.read_bytes()
    code, out, err = await run(tool("nghttp"), "-m", "20", f"{h2_server.url}/big/100000")
    assert code == 0, err
    assert out == b"z" * 2_000_000
    assert h2_server.stats.goaways == []


async def test_nghttp_verbose_shows_clean_frames(h2_server) -> None:  # type: ignore[no-untyped-def]
    code, out, err = await run(tool("nghttp"), "-v", "-n", f"{h2_server.url}/x")
    assert code == 0, err
    text = out.decode()
    assert "recv SETTINGS frame" in text
    # nghttp anchors its priority tree with PRIORITY frames on idle streams 3..11 first
    # (RFC 7540 style, ignored here), then requests on stream 13.
    assert "send PRIORITY frame" in text
    assert re.search(r"recv \(stream_id=13\) :status: 200", text), text
    assert "recv DATA frame <length=8, flags=0x01, stream_id=13>" in text
    assert "recv GOAWAY" not in text
    assert "recv RST_STREAM" not in text


async def test_curl_prior_knowledge(h2_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One URL per run: curl 7.88 fails its second request on a reused prior-knowledge
    # connection against any server (nghttpd too: "Error in the HTTP2 framing layer").
    code, out, err = await run(tool("curl"), "-sS", "--http2-prior-knowledge", f"{h2_server.url}/a")
    assert code == 0, err
    assert out == b"hello /a"
    body = tmp_path / "body"
    body.write_bytes(b"0123456789" * 50_000)
    code, out, err = await run(
        tool("curl"),
        "-sS",
        "--http2-prior-knowledge",
        "--data-binary",
        f"@{body}",
        f"{h2_server.url}/echo",
    )
    assert code == 0, err
    assert out == body.read_bytes()


async def test_h2load(h2_server) -> None:  # type: ignore[no-untyped-def]
    code, out, err = await run(
        tool("h2load"), "-n", "3000", "-c", "4", "-m", "10", f"{h2_server.url}/bench"
    )
    assert code == 0, err
    text = out.decode()
    assert re.search(r"requests: 3000 total, 3000 started, 3000 done, 3000 succeeded", text), text
    assert "0 failed, 0 errored" in text, text
    assert h2_server.stats.requests == 3000


# -- a client on the codec against nghttpd -------------------------------------------------


@pytest.fixture
async def nghttpd(tmp_path: Path) -> AsyncIterator[int]:
    docs = tmp_path / "htdocs"
    docs.mkdir()
    (docs / "small.txt").write_bytes(b"small file\n")
    (docs / "large.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MB
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        tool("nghttpd"),
        "--no-tls",
        "--echo-upload",
        "-a",
        "127.0.0.1",
        "-d",
        str(docs),
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):  # bounded: up to 10 s for it to listen
            try:
                with socket.create_connection(("127.0.0.1", port), 0.5):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        yield port
    finally:
        process.terminate()
        await process.wait()


async def test_client_against_nghttpd(nghttpd: int, h2_connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = await h2_connect("127.0.0.1", nghttpd)
    small = client.request([*GET, (b":path", b"/small.txt")])
    large = [client.request([*GET, (b":path", b"/large.bin")]) for _ in range(3)]
    missing = client.request([*GET, (b":path", b"/nothing")])
    headers, body, _ = await asyncio.wait_for(small, 30)
    assert dict(headers)[b":status"] == b"200"
    assert body == b"small file\n"
    for future in large:
        headers, body, _ = await asyncio.wait_for(future, 30)
        assert body == (tmp_path / "htdocs" / "large.bin").read_bytes()
        assert dict(headers)[b"content-length"] == b"2097152"
    headers, _, _ = await asyncio.wait_for(missing, 30)
    assert dict(headers)[b":status"] == b"404"
    # An upload larger than nghttpd's windows, echoed back (its --echo-upload).
    upload = bytes(range(251)) * 4000
    headers, body, _ = await asyncio.wait_for(
        client.request(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"l"), (b":path", b"/")],
            upload,
        ),
        30,
    )
    assert dict(headers)[b":status"] == b"200"
    assert body == upload
    assert client.terminated is None


# -- abusive peers: the right GOAWAY, that connection closed, the others unharmed ----------


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


async def _abuse(host: str, port: int, data: bytes) -> int:
    """Send `data` after a valid preface; the GOAWAY error code the server answers with,
    reading until it closes the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(PREFACE + _frame(4, 0, 0) + data)
    await writer.drain()
    received = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 30):
        received += chunk
    writer.close()
    codes = []
    while len(received) >= 9:
        length = int.from_bytes(received[:3], "big")
        if received[3] == 7:
            codes.append(int.from_bytes(received[13:17], "big"))
        received = received[9 + length :]
    assert len(codes) == 1, codes
    return codes[0]


async def test_abusive_peers_get_goaway_and_others_are_unharmed(h2_server) -> None:  # type: ignore[no-untyped-def]
    encoder = Encoder()
    request = encoder.encode([*GET, (b":path", b"/")])
    rapid_reset = b"".join(
        _frame(1, 4, stream_id, request) + _frame(3, 0, stream_id, struct.pack(">L", 8))
        for stream_id in range(1, 2 * 1100, 2)
    )
    cases = {
        "oversized frame": (_frame(0, 0, 1, b"x" * 20000), ErrorCode.FRAME_SIZE_ERROR),
        "bad ping": (_frame(6, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        "hpack garbage": (_frame(1, 5, 1, b"\x80\xff\xff"), ErrorCode.COMPRESSION_ERROR),
        "continuation flood": (
            _frame(1, 0, 1, request[:1]) + _frame(9, 0, 1) * 100,
            ErrorCode.ENHANCE_YOUR_CALM,
        ),
        "rapid reset": (rapid_reset, ErrorCode.ENHANCE_YOUR_CALM),
        "ping flood": (_frame(6, 0, 0, b"12345678") * 1500, ErrorCode.ENHANCE_YOUR_CALM),
    }

    # A well-behaved client keeps a connection open the whole time.
    async def steady() -> int:
        code, out, err = await run(
            tool("h2load"), "-n", "2000", "-c", "1", "-m", "4", h2_server.url
        )
        assert code == 0, err
        assert "2000 succeeded" in out.decode(), out
        return code

    good = asyncio.get_running_loop().create_task(steady())
    for name, (data, expected) in cases.items():
        got = await _abuse(h2_server.host, h2_server.port, data)
        assert got == expected, name
    assert await good == 0
