"""``openexample-bench latency``: the system as users run it, against its own floors.

Scenarios (each at 1, 4, 16 and 64 concurrent agents, spread over up to four client
processes): ``bare_model`` (the model call alone), ``fast_path`` (a local ALLOW rule),
``mirror`` (a local MIRROR rule: send, don't wait), ``inspect`` (the round trip through
the controller and its detectors), and two floors measured in the same run:
``grpc_echo`` (the same gRPC stack, a server that answers at once) and ``tcp_echo``
(a raw loopback socket). Then the controller under saturation: inspected samples per
second with batching, and its CPU seconds per 1,000 inspections.

Latencies are the time the vigilance loop adds to the model call (agents), or the
round trip (floors), in microseconds, after a warm-up, in perf_analyzer's terms.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.demo import DETECTORS, start_controller
from bench.latency_workers import run_agents
from controller.training.example_model import ensure_example_model
from controller.training.train import ensure_artifacts

SCENARIOS = ("bare_model", "fast_path", "mirror", "inspect", "grpc_echo", "tcp_echo")
PERCENTILES = {"p50_us": 50, "p90_us": 90, "p95_us": 95, "p99_us": 99, "p999_us": 99.9}
MAX_PROCS = 4
BUDGET_US = 350  # the paper's; inspect is run with a long budget and scored against it


def _spread(agents: int, max_procs: int = MAX_PROCS) -> list[int]:
    procs = min(agents, max_procs)
    return [agents // procs + (i < agents % procs) for i in range(procs)]


def run_scenario(
    scenario: str,
    address: str,
    model: str,
    agents: int,
    requests: int,
    warmup: int,
    batch: int = 1,
    max_procs: int = MAX_PROCS,
) -> dict:
    ctx = mp.get_context("spawn")
    per_proc = _spread(agents, max_procs)
    start = ctx.Barrier(agents + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=run_agents,
            args=(scenario, address, model, i, k, requests, warmup, batch, start, out),
            daemon=True,
        )
        for i, k in enumerate(per_proc)
    ]
    for p in procs:
        p.start()
    start.wait(timeout=300)  # every agent connected and warmed up
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(30)
    runs = [r for _, rs in results for r in rs]
    lat = np.concatenate([r[0] for r in runs]) if runs else np.empty(0)
    t0, t1 = min(r[1] for r in runs), max(r[2] for r in runs)
    n = len(runs) * requests
    row = {"scenario": scenario, "agents": agents, "requests": n}
    if lat.size:
        row |= {k: round(float(np.percentile(lat, q)), 1) for k, q in PERCENTILES.items()}
        row["mean_us"] = round(float(lat.mean()), 1)
        row["within_budget"] = round(float(np.mean(lat <= BUDGET_US)), 4)
    row["throughput_per_s"] = round(n / (t1 - t0), 1)
    return row | {"_latencies": lat, "_window_s": t1 - t0}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _verdicts(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "openexample_controller_verdicts"
        for s in fam.samples
        if s.name.endswith("_total")
    )


def saturation(proc: object, model: str, agents: int, batch: int, samples: int) -> dict:
    before_cpu, before_n = _cpu_seconds(proc.proc.pid), _verdicts(proc.metrics_url)
    row = run_scenario("saturation", proc.address, model, agents, samples, 0, batch=batch)
    wall = row["_window_s"]  # from the common start to the last agent's end
    cpu = _cpu_seconds(proc.proc.pid) - before_cpu  # includes the agents' connect: small
    n = _verdicts(proc.metrics_url) - before_n
    return {
        "agents": agents,
        "batch": batch,
        "inspected": int(n),
        "inspected_per_s": round(n / wall, 1),
        "controller_cpu_s_per_1000": round(1000 * cpu / max(n, 1), 4),
    }


def _echo_server(kind: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_servers", kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()  # type: ignore[union-attr]
    return p, f"127.0.0.1:{line.split()[-1]}"


def markdown(results: list[dict], sat: dict | None) -> str:
    cols = ["scenario", "agents", "requests", *PERCENTILES, "throughput_per_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if sat:
        lines += [
            "",
            f"Saturation ({sat['agents']} agents, batches of {sat['batch']}):"
            f" {sat['inspected_per_s']:.0f} inspected samples/s,"
            f" {sat['controller_cpu_s_per_1000']:.3f} controller CPU s per 1,000.",
        ]
    return "\n".join(lines) + "\n"


def cdf_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        lat = r["_latencies"]
        if r["agents"] != 1 or lat.size == 0:
            continue
        xs = np.sort(lat)
        ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=r["scenario"])
    ax.axvline(BUDGET_US, color="grey", linestyle="--", label=f"budget {BUDGET_US} us")
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("OpenExample latency CDF, 1 agent")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path("var/cache")
    model = ensure_example_model(cache)
    artifacts = ensure_artifacts(DETECTORS, cache=cache)
    agents = [1, 4] if args.quick else [int(a) for a in args.agents.split(",")]
    requests = args.requests or (200 if args.quick else 2000)
    warmup = max(20, requests // 10)
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    proc = start_controller(out / "controller", artifacts, 1_000_000)
    grpc_echo, grpc_addr = _echo_server("grpc")
    tcp_echo, tcp_addr = _echo_server("tcp")
    address = {"grpc_echo": grpc_addr, "tcp_echo": tcp_addr}
    results = []
    try:
        todo = [(s, n) for s in scenarios for n in agents]
        for s, n in tqdm(todo, desc="latency", unit="run"):
            per_agent = max(requests // n, 50)
            row = run_scenario(
                s,
                address.get(s, proc.address),
                str(model),
                n,
                per_agent,
                warmup,
                max_procs=2 if args.quick else MAX_PROCS,
            )
            results.append(row)
            tqdm.write(
                f"{s:<11} agents={n:<3} p50={row.get('p50_us', 0):9.1f} us"
                f"  p99={row.get('p99_us', 0):9.1f} us  {row['throughput_per_s']:9.1f}/s"
            )
        sat = None
        if not args.no_saturation:
            sat = saturation(
                proc, str(model), 4 if args.quick else 16, 32, 256 if args.quick else 4096
            )
            tqdm.write(f"saturation: {sat}")
    finally:
        proc.stop()
        for p in (grpc_echo, tcp_echo):
            p.terminate()
            p.wait(10)
    report = {
        "schema": "openexample.bench.latency/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "budget_us": BUDGET_US,
        "detectors": list(DETECTORS),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "saturation": sat,
    }
    json_path = Path(args.json) if args.json else out / "latency.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    (out / "latency.md").write_text(markdown(report["results"], sat))
    cdf_plot(results, out / "latency_cdf.png")
    print(markdown(report["results"], sat))
    print(f"wrote {json_path}, {out / 'latency.md'}, {out / 'latency_cdf.png'}")
    return 0 if all(math.isfinite(r["throughput_per_s"]) for r in results) else 1
