"""The two floors of the latency bench: servers that answer at once.

``grpc``: the OpenExample stream method, echoing every message (same gRPC stack as
the controller). ``tcp``: a raw loopback socket echoing length-prefixed frames.
Run as ``python -m bench.echo_servers grpc|tcp [--tls-ca CA --tls-cert CERT --tls-key
KEY]``; prints ``listening on PORT``, and with the TLS files ``listening on PORT tls
TLS_PORT``: the same server also on a second port with mTLS (a client certificate from
the same CA required, as on the controller's listeners).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections.abc import AsyncIterator

import grpc

from openexample.limits import DEFAULT_LIMITS
from openexample.tls import TlsFiles

METHOD_SERVICE, METHOD_NAME = "openexample.v1.OpenExample", "Connect"


async def _grpc_echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for data in requests:
        yield data


def _ready(port: int, tls_port: int | None) -> None:
    tls = "" if tls_port is None else f" tls {tls_port}"
    print(f"listening on {port}{tls}", flush=True)


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def serve_grpc(port: int, files: TlsFiles | None = None) -> None:
    from openexample.grpc_tls import grpc_server_credentials

    server = grpc.aio.server(options=DEFAULT_LIMITS.grpc_options())
    handler = grpc.stream_stream_rpc_method_handler(_grpc_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(METHOD_SERVICE, {METHOD_NAME: handler}),)
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    tls_port = None
    if files is not None:
        tls_port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(files))
    await server.start()
    _ready(bound, tls_port)
    await _until_sigterm()
    await server.stop(0)


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(4)
            (n,) = struct.unpack("<I", head)
            writer.write(head + await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        writer.close()


async def serve_tcp(port: int, files: TlsFiles | None = None) -> None:
    from openexample.tls import server_context

    servers = [await asyncio.start_server(_tcp_echo, "127.0.0.1", port)]
    if files is not None:
        ctx = server_context(files)  # mTLS: a client certificate from the CA required
        servers.append(await asyncio.start_server(_tcp_echo, "127.0.0.1", 0, ssl=ctx))
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    _ready(ports[0], ports[1] if files is not None else None)
    await _until_sigterm()
    for s in servers:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=("grpc", "tcp"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-ca", help="also serve with mTLS: the CA that signs clients")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    args = p.parse_args()
    files = None
    if args.tls_ca:
        files = TlsFiles.from_settings(args.tls_ca, args.tls_cert or "", args.tls_key or "")
    import uvloop

    serve = serve_grpc if args.kind == "grpc" else serve_tcp
    uvloop.run(serve(args.port, files))


if __name__ == "__main__":
    main()
