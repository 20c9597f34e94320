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

Every channel is mTLS, as deployed (certificates from a development CA in the
controller's folder, ``controller/pki``; the echo servers use the same CA). What TLS
costs: ``inspect_plain``, ``inspect_tcp_plain``, ``grpc_echo_plain`` and
``tcp_echo_plain`` are the same on plain text (a second controller with ``plaintext``,
loopback; the echo servers' plain ports), and the report sets them side by side.

For ``inspect`` the report also says where each microsecond goes, the way
perf_analyzer splits queue and compute: every Result's ``stages`` (agents/results.py
``Stages``: agent before send, wire out + back, controller queue, detectors, controller
reply, agent after; the controller's part comes in PKG_OUT ``Timings``), as mean, p50
and p99 beside the total and the gRPC and TCP echo floors at the same agent count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from agents.results import STAGE_NAMES
from bench.demo import DETECTORS, start_controller
from bench.latency_workers import PLAIN, agent_id, base_scenario, serve
from bench.procs import spawn, stop_group
from controller.training.example_model import ensure_example_model
from controller.training.train import ensure_artifacts
from openexample.tls import TlsFiles

# inspect: over gRPC; inspect_tcp: the same over the native channel (tcp://); all on
# mTLS. *_plain: the same on plain text (what TLS costs).
SPLIT = ("inspect", "inspect_tcp", "grpc_echo", "tcp_echo")  # measured both ways
# Each of SPLIT right before its plain-text twin: both see the machine in the same state.
SCENARIOS = ("bare_model", "fast_path", "mirror", *(x for s in SPLIT for x in (s, s + PLAIN)))
FLOORS = ("grpc_echo", "tcp_echo")
PERCENTILES = {"p50_us": 50, "p90_us": 90, "p95_us": 95, "p99_us": 99, "p999_us": 99.9}
MAX_PROCS = 4
BUDGET_US = 350  # the paper's; inspect is run with a long budget and scored against it


# Stages fields (agents.results.STAGE_NAMES) as the breakdown names them; the first
# six add up to the total.
STAGE_LABELS = {
    "before_send": "agent: before send",
    "wire": "wire: out + back",
    "controller_queue": "controller: queue",
    "detectors": "controller: detectors",
    "controller_reply": "controller: reply",
    "after": "agent: after",
    "total": "total added",
}


def stage_summary(m: np.ndarray) -> dict:
    """Mean, p50 and p99 per stage (means add up to the total's; percentiles do not)."""
    out: dict[str, Any] = {"n": len(m)}
    if not len(m):
        return out
    for i, k in enumerate(STAGE_NAMES):
        col = m[:, i]
        p50, p99 = np.percentile(col, [50, 99])
        unit = "" if k == "batch_items" else "_us"
        out[k] = {
            f"mean{unit}": round(float(col.mean()), 1),
            f"p50{unit}": round(float(p50), 1),
            f"p99{unit}": round(float(p99), 1),
        }
    return out


def breakdown_table(summary: dict, floors: dict[str, tuple[float, float]]) -> list[str]:
    """A markdown table: each stage's mean/p50/p99, the total, then the floors
    (name -> (p50, p99)) measured in the same run."""
    lines = [
        f"| {'stage':<24} | {'mean us':>9} | {'p50 us':>9} | {'p99 us':>9} |",
        f"|{'-' * 26}|{'-' * 10}:|{'-' * 10}:|{'-' * 10}:|",
    ]
    if summary.get("n", 0):
        for k, label in STAGE_LABELS.items():
            st = summary[k]
            name = f"**{label}**" if k == "total" else label
            lines.append(
                f"| {name:<24} | {st['mean_us']:>9.1f} | {st['p50_us']:>9.1f} |"
                f" {st['p99_us']:>9.1f} |"
            )
    for name, (p50, p99) in floors.items():
        lines.append(f"| {'floor: ' + name:<24} | {'':>9} | {p50:>9.1f} | {p99:>9.1f} |")
    if summary.get("n", 0):
        b = summary["batch_items"]
        lines.append(
            f"\n{summary['n']} results; items scored together: mean {b['mean']:.1f},"
            f" p50 {b['p50']:.0f}, p99 {b['p99']:.0f}."
        )
    return lines


def plaintext(scenario: str) -> bool:
    return scenario.endswith(PLAIN)


def breakdowns(results: list[dict]) -> list[dict]:
    """Per run with stages: its summary beside the floors of the same agent count,
    measured the same way (mTLS, or plain text for a ``_plain`` run)."""
    floors = {
        (r["scenario"], r["agents"]): r for r in results if base_scenario(r["scenario"]) in FLOORS
    }
    out = []
    for r in results:
        if "stages" not in r:
            continue
        fl = {}
        suffix = PLAIN if plaintext(r["scenario"]) else ""
        for name in (f + suffix for f in FLOORS):
            f = floors.get((name, r["agents"]))
            if f is not None and "p50_us" in f:
                fl[name] = {"p50_us": f["p50_us"], "p99_us": f["p99_us"]}
        total = {"p50_us": r.get("p50_us"), "p99_us": r.get("p99_us")}
        out.append(
            {"scenario": r["scenario"], "agents": r["agents"], "latency": total}
            | {"stages": r["stages"], "floors": fl}
        )
    return out


def _spread(agents: int, max_procs: int = MAX_PROCS) -> list[int]:
    procs = min(agents, max_procs)
    return [agents // procs + (i < agents % procs) for i in range(procs)]


class WorkerPool:
    """The client processes (bench.latency_workers.serve, spawn context), started once
    and given one run after another over a pipe each. They watch this process and die
    with it; :meth:`close` (or leaving the ``with`` block) stops them."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        try:
            for _ in range(procs):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=serve, args=(theirs, os.getpid()), daemon=True)
                p.start()
                theirs.close()
                self.procs.append(p)
                self.conns.append(ours)
        except BaseException:
            self.close(0)
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(5.0 if kind is None else 0.0)  # mid-run: don't wait for the run

    def run(
        self,
        task: tuple,
        agents: int,
        tls: Callable[[str], dict[str, Any]],
        timeout_s: float = 900,
    ) -> list:
        """run_agents' ``task`` (scenario .. batch, without proc index and threads) with
        ``agents`` spread over the processes: each process's ``(index, results)``.
        ``tls``: an agent id's TLS settings (ControllerProcess.agent_tls: its certificate
        is made here, the client processes get the file paths)."""
        per_proc = _spread(agents, len(self.procs))
        conns = self.conns[: len(per_proc)]
        scenario, address, model, requests, warmup, batch = task
        for i, (c, k) in enumerate(zip(conns, per_proc, strict=True)):
            settings = {a: tls(a) for a in (agent_id(i, t) for t in range(k))}
            c.send((scenario, address, model, i, k, requests, warmup, batch, settings))
        for c in conns:  # every agent connected and warmed up
            self._reply(c, "ready", 300)
        for c in conns:
            c.send("go")
        return [self._reply(c, "done", timeout_s) for c in conns]

    @staticmethod
    def _reply(conn: Any, kind: str, timeout_s: float) -> Any:
        if not conn.poll(timeout_s):
            raise TimeoutError(f"latency worker: no {kind!r} within {timeout_s:.0f} s")
        got, value = conn.recv()  # EOFError if it died
        if got == "error":
            raise RuntimeError(f"latency worker failed:\n{value}")
        if got != kind:
            raise RuntimeError(f"latency worker: {got!r} instead of {kind!r}")
        return value

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask them to exit (idle ones do at once), then SIGTERM, then SIGKILL."""
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []


def _no_tls(agent_id: str) -> dict[str, Any]:
    return {"plaintext": True}


def run_scenario(
    scenario: str,
    address: str,
    model: str,
    agents: int,
    requests: int,
    warmup: int,
    batch: int = 1,
    max_procs: int = MAX_PROCS,
    pool: WorkerPool | None = None,
    tls: Callable[[str], dict[str, Any]] = _no_tls,
) -> dict:
    """``tls``: an agent id's TLS settings (ControllerProcess.agent_tls)."""
    if pool is None:
        with WorkerPool(len(_spread(agents, max_procs))) as own:
            return run_scenario(
                scenario, address, model, agents, requests, warmup, batch, pool=own, tls=tls
            )
    results = pool.run((scenario, address, model, requests, warmup, batch), agents, tls)
    runs = [r for _, rs in results for r in rs]
    lat = np.concatenate([r[0] for r in runs]) if runs else np.empty(0)
    t0, t1 = min(r[1] for r in runs), max(r[2] for r in runs)
    n = len(runs) * requests
    row = {"scenario": scenario, "agents": agents, "requests": n, "tls": not plaintext(scenario)}
    if lat.size:
        row |= {k: round(float(np.percentile(lat, q)), 1) for k, q in PERCENTILES.items()}
        row["mean_us"] = round(float(lat.mean()), 1)
        row["within_budget"] = round(float(np.mean(lat <= BUDGET_US)), 4)
    row["throughput_per_s"] = round(n / (t1 - t0), 1)
    staged = [r[3] for r in runs if len(r) > 3 and r[3] is not None]
    if staged:
        row["stages"] = stage_summary(np.concatenate(staged))
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def saturation(
    proc: object,
    model: str,
    agents: int,
    batch: int,
    samples: int,
    pool: WorkerPool | None = None,
    channel: str = "grpc",
) -> dict:
    """Agents in other processes send batches as fast as they can: inspected samples/s
    and controller CPU per 1,000, over ``channel`` (grpc, or tcp: the native channel)."""
    pid = proc.proc.pid  # bench.procs runs the controller in the spawned process itself
    before_cpu, before_n = _cpu_seconds(pid), _verdicts(proc.metrics_url)
    rss_before = _rss_mb(pid)
    scenario, address = ("saturation", proc.address)
    if channel == "tcp":
        scenario, address = ("saturation_tcp", proc.address_for("tcp"))
    row = run_scenario(
        scenario, address, model, agents, samples, 0, batch=batch, pool=pool, tls=proc.agent_tls
    )
    wall = row["_window_s"]  # from the common start to the last agent's end
    cpu = _cpu_seconds(pid) - before_cpu  # includes the agents' connect: small
    n = _verdicts(proc.metrics_url) - before_n
    return {
        "channel": channel,
        "tls": not proc.plaintext,
        "agents": agents,
        "batch": batch,
        "inspected": int(n),
        "inspected_per_s": round(n / wall, 1),
        "controller_cpu_s_per_1000": round(1000 * cpu / max(n, 1), 4),
        "controller_rss_mb": {"before": rss_before, "after": _rss_mb(pid)},
    }


def _echo_server(kind: str, files: TlsFiles) -> tuple[subprocess.Popen, str, str]:
    """An echo server in its own process group (bench.procs.spawn: stop_group stops it),
    on a plain port and an mTLS one (``files``): the process and both addresses."""
    tls = ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    p = spawn("bench.echo_servers", kind, *tls, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # type: ignore[union-attr]
    m = re.match(r"listening on (\d+) tls (\d+)", line)
    if not m:
        stop_group(p)
        raise RuntimeError(f"the {kind} echo server did not start: {line!r}")
    return p, f"127.0.0.1:{m[1]}", f"127.0.0.1:{m[2]}"


def tls_cost(results: Sequence[dict]) -> list[dict]:
    """Per scenario of SPLIT and agent count measured both ways: p50 and p99 on mTLS and
    on plain text, and what TLS adds."""
    rows = {(r["scenario"], r["agents"]): r for r in results if "p50_us" in r}
    out = []
    for s in SPLIT:
        for (name, agents), tls in rows.items():
            plain = rows.get((s + PLAIN, agents))
            if name != s or plain is None:
                continue
            row: dict[str, Any] = {"scenario": s, "agents": agents}
            for q in ("p50_us", "p99_us"):
                added = round(tls[q] - plain[q], 1)
                row[q] = {"tls": tls[q], "plaintext": plain[q], "added": added}
            out.append(row)
    return out


def tls_cost_table(cost: Sequence[dict]) -> list[str]:
    lines = [
        "| scenario | agents | p50 mTLS | p50 plain | TLS adds | p99 mTLS | p99 plain | TLS adds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cost:
        p50, p99 = c["p50_us"], c["p99_us"]
        lines.append(
            f"| {c['scenario']} | {c['agents']} | {p50['tls']} | {p50['plaintext']} |"
            f" {p50['added']:+.1f} | {p99['tls']} | {p99['plaintext']} | {p99['added']:+.1f} |"
        )
    return lines


def markdown(
    results: list[dict],
    sats: Sequence[dict],
    breakdown: Sequence[dict] = (),
    tls: str = "",
    cost: Sequence[dict] = (),
) -> str:
    """``tls``: a line saying how the channels were secured; ``cost``: tls_cost()."""
    cols = ["scenario", "agents", "requests", *PERCENTILES, "throughput_per_s"]
    lines = [tls, ""] if tls else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if cost:
        lines += ["", "What TLS costs (us; mTLS minus plain text, same run):", ""]
        lines += tls_cost_table(cost)
    for b in breakdown:
        floors = {k: (v["p50_us"], v["p99_us"]) for k, v in b["floors"].items()}
        lines += [
            "",
            f"Where the time goes: {b['scenario']}, {b['agents']} agent(s)"
            " (wire = round trip - controller time; out and back need synchronized clocks"
            " to tell apart):",
            "",
            *breakdown_table(b["stages"], floors),
        ]
    for sat in sats:
        rss = sat.get("controller_rss_mb", {})
        lines += [
            "",
            f"Saturation over {sat.get('channel', 'grpc')}{' (mTLS)' if sat.get('tls') else ''}"
            f" ({sat['agents']} agents, batches of"
            f" {sat['batch']}): {sat['inspected_per_s']:.0f} inspected samples/s,"
            f" {sat['controller_cpu_s_per_1000']:.3f} controller CPU s per 1,000; controller"
            f" RSS {rss.get('before')} -> {rss.get('after')} MB.",
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
    _save(fig, ax, path, "latency (us, log)", "fraction of requests", "latency CDF, 1 agent")


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"OpenExample {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def agent_memory(proc: object, model: str, seconds: float) -> dict:
    """bench.agent_memory in its own process over the native channel: the RSS an agent
    adds to the user's process, and the agent's and the controller's growth meanwhile
    (with TLS as the controller has it: the certificate's paths are its arguments)."""
    tls = proc.agent_tls("bench-memory")
    tls_args = ["--plaintext"] if tls.get("plaintext") else []
    for k in ("tls_ca", "tls_cert", "tls_key"):
        if k in tls:
            tls_args += ["--" + k.replace("_", "-"), tls[k]]
    p = spawn(
        "bench.agent_memory",
        proc.address_for("tcp"),
        model,
        *tls_args,
        "--seconds",
        str(seconds),
        "--every",
        str(max(seconds / 10, 0.5)),
        "--controller-pid",
        str(proc.proc.pid),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = p.communicate(timeout=seconds + 120)
    finally:
        stop_group(p)
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"bench.agent_memory failed (exit {p.returncode})")
    return json.loads(lines[-1])


def load_plot(results: list[dict], path: Path) -> None:
    """Throughput against p99 as agents are added, per INSPECT channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = {"inspect": "gRPC", "inspect_tcp": "native tcp"}
    for scenario in ("inspect", "inspect_tcp", "inspect" + PLAIN, "inspect_tcp" + PLAIN):
        rows = sorted(
            (r for r in results if r["scenario"] == scenario and "p99_us" in r),
            key=lambda r: r["agents"],
        )
        if not rows:
            continue
        xs, ys = [r["throughput_per_s"] for r in rows], [r["p99_us"] for r in rows]
        label = names[base_scenario(scenario)] + (", plain" if plaintext(scenario) else ", mTLS")
        style = "--" if plaintext(scenario) else "-"
        ax.plot(xs, ys, marker="o", linestyle=style, label=label)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['agents']}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.axhline(BUDGET_US, color="grey", linestyle="--", label=f"budget {BUDGET_US} us")
    ax.set_yscale("log")
    xlabel, ylabel = "inspected calls/s (all agents)", "p99 added latency (us, log)"
    _save(fig, ax, path, xlabel, ylabel, "INSPECT p99 as load rises (labels: agents)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path("var/cache")
    own = Path(args.model).resolve() if getattr(args, "model", None) else None
    # --model: the user's own model (mnist5k-shaped, checked by bench.cli.preflight), with
    # the detectors trained for it
    model = own or ensure_example_model(cache)
    artifacts = ensure_artifacts(DETECTORS, cache=cache, model=own)
    agents = [1, 4] if args.quick else [int(a) for a in args.agents.split(",")]
    requests = args.requests or (200 if args.quick else 2000)
    warmup = max(20, requests // 10)
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    results = []
    # Every process of the run, stopped in this order however it ends (SIGTERM and
    # SIGHUP raise SystemExit: bench.procs.exit_on_signals). The client processes come
    # first: their imports overlap the controller's start.
    pool = WorkerPool(2 if args.quick else MAX_PROCS)
    stops: list[Callable[[], object]] = [pool.close]
    try:
        # mTLS, as deployed: certificates from a development CA in controller/pki.
        proc = start_controller(
            out / "controller", artifacts, 1_000_000, native=["tcp://127.0.0.1:0"]
        )
        stops.append(proc.stop)
        tls_note = (
            f"Channels: mTLS (certificates from a development CA in {proc.pki.folder}); the"
            f" `{PLAIN}` scenarios on plain text (a second controller, loopback)."
        )
        tqdm.write(tls_note)
        echo_files = proc.pki.ensure(["controller/echo-floor"]).files("controller/echo-floor")
        grpc_echo, grpc_addr, grpc_tls_addr = _echo_server("grpc", echo_files)
        stops.append(lambda: stop_group(grpc_echo))
        tcp_echo, tcp_addr, tcp_tls_addr = _echo_server("tcp", echo_files)
        stops.append(lambda: stop_group(tcp_echo))
        plain = None  # the plain-text twin, only if a *_plain scenario is asked for
        if any(plaintext(s) for s in scenarios):
            plain = start_controller(
                out / "controller-plaintext",
                artifacts,
                1_000_000,
                native=["tcp://127.0.0.1:0"],
                plaintext=True,
            )
            stops.append(plain.stop)
        address = {
            "grpc_echo": grpc_tls_addr,
            "tcp_echo": tcp_tls_addr,
            "grpc_echo" + PLAIN: grpc_addr,
            "tcp_echo" + PLAIN: tcp_addr,
            "inspect_tcp": proc.address_for("tcp"),
        }
        if plain is not None:
            address |= {"inspect" + PLAIN: plain.address}
            address |= {"inspect_tcp" + PLAIN: plain.address_for("tcp")}
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
                pool=pool,
                tls=_no_tls if plaintext(s) else proc.agent_tls,  # echo: any agent's will do
            )
            results.append(row)
            tqdm.write(
                f"{s:<17} agents={n:<3} p50={row.get('p50_us', 0):9.1f} us"
                f"  p99={row.get('p99_us', 0):9.1f} us  {row['throughput_per_s']:9.1f}/s"
            )
            if row.get("stages", {}).get("n"):
                tqdm.write(
                    "                  p50 by stage: "
                    + "  ".join(f"{k}={row['stages'][k]['p50_us']:.0f}" for k in STAGE_LABELS)
                )
        sat = sat_native = memory = None
        if not args.no_saturation:
            sat_agents = 4 if args.quick else 16
            sat_samples = 256 if args.quick else 4096
            sat = saturation(proc, str(model), sat_agents, 32, sat_samples, pool)
            tqdm.write(f"saturation: {sat}")
            sat_native = saturation(
                proc, str(model), sat_agents, 32, sat_samples, pool, channel="tcp"
            )
            tqdm.write(f"saturation (native): {sat_native}")
        soak = args.soak_s if args.soak_s is not None else (2.0 if args.quick else 5.0)
        if soak > 0:
            memory = agent_memory(proc, str(model), soak)
            tqdm.write(f"memory: { ({k: v for k, v in memory.items() if k != 'samples_mb'}) }")
    except BaseException:
        pool.close(0.0)  # stopped mid-run: don't wait for the run to end
        raise
    finally:
        for stop in stops:
            stop()
    report = {
        "schema": "openexample.bench.latency/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "budget_us": BUDGET_US,
        "model": {"path": str(model), "example": own is None},
        "detectors": list(DETECTORS),
        "results": [
            {k: v for k, v in r.items() if not k.startswith("_") and k != "stages"} for r in results
        ],
        "tls": {
            "channels": "mTLS",
            "pki": str(proc.pki.folder),
            "plaintext_scenarios": [s for s in scenarios if plaintext(s)],
        },
        "tls_cost": tls_cost(results),
        "breakdown": breakdowns(results),
        "saturation": sat,
        "saturation_native": sat_native,
        "memory": memory,
    }
    json_path = Path(args.json) if args.json else out / "latency.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    sats = [x for x in (sat, sat_native) if x]
    md = markdown(report["results"], sats, report["breakdown"], tls_note, report["tls_cost"])
    if memory:
        md += (
            f"\nMemory: an attached agent adds {memory['agent_added_mb']} MB to the user's"
            f" process; over {memory['seconds']:.0f} s of INSPECT ({memory['calls']} calls) the"
            f" agent grew {memory['agent_growth_mb']} MB and the controller"
            f" {memory['controller_growth_mb']} MB.\n"
        )
    if own is not None:
        md += f"\nModel: {own} (the user's own), with the detectors trained for it.\n"
    (out / "latency.md").write_text(md)
    cdf_plot(results, out / "latency_cdf.png")
    load_plot(results, out / "latency_load.png")
    print(md)
    print(
        f"wrote {json_path}, {out / 'latency.md'}, {out / 'latency_cdf.png'},"
        f" {out / 'latency_load.png'}"
    )
    return 0 if all(math.isfinite(r["throughput_per_s"]) for r in results) else 1
