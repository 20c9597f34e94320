"""Client processes of the latency bench: each runs several agents (threads).

Module-level functions only: they are started with multiprocessing's spawn context,
once per bench (``serve``: bench.latency.WorkerPool), and run one scenario after another
as the bench sends them over a pipe. Every thread warms up, waits for the common start
(all threads of all processes), then times ``requests`` calls and reports its latencies
in microseconds with its start and end times. A client process stops when the bench
tells it to, and by itself when the bench dies (bench.procs.watch_parent).

TLS: each task carries, per agent id, the settings to reach the server with (AgentConfig
overrides: ``tls_ca``/``tls_cert``/``tls_key``, file paths made by the bench, or
``plaintext``); the echo floors use the same files. A scenario ending in ``_plain``
(``inspect_plain``, ``grpc_echo_plain``, ...) is its namesake on plain text.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable
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


def stage_matrix(stages: Iterable[Any]) -> np.ndarray:
    """``[n, len(STAGE_NAMES)]`` from Result.stages, in microseconds (batch_items last).
    None and unfinished ones are left out: decided locally, by timeout, or joined an
    input already sent."""
    from agents.results import STAGE_NAMES

    rows = [
        [getattr(s, k) for k in STAGE_NAMES]
        for s in stages
        if s is not None and s.total is not None
    ]
    return np.asarray(rows, np.float64).reshape(-1, len(STAGE_NAMES))


def agent_id(proc_index: int, thread: int) -> str:
    """The agent id (and certificate name, ``agent/<id>``) of a client thread."""
    return f"bench-{proc_index}-{thread}"


@dataclass
class Client:
    """One thread's way to make a timed call, and what to close afterwards."""

    call: Callable[[np.ndarray], float]
    close: Callable[[], object] | None = None
    guard: Any = None  # the agent, for scenarios that drive it directly
    stages: list | None = None  # inspect: each call's Result.stages, in order


# Scenarios run by a real agent (attach): the address's scheme picks the channel
# (HOST:PORT gRPC, tcp:// the native channel).
AGENT_SCENARIOS = ("fast_path", "mirror", "inspect", "inspect_tcp", "saturation", "saturation_tcp")
PLAIN = "_plain"  # a scenario with this suffix: its namesake on plain text


def base_scenario(scenario: str) -> str:
    """``inspect_plain`` -> ``inspect``: what the client does (the channel's security
    comes with the task's TLS settings)."""
    return scenario.removesuffix(PLAIN)


def _tls_files(tls: dict[str, Any]) -> Any:
    """TlsFiles from AgentConfig overrides; None for plain text."""
    from openexample.tls import TlsFiles

    if tls.get("plaintext"):
        return None
    return TlsFiles.from_settings(tls["tls_ca"], tls["tls_cert"], tls["tls_key"])


def _client(
    scenario: str, address: str, model_path: str, agent_id: str, tls: dict[str, Any]
) -> Client:
    scenario = base_scenario(scenario)
    if scenario == "bare_model":
        from agents.models import wrap_model

        # the model as the agent calls it (TorchScript or ONNX), with no agent around it
        model = wrap_model(model_path, input_shape=SHAPE)

        def bare(x: np.ndarray) -> float:
            t0 = time.perf_counter()
            model.predict(x[None])
            return time.perf_counter() - t0

        return Client(bare)
    if scenario in AGENT_SCENARIOS:
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
            **tls,
        )
        if not g.connected:
            raise RuntimeError(f"{agent_id}: no session with {address}")
        action = {"fast_path": rules.allow(), "mirror": rules.mirror()}.get(scenario)
        if action is not None:  # local rule, above the controller's table-miss rule
            g.local_mod(rules.vigilance_mod("add", priority=10, actions=[action]))
        if scenario.startswith("inspect"):  # keep where the time went (read after the run)
            stages: list = []

            def inspect(x: np.ndarray) -> float:
                res = g(x)
                stages.append(res.stages)
                return res.latency_s

            return Client(inspect, g.close, g, stages)
        return Client(lambda x: g(x).latency_s, g.close, g)
    if scenario == "grpc_echo":
        return Client(*_grpc_echo_client(address, _tls_files(tls)))
    if scenario == "tcp_echo":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        files = _tls_files(tls)
        if files is not None:  # mTLS, as the native channel: verify the server, show ours
            from openexample.tls import client_context

            sock = client_context(files).wrap_socket(sock, server_hostname=host)

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


def _grpc_echo_client(address: str, files: Any = None) -> tuple[Callable, Callable]:
    """A grpc.aio stream on its own loop thread, driven synchronously like an agent;
    mTLS with ``files`` (TlsFiles), else plain text."""
    import grpc

    from openexample import messages, tensor
    from openexample.grpc_tls import grpc_channel_credentials
    from openexample.v1 import openexample_pb2 as pb

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def open_call() -> Any:
        if files is None:
            channel = grpc.aio.insecure_channel(address)
        else:
            channel = grpc.aio.secure_channel(address, grpc_channel_credentials(files))
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
    tls: dict[str, dict[str, Any]],
    start: Any,
    out: Any,
) -> None:
    """One client process: ``threads`` agents, results put on ``out``. ``tls``: per
    agent id (``bench-PROC-THREAD``), its TLS settings (see the module's docstring)."""
    import torch

    torch.set_num_threads(1)  # many agents share 2 cores; intra-op threads only fight
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ids = [agent_id(proc_index, t) for t in range(threads)]
    clients = [_client(scenario, address, model_path, a, tls[a]) for a in ids]
    # (latencies us, start, end, stage_matrix of the results or None)
    results: list[tuple] = [None] * threads  # type: ignore[list-item]

    def work(t: int, c: Client) -> None:
        fn = c.call
        x = _inputs(proc_index * 1000 + t, warmup + requests)
        for i in range(warmup):
            fn(x[i])
        start.wait()
        if c.stages is not None:
            c.stages.clear()  # the warm-up's
        lat = np.empty(requests, np.float64)
        t0 = time.perf_counter()
        for i in range(requests):
            lat[i] = fn(x[warmup + i])
        t1 = time.perf_counter()
        stages = None if c.stages is None else stage_matrix(c.stages)
        results[t] = (lat * 1e6, t0, t1, stages)

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
        if base_scenario(scenario).startswith("saturation"):
            workers.append(threading.Thread(target=saturate, args=(t, c.guard.batch)))
        else:
            workers.append(threading.Thread(target=work, args=(t, c)))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for c in clients:
        if c.close is not None:
            c.close()
    out.put((proc_index, results))


class _CommonStart:
    """``start`` for run_agents in a served process: when all its threads are warm, tell
    the bench (``ready``) and wait for its ``go``, which it sends once every process is."""

    def __init__(self, threads: int, conn: Any, timeout_s: float = 300.0) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self._barrier = threading.Barrier(threads, action=self._sync)

    def _sync(self) -> None:
        self._conn.send(("ready", None))
        if self._conn.recv() != "go":
            raise RuntimeError("the bench called the run off")

    def wait(self) -> None:
        self._barrier.wait(self._timeout_s)


class _Reply:
    """``out`` for run_agents in a served process: the results go back over the pipe."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def put(self, item: tuple[int, list]) -> None:
        if any(r is None for r in item[1]):
            self._conn.send(("error", "a client thread failed (its traceback is above)"))
        else:
            self._conn.send(("done", item))


def serve(conn: Any, parent_pid: int) -> None:
    """A client process: run_agents for each task read from ``conn``, until None.

    A task is run_agents' arguments up to ``tls``; the replies are ``("ready", None)``
    (all its agents warm), then ``("done", (proc_index, results))``, or ``("error",
    text)``. Ctrl-C is the bench's to handle (it stops us); we stop when it dies.
    """
    from bench.procs import watch_parent

    watch_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    import agents  # noqa: F401  (imported once, while the bench starts the controller)

    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the bench is gone
            return
        if task is None:
            return
        try:
            run_agents(*task, _CommonStart(task[4], conn), _Reply(conn))
        except Exception:
            conn.send(("error", traceback.format_exc()))
