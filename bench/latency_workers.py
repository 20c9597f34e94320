"""Client processes of the latency bench: each runs several agents (threads).

Module-level functions only: they are started with multiprocessing's spawn context.
Every thread warms up, waits for the common start, then times ``requests`` calls and
reports its latencies in microseconds with its start and end times.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPE = (1, 28, 28)


def _inputs(seed: int, n: int) -> np.ndarray:
    """Distinct MNIST-sized inputs (none repeats, so no RT hit on the inspect path)."""
    from controller.training import datasets

    x = datasets.load("mnist5k").x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), n)
    return np.clip(x[idx] + rng.uniform(0, 1e-3, (n, *SHAPE)), 0, 1).astype(np.float32)


@dataclass
class Client:
    """One thread's way to make a timed call, and what to close afterwards."""

    call: Callable[[np.ndarray], float]
    close: Callable[[], object] | None = None
    guard: Any = None  # the agent, for scenarios that drive it directly


def _client(scenario: str, address: str, model_path: str, agent_id: str) -> Client:
    if scenario == "bare_model":
        import torch

        from controller.reference_model import load_model

        model = load_model(model_path)

        def bare(x: np.ndarray) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(torch.from_numpy(x[None]))
            return time.perf_counter() - t0

        return Client(bare)
    if scenario in ("fast_path", "mirror", "inspect", "saturation"):
        from agents import attach
        from openexample import rules

        g = attach(
            model_path,
            controller=address,
            model_id="mnist-cnn",
            agent_id=agent_id,
            input_shape=SHAPE,
            budget_us=1_000_000,
            connect_timeout_s=60,
        )
        if not g.connected:
            raise RuntimeError(f"{agent_id}: no session with {address}")
        action = {"fast_path": rules.allow(), "mirror": rules.mirror()}.get(scenario)
        if action is not None:  # local rule, above the controller's table-miss rule
            g.local_mod(rules.vigilance_mod("add", priority=10, actions=[action]))
        return Client(lambda x: g(x).latency_s, g.close, g)
    if scenario == "grpc_echo":
        return Client(*_grpc_echo_client(address))
    if scenario == "tcp_echo":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def tcp(x: np.ndarray) -> float:
            data = x.tobytes()
            t0 = time.perf_counter()
            sock.sendall(struct.pack("<I", len(data)) + data)
            want = len(data) + 4
            got = 0
            while got < want:
                got += len(sock.recv(want - got))
            return time.perf_counter() - t0

        return Client(tcp, sock.close)
    raise ValueError(scenario)


def _grpc_echo_client(address: str) -> tuple[Callable, Callable]:
    """A grpc.aio stream on its own loop thread, driven synchronously like an agent."""
    import grpc

    from openexample import messages, tensor
    from openexample.v1 import openexample_pb2 as pb

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def open_call() -> Any:
        channel = grpc.aio.insecure_channel(address)
        return channel, channel.stream_stream("/openexample.v1.OpenExample/Connect")()

    channel, call = asyncio.run_coroutine_threadsafe(open_call(), loop).result()

    async def round_trip(data: bytes) -> None:
        await call.write(data)
        await call.read()

    def echo(x: np.ndarray) -> float:
        item = pb.PkgInItem(label=1, confidence=0.9, reason=pb.PKG_IN_REASON_ACTION)
        env = messages.envelope(pb.PkgIn(model_id="m", inputs=tensor.encode(x[None]), items=[item]))
        t0 = time.perf_counter()
        asyncio.run_coroutine_threadsafe(round_trip(env.SerializeToString()), loop).result()
        return time.perf_counter() - t0

    def close() -> None:
        call.cancel()
        asyncio.run_coroutine_threadsafe(channel.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)

    return echo, close


def run_agents(
    scenario: str,
    address: str,
    model_path: str,
    proc_index: int,
    threads: int,
    requests: int,
    warmup: int,
    batch: int,
    start: Any,
    out: Any,
) -> None:
    """One client process: ``threads`` agents, results put on ``out``."""
    import torch

    torch.set_num_threads(1)  # many agents share 2 cores; intra-op threads only fight
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    clients = [
        _client(scenario, address, model_path, f"bench-{proc_index}-{t}") for t in range(threads)
    ]
    results: list[tuple[np.ndarray, float, float]] = [None] * threads  # type: ignore[list-item]

    def work(t: int, fn: Callable[[np.ndarray], float]) -> None:
        x = _inputs(proc_index * 1000 + t, warmup + requests)
        for i in range(warmup):
            fn(x[i])
        start.wait()
        lat = np.empty(requests, np.float64)
        t0 = time.perf_counter()
        for i in range(requests):
            lat[i] = fn(x[warmup + i])
        results[t] = (lat * 1e6, t0, time.perf_counter())

    def saturate(t: int, guard_call: Any) -> None:
        # Batches of `batch` inputs per call: the controller batches across agents too.
        x = _inputs(proc_index * 1000 + t, requests)  # all distinct: no RT hit
        start.wait()
        t0 = time.perf_counter()
        for n in range(0, requests, batch):
            guard_call(x[n : n + batch])
        results[t] = (np.empty(0), t0, time.perf_counter())

    workers = []
    for t, c in enumerate(clients):
        if scenario == "saturation":
            workers.append(threading.Thread(target=saturate, args=(t, c.guard.batch)))
        else:
            workers.append(threading.Thread(target=work, args=(t, c.call)))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for c in clients:
        if c.close is not None:
            c.close()
    out.put((proc_index, results))
