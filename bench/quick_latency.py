"""A first latency probe (``python -m bench.quick_latency``), until ``openexample-bench
latency`` lands: one real controller process, one agent, the example MNIST model.

Measures, in the same run: the bare model call, the agent fast path (ALLOW rule and
RT hit: added latency), the INSPECT round trip through the controller's detectors, and
a bare ECHO round trip on the same gRPC stack as the floor; then INSPECT on the native
channel (tcp://, unix://, same daemon) and a framed ECHO floor on tcp. Then where the INSPECT
latency goes, stage by stage (agents/results.py ``Stages``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import uvloop

from agents import attach
from bench.demo import DETECTORS, MODEL_ID, start_controller
from bench.latency import breakdown_table, stage_summary
from bench.latency_workers import stage_matrix
from controller.reference_model import load_model
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import ensure_artifacts
from openexample import messages, rules, tables
from openexample.addresses import parse_address
from openexample.framing import FrameDecoder, frame
from openexample.v1 import openexample_pb2 as pb


def pct(us: list[float]) -> str:
    a = np.asarray(us)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return f"n={len(a):<6} p50={p50:8.1f} us  p90={p90:8.1f} us  p99={p99:8.1f} us"


async def echo_floor(address: str, n: int) -> list[float]:
    """ECHO round trips on a raw OpenExample stream (HELLO first), grpc.aio client."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream("/openexample.v1.OpenExample/Connect")()
        await call.write(messages.hello("probe").SerializeToString())
        await call.read()  # controller HELLO
        await call.read()  # FEATURES_REQUEST (unanswered: ECHO works in any state)
        out = []
        for i in range(n):
            env = messages.envelope(pb.EchoRequest(data=b""), xid=i + 1).SerializeToString()
            t0 = time.perf_counter()
            await call.write(env)
            while True:
                reply = pb.Envelope.FromString(await call.read())
                if reply.HasField("echo_reply") and reply.xid == i + 1:
                    break
            out.append((time.perf_counter() - t0) * 1e6)
        call.cancel()
        return out


async def native_echo_floor(address: str, n: int) -> list[float]:
    """ECHO round trips on the native channel (HELLO first): a framed asyncio Protocol on
    uvloop, TCP_NODELAY, the floor under INSPECT over tcp://."""
    a = parse_address(address)
    loop = asyncio.get_running_loop()

    class Probe(asyncio.Protocol):
        def __init__(self) -> None:
            self.decoder = FrameDecoder(1 << 25)
            self.want = 0
            self.waiter: asyncio.Future | None = None

        def data_received(self, data: bytes) -> None:
            for f in self.decoder.feed(data):
                env = pb.Envelope.FromString(f)
                if env.HasField("echo_reply") and env.xid == self.want and self.waiter:
                    self.waiter.set_result(None)

    tr, probe = await loop.create_connection(Probe, a.host, a.port)
    tr.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tr.write(frame(messages.hello("probe").SerializeToString()))
    out = []
    for i in range(n):
        env = messages.envelope(pb.EchoRequest(data=b""), xid=i + 1).SerializeToString()
        probe.want, probe.waiter = i + 1, loop.create_future()
        t0 = time.perf_counter()
        tr.write(frame(env))
        await probe.waiter
        out.append((time.perf_counter() - t0) * 1e6)
    tr.close()
    return out


def _attach(address: str, model_path: Path, x: np.ndarray) -> Any:
    """The example model behind the controller at ``address`` (its scheme picks the
    channel), connected and warmed up."""
    g = attach(
        str(model_path),
        controller=address,
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
        connect_timeout_s=30,
    )
    for i in range(200):  # warm-up
        g(x[i])
    return g


def _fresh(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` test images with a tiny jitter of their own: none is an RT hit."""
    rng = np.random.default_rng(seed)
    fresh = np.clip(x[np.arange(n) % len(x)] + rng.uniform(0, 1e-3, (n, *x.shape[1:])), 0, 1)
    return fresh.astype(np.float32)


def native_inspect(address: str, model_path: Path, x: np.ndarray, n: int, seed: int) -> list:
    """INSPECT results of one agent on the native channel (``tcp://``, ``unix://``):
    the same images as the gRPC run, their own jitter (no RT hit from an earlier run)."""
    g = _attach(address, model_path, x)
    try:
        fresh = _fresh(x, n, seed)
        return [g(fresh[i]) for i in range(n)]
    finally:
        g.close()


def agent_only_fast_path(n: int) -> tuple[list[float], list[float]]:
    """The agent's own cost on the fast path, without torch or a controller: a numpy
    model, an ALLOW rule; then the same with a known attack on the label (the rule then
    checks the RT: a fingerprint per call)."""
    logits = np.arange(10, dtype=np.float32)
    g = attach(
        lambda xs: np.tile(logits, (len(xs), 1)),
        controller="127.0.0.1:1",  # nobody there: the rule decides everything
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
    )
    try:
        g.local_mod(rules.vigilance_mod("add", priority=10, actions=[rules.allow()]))
        x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
        for _ in range(500):
            g(x)
        plain = [g(x).latency_s * 1e6 for _ in range(n)]
        known = tables.label_entry(b"\x01" * 16, 9, pb.VERDICT_ADVERSARIAL)  # label 9 = argmax
        g.local_mod(tables.rt_push(MODEL_ID, [known]))
        checked = [g(x).latency_s * 1e6 for _ in range(n)]
        return plain, checked
    finally:
        g.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=2000)
    args = p.parse_args()
    cache = Path("var/cache")
    model_path = ensure_example_model(cache)
    art = ensure_artifacts(DETECTORS, cache=cache)
    workdir = Path("var/quick_latency")
    workdir.mkdir(parents=True, exist_ok=True)
    # gRPC and the native channel at once (tcp:// and unix://), one daemon.
    native = ["tcp://127.0.0.1:0", f"unix://{workdir.resolve() / 'controller.sock'}"]
    proc = start_controller(workdir, art, budget_us=1_000_000, native=native)
    address = proc.address
    x = datasets.load("mnist5k").split().test.x
    n = args.n
    try:
        model = load_model(model_path)
        bare = []
        for i in range(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(torch.from_numpy(x[i % len(x)][None]))
            bare.append((time.perf_counter() - t0) * 1e6)
        g = _attach(address, model_path, x)
        fresh = _fresh(x, n, seed=0)
        inspected = [g(fresh[i]) for i in range(n)]
        inspect = [r.latency_s * 1e6 for r in inspected]
        stages = stage_summary(stage_matrix(r.stages for r in inspected))
        rt = [g(x[i % 200]).latency_s * 1e6 for i in range(n)]  # seen before: RT hits
        g.local_mod(rules.vigilance_mod("add", priority=10, actions=[rules.allow()]))
        allow = [g(x[i % len(x)]).latency_s * 1e6 for i in range(n)]
        g.close()
        echo = asyncio.run(echo_floor(address, n))
        tcp_results = native_inspect(proc.address_for("tcp"), model_path, x, n, seed=1)
        native_tcp = [r.latency_s * 1e6 for r in tcp_results]
        tcp_stages = stage_summary(stage_matrix(r.stages for r in tcp_results))
        native_unix = [
            r.latency_s * 1e6
            for r in native_inspect(proc.address_for("unix"), model_path, x, n, seed=2)
        ]
        native_echo = uvloop.run(native_echo_floor(proc.address_for("tcp"), n))
    finally:
        proc.stop()
    agent_allow, agent_checked = agent_only_fast_path(n)
    print(f"bare model call           {pct(bare)}")
    print(f"fast path: ALLOW rule     {pct(allow)}  (added)")
    print(f"fast path: RT hit         {pct(rt)}  (added)")
    print(f"agent only: ALLOW rule    {pct(agent_allow)}  (numpy model, no controller)")
    print(f"agent only: ALLOW + RT    {pct(agent_checked)}  (a known attack on the label)")
    print(f"INSPECT round trip        {pct(inspect)}  (added)")
    print(f"gRPC ECHO floor           {pct(echo)}")
    print(f"INSPECT native tcp        {pct(native_tcp)}  (added)")
    print(f"INSPECT native unix       {pct(native_unix)}  (added)")
    print(f"native ECHO floor (tcp)   {pct(native_echo)}")
    p50, p99 = np.percentile(echo, [50, 99])
    print("\nINSPECT on gRPC, where the added latency goes (Result.stages; wire = out + back):")
    print("\n".join(breakdown_table(stages, {"gRPC ECHO": (p50, p99)})))
    p50, p99 = np.percentile(native_echo, [50, 99])
    print("\nINSPECT on the native channel (tcp), where the added latency goes:")
    print("\n".join(breakdown_table(tcp_stages, {"native ECHO": (p50, p99)})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
