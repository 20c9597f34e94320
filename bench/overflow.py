"""Several controllers, measured (``python -m bench.overflow``): what a PKG_IN handed to a
neighbour over W0 costs, what k-of-n consensus costs, and how many samples 1, 2 or 3
controllers inspect.

Everything runs for real on this machine: Mosquitto with TLS and its ACL, controller
processes on one development CA, agents in client processes, mTLS everywhere.

- **Forwarded item**: one agent on ctl-a (W0 = 1, so a PKG_IN of two items is over it)
  and one on ctl-b, taking turns: two items through ctl-a (scored by ctl-b, handed over
  the bus) against two items sent to ctl-b directly (scored there, no bus), p50 and p99
  of the agent's wall time per call, in the same run.
- **Consensus**: three controllers; one agent on ctl-a for a model decided by ctl-a
  alone and one for the same detectors under ``consensus: 2`` (two of the three must
  agree), taking turns, one fresh input per call: p50 and p99 of each, same run.
- **Throughput**: client processes with several agents each send batches of 32 fresh
  inputs to ctl-a for a fixed time; ctl-a's W0 is 64 items, so what it cannot take goes
  to its neighbours (1 controller: nobody, it answers OVERLOADED). Inspected samples/s =
  items answered with a verdict, per second; the share scored by a neighbour beside it.
  On 2 cores every controller shares the same CPUs: more controllers add no compute
  here, only the hand-over path (a deployment puts them on other machines).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ID = "mnist-cnn"
BATCH = 32


def _inputs(seed: int, n: int) -> np.ndarray:
    from controller.training import datasets

    x = datasets.load("mnist5k").x
    rng = np.random.default_rng(seed)
    return np.clip(
        x[rng.integers(0, len(x), n)] + rng.uniform(0, 1e-3, (n, *x.shape[1:])), 0, 1
    ).astype(np.float32)


def _client(args: tuple[str, list[dict], str, float, int]) -> tuple[int, int, int]:
    """One client process: an agent per TLS setting in the list, on ``address``, sending
    batches for ``seconds``. Returns (items with a verdict, items UNKNOWN, scored by a
    neighbour)."""
    import threading

    from agents import attach

    address, tls_list, model, seconds, seed = args
    counts = [0, 0, 0]
    lock = threading.Lock()

    def run(k: int, tls: dict) -> None:
        g = attach(
            model,
            controller=address,
            model_id=MODEL_ID,
            input_shape=(1, 28, 28),
            budget_us=2_000_000,
            connect_timeout_s=30,
            **tls,
        )
        x = _inputs(seed * 100 + k, 4096 + BATCH)
        i = 0
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                rs = g.batch(x[i % 4096 : i % 4096 + BATCH])
                i += BATCH
                with lock:
                    for r in rs:
                        known = r.verdict != "unknown"
                        counts[0] += known
                        counts[1] += not known
                        counts[2] += known and r.reason.startswith("scored by")
        finally:
            g.close()

    ts = [threading.Thread(target=run, args=(k, t)) for k, t in enumerate(tls_list)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts[0], counts[1], counts[2]


def _cluster(root: Path, n: int, w0_first: int, models: dict[str, dict]) -> tuple[Any, list[Any]]:
    """A broker (for n > 1) and n controllers with ``models``; the first with W0
    ``w0_first``, the others 4096."""
    from bench.procs import BrokerProcess, ControllerProcess
    from openexample.pki import DevPki

    pki = DevPki(root / "pki")
    broker = BrokerProcess(root / "broker", pki).start() if n > 1 else None
    procs = []
    for k in range(n):
        cfg: dict[str, Any] = {
            "controller_id": f"ctl-{k}",
            "models": models,
            "budget_us": 2_000_000,
            "max_workload": w0_first if k == 0 else 4096,
            "max_in_flight_per_agent": 4096,
        }
        if broker is not None:
            cfg["cluster"] = {"broker": broker.url, "workload_interval_s": 0.2}
        procs.append(ControllerProcess(root / f"ctl-{k}", cfg, pki=pki).start())
    time.sleep(1.5 if broker else 0)  # every controller has seen the others' load
    return broker, procs


def _models(artifacts: list[Path]) -> dict[str, dict]:
    return {MODEL_ID: {"detectors": [str(p) for p in artifacts]}}


def _stop(broker: Any, procs: list[Any]) -> None:
    for p in procs:
        p.stop()
    if broker is not None:
        broker.stop()


def forwarded_cost(root: Path, artifacts: list[Path], model: str, n: int) -> dict[str, Any]:
    from agents import attach

    broker, (a, b) = _cluster(root, 2, 1, _models(artifacts))
    try:
        guards = {
            name: attach(
                model,
                controller=p.address,
                model_id=MODEL_ID,
                input_shape=(1, 28, 28),
                budget_us=2_000_000,
                connect_timeout_s=30,
                **p.agent_tls(f"probe-{name}"),
            )
            for name, p in (("forwarded", a), ("local", b))
        }
        x = _inputs(1, 4 * n + 200)
        times: dict[str, list[float]] = {"forwarded": [], "local": []}
        for i in range(n + 50):  # the first 50 warm up
            for name, g in guards.items():
                t0 = time.perf_counter()
                rs = g.batch(x[4 * i + (2 if name == "local" else 0) :][:2])
                took = (time.perf_counter() - t0) * 1e6
                if i >= 50 and rs[0].verdict != "unknown":
                    assert (name == "forwarded") == rs[0].reason.startswith("scored by"), rs[0]
                    times[name].append(took)
        for g in guards.values():
            g.close()
    finally:
        _stop(broker, [a, b])
    out: dict[str, Any] = {name: _percentiles(us) for name, us in times.items()}
    out["added_p50_us"] = out["forwarded"]["p50_us"] - out["local"]["p50_us"]
    return out


def consensus_cost(root: Path, artifacts: list[Path], model: str, n: int) -> dict[str, Any]:
    from agents import attach

    dets = [str(p) for p in artifacts]
    models = {"alone": {"detectors": dets}, "k2": {"detectors": dets, "consensus": 2}}
    broker, procs = _cluster(root, 3, 4096, models)
    try:
        a = procs[0]
        guards = {
            name: attach(
                model,
                controller=a.address,
                model_id=name,
                input_shape=(1, 28, 28),
                budget_us=2_000_000,
                connect_timeout_s=30,
                **a.agent_tls(f"probe-{name}"),
            )
            for name in ("alone", "k2")
        }
        x = _inputs(2, 2 * n + 200)
        times: dict[str, list[float]] = {"alone": [], "k2": []}
        for i in range(n + 50):
            for j, (name, g) in enumerate(guards.items()):
                t0 = time.perf_counter()
                r = g(x[2 * i + j])
                took = (time.perf_counter() - t0) * 1e6
                if i >= 50 and r.verdict != "unknown":
                    times[name].append(took)
        for g in guards.values():
            g.close()
    finally:
        _stop(broker, procs)
    return {name: _percentiles(us) for name, us in times.items()}


def _percentiles(us: list[float]) -> dict[str, int]:
    us = sorted(us)
    return {
        "n": len(us),
        "p50_us": round(statistics.median(us)) if us else 0,
        "p99_us": round(us[int(0.99 * (len(us) - 1))]) if us else 0,
    }


def throughput(
    root: Path,
    artifacts: list[Path],
    model: str,
    controllers: int,
    seconds: float,
    clients: int,
    threads: int,
) -> dict[str, Any]:
    broker, procs = _cluster(root, controllers, 64, _models(artifacts))
    try:
        a = procs[0]
        tasks = [
            (a.address, [a.agent_tls(f"load-{c}-{k}") for k in range(threads)], model, seconds, c)
            for c in range(clients)
        ]
        ctx = multiprocessing.get_context("spawn")
        t0 = time.monotonic()
        with ctx.Pool(clients) as pool:
            results = pool.map(_client, tasks)
        wall = time.monotonic() - t0
    finally:
        _stop(broker, procs)
    known = sum(r[0] for r in results)
    unknown = sum(r[1] for r in results)
    moved = sum(r[2] for r in results)
    return {
        "controllers": controllers,
        "inspected_per_s": round(known / seconds),
        "overloaded_per_s": round(unknown / seconds),
        "scored_by_neighbours": round(moved / max(known, 1), 3),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=300, help="timed calls per path (forwarded cost)")
    p.add_argument("--seconds", type=float, default=10.0, help="load per throughput run")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--threads", type=int, default=4, help="agents per client process")
    p.add_argument("--controllers", default="1,2,3")
    p.add_argument("--out", default="var/bench/overflow")
    args = p.parse_args(argv)
    from bench.procs import exit_on_signals, mosquitto_path
    from controller.training.example_model import ensure_example_model
    from controller.training.train import ensure_artifacts

    if mosquitto_path() is None:
        print(
            "bench.overflow: mosquitto is not installed (scripts/system-deps.sh)", file=sys.stderr
        )
        return 2
    exit_on_signals()
    out = Path(args.out).resolve()
    model = str(ensure_example_model(Path("var/cache")))
    artifacts = [p.resolve() for p in ensure_artifacts()]
    cost = forwarded_cost(out / "cost", artifacts, model, args.n)
    print("| path (2 items per PKG_IN) | n | p50 us | p99 us |\n|---|---|---|---|")
    for name in ("local", "forwarded"):
        c = cost[name]
        print(f"| {name} | {c['n']} | {c['p50_us']} | {c['p99_us']} |")
    print(f"\nadded by the hand-over (p50): {cost['added_p50_us']} us\n")
    k2 = consensus_cost(out / "consensus", artifacts, model, args.n)
    print(
        "| verdict (3 controllers, one input per call) | n | p50 us | p99 us |\n|---|---|---|---|"
    )
    for name, label in (("alone", "ctl-a alone"), ("k2", "2 of 3 agree (consensus: 2)")):
        c = k2[name]
        print(f"| {label} | {c['n']} | {c['p50_us']} | {c['p99_us']} |")
    print()
    print(
        "| controllers | inspected samples/s | OVERLOADED/s | scored by a neighbour |\n"
        "|---|---|---|---|"
    )
    for k in (int(v) for v in args.controllers.split(",")):
        r = throughput(
            out / f"load-{k}", artifacts, model, k, args.seconds, args.clients, args.threads
        )
        print(
            f"| {k} | {r['inspected_per_s']} | {r['overloaded_per_s']} |"
            f" {r['scored_by_neighbours']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
