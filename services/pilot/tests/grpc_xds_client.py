"""A proxyless gRPC client, run as its own process by the tests: gRPC's xDS client talks to
Pilot (GRPC_XDS_BOOTSTRAP names it) and routes `xds:///TARGET` calls by what Pilot sent.

    python grpc_xds_client.py TARGET CALLS [HEADER=VALUE...]

Each call's outcome is printed as one line, `ok <reply>` or `error <STATUS_CODE>`, so a test can
read results while it changes rules. It stops after CALLS calls.
"""

from __future__ import annotations

import sys

import grpc

METHOD = "/echo.Echo/Call"


def main() -> int:
    target, calls = sys.argv[1], int(sys.argv[2])
    metadata = [tuple(item.split("=", 1)) for item in sys.argv[3:]]
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(calls):
            try:
                reply = call(b"ping", timeout=10, metadata=metadata)
                print(f"ok {reply.decode()}", flush=True)
            except grpc.RpcError as error:
                print(f"error {error.code().name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
