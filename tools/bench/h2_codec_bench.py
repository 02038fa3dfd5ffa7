"""HTTP/2 codec cost per request: istio.http2 against the `h2` package, in one run.

    .venv/bin/python tools/bench/h2_codec_bench.py [--requests 20000] [--rounds 5]
        [--markdown build/bench/h2_codec.md]

In-process, no sockets: what a proxy pays in frame and HPACK work for one request on a warm
connection, for two typical requests:

  grpc   POST /helloworld.Greeter/SayHello with gRPC's headers (te, content-type,
         grpc-timeout, user-agent, grpc-accept-encoding), a 24-byte message; the response:
         :status 200 + content-type, a 24-byte message, trailers grpc-status/grpc-message;
  http   GET /api/v1/products/<n> with curl-like headers and a unique x-request-id; the
         response: :status 200, content-type, content-length, a 100-byte body.

  server  feed one request's bytes to a server connection, dispatch its events (acknowledging
          the data), send the response, take the bytes to write;
  client  send a request, take its bytes, feed the response's bytes, dispatch the events;
  hpack   encode and decode the request's header list alone (warm dynamic tables).

The bytes fed in are recorded once from h2 talking to itself (windows opened wide so nothing
waits on credit), and both codecs get the same bytes. Each figure is the median over --rounds
of the mean per request; the ratio is h2's time over ours (above 1: ours is faster). CPU time of
other processes during the run is reported: the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack

from istio.http2 import Data, H2Connection, HeadersReceived, Settings, Trailers
from istio.http2.hpack import Decoder, Encoder

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from proxy_bench import background_busy  # noqa: E402

BIG = (1 << 31) - 1
Headers = list[tuple[bytes, bytes]]
Message = tuple[Headers, bytes, Headers, bytes, Headers | None]  # req, body, resp, body, trailers


def grpc_request(i: int) -> Message:
    return (
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/helloworld.Greeter/SayHello"),
            (b":authority", b"greeter.default.svc.cluster.local:50051"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-python/1.85.1 grpc-c/52.0.0 (linux; chttp2)"),
            (b"grpc-accept-encoding", b"identity,deflate,gzip"),
            (b"grpc-timeout", b"%dm" % (5000 - i % 7)),
        ],
        b"\0\0\0\0\x13" + b"\n\x11hello world %05d" % (i % 100000),
        [(b":status", b"200"), (b"content-type", b"application/grpc")],
        b"\0\0\0\0\x13" + b"\n\x11hello again %05d" % (i % 100000),
        [(b"grpc-status", b"0"), (b"grpc-message", b"")],
    )


def http_request(i: int) -> Message:
    return (
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/api/v1/products/%d" % (i % 1000)),
            (b":authority", b"productpage:9080"),
            (b"user-agent", b"curl/7.88.1"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"x-request-id", b"4f0e2c1a-9b7d-4e3f-8a21-%012d" % i),
        ],
        b"",
        [(b":status", b"200"), (b"content-type", b"text/html"), (b"content-length", b"100")],
        b"p" * 100,
        None,
    )


# -- recording the wire bytes with h2 on both sides ----------------------------------------


def _h2(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BIG,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(BIG - 65535)
    return conn


def record(
    make: Callable[[int], Message], count: int
) -> tuple[bytes, list[bytes], bytes, list[bytes]]:
    """(client preface, per-request client bytes, server preface, per-request server bytes)."""
    client, server = _h2(True), _h2(False)
    client_start = client.data_to_send()
    server.receive_data(client_start)
    server_start = server.data_to_send()
    client.receive_data(server_start)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    requests, responses = [], []
    for i in range(count):
        req, body, resp, resp_body, trailers = make(i)
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, req, end_stream=not body)
        if body:
            client.send_data(stream_id, body, end_stream=True)
        sent = client.data_to_send()
        requests.append(sent)
        server.receive_data(sent)
        server.send_headers(stream_id, resp)
        server.send_data(stream_id, resp_body, end_stream=trailers is None)
        if trailers is not None:
            server.send_headers(stream_id, trailers, end_stream=True)
        answer = server.data_to_send()
        responses.append(answer)
        client.receive_data(answer)
    return client_start, requests, server_start, responses


# -- the work measured ---------------------------------------------------------------------

OUR_SETTINGS = Settings(initial_window_size=BIG, connection_window=BIG, max_concurrent_streams=1000)


def ours_server(start: bytes, requests: list[bytes], make: Callable[[int], Message]) -> float:
    conn = H2Connection(client=False, settings=OUR_SETTINGS)
    conn.initiate()
    conn.receive(start)
    conn.data_to_send()
    answers = [make(i)[2:] for i in range(len(requests))]
    gc.collect()
    begin = time.perf_counter()
    for data, (resp, resp_body, trailers) in zip(requests, answers, strict=True):
        stream_id = 0
        for event in conn.receive(data):
            kind = type(event)
            if kind is HeadersReceived:
                stream_id = event.stream_id  # type: ignore[attr-defined]
            elif kind is Data:
                conn.acknowledge(event.stream_id, event.flow_length)  # type: ignore[attr-defined]
        conn.send_headers(stream_id, resp)
        conn.send_data(stream_id, resp_body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(stream_id, trailers, end_stream=True)
        conn.data_to_send()
    return (time.perf_counter() - begin) / len(requests)


def h2_server(start: bytes, requests: list[bytes], make: Callable[[int], Message]) -> float:
    conn = _h2(False)
    conn.receive_data(start)
    conn.data_to_send()
    answers = [make(i)[2:] for i in range(len(requests))]
    gc.collect()
    begin = time.perf_counter()
    for data, (resp, resp_body, trailers) in zip(requests, answers, strict=True):
        stream_id = 0
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                stream_id = event.stream_id
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        conn.send_headers(stream_id, resp)
        conn.send_data(stream_id, resp_body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(stream_id, trailers, end_stream=True)
        conn.data_to_send()
    return (time.perf_counter() - begin) / len(requests)


def ours_client(start: bytes, responses: list[bytes], make: Callable[[int], Message]) -> float:
    conn = H2Connection(client=True, settings=OUR_SETTINGS)
    conn.initiate()
    conn.data_to_send()
    conn.receive(start)
    conn.data_to_send()
    asks = [make(i)[:2] for i in range(len(responses))]
    gc.collect()
    begin = time.perf_counter()
    for data, (req, body) in zip(responses, asks, strict=True):
        stream_id = conn.send_request(req, end_stream=not body)
        if body:
            conn.send_data(stream_id, body, end_stream=True)
        conn.data_to_send()
        for event in conn.receive(data):
            kind = type(event)
            if kind is Data:
                conn.acknowledge(event.stream_id, event.flow_length)  # type: ignore[attr-defined]
            elif kind is Trailers or kind is HeadersReceived:
                pass
    return (time.perf_counter() - begin) / len(responses)


def h2_client(start: bytes, responses: list[bytes], make: Callable[[int], Message]) -> float:
    conn = _h2(True)
    conn.data_to_send()
    conn.receive_data(start)
    conn.data_to_send()
    asks = [make(i)[:2] for i in range(len(responses))]
    gc.collect()
    begin = time.perf_counter()
    for data, (req, body) in zip(responses, asks, strict=True):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, req, end_stream=not body)
        if body:
            conn.send_data(stream_id, body, end_stream=True)
        conn.data_to_send()
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return (time.perf_counter() - begin) / len(responses)


def ours_hpack(make: Callable[[int], Message], count: int) -> float:
    encoder, decoder = Encoder(), Decoder()
    lists = [make(i)[0] for i in range(count)]
    gc.collect()
    begin = time.perf_counter()
    for headers in lists:
        decoder.decode(encoder.encode(headers))
    return (time.perf_counter() - begin) / count


def h2_hpack(make: Callable[[int], Message], count: int) -> float:
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    lists = [make(i)[0] for i in range(count)]
    gc.collect()
    begin = time.perf_counter()
    for headers in lists:
        decoder.decode(encoder.encode(headers), raw=True)
    return (time.perf_counter() - begin) / count


def check_same_results(make: Callable[[int], Message], count: int) -> None:
    """Before timing: our server sees the same requests h2's does (a benchmark of a codec that
    drops something would be meaningless)."""
    start, requests, _, _ = record(make, count)
    conn = H2Connection(client=False, settings=OUR_SETTINGS)
    conn.initiate()
    conn.receive(start)
    for i, data in enumerate(requests):
        heads = [e for e in conn.receive(data) if type(e) is HeadersReceived]
        if [h.headers for h in heads] != [make(i)[0]]:  # type: ignore[attr-defined]
            raise SystemExit(f"request {i} decoded differently: {heads}")
        stream_id = heads[0].stream_id  # type: ignore[attr-defined]
        conn.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
        conn.data_to_send()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    kinds = {"grpc": grpc_request, "http": http_request}
    results: dict[tuple[str, str], tuple[float, float]] = {}
    busy_before = background_busy(1.0)
    for name, make in kinds.items():
        check_same_results(make, 200)
        client_start, requests, server_start, responses = record(make, args.requests)
        cases: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {
            "server": (
                partial(ours_server, client_start, requests, make),
                partial(h2_server, client_start, requests, make),
            ),
            "client": (
                partial(ours_client, server_start, responses, make),
                partial(h2_client, server_start, responses, make),
            ),
            "hpack": (
                partial(ours_hpack, make, args.requests),
                partial(h2_hpack, make, args.requests),
            ),
        }
        for case, (ours, theirs) in cases.items():
            ours_times, theirs_times = [], []
            for _ in range(args.rounds):  # interleaved, so a burst of other load hits both
                ours_times.append(ours())
                theirs_times.append(theirs())
            results[(name, case)] = (statistics.median(ours_times), statistics.median(theirs_times))
            print(
                f"{name:5} {case:7} ours {results[(name, case)][0] * 1e6:7.2f} us  "
                f"h2 {results[(name, case)][1] * 1e6:7.2f} us",
                file=sys.stderr,
            )
    busy_after = background_busy(1.0)
    lines = [
        "## HTTP/2 codec (istio.http2 vs h2)",
        "",
        f"`tools/bench/h2_codec_bench.py --requests {args.requests} --rounds {args.rounds}`,"
        f" Python {sys.version.split()[0]}, h2 {h2.__version__}, hpack {hpack.__version__};"
        f" other processes kept {busy_before:.2f} cores busy before the run and"
        f" {busy_after:.2f} after (2 cores here, shared).",
        "Per request on a warm connection, median of the rounds' means; ratio = h2 / ours.",
        "",
        "| request | work | istio.http2 | h2 | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for (name, case), (ours_time, theirs_time) in results.items():
        lines.append(
            f"| {name} | {case} | {ours_time * 1e6:.2f} us | {theirs_time * 1e6:.2f} us |"
            f" {theirs_time / ours_time:.1f}x |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
