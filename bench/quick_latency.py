"""A first latency probe (``python -m bench.quick_latency``), until ``openexample-bench
latency`` lands: real controller processes, one agent at a time, the example MNIST model.

Measures, in the same run: the bare model call, the agent fast path (ALLOW rule and
RT hit: added latency), the INSPECT round trip through the controller's detectors, and
a bare ECHO round trip on the same gRPC stack as the floor; then INSPECT on the native
channel (tcp://, unix://, same daemon) and a framed ECHO floor on each. Then where the
INSPECT latency goes, stage by stage (agents/results.py ``Stages``).

What TLS costs: every channel is measured twice, with mTLS (the default: certificates
from a development CA in ``var/quick_latency/tls/pki``) and on plain text (a second
controller with ``plaintext``, loopback only), in alternating blocks of calls so that
both see the machine in the same state; the report sets them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from agents import attach
from agents.models import wrap_model
from agents.native import ALPN
from bench.demo import DETECTORS, MODEL_ID, start_controller
from bench.latency import STAGE_LABELS, stage_summary
from bench.latency_workers import stage_matrix
from bench.procs import ControllerProcess
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import ensure_artifacts
from openexample import messages, rules, tables
from openexample.addresses import TCP, parse_address
from openexample.framing import FrameDecoder, frame
from openexample.grpc_tls import grpc_channel_credentials
from openexample.tls import TlsFiles, client_context
from openexample.v1 import openexample_pb2 as pb

MODES = ("mTLS", "plain")  # the default, and the same on plain text
BLOCK = 100  # calls per mode before switching to the other one
WARMUP = 200


def pct(us: list[float]) -> str:
    a = np.asarray(us)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return f"n={len(a):<6} p50={p50:8.1f} us  p90={p90:8.1f} us  p99={p99:8.1f} us"


def _files(tls: dict[str, Any]) -> TlsFiles | None:
    """TlsFiles from ControllerProcess.agent_tls settings (None: plain text)."""
    if tls.get("plaintext"):
        return None
    return TlsFiles.from_settings(tls["tls_ca"], tls["tls_cert"], tls["tls_key"])


def alternate(calls: dict[str, Callable[[int], Any]], n: int) -> dict[str, list]:
    """``n`` calls of each (``call(i)``, i = 0..n-1), in blocks of BLOCK taking turns
    (who goes first alternates too): drift on the machine hits both alike."""
    out: dict[str, list] = {k: [] for k in calls}
    order = list(calls)
    for b, start in enumerate(range(0, n, BLOCK)):
        for k in order if b % 2 == 0 else order[::-1]:
            fn = calls[k]
            out[k] += [fn(i) for i in range(start, min(n, start + BLOCK))]
    return out


async def alternate_async(calls: dict[str, Callable[[int], Any]], n: int) -> dict[str, list]:
    """:func:`alternate` for coroutine functions."""
    out: dict[str, list] = {k: [] for k in calls}
    order = list(calls)
    for b, start in enumerate(range(0, n, BLOCK)):
        for k in order if b % 2 == 0 else order[::-1]:
            for i in range(start, min(n, start + BLOCK)):
                out[k].append(await calls[k](i))
    return out


def _echo_env(i: int) -> bytes:
    return messages.envelope(pb.EchoRequest(data=b""), xid=i + 1).SerializeToString()


async def grpc_echo_floors(targets: dict[str, tuple[str, dict]], n: int) -> dict[str, list]:
    """ECHO round trips on a raw OpenExample stream (HELLO first), grpc.aio client, per
    mode: ``targets`` mode -> (address, agent_tls settings)."""
    calls, channels = {}, []
    for mode, (address, tls) in targets.items():
        files = _files(tls)
        if files is None:
            ch = grpc.aio.insecure_channel(address)
        else:
            ch = grpc.aio.secure_channel(address, grpc_channel_credentials(files))
        channels.append(ch)
        call = ch.stream_stream("/openexample.v1.OpenExample/Connect")()
        await call.write(messages.hello("probe").SerializeToString())
        await call.read()  # controller HELLO
        await call.read()  # FEATURES_REQUEST (unanswered: ECHO works in any state)

        async def echo(i: int, call: Any = call) -> float:
            env = _echo_env(i)
            t0 = time.perf_counter()
            await call.write(env)
            while True:
                reply = pb.Envelope.FromString(await call.read())
                if reply.HasField("echo_reply") and reply.xid == i + 1:
                    break
            return (time.perf_counter() - t0) * 1e6

        for i in range(n, n + WARMUP):  # warm-up, xids of its own
            await echo(i)
        calls[mode] = echo
    try:
        return await alternate_async(calls, n)
    finally:
        for ch in channels:
            await ch.close()


class _Probe(asyncio.Protocol):
    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 25)
        self.want = 0
        self.waiter: asyncio.Future | None = None

    def data_received(self, data: bytes) -> None:
        for f in self.decoder.feed(data):
            env = pb.Envelope.FromString(f)
            if env.HasField("echo_reply") and env.xid == self.want and self.waiter:
                self.waiter.set_result(None)


async def _native_probe(address: str, tls: dict[str, Any]) -> Callable[[int], Any]:
    """A framed connection to the native channel (HELLO sent), mTLS as an agent makes
    it (ALPN, the server's name checked) unless ``tls`` says plain text; an ECHO round
    trip maker."""
    a = parse_address(address)
    loop = asyncio.get_running_loop()
    files = _files(tls)
    ctx: ssl.SSLContext | None = None
    if files is not None:
        ctx = client_context(files)
        ctx.set_alpn_protocols([ALPN])
    if a.scheme == TCP:
        name = a.host if ctx is not None else None
        tr, probe = await loop.create_connection(
            _Probe, a.host, a.port, ssl=ctx, server_hostname=name
        )
        tr.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        name = "localhost" if ctx is not None else None
        tr, probe = await loop.create_unix_connection(_Probe, a.path, ssl=ctx, server_hostname=name)
    tr.write(frame(messages.hello("probe").SerializeToString()))

    async def echo(i: int) -> float:
        env = _echo_env(i)
        probe.want, probe.waiter = i + 1, loop.create_future()
        t0 = time.perf_counter()
        tr.write(frame(env))
        await probe.waiter
        return (time.perf_counter() - t0) * 1e6

    for i in range(1 << 20, (1 << 20) + WARMUP):  # warm-up, xids of its own
        await echo(i)
    echo.close = tr.close  # type: ignore[attr-defined]
    return echo


async def native_echo_floors(targets: dict[str, tuple[str, dict]], n: int) -> dict[str, list]:
    """ECHO round trips on the native channel (HELLO first) per mode: a framed asyncio
    Protocol on uvloop, TCP_NODELAY on tcp, the floor under INSPECT over tcp:// and
    unix://."""
    calls = {mode: await _native_probe(address, tls) for mode, (address, tls) in targets.items()}
    try:
        return await alternate_async(calls, n)
    finally:
        for c in calls.values():
            c.close()  # type: ignore[attr-defined]


def _attach(address: str, model_path: Path, x: np.ndarray, tls: dict[str, Any]) -> Any:
    """The example model behind the controller at ``address`` (its scheme picks the
    channel), connected and warmed up; ``tls``: ControllerProcess.agent_tls."""
    g = attach(
        str(model_path),
        controller=address,
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
        connect_timeout_s=30,
        **tls,
    )
    for i in range(WARMUP):
        g(x[i])
    return g


def _fresh(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` test images with a tiny jitter of their own: none is an RT hit."""
    rng = np.random.default_rng(seed)
    fresh = np.clip(x[np.arange(n) % len(x)] + rng.uniform(0, 1e-3, (n, *x.shape[1:])), 0, 1)
    return fresh.astype(np.float32)


def inspect_pair(
    procs: dict[str, ControllerProcess],
    scheme: str,
    model_path: Path,
    x: np.ndarray,
    n: int,
    seed: int,
    keep: Callable[[Any], None] | None = None,
) -> dict[str, list]:
    """INSPECT results of one agent per mode on channel ``scheme`` (grpc, tcp, unix),
    taking turns; the same fresh images for both (each daemon sees them once).
    ``keep``: called with the mTLS agent before it is closed (more runs on it)."""
    fresh = _fresh(x, n, seed)
    guards = {
        m: _attach(p.address_for(scheme), model_path, x, p.agent_tls(f"quick-{scheme}"))
        for m, p in procs.items()
    }
    try:
        results = alternate({m: (lambda i, g=g: g(fresh[i])) for m, g in guards.items()}, n)
        if keep is not None:
            keep(guards[MODES[0]])
        return results
    finally:
        for g in guards.values():
            g.close()


def agent_only_fast_path(n: int, images: np.ndarray) -> dict[str, list[float]]:
    """The agent's own cost on the fast path, without torch or a controller: a numpy
    model that always says 9, an ALLOW rule, new inputs (test images in turn).

    ``allow``: nothing known. ``rt``: one known attack on the label, so the rule checks
    the RT (a fingerprint per call). ``rt exact`` / ``rt near``: 500 known attacks with
    perceptual keys on the label (other test images), with near-copy matching off
    (radius 0) and at the default radius: what near-copy refusal adds to every new
    input of a label with known attacks (issue 18's budget: 20 us at p99)."""
    from agents.config import AgentConfig
    from openexample.perceptual import perceptual

    logits = np.arange(10, dtype=np.float32)
    queries, known = images[:200], images[200:700]
    entries = []
    for a in known:
        key, sketch = perceptual(a)
        fp = tables.fingerprint(a)
        entries.append(
            tables.label_entry(fp, 9, pb.VERDICT_ADVERSARIAL, near_key=key, near_sketch=sketch)
        )

    def guard(radius: int) -> Any:
        quiet = logging.getLogger("agents.guard")  # its plain-text warning: no session here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            g = attach(
                lambda xs: np.tile(logits, (len(xs), 1)),
                controller="127.0.0.1:1",  # nobody there: the rule decides everything
                model_id=MODEL_ID,
                input_shape=(1, 28, 28),
                plaintext=True,  # never connects; no certificate needed
                near_copy_radius=radius,
            )
        finally:
            quiet.setLevel(level)
        g.local_mod(rules.vigilance_mod("add", priority=10, actions=[rules.allow()]))
        return g

    def timed(g: Any) -> list[float]:
        for i in range(500):
            g(queries[i % len(queries)])
        return [g(queries[i % len(queries)]).latency_s * 1e6 for i in range(n)]

    out: dict[str, list[float]] = {}
    default_radius = AgentConfig().near_copy_radius
    g, g0 = guard(default_radius), guard(0)
    try:
        out["allow"] = timed(g)
        one = tables.label_entry(b"\x01" * 16, 9, pb.VERDICT_ADVERSARIAL)  # label 9 = argmax
        g.local_mod(tables.rt_push(MODEL_ID, [one]))
        out["rt"] = timed(g)
        for i in range(0, len(entries), 256):
            g.local_mod(tables.rt_push(MODEL_ID, entries[i : i + 256]))
            g0.local_mod(tables.rt_push(MODEL_ID, entries[i : i + 256]))
        exact, near = [], []
        for _ in range(4):  # in turns, so both see the machine in the same state
            exact += timed(g0)[: n // 4]
            near += timed(g)[: n // 4]
        out["rt exact"], out[f"rt near (radius {default_radius})"] = exact, near
        return out
    finally:
        g.close()
        g0.close()


def _p(us: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(us), [50, 99])
    return float(p50), float(p99)


def cost_table(rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """What TLS adds per channel: p50 and p99 with mTLS, on plain text, the difference."""
    lines = [
        f"| {'channel':<20} | {'p50 mTLS':>8} | {'p50 plain':>9} | {'TLS adds':>8} |"
        f" {'p99 mTLS':>8} | {'p99 plain':>9} | {'TLS adds':>8} |",
        f"|{'-' * 22}|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|",
    ]
    for name, by_mode in rows.items():
        (t50, t99), (p50, p99) = _p(by_mode["mTLS"]), _p(by_mode["plain"])
        lines.append(
            f"| {name:<20} | {t50:>8.1f} | {p50:>9.1f} | {t50 - p50:>+8.1f} |"
            f" {t99:>8.1f} | {p99:>9.1f} | {t99 - p99:>+8.1f} |"
        )
    return lines


def stages_table(summaries: dict[str, dict], floors: dict[str, dict[str, list[float]]]) -> list:
    """Where an INSPECT's added latency goes, mTLS beside plain text: mean (the means add
    up to the total's), p50 and p99 per stage (agents/results.py ``Stages``), then the
    floors measured the same way."""
    t, p = summaries["mTLS"], summaries["plain"]
    head = ["mean mTLS", "mean plain", "p50 mTLS", "p50 plain", "p99 mTLS", "p99 plain"]
    lines = [
        f"| {'stage':<24} | " + " | ".join(f"{h:>10}" for h in head) + " |",
        f"|{'-' * 26}|" + "|".join(f"{'-' * 11}:" for _ in head) + "|",
    ]
    if t.get("n") and p.get("n"):
        for k, label in STAGE_LABELS.items():
            name = f"**{label}**" if k == "total" else label
            cells = [s[k][q] for q in ("mean_us", "p50_us", "p99_us") for s in (t, p)]
            lines.append(f"| {name:<24} | " + " | ".join(f"{c:>10.1f}" for c in cells) + " |")
    for name, by_mode in floors.items():
        (t50, t99), (p50, p99) = _p(by_mode["mTLS"]), _p(by_mode["plain"])
        cells = ["", "", f"{t50:.1f}", f"{p50:.1f}", f"{t99:.1f}", f"{p99:.1f}"]
        lines.append(f"| {'floor: ' + name:<24} | " + " | ".join(f"{c:>10}" for c in cells) + " |")
    lines.append(
        f"\n{t.get('n', 0)} / {p.get('n', 0)} results (mTLS / plain); items scored together,"
        f" mean: {t['batch_items']['mean'] if t.get('n') else 0:.1f} /"
        f" {p['batch_items']['mean'] if p.get('n') else 0:.1f}."
    )
    return lines


def start_pair(workdir: Path, artifacts: list[Path]) -> dict[str, ControllerProcess]:
    """Two daemons, each on gRPC and the native channel (tcp:// and unix://): one with
    mTLS (the default), one on plain text; started side by side."""

    def start(mode: str) -> ControllerProcess:
        folder = workdir / ("tls" if mode == "mTLS" else "plaintext")
        folder.mkdir(parents=True, exist_ok=True)
        native = ["tcp://127.0.0.1:0", f"unix://{folder.resolve() / 'controller.sock'}"]
        return start_controller(
            folder, artifacts, 1_000_000, native=native, plaintext=mode == "plain"
        )

    with ThreadPoolExecutor(len(MODES)) as ex:
        futures = {m: ex.submit(start, m) for m in MODES}
    procs: dict[str, ControllerProcess] = {}
    errors = []
    for m, f in futures.items():
        try:
            procs[m] = f.result()
        except Exception as exc:  # stop the other one, then raise
            errors.append(exc)
    if errors:
        for p in procs.values():
            p.stop()
        raise errors[0]
    return procs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=2000)
    p.add_argument(
        "--model",
        help="your own TorchScript model (mnist5k inputs: 1x28x28, 10 classes) instead of"
        " the example one; the default detectors are trained for it first (cached)",
    )
    args = p.parse_args()
    cache = Path("var/cache")
    if args.model:
        from controller.training.train import check_model

        problem = check_model("mnist5k", args.model)
        if problem is not None:
            print(f"quick_latency: {problem}", file=sys.stderr)
            return 2
    own = Path(args.model).resolve() if args.model else None
    model_path = own or ensure_example_model(cache)
    art = ensure_artifacts(DETECTORS, cache=cache, model=own)
    workdir = Path("var/quick_latency")
    x = datasets.load("mnist5k").split().test.x
    n = args.n
    t_start = time.perf_counter()
    procs = start_pair(workdir, art)
    try:
        # the model as the agent calls it (TorchScript or ONNX), with no agent around it
        model = wrap_model(str(model_path), input_shape=(1, 28, 28))
        bare = []
        for i in range(n):
            t0 = time.perf_counter()
            model.predict(x[i % len(x)][None])
            bare.append((time.perf_counter() - t0) * 1e6)
        local: dict[str, list[float]] = {}

        def fast_paths(g: Any) -> None:  # decided in the agent: TLS plays no part
            local["rt"] = [g(x[i % 200]).latency_s * 1e6 for i in range(n)]  # RT hits
            g.local_mod(rules.vigilance_mod("add", priority=10, actions=[rules.allow()]))
            local["allow"] = [g(x[i % len(x)]).latency_s * 1e6 for i in range(n)]

        grpc_res = inspect_pair(procs, "grpc", model_path, x, n, seed=0, keep=fast_paths)
        tcp_res = inspect_pair(procs, "tcp", model_path, x, n, seed=1)
        unix_res = inspect_pair(procs, "unix", model_path, x, n, seed=2)

        def targets(scheme: str) -> dict[str, tuple[str, dict]]:
            return {
                m: (proc.address_for(scheme), proc.agent_tls("quick-echo"))
                for m, proc in procs.items()
            }

        echo = asyncio.run(grpc_echo_floors(targets("grpc"), n))
        echo_tcp = uvloop.run(native_echo_floors(targets("tcp"), n))
        echo_unix = uvloop.run(native_echo_floors(targets("unix"), n))
    finally:
        for proc in procs.values():
            proc.stop()
    agent_only = agent_only_fast_path(n, x)

    def us(results: dict[str, list]) -> dict[str, list[float]]:
        return {m: [r.latency_s * 1e6 for r in rs] for m, rs in results.items()}

    def stages(results: dict[str, list]) -> dict[str, dict]:
        return {m: stage_summary(stage_matrix(r.stages for r in rs)) for m, rs in results.items()}

    inspect, inspect_tcp, inspect_unix = us(grpc_res), us(tcp_res), us(unix_res)
    print(
        f"mTLS: certificates from a development CA in {procs['mTLS'].pki.folder}; plain: a"
        f" second controller without TLS (loopback); the two take turns every {BLOCK} calls."
    )
    print(f"bare model call                {pct(bare)}")
    print(f"fast path: ALLOW rule          {pct(local['allow'])}  (added)")
    print(f"fast path: RT hit              {pct(local['rt'])}  (added)")
    notes = {
        "allow": ("ALLOW rule", "numpy model, no controller"),
        "rt": ("ALLOW + RT", "a known attack on the label"),
        "rt exact": ("ALLOW + RT exact", "500 known attacks on the label, fingerprints only"),
    }
    for name, us_ in agent_only.items():
        label, why = notes.get(name, ("ALLOW + " + name, "the same 500, near-copy matching"))
        print(f"{'agent only: ' + label:<30} {pct(us_)}  ({why})")
    rows = {
        "INSPECT gRPC": inspect,
        "INSPECT native tcp": inspect_tcp,
        "INSPECT native unix": inspect_unix,
        "ECHO gRPC": echo,
        "ECHO native tcp": echo_tcp,
        "ECHO native unix": echo_unix,
    }
    for name, by_mode in rows.items():
        added = "  (added)" if name.startswith("INSPECT") else ""
        for m in MODES:
            print(f"{name + ', ' + m:<30} {pct(by_mode[m])}{added}")
    print("\nWhat TLS costs (us; mTLS minus plain text, same run):")
    print("\n".join(cost_table(rows)))
    print("\nINSPECT on gRPC, where the added latency goes (Result.stages; wire = out + back):")
    print("\n".join(stages_table(stages(grpc_res), {"gRPC ECHO": echo})))
    print("\nINSPECT on the native channel (tcp), where the added latency goes:")
    print("\n".join(stages_table(stages(tcp_res), {"native ECHO (tcp)": echo_tcp})))
    print(f"\nquick_latency finished in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
