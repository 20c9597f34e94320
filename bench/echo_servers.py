"""The two floors of the latency bench: servers that answer at once.

``grpc``: the OpenExample stream method, echoing every message (same gRPC stack as
the controller). ``tcp``: a raw loopback socket echoing length-prefixed frames.
Run as ``python -m bench.echo_servers grpc|tcp``; prints ``listening on PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections.abc import AsyncIterator

import grpc

from openexample.limits import DEFAULT_LIMITS

METHOD_SERVICE, METHOD_NAME = "openexample.v1.OpenExample", "Connect"


async def _grpc_echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for data in requests:
        yield data


async def serve_grpc(port: int) -> None:
    server = grpc.aio.server(options=DEFAULT_LIMITS.grpc_options())
    handler = grpc.stream_stream_rpc_method_handler(_grpc_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(METHOD_SERVICE, {METHOD_NAME: handler}),)
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(4)
            (n,) = struct.unpack("<I", head)
            writer.write(head + await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def serve_tcp(port: int) -> None:
    server = await asyncio.start_server(_tcp_echo, "127.0.0.1", port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=("grpc", "tcp"))
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    import uvloop

    uvloop.run(serve_grpc(args.port) if args.kind == "grpc" else serve_tcp(args.port))


if __name__ == "__main__":
    main()
